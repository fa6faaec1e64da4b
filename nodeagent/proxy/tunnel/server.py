"""The tunnel server (port 15008): accepts tunnel connections from other nodes' agents,
checks them, and relays each stream to a local pod.

Per connection::

    accept -> a handshake turn (`Admission`) -> TLS 1.3: SNI picks the destination
    workload's certificate, the client's certificate is required and verified
    -> the client's SPIFFE ID is checked (a workload of this trust domain)
    -> prefaces exchanged -> streams, until GOAWAY, idle, expiry or loss

Per stream (an OPEN naming a target pod address)::

    the target must be a local pod (`LocateTarget`; anything else, such as the node's
    own admin port, is UNKNOWN_TARGET: the tunnel is no open relay), running as the
    identity whose certificate this connection presented (else
    TARGET_IDENTITY_MISMATCH: the client's check of our SPIFFE ID would prove nothing
    about the pod that gets its bytes), and the client must be authorized for it
    (`Authorize`) -> connect to the pod -> ANSWER OK -> `Relay` between the stream and
    the pod's socket (same flow control and idle handling as the outbound path)

Every failure becomes one counter (`TunnelServerStats`) and one log line naming the
client address, its identity, the target and the reason; handshake failures carry a
hint for the operator (`HANDSHAKE_HINTS`). Every stage has its own deadline.

Going away: certificate rotation (a stream arriving on a connection made with a
certificate that has since been replaced), shutdown and drain send GOAWAY: open streams
continue, new ones go to a fresh connection (the client retries OPENs refused
unprocessed). The client certificate's expiry closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from nodeagent.proxy import tls
from nodeagent.proxy.admission import Admission
from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.listener import (
    Address,
    Listener,
    endpoint,
    format_address,
    reset_socket,
    set_nodelay,
)
from nodeagent.proxy.relay import ByteMeter, Relay, reset_transport
from nodeagent.proxy.tunnel.config import TunnelServerConfig, TunnelServerStats
from nodeagent.proxy.tunnel.errors import HANDSHAKE_HINTS, Failure, classify_handshake, describe
from nodeagent.proxy.tunnel.hooks import (
    Authorize,
    LocateTarget,
    NotLocal,
    StreamServer,
    TargetConnector,
    allow_trust_domain,
    connect_target_plaintext,
)
from nodeagent.proxy.tunnel.session import Session, Stream
from nodeagent.proxy.tunnel.wire import (
    ConnectRequest,
    Extensions,
    Invalid,
    Reset,
    Status,
    encode_answer_payload,
    judges_requests,
    requested_protocol,
)
from weft.identity import SpiffeId

log = logging.getLogger("weft.proxy.tunnel")

TUNNEL_PORT = 15008


def tunnel_listener(host: str, port: int = TUNNEL_PORT, backlog: int = 1024) -> socket.socket:
    """A listening socket for `TunnelServer.serve` on the node address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class ConnectionMeter(ByteMeter, Protocol):
    """A per-connection byte meter that is told when its connection has closed."""

    def close(self) -> None: ...


MeterFactory = Callable[[SpiffeId, "SpiffeId | None", Address], ConnectionMeter]
"""(client identity, identity the server presented, target) -> a meter for one relayed
stream (the agent's golden metrics)."""


@dataclass
class _Conn:
    """One tunnel connection, as its task sees it."""

    where: str
    stage: str = "handshaking"
    session: Session | None = None
    client: SpiffeId | None = None
    presented: SpiffeId | None = None
    context: Any = None
    label: str = ""
    streams: set[asyncio.Task[None]] = field(default_factory=set)


