"""The node proxy's outbound listener (port 15001): accept, find where to, relay.

eBPF redirects a captured pod's ``connect()`` to this listener and records where the pod
meant to go. For each accepted connection the proxy asks the injected
``original_destination`` lookup, refuses what it cannot or must not serve, opens the
upstream through the injected ``connect`` seam and joins the two with a `Relay`.

Design choices:

* Accepting is our own ``add_reader`` + non-blocking ``accept()`` loop on the agent's
  socket, not ``loop.create_server``. The lookup needs the accepted ``socket.socket``
  itself (``getsockopt``/the connection's tuple), while transports only expose a wrapper
  (asyncio's ``TransportSocket``, uvloop's ``PseudoSocket``); and a refused connection
  never becomes a transport at all. It also makes "stop accepting" one
  ``remove_reader``, and it batches accepts like asyncio's own server.
* Refusals reset (``SO_LINGER`` 0) instead of closing: to the app a FIN right after a
  successful connect looks like a server that answered with nothing; a reset says the
  connection failed, and app retry logic treats it that way.
* The upstream leg is a seam (`UpstreamConnector`): plaintext ``create_connection``
  today, the mTLS tunnel later. The connect timeout wraps whatever is plugged in, and
  the seam gets the client address because the tunnel must present the client
  workload's identity.
* While the upstream connects, the client is not read (see `Relay`): its bytes wait in
  the kernel, where TCP pushes back on the app, not in our memory.
* One task per relayed connection runs connect-then-relay; `close` waits on those tasks
  until the grace deadline and cancels the rest, and cancellation resets both legs.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nodeagent.proxy.relay import Relay

log = logging.getLogger("weft.proxy")

Address = tuple[str, int]
"""An (ip, port) pair; IPv4-mapped IPv6 addresses are reported in their IPv4 form."""

OriginalDestination = Callable[[socket.socket], Address | None]
"""Where the accepted connection was originally headed, or None if it was not captured."""

IsSelf = Callable[[str, int], bool]
"""Whether (ip, port) is one of this proxy's own listeners (inbound, admin, ...)."""

# Accept at most this many connections per readiness event, so a connect storm cannot
# starve the connections already being relayed.
_ACCEPT_BATCH = 128
# Out of file descriptors or buffers: back off instead of spinning on a readable socket.
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)


class UpstreamConnector(Protocol):
    """Opens the upstream leg of one outbound connection.

    Connect to ``destination`` (for ``client``), attach a protocol made by
    ``protocol_factory`` to the new transport, and return that transport once the
    protocol's ``connection_made`` has run; raise on failure. The proxy applies
    `OutboundConfig.connect_timeout` around the call and cancels it on timeout or shutdown.
    ``loop.create_connection(protocol_factory, *destination)`` is the plaintext version.
    """

    def __call__(
        self,
        client: Address,
        destination: Address,
        protocol_factory: Callable[[], asyncio.Protocol],
        /,
    ) -> Awaitable[asyncio.BaseTransport]: ...


