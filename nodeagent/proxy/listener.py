"""The accept loop shared by the node proxy's listeners (outbound :15001, tunnel :15008).

Accepting is our own ``add_reader`` + non-blocking ``accept()`` loop on a socket the
agent made, not ``loop.create_server``: the outbound listener needs the accepted
``socket.socket`` itself (its peer address keys the original-destination lookup) and a
refused connection never becomes a transport; the tunnel hands each socket to
``connect_accepted_socket(ssl=...)`` so handshake failures reach it.  Both also want
"stop accepting" to be one ``remove_reader``, accepts batched like asyncio's own
server, and a pause instead of a spin when the process runs out of descriptors.

Subclasses implement `_admit` (decide about one accepted socket, usually by `_spawn`-ing
a task for it); `serve` and `close` (drain with a grace period, then cancel) are here.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodeagent.proxy.hold import ReadyHold

log = logging.getLogger("weft.proxy")

Address = tuple[str, int]
"""An (ip, port) pair; IPv4-mapped IPv6 addresses are reported in their IPv4 form."""

# Accept at most this many connections per readiness event, so a connect storm cannot
# starve the connections already being relayed.
_ACCEPT_BATCH = 128
# Out of file descriptors or buffers: back off instead of spinning on a readable socket.
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint(sockaddr: Any) -> Address:
    """(host, port) from a socket address, in a canonical text form for comparisons."""
    host, port = str(sockaddr[0]), int(sockaddr[1])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def set_nodelay(sock: socket.socket) -> None:
    """asyncio sets TCP_NODELAY only when ``sock.proto`` is IPPROTO_TCP, and sockets made
    as ``socket(AF_INET, SOCK_STREAM)`` (or accepted from one) report proto 0: without
    this, Nagle delays small writes by ~40 ms."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def reset_socket(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): to an app, a FIN right after a successful connect
    looks like a server that answered nothing; a reset says the connection failed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # the client is already gone; close() still frees the descriptor
    sock.close()


class Listener:
    """Accepts on one listening socket and tracks one task per admitted connection."""

    def __init__(self, kind: str, hold: ReadyHold | None = None) -> None:
        self._kind = kind
        """``outbound`` or ``tunnel``: the prefix of every log line."""
        self.hold = hold
        """Parks accepted connections until the agent is ready (None: admit at once)."""
        self._listener: socket.socket | None = None
        self._listen_address: Address | None = None
        self._serving: asyncio.Future[None] | None = None
        self._accept_backoff: asyncio.TimerHandle | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    # --- for subclasses -----------------------------------------------------------------

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        raise NotImplementedError

    def _before_accepting(self) -> str:
        """Runs once before the first accept (fail early here); returns a log suffix."""
        return ""

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    # --- public -------------------------------------------------------------------------

    async def serve(self, sock: socket.socket) -> None:
        """Accept on the listening ``sock`` until `close`, then return.

        Takes ownership of ``sock``: it is closed when accepting stops. Raises if
        accepting fails in a way retrying cannot fix, so the caller's task guard sees it.
        """
        if self._listener is not None:
            raise RuntimeError(f"{type(self).__name__}.serve() may only be called once")
        if self._closing:
            sock.close()  # close() came first; honour it rather than start accepting
            return
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._listener = sock
        self._listen_address = endpoint(sock.getsockname())
        self._serving = loop.create_future()
        detail = self._before_accepting()
        loop.add_reader(sock, self._accept_ready)
        log.info("%s: accepting on %s%s", self._kind, format_address(self._listen_address), detail)
        try:
            await self._serving
        finally:
            self._stop_accepting()

    async def close(self, grace: float) -> None:
        """Stop accepting, let active connections finish for ``grace`` seconds, then
        reset the rest. Returns once every connection is closed."""
        self._stop_accepting()
        active = set(self._tasks)
        if not active:
            return
        log.info("%s: draining %d connections for up to %gs", self._kind, len(active), grace)
        _, stragglers = await asyncio.wait(active, timeout=grace)
        for task in stragglers:
            task.cancel()
        if stragglers:
            await asyncio.wait(stragglers)
        log.info(
            "%s: closed; %d connections finished within %gs, %d were reset",
            self._kind,
            len(active) - len(stragglers),
            grace,
            len(stragglers),
        )

    # --- accepting ----------------------------------------------------------------------

    def _stop_accepting(self, error: OSError | None = None) -> None:
        self._closing = True
        if self.hold is not None:
            self.hold.close()
        if self._accept_backoff is not None:
            self._accept_backoff.cancel()
            self._accept_backoff = None
        if self._listener is not None and self._listener.fileno() != -1:
            asyncio.get_running_loop().remove_reader(self._listener)
            # Closing, not just ignoring, the socket: connections still in the backlog
            # are reset now instead of hanging until their clients time out.
            self._listener.close()
        if self._serving is not None and not self._serving.done():
            if error is None:
                self._serving.set_result(None)
            else:
                self._serving.set_exception(error)

    def _accept_ready(self) -> None:
        assert self._listener is not None  # only registered while listening
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while in the backlog
            except OSError as exc:
                self._accept_failed(exc)
                return
            try:
                if self.hold is None:
                    self._admit(conn, peer)
                else:
                    self.hold.take(conn, peer, self._admit)
            except Exception:
                # A bug here must cost one connection, not the listener.
                log.exception("%s: handling a connection from %s failed", self._kind, peer)
                reset_socket(conn)

    def _accept_failed(self, exc: OSError) -> None:
        assert self._listener is not None and self._listen_address is not None
        loop = asyncio.get_running_loop()
        where = format_address(self._listen_address)
        if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
            log.error(
                "%s: accept on %s failed (%s); pausing accepts for %gs "
                "(out of file descriptors? raise the agent's `ulimit -n`)",
                self._kind,
                where,
                exc,
                _ACCEPT_BACKOFF,
            )
            loop.remove_reader(self._listener)
            self._accept_backoff = loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting)
            return
        log.error("%s: accept on %s failed (%s); no longer accepting", self._kind, where, exc)
        self._stop_accepting(exc)

    def _resume_accepting(self) -> None:
        self._accept_backoff = None
        if not self._closing and self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener, self._accept_ready)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: crashed", task.get_name(), exc_info=exc)