class TunnelServer(Listener):
    """Accepts tunnel connections, checks them, and relays their streams to local pods.

    ``contexts`` supplies the TLS material (and the trust domain); ``locate_target``,
    ``authorize`` and ``connect_target`` are the seams of :mod:`.hooks`; ``meter``
    makes a byte meter per relayed stream (the agent's golden metrics).
    """

    def __init__(
        self,
        *,
        contexts: tls.TlsContexts,
        locate_target: LocateTarget,
        authorize: Authorize | None = None,
        connect_target: TargetConnector = connect_target_plaintext,
        config: TunnelServerConfig | None = None,
        meter: MeterFactory | None = None,
        hold: ReadyHold | None = None,
        protocols: Mapping[str, StreamServer] | None = None,
    ) -> None:
        super().__init__("tunnel", hold)
        self._protocols = dict(protocols or {})
        self.served: dict[str, int] = {}
        """Streams served by a protocol server, by protocol (the rest are relayed)."""
        self._meter = meter
        self.config = config or TunnelServerConfig()
        self.stats = TunnelServerStats()
        self.trust_domain = contexts.trust_domain
        self._tls = contexts
        self._locate = locate_target
        self._authorize = authorize or allow_trust_domain(contexts.trust_domain)
        self._connect_target = connect_target
        self._settings = self.config.settings()
        self._sessions: set[Session] = set()
        self.admission = Admission(
            self.config.max_handshakes,
            max_queued=self.config.handshake_queue,
            # Longer than the handshake timeout around it, so a wait that is too long
            # ends as that timeout (HANDSHAKE_TIMEOUT), not as "overloaded".
            queue_timeout=self.config.handshake_timeout + 1.0,
            # All of one peer node's workloads share its address: half the queue each.
            max_queued_per_key=max(64, self.config.handshake_queue // 2),
        )

    def _before_accepting(self) -> str:
        self._tls.server_context()  # built now, so a broken setup fails at start
        return f" (trust domain {self.trust_domain})"

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        self.stats.accepted += 1
        conn.setblocking(False)
        set_nodelay(conn)
        where = format_address(endpoint(peer))
        self._spawn(self._run(conn, where), f"weft.proxy.tunnel from {where}")

    async def close(self, grace: float) -> None:
        """Stop accepting, tell every client to go away (GOAWAY: open streams go on,
        new ones go elsewhere), give streams ``grace`` seconds, then reset the rest."""
        self._stop_accepting()
        for session in list(self._sessions):
            self.stats.goaways += 1
            session.goaway(Reset.NO_ERROR, "the node agent is shutting down")
        await super().close(grace)

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions)

    # --- one connection ---------------------------------------------------------------

    async def _run(self, conn: socket.socket, where: str) -> None:
        state = _Conn(where)
        self.stats.active += 1
        try:
            await self._connection(conn, state)
        except asyncio.CancelledError:
            log.info(
                "tunnel from %s: still %s at the shutdown deadline; resetting",
                where,
                state.stage,
            )
            if state.session is not None:
                state.session.abort("proxy shut down")
            raise
        finally:
            for task in state.streams:
                task.cancel()
            if state.streams:
                await asyncio.gather(*state.streams, return_exceptions=True)
            self.stats.active -= 1

    def _fail(
        self, failure: Failure, message: str, *, level: int = logging.WARNING, exc: Any = None
    ) -> None:
        self.stats.count(failure)
        log.log(level, "%s [%s]", message, failure.value, exc_info=exc)

    async def _connection(self, conn: socket.socket, state: _Conn) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        notes = tls.begin_handshake_notes()  # read by the SNI callback of this handshake
        session = Session(
            label=f"tunnel from {state.where}",
            local=self._settings,
            on_open=lambda stream, request: self._on_open(state, stream, request),
            held=True,
            rapid_resets=config.rapid_resets,
            on_refused=self._refused_stream,
        )
        handed = False  # once connect_accepted_socket has it, the loop closes ``conn``
        try:
            # The wait for a turn counts towards the handshake timeout: a connection may
            # hold this node for that long in all, whatever it waits for.
            # Turns are fair between peers (the client's identity is not known before
            # the handshake; its address is): one node's burst queues behind itself.
            peer = state.where.rpartition(":")[0] or state.where
            async with asyncio.timeout(config.handshake_timeout), self.admission.slot(peer):
                handed = True
                transport, _ = await loop.connect_accepted_socket(
                    lambda: session,
                    conn,
                    ssl=self._tls.server_context(),
                    ssl_shutdown_timeout=config.close_timeout,
                )
        except Exception as exc:
            if not handed:
                reset_socket(conn)
            failure, detail = classify_handshake(exc, notes)
            if failure is Failure.HANDSHAKE_TIMEOUT:
                detail = f"no complete TLS handshake within {config.handshake_timeout:g}s"
            quiet = failure in (Failure.HANDSHAKE_TIMEOUT, Failure.HANDSHAKE_ABORTED)
            self._fail(
                failure,
                f"tunnel from {state.where}: TLS handshake refused: {detail}; "
                f"{HANDSHAKE_HINTS[failure]}",
                level=logging.INFO if quiet else logging.WARNING,
            )
            return
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            client = tls.check_client_identity(ssl_object, self.trust_domain)
        except tls.PeerIdentityError as exc:
            self._fail(
                Failure.CLIENT_IDENTITY_REFUSED, f"tunnel from {state.where}: refused: {exc}"
            )
            reset_transport(transport)
            return
        state.client = client
        state.presented = tls.presented_identity(ssl_object)
        state.context = getattr(ssl_object, "context", None)
        state.label = session.label = f"tunnel from {state.where} ({client})"
        state.session = session
        state.stage = "reading the preface"
        session.start()
        try:
            async with asyncio.timeout(config.header_timeout):
                await asyncio.shield(session.ready)
        except TimeoutError:
            self._fail(
                Failure.HEADER_TIMEOUT,
                f"{state.label}: no complete preface within {config.header_timeout:g}s",
                level=logging.INFO,
            )
            session.abort("preface timeout")
            await session.closed
            return
        except ConnectionError:
            self._preface_failed(session, state)
            await self._closed(session)
            return
        self.stats.sessions += 1
        self.stats.sessions_active += 1
        self._sessions.add(session)
        session.expire_with_peer_certificate("the client's")
        state.stage = "serving streams"
        log.debug("%s: tunnel connection up (as %s)", state.label, state.presented)
        try:
            await self._serve(session)
        finally:
            self._sessions.discard(session)
            self.stats.sessions_active -= 1
        if session.violation is not None:
            self._fail(Failure.PROTOCOL_VIOLATION, f"{state.label}: closed: {session.violation}")
        else:
            log.debug("%s: closed (%s)", state.label, session.close_reason)

    def _refused_stream(self) -> None:
        self.stats.streams_refused += 1

    def _preface_failed(self, session: Session, state: _Conn) -> None:
        decoder = session.preface_decoder
        detail = session.violation or session.close_reason or "connection lost"
        if decoder is not None and decoder.version == 1:
            # A node agent of the previous release (it reads our preface as a version 2
            # answer and logs "upgrade the older agent").
            self._fail(
                Failure.UNSUPPORTED_VERSION,
                f"{state.label}: refused: a version 1 tunnel client (upgrade its node agent)",
            )
        elif session.violation is not None:
            failure = Failure.HEADER_TOO_LARGE if "at most" in detail else Failure.BAD_HEADER
            if decoder is not None and decoder.version not in (None, 1, 2):
                failure = Failure.UNSUPPORTED_VERSION
            self._fail(failure, f"{state.label}: refused: {detail}")
        else:
            received = decoder.received if decoder is not None else 0
            self._fail(
                Failure.PREFACE_TRUNCATED,
                f"{state.label}: the client closed the connection after {received} bytes "
                "of its preface",
                level=logging.INFO,
            )
        session.close("bad preface")

    async def _closed(self, session: Session) -> None:
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await session.closed
        except TimeoutError:
            session.abort("close timed out")
            await session.closed

    async def _serve(self, session: Session) -> None:
        """Until the connection ends; closes it after ``connection_idle_timeout``
        without streams."""
        loop = asyncio.get_running_loop()
        idle_timeout = self.config.connection_idle_timeout
        while not session.closed.done():
            since = session.idle_since
            wait = idle_timeout if since is None else since + idle_timeout - loop.time()
            if since is not None and wait <= 0:
                self.stats.idle_closed += 1
                log.debug("%s: no stream for %gs; closing", session.label, idle_timeout)
                session.goaway(Reset.NO_ERROR, "idle")
                await self._closed(session)
                return
            try:
                async with asyncio.timeout(wait):
                    await asyncio.shield(session.closed)
            except TimeoutError:
                continue

    # --- one stream -------------------------------------------------------------------

    def _on_open(self, state: _Conn, stream: Stream, request: ConnectRequest | Invalid) -> None:
        session = stream.session
        assert state.client is not None
        if isinstance(request, Invalid):
            self._refuse(stream, request.status, f"{state.label}: stream {stream.id}",
                         request.detail)  # fmt: skip
            return
        target = request.target
        label = f"{state.label} to {format_address(target)}"
        protocol = requested_protocol(request.extensions)
        if protocol not in self._protocols:
            protocol = None  # no hint, or one this node does not serve: relayed as bytes
        # What authorization may count on: HTTP/1.1 requests are judged here; HTTP/2 ones
        # only if the client node says it judges them, else the stream is opaque to it.
        judged = protocol
        if protocol == "h2" and not judges_requests(request.extensions):
            judged = None
        status, detail, error = self._decide(state.client, state.presented, target, judged)
        if status is not Status.OK:
            self._refuse(stream, status, label, detail, exc=error)
            return
        if state.presented is not None and not session.draining:
            current = self._current_context(state.presented)
            if current is not None and current is not state.context:
                # Our certificate for this identity was rotated since the connection was
                # made: this stream is served, the next ones go to a new connection.
                self.stats.goaways += 1
                log.info("%s: certificate of %s rotated; asking the client to reconnect",
                         state.label, state.presented)  # fmt: skip
                session.goaway(Reset.NO_ERROR, "certificate rotated")
        if protocol is not None:
            server = self._protocols[protocol]
            job = self._serve_stream(
                state, stream, target, label, protocol, server, request.extensions
            )
        else:
            # No hint, or one this node does not serve: bytes, which is still correct.
            job = self._relay(state, stream, target, label)
        task = asyncio.get_running_loop().create_task(job, name=f"weft.proxy.tunnel {label}")
        state.streams.add(task)
        task.add_done_callback(state.streams.discard)

    def _current_context(self, identity: SpiffeId) -> Any:
        try:
            return self._tls.workload_context(identity)
        except tls.TlsMaterialError:
            return None

    async def _relay(self, state: _Conn, stream: Stream, target: Address, label: str) -> None:
        config = self.config
        relay = Relay(
            label=label,
            high_water=config.high_water,
            low_water=config.low_water,
            idle_timeout=config.idle_timeout,
            meter=self.stats,
        )
        try:
            async with asyncio.timeout(config.target_connect_timeout):
                await self._connect_target(target, lambda: relay.upstream)
            if relay.upstream.transport is None:
                raise RuntimeError("the target connector returned without attaching the relay")
        except asyncio.CancelledError:
            relay.abort("shut down")
            await relay.wait_closed()
            raise
        except Exception as exc:
            relay.abort("target connect failed")
            await relay.wait_closed()
            self._refuse_connect(stream, label, exc)
            return
        if stream.finished:
            log.debug("%s: the client cancelled the stream while the pod was connecting", label)
            relay.abort("client cancelled")
            await relay.wait_closed()
            return
        stream.session.answer(stream, encode_answer_payload(Status.OK))
        self.stats.established += 1
        self.stats.streams_active += 1
        stream.attach(relay.client)
        conn_meter = None
        if self._meter is not None:
            assert state.client is not None
            conn_meter = self._meter(state.client, state.presented, target)
            relay.add_meter(conn_meter)
        try:
            await relay.wait_closed()
        finally:
            self.stats.streams_active -= 1
            if conn_meter is not None:
                conn_meter.close()
        log.debug(
            "%s: closed (%s); %d bytes out, %d bytes in",
            label,
            relay.close_reason,
            relay.bytes_out,
            relay.bytes_in,
        )

    async def _serve_stream(
        self,
        state: _Conn,
        stream: Stream,
        target: Address,
        label: str,
        protocol: str,
        server: StreamServer,
        extensions: Extensions,
    ) -> None:
        """A stream served by a protocol server (HTTP): it connects to the pod per
        request itself, so the stream is answered at once."""
        assert state.client is not None
        config = self.config
        try:
            async with asyncio.timeout(config.target_connect_timeout):
                served = await server(
                    state.client, state.presented, target, f"{label} ({protocol})", extensions
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._refuse_connect(stream, label, exc)
            return
        if stream.finished:
            served.abandon()
            return
        stream.session.answer(stream, encode_answer_payload(Status.OK))
        self.stats.established += 1
        self.stats.streams_active += 1
        self.served[protocol] = self.served.get(protocol, 0) + 1
        try:
            stream.attach(cast(asyncio.Protocol, served))
            await asyncio.shield(served.closed)
        except asyncio.CancelledError:
            stream.abort()
            raise
        finally:
            self.stats.streams_active -= 1

    def _refuse_connect(self, stream: Stream, label: str, exc: Exception) -> None:
        """Connecting to the target pod failed: TARGET_UNREACHABLE (the client node
        tries another endpoint), or INTERNAL_ERROR for what is not a network error."""
        expected = isinstance(exc, OSError)
        why = (
            f"connecting timed out after {self.config.target_connect_timeout:g}s"
            if isinstance(exc, TimeoutError)
            else f"connecting failed ({describe(exc)})"
        )
        status = Status.TARGET_UNREACHABLE if expected else Status.INTERNAL_ERROR
        self._refuse(stream, status, label, why, exc=None if expected else exc)

    def _decide(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address, protocol: str | None
    ) -> tuple[Status, str, BaseException | None]:
        try:
            located = self._locate(target)
        except Exception as exc:
            return Status.INTERNAL_ERROR, "the target lookup raised", exc
        if located is NotLocal.UNKNOWN:
            return Status.UNKNOWN_TARGET, "no pod is known at this address", None
        if located is NotLocal.ELSEWHERE:
            return (
                Status.TARGET_NOT_ON_NODE,
                "the pod at this address runs on another node (stale discovery at the client)",
                None,
            )
        assert isinstance(located, SpiffeId)
        if presented is None:
            return (
                Status.INTERNAL_ERROR,
                "cannot tell which identity this connection presented; refusing",
                None,
            )
        if located != presented:
            return (
                Status.TARGET_IDENTITY_MISMATCH,
                f"the pod runs as {located}, but the client asked for {presented} "
                "(stale discovery at the client)",
                None,
            )
        try:
            decision = self._authorize(client, target, protocol)
        except Exception as exc:
            return Status.INTERNAL_ERROR, "the authorization hook raised", exc
        if not decision.allowed:
            return Status.POLICY_DENIED, decision.reason or "denied by policy", None
        return Status.OK, "", None

    def _refuse(
        self,
        stream: Stream,
        status: Status,
        label: str,
        detail: str,
        *,
        exc: BaseException | None = None,
    ) -> None:
        """Log and count the refusal and answer it; the stream is over."""
        level = logging.ERROR if status is Status.INTERNAL_ERROR else logging.WARNING
        self._fail(
            Failure.of(status), f"{label}: refused {status.name}: {detail}", level=level, exc=exc
        )
        if not stream.finished:
            stream.session.answer(stream, encode_answer_payload(status))
            stream.discard()
