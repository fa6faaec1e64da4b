"""The tunnel client: a pool of multiplexed tunnel connections to other nodes, and one
stream per proxied connection.

**Pooling.** Connections are keyed by (source identity, destination node, destination
identity): a connection presents one source certificate and has verified one
destination identity, so it is never used for any other pair. `TunnelClient.connect`
takes the first usable connection of its key (open, not draining, below its stream
limit, made with the source's current certificate), else waits for the one being
dialled, else dials one. Only one dial per key is in flight: two hundred connections
opened at once to one peer make two connections (at 100 streams each), not two
hundred handshakes. A dial runs in its own task, so a caller that gives up (its app
went away) does not fail the others waiting for it.

**Certificate rotation.** A connection remembers the SSL context (the certificate) it
was made with. When the source's certificate is rotated, `connect` retires the old
connections of that source (no new streams; they close when their last stream ends)
and dials with the new one. A server whose own certificate was rotated, or that is
shutting down, sends GOAWAY with the same effect. Each connection is reset when the
server's certificate it verified expires.

**Idle connections** close after ``idle_timeout`` without a stream.

**Retries.** A stream the server refuses *unprocessed* (RESET REFUSED: its limit, or
it is going away) is retried on another connection, up to three times; nothing reached
a pod. Every other failure is raised as a `TunnelError` saying whether another endpoint
may succeed (``retryable``), for the agent's failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.proxy import tls
from nodeagent.proxy.admission import Admission, Overloaded
from nodeagent.proxy.listener import Address, format_address, set_nodelay
from nodeagent.proxy.outbound import UpstreamConnector
from nodeagent.proxy.relay import reset_transport
from nodeagent.proxy.tunnel.config import TunnelClientConfig, TunnelClientStats
from nodeagent.proxy.tunnel.errors import (
    REFUSAL_HINTS,
    TunnelError,
    TunnelHandshakeError,
    TunnelImpersonation,
    TunnelLost,
    TunnelNoRoute,
    TunnelOverloaded,
    TunnelProtocolError,
    TunnelRefused,
    TunnelSetupError,
    TunnelStreamRefused,
    TunnelTimeout,
    TunnelUnreachable,
    describe,
)
from nodeagent.proxy.tunnel.session import Session, Stream, StreamLost
from nodeagent.proxy.tunnel.wire import (
    Extensions,
    HeaderError,
    Invalid,
    Reset,
    Status,
    encode_open_payload,
)
from weft.identity import SpiffeId

log = logging.getLogger("weft.proxy.tunnel")

_STREAM_TRIES = 3

CURRENT_RECHECK = 1.0
"""Seconds a pooled connection's certificate check (`TunnelClient.current`) holds."""


@dataclass(frozen=True)
class TunnelRoute:
    """How to reach a destination through a tunnel (from discovery)."""

    source: SpiffeId
    """The identity of the pod that opened the connection: the certificate presented."""
    node: Address
    """The destination node's tunnel address (its node IP, port 15008)."""
    expected: SpiffeId
    """The identity the destination endpoint must prove."""


RouteLookup = Callable[[Address, Address], TunnelRoute | None]
"""(app client address, original destination) -> the tunnel to use, None if none."""

PoolKey = tuple[SpiffeId, Address, SpiffeId]
"""(source identity, destination node, destination identity)."""


@dataclass
class _Peer:
    """The pooled connections of one `PoolKey`."""

    sessions: list[Session] = field(default_factory=list)
    dialing: asyncio.Task[Session] | None = None