async def connect_plaintext(
    client: Address,
    destination: Address,
    protocol_factory: Callable[[], asyncio.Protocol],
) -> asyncio.BaseTransport:
    """Plain TCP straight to the original destination (until the mTLS tunnel lands)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(protocol_factory, *destination)
    return transport


@dataclass(frozen=True)
class OutboundConfig:
    """Tuning of the outbound listener; the defaults suit a node proxy."""

    connect_timeout: float = 5.0
    """Seconds allowed to open the upstream leg before the client is reset."""

    idle_timeout: float = 3600.0
    """Seconds without a byte either way after which a connection is closed."""

    high_water: int = 256 * 1024
    """Bytes buffered towards one side above which the other side is no longer read."""

    low_water: int = 64 * 1024
    """Bytes buffered towards one side below which reading the other side resumes."""

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError(
                f"connect_timeout and idle_timeout must be positive, got "
                f"{self.connect_timeout} and {self.idle_timeout}"
            )
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError(
                f"need 0 <= low_water <= high_water, got low_water={self.low_water}, "
                f"high_water={self.high_water}"
            )


@dataclass
class ProxyStats:
    """Counters of the outbound listener, for /debug/state and metrics."""

    accepted: int = 0
    """Connections accepted, refused ones included."""

    active: int = 0
    """Connections connecting upstream or relaying right now."""

    refused_unknown: int = 0
    """Refused: the lookup had no original destination (not captured by this node)."""

    refused_loop: int = 0
    """Refused: the original destination is this proxy itself."""

    upstream_failed: int = 0
    """The upstream connect failed or timed out; the client was reset."""

    bytes_out: int = 0
    """Bytes relayed from clients to upstreams."""

    bytes_in: int = 0
    """Bytes relayed from upstreams to clients."""


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint(sockaddr: Any) -> Address:
    """(host, port) from a socket address, in a canonical text form for comparisons."""
    host, port = str(sockaddr[0]), int(sockaddr[1])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def _reset_socket(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # the client is already gone; close() still frees the descriptor
    sock.close()


class OutboundProxy:
    """Relays captured connections to their original destinations.

    ``original_destination`` is called with each accepted socket; ``is_self`` says which
    addresses are this proxy's other listeners (the outbound listener itself is always
    recognised); ``connect`` opens upstream legs (default: plaintext TCP).
    """

    def __init__(
        self,
        *,
        original_destination: OriginalDestination,
        is_self: IsSelf,
        connect: UpstreamConnector = connect_plaintext,
        config: OutboundConfig | None = None,
    ) -> None:
        self.config = config or OutboundConfig()
        self.stats = ProxyStats()
        self._original_destination = original_destination
        self._is_self = is_self
        self._connect = connect
        self._listener: socket.socket | None = None
        self._listen_address: Address | None = None
        self._serving: asyncio.Future[None] | None = None
        self._accept_backoff: asyncio.TimerHandle | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        """Accept on the listening ``sock`` until `close`, then return.

        Takes ownership of ``sock``: it is closed when accepting stops. Raises if
        accepting fails in a way retrying cannot fix, so the caller's task guard sees it.
        """
        if self._listener is not None:
            raise RuntimeError("OutboundProxy.serve() may only be called once")
        if self._closing:
            sock.close()  # close() came first; honour it rather than start accepting
            return
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._listener = sock
        self._listen_address = _endpoint(sock.getsockname())
        self._serving = loop.create_future()
        loop.add_reader(sock, self._accept_ready)
        log.info("outbound: accepting on %s", format_address(self._listen_address))
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
        log.info("outbound: draining %d connections for up to %gs", len(active), grace)
        _, stragglers = await asyncio.wait(active, timeout=grace)
        for task in stragglers:
            task.cancel()
        if stragglers:
            await asyncio.wait(stragglers)
        log.info(
            "outbound: closed; %d connections finished within %gs, %d were reset",
            len(active) - len(stragglers),
            grace,
            len(stragglers),
        )

    # --- accepting --------------------------------------------------------------------

    def _stop_accepting(self, error: OSError | None = None) -> None:
        self._closing = True
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
                self._admit(conn, peer)
            except Exception:
                # A bug here must cost one connection, not the listener.
                log.exception("outbound: handling a connection from %s failed", peer)
                _reset_socket(conn)

    def _accept_failed(self, exc: OSError) -> None:
        assert self._listener is not None and self._listen_address is not None
        loop = asyncio.get_running_loop()
        where = format_address(self._listen_address)
        if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
            log.error(
                "outbound: accept on %s failed (%s); pausing accepts for %gs "
                "(out of file descriptors? raise the agent's `ulimit -n`)",
                where,
                exc,
                _ACCEPT_BACKOFF,
            )
            loop.remove_reader(self._listener)
            self._accept_backoff = loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting)
            return
        log.error("outbound: accept on %s failed (%s); no longer accepting", where, exc)
        self._stop_accepting(exc)

    def _resume_accepting(self) -> None:
        self._accept_backoff = None
        if not self._closing and self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener, self._accept_ready)

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        self.stats.accepted += 1
        client = _endpoint(peer)
        # asyncio sets TCP_NODELAY only when sock.proto is IPPROTO_TCP, and accepted
        # sockets report proto 0: without this, Nagle delays small writes by ~40 ms.
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            found = self._original_destination(conn)
        except Exception:
            log.exception(
                "original-destination lookup failed for %s; refusing", format_address(client)
            )
            found = None
        if found is None:
            self.stats.refused_unknown += 1
            log.warning(
                "no original destination for %s; refusing (is it captured by this node's eBPF?)",
                format_address(client),
            )
            _reset_socket(conn)
            return
        destination = _endpoint(found)
        label = f"{format_address(client)} -> {format_address(destination)}"
        if self._is_loop(destination, conn):
            self.stats.refused_loop += 1
            log.warning(
                "outbound %s: the destination is this proxy itself; refusing the loop "
                "(did the app connect to the proxy port directly, or is the proxy's own "
                "cgroup captured?)",
                label,
            )
            _reset_socket(conn)
            return
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(
            self._run(conn, client, destination, label), name=f"weft.proxy.outbound {label}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _is_loop(self, destination: Address, conn: socket.socket) -> bool:
        listen = self._listen_address
        assert listen is not None
        if destination == listen:
            return True
        try:
            # With a wildcard listener this is the concrete address the client reached.
            if destination == _endpoint(conn.getsockname()):
                return True
        except OSError:
            pass
        if ipaddress.ip_address(listen[0]).is_unspecified and destination[1] == listen[1]:
            try:
                dest_ip = ipaddress.ip_address(destination[0])
            except ValueError:
                dest_ip = None
            if dest_ip is not None and (dest_ip.is_loopback or dest_ip.is_unspecified):
                return True  # what a wildcard listener answers on without is_self knowing
        return self._is_self(*destination)

    # --- one connection ---------------------------------------------------------------

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("outbound %s: crashed", task.get_name(), exc_info=exc)

    async def _run(
        self, conn: socket.socket, client: Address, destination: Address, label: str
    ) -> None:
        relay = Relay(
            label=f"outbound {label}",
            high_water=self.config.high_water,
            low_water=self.config.low_water,
            idle_timeout=self.config.idle_timeout,
            meter=self.stats,
        )
        self.stats.active += 1
        try:
            await self._connect_and_relay(relay, conn, client, destination)
        except asyncio.CancelledError:
            state = "relaying" if relay.connected else "connecting"
            log.info("outbound %s: still %s at the shutdown deadline; resetting", label, state)
            relay.abort("proxy shut down")
            await relay.wait_closed()
            raise
        finally:
            self.stats.active -= 1

    async def _connect_and_relay(
        self, relay: Relay, conn: socket.socket, client: Address, destination: Address
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: relay.client, conn)
        except OSError as exc:
            # Only if the client vanished while being wrapped; the transport closes it.
            log.info("%s: client connection unusable (%s)", relay.label, exc)
            return
        timeout = self.config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._connect(client, destination, lambda: relay.upstream)
            if not relay.connected:
                raise RuntimeError(
                    "the upstream connector returned without attaching the relay's protocol"
                )
        except Exception as exc:  # any failure of the pluggable seam fails this connection
            self.stats.upstream_failed += 1
            expected = isinstance(exc, (OSError, TimeoutError))
            why = (
                f"timed out after {timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.warning(
                "%s: upstream connect failed (%s); resetting the client",
                relay.label,
                why,
                exc_info=None if expected else exc,
            )
            relay.abort(f"upstream connect failed ({why})")
            await relay.wait_closed()
            return
        log.debug("%s: relaying", relay.label)
        await relay.wait_closed()
        log.debug(
            "%s: closed (%s); %d bytes out, %d bytes in",
            relay.label,
            relay.close_reason,
            relay.bytes_out,
            relay.bytes_in,
        )