class TunnelClient:
    """Opens streams to other nodes' tunnel servers over pooled connections.

    `connect` is usable as the outbound proxy's `UpstreamConnector` through
    `tunnel_connector`, which adds the lookup of source and destination identities.
    """

    def __init__(
        self, contexts: tls.TlsContexts, *, config: TunnelClientConfig | None = None
    ) -> None:
        self.config = config or TunnelClientConfig()
        self.stats = TunnelClientStats()
        self.admission = Admission(
            self.config.max_handshakes,
            max_queued=self.config.handshake_queue,
            queue_timeout=self.config.handshake_queue_timeout,
            # One workload may hold a quarter of the queue: the rest stays for the others.
            max_queued_per_key=max(64, self.config.handshake_queue // 4),
        )
        self._tls = contexts
        self._settings = self.config.settings()
        self._peers: dict[PoolKey, _Peer] = {}
        self._closed = False

    # --- state --------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Pooled tunnel connections open now."""
        return sum(len(p.sessions) for p in self._peers.values())

    @property
    def open_streams(self) -> int:
        return sum(s.open_streams for p in self._peers.values() for s in p.sessions)

    def pool_state(self) -> list[dict[str, Any]]:
        """The pool, for /debug/state: one entry per key, one row per connection."""
        now = asyncio.get_running_loop().time()
        return [
            {
                "source": str(source),
                "node": format_address(node),
                "destination": str(expected),
                "dialing": peer.dialing is not None,
                "connections": [
                    {
                        "streams": s.open_streams,
                        "streams_opened": s.streams_opened,
                        "draining": s.draining,
                        "idle_seconds": round(now - s.idle_since, 1)
                        if s.idle_since is not None
                        else 0.0,
                        "bytes_sent": s.sent_bytes,
                        "bytes_received": s.received_bytes,
                        "tls_version": _tls(s, "version"),
                        "cipher": _tls(s, "cipher"),
                    }
                    for s in peer.sessions
                ],
            }
            for (source, node, expected), peer in self._peers.items()
        ]

    # --- connecting ---------------------------------------------------------------------

    async def connect(
        self,
        source: SpiffeId,
        dest_node: Address,
        target: Address,
        expected: SpiffeId,
        protocol_factory: Callable[[], asyncio.Protocol],
        extensions: Extensions = (),
    ) -> Stream:
        """Open a stream to ``target`` via the tunnel server at ``dest_node``,
        presenting ``source``'s certificate and requiring the server to be
        ``expected``; ``extensions`` go into the OPEN (the protocol hint). Returns
        the `Stream`, whose protocol, made by ``protocol_factory``, has seen
        ``connection_made``. Raises a `TunnelError` subclass naming the failure;
        cancelling it resets the stream it opened."""
        self.stats.attempts += 1
        what = (
            f"tunnel from {source} to {format_address(target)} ({expected}) via "
            f"{format_address(dest_node)}"
        )
        try:
            try:
                payload = encode_open_payload(target, extensions)
            except HeaderError as exc:
                raise TunnelSetupError(f"{what}: {exc}") from None
            key = (source, dest_node, expected)
            for _ in range(_STREAM_TRIES):
                context = self._context(source, what)
                session, fresh = await self._session(key, context, what)
                stream = session.open(payload)
                result = await self._answer(stream, what)
                if isinstance(result, StreamLost):
                    if result.reason == Reset.REFUSED:
                        # Unprocessed: the server is at its limit or going away.
                        session.draining = True
                        self.stats.stream_retries += 1
                        continue
                    raise TunnelLost(f"{what}: {result} before the answer")
                if isinstance(result, Invalid):
                    stream.abort()
                    raise TunnelProtocolError(f"{what}: malformed answer: {result.detail}")
                if not result.ok:
                    stream.discard()
                    status = result.status
                    name = status.name if status is not None else f"code {result.code:#04x}"
                    hint = (
                        REFUSAL_HINTS.get(status, "")
                        if status is not None
                        else "a code from a newer node agent"
                    )
                    raise TunnelRefused(f"{what}: refused {name}: {hint}", result.code)
                stream.attach(protocol_factory())
                self.stats.opened += 1
                if not fresh:
                    self.stats.reused += 1
                return stream
            raise TunnelStreamRefused(
                f"{what}: the node refused the stream on {_STREAM_TRIES} connections "
                "(it is at its stream limit or shutting down)"
            )
        except TunnelError as exc:
            setattr(self.stats, exc.stat, getattr(self.stats, exc.stat) + 1)
            raise

    async def _answer(self, stream: Stream, what: str) -> Any:
        assert stream.answer is not None
        try:
            async with asyncio.timeout(self.config.answer_timeout):
                return await stream.answer
        except TimeoutError:
            stream.abort()
            raise TunnelTimeout(
                f"{what}: no answer within {self.config.answer_timeout:g}s after OPEN", "answer"
            ) from None
        except BaseException:
            stream.abort()  # cancelled: the app went away
            raise

    def _context(self, source: SpiffeId, what: str) -> ssl.SSLContext:
        try:
            context = self._tls.client_context(source)
        except tls.TlsMaterialError as exc:
            raise TunnelSetupError(f"{what}: {exc}") from None
        if context is None:
            raise TunnelSetupError(
                f"{what}: this node has no certificate for {source} (not issued yet, or no "
                "pod of that identity here)"
            )
        return context

    def current(self, stream: Stream, source: SpiffeId) -> bool:
        """Whether a new request may still go over an open ``stream`` (a pooled HTTP
        connection): its tunnel connection is not draining (GOAWAY, or retired) and was
        made with ``source``'s current certificate. A connection made with a rotated
        certificate is retired here as `connect` would, so requests move to a new one
        while the old one's streams finish. The certificate is looked up at most every
        `CURRENT_RECHECK` seconds per connection (requests after a rotation move within
        that time); draining is checked on every call."""
        session = stream.session
        if session.draining or session.closed.done() or stream.finished:
            return False
        now = asyncio.get_running_loop().time()
        if now < session.current_until:
            return True  # checked less than CURRENT_RECHECK ago: a request costs no lookup
        try:
            context = self._tls.client_context(source)
        except tls.TlsMaterialError:
            return False
        if self._retire_if_rotated(session, context):
            return False
        session.current_until = now + CURRENT_RECHECK
        return True

    def _retire_if_rotated(self, session: Session, context: ssl.SSLContext | None) -> bool:
        """Retire ``session`` (draining: its streams finish, no new ones) if it was made
        with a certificate other than ``context``'s; True if it is retired now."""
        if session.context is context or session.draining:
            return session.draining
        session.draining = True
        self.stats.drained += 1
        if not session.streams:
            session.close("certificate rotated")
        return True

    async def _session(
        self, key: PoolKey, context: ssl.SSLContext, what: str
    ) -> tuple[Session, bool]:
        """A connection of ``key`` with room for a stream; True if it was dialled for
        this call."""
        peer = self._peers.setdefault(key, _Peer())
        while True:
            for session in peer.sessions:
                # Made with a certificate that has since been rotated: retired.
                self._retire_if_rotated(session, context)
                if session.usable:
                    return session, False
            if self._closed:
                raise TunnelSetupError(f"{what}: the tunnel client is shutting down")
            dialing = peer.dialing
            mine = dialing is None
            if dialing is None:
                dialing = peer.dialing = asyncio.get_running_loop().create_task(
                    self._dial_for(peer, key, context, what), name="tunnel-dial"
                )
                # Raised by every waiter; retrieved here in case all of them gave up.
                dialing.add_done_callback(_retrieve)
            try:
                session = await asyncio.shield(dialing)
            except TunnelError as exc:
                raise exc if mine else exc.again() from None
            if mine and session.usable:
                return session, True

    async def _dial_for(
        self, peer: _Peer, key: PoolKey, context: ssl.SSLContext, what: str
    ) -> Session:
        """`_dial`, then the pool's bookkeeping, done before anyone waiting resumes."""
        try:
            session = await self._dial(key, context, what)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.stats.connection_failures += 1
            raise
        finally:
            peer.dialing = None
        peer.sessions.append(session)
        session.closed.add_done_callback(functools.partial(self._lost, peer, session))
        return session

    def _lost(self, peer: _Peer, session: Session, _: object = None) -> None:
        if session in peer.sessions:
            peer.sessions.remove(session)
        if not peer.sessions and peer.dialing is None:
            for key, value in list(self._peers.items()):
                if value is peer:
                    del self._peers[key]

    def _idle(self, session: Session) -> None:
        asyncio.get_running_loop().call_later(
            self.config.idle_timeout, self._close_if_idle, session
        )

    def _close_if_idle(self, session: Session) -> None:
        since = session.idle_since
        if since is None or session.closed.done():
            return
        left = since + self.config.idle_timeout - asyncio.get_running_loop().time()
        if left > 0.01:
            asyncio.get_running_loop().call_later(left, self._close_if_idle, session)
            return
        log.debug("%s: idle for %gs; closing", session.label, self.config.idle_timeout)
        session.draining = True
        session.close("idle")

    async def close(self) -> None:
        """Close every pooled connection (shutdown): streams still open are reset."""
        self._closed = True
        dials = [p.dialing for p in self._peers.values() if p.dialing is not None]
        for task in dials:
            task.cancel()
        await asyncio.gather(*dials, return_exceptions=True)
        sessions = [s for p in self._peers.values() for s in p.sessions]
        for session in sessions:
            session.draining = True
            session.close("the node agent is shutting down")
        if sessions:
            await asyncio.wait(
                [asyncio.ensure_future(s.closed) for s in sessions],
                timeout=self.config.close_timeout,
            )
            for session in sessions:
                if not session.closed.done():
                    session.abort("close timed out")

    # --- one connection -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, what: str, source: SpiffeId) -> AsyncIterator[None]:
        """A handshake slot (`Admission`) for the body; `TunnelOverloaded` instead. Turns
        are fair between source workloads (identities): one's burst of new connections
        queues behind itself."""
        try:
            await self.admission.acquire(str(source))
        except Overloaded as exc:
            raise TunnelOverloaded(f"{what}: {exc}") from None
        try:
            yield
        finally:
            self.admission.release()

    async def _dial(self, key: PoolKey, context: ssl.SSLContext, what: str) -> Session:
        """TCP + TLS 1.3 + prefaces to the node's tunnel port, server identity checked.
        Holds a handshake turn throughout, so the stage timeouts measure the remote end,
        not handshakes queued on this node's own event loop."""
        source, dest_node, expected = key
        try:
            server_name = tls.sni_for(expected)
        except tls.SniError as exc:
            raise TunnelSetupError(f"{what}: {exc}") from None
        async with self._turn(what, source):
            session = Session(
                label=f"tunnel to {format_address(dest_node)} ({expected}) as {source}",
                local=self._settings,
                on_idle=self._idle,
                held=True,
            )
            session.context = context
            transport = await self._handshake(session, context, server_name, dest_node, what)
            try:
                ssl_object = transport.get_extra_info("ssl_object")
                tls.check_server_identity(ssl_object, expected)
            except tls.ImpersonationError as exc:
                reset_transport(transport)
                raise TunnelImpersonation(f"{what}: {exc}", exc.expected, exc.actual) from None
            except tls.PeerIdentityError as exc:
                reset_transport(transport)
                raise TunnelHandshakeError(f"{what}: {exc}") from None
            except BaseException:
                reset_transport(transport)
                raise
            session.start()
            await self._preface(session, what, source)
        self.stats.connections += 1
        session.expire_with_peer_certificate("the server's")
        log.debug("%s: tunnel connection up", session.label)
        return session

    async def _handshake(
        self,
        session: Session,
        context: ssl.SSLContext,
        server_name: str,
        dest_node: Address,
        what: str,
    ) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        config = self.config
        family = socket.AF_INET6 if ":" in dest_node[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            set_nodelay(sock)
            async with asyncio.timeout(config.connect_timeout):
                await loop.sock_connect(sock, dest_node)
        except TimeoutError:
            sock.close()
            raise TunnelTimeout(
                f"{what}: no TCP connection to the node's tunnel port within "
                f"{config.connect_timeout:g}s (node down, or packets dropped?)",
                "connect",
            ) from None
        except OSError as exc:
            sock.close()
            raise TunnelUnreachable(
                f"{what}: cannot connect to the node's tunnel port ({describe(exc)}); is its "
                "node agent running?"
            ) from None
        except BaseException:
            sock.close()
            raise

        # From here the event loop owns ``sock``: when the handshake fails or is cancelled,
        # create_connection closes its transport.  Closing ``sock`` ourselves would close
        # a descriptor number that, under load, may already belong to another connection
        # — and, mid-handshake, makes the TLS layer write to a closed transport ("Fatal
        # error on SSL protocol").  See `_disown` for the one thing left to do.
        try:
            async with asyncio.timeout(config.handshake_timeout):
                transport, _ = await loop.create_connection(
                    lambda: session,
                    sock=sock,
                    ssl=context,
                    server_hostname=server_name,
                    ssl_shutdown_timeout=config.close_timeout,
                )
        except BaseException as exc:
            _disown(loop, sock)
            if isinstance(exc, TimeoutError):
                raise TunnelTimeout(
                    f"{what}: TLS handshake did not complete within {config.handshake_timeout:g}s",
                    "handshake",
                ) from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise TunnelHandshakeError(
                    f"{what}: the node's certificate did not verify ({exc.verify_message}); "
                    "is it from another mesh, expired, or is this node's trust bundle out "
                    "of date?"
                ) from None
            if isinstance(exc, (ssl.SSLError, OSError)):
                raise TunnelHandshakeError(
                    f"{what}: TLS handshake failed ({describe(exc)}); the node refused it "
                    "(no certificate for the destination there, or TLS settings) and its "
                    "log says why"
                ) from None
            raise
        return transport

    async def _preface(self, session: Session, what: str, source: SpiffeId) -> None:
        """Wait for the server's preface; a failure closes the connection."""
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await asyncio.shield(session.ready)
            return
        except TimeoutError:
            session.abort("no preface")
            raise TunnelTimeout(
                f"{what}: no preface from the node within {self.config.handshake_timeout:g}s",
                "preface",
            ) from None
        except ConnectionError:
            pass
        except BaseException:
            session.abort("cancelled")
            raise
        decoder = session.preface_decoder
        session.abort("bad preface")
        if decoder is not None and decoder.version == 1:
            raise TunnelRefused(
                f"{what}: the node runs an older agent (tunnel version 1); upgrade it",
                Status.UNSUPPORTED_VERSION,
            )
        if session.violation is not None:
            raise TunnelProtocolError(f"{what}: {session.violation}")
        raise TunnelHandshakeError(
            f"{what}: the node closed the connection without a preface; it rejected our "
            f"certificate for {source} (untrusted, expired, not yet valid) or our identity "
            "— its log names the reason"
        )


def _tls(session: Session, what: str) -> str | None:
    ssl_object = session.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    if what == "version":
        return str(ssl_object.version())
    cipher = ssl_object.cipher()
    return str(cipher[0]) if cipher else None


def _retrieve(task: asyncio.Task[Session]) -> None:
    if not task.cancelled():
        task.exception()


def _disown(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """After a failed ``create_connection(sock=sock)``: the loop owns the descriptor.
    asyncio's own loops keep and close this very socket object.  uvloop takes the
    descriptor by number and, when the TLS handshake fails, closes it without detaching
    our object (seen with uvloop 0.23: ``sock.fileno()`` still names the closed number),
    which would close that number again when collected — by then, possibly another
    connection's.  So for any other loop, let go of the number."""
    if not isinstance(loop, asyncio.BaseEventLoop) and sock.fileno() != -1:
        sock.detach()


def tunnel_connector(client: TunnelClient, route: RouteLookup) -> UpstreamConnector:
    """The outbound proxy's `UpstreamConnector` over ``client``: ``route`` says, for each
    (app client, original destination), which identities and node to use."""

    async def connect(
        app: Address, destination: Address, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.BaseTransport:
        found = route(app, destination)
        if found is None:
            client.stats.attempts += 1
            client.stats.no_route += 1
            raise TunnelNoRoute(
                f"no tunnel route from {format_address(app)} to {format_address(destination)} "
                "(no workload known at that address, or the client pod has no identity yet)"
            )
        return await client.connect(
            found.source, found.node, destination, found.expected, protocol_factory
        )

    return connect
