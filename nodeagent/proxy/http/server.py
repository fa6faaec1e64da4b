"""The HTTP/1.1 server stage: one per downstream connection (an app's connection on the
outbound side, a tunnel stream on the inbound side).

It parses requests (`RequestCodec`), and for each one makes an `Exchange` and hands it
to its `Forwarder` (outbound: resolve -> balance -> pooled upstream; inbound: the local
pod), which binds it to an upstream connection; the response streams back through the
exchange. The server owns what is per connection:

* **order** — exchanges run one at a time in arrival order, so pipelined requests get
  their responses in order and are never merged; requests parsed while one is in flight
  wait in the queue (and reading stops, so at most one read of them is held);
* **framing** of responses towards the client: a known length is kept, an unknown one
  is re-chunked for an HTTP/1.1 client (so close-delimited upstream responses do not
  cost the client its connection), a HEAD/1xx/204/304 response has no body;
* **flow control** — reading the client stops while the upstream's buffer is full or
  request-body bytes wait for an upstream; the upstream's reading stops while the
  client's buffer is full (`FlowControl` holds, both directions);
* **the proxy's own answers** — a malformed request gets 400 (431/414 over limits) and a
  close; a request the forwarder could not serve gets 502/503/504 with a
  ``weft-proxy-error`` header (`ProxyFailure`); an upstream that fails after the
  response started resets the client (a truncated body must not look complete);
* **upgrades** — after ``101 Switching Protocols`` both connections are joined by a
  `Relay` and the bytes are opaque from then on (WebSocket);
* **timeouts** — a request head must arrive within ``head_timeout`` of its first byte
  (a client that sends half a request and stalls gets 408), and a connection with no
  exchange for ``idle_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from nodeagent.proxy.flow import CLOSING, HELD_BYTES, PEER_BLOCKED, FlowControl
from nodeagent.proxy.http.h1 import (
    H1Error,
    Limits,
    RequestCodec,
    encode_chunk,
    encode_last_chunk,
    encode_response_head,
)
from nodeagent.proxy.http.message import (
    RETRY_ATTEMPTS_HEADER,
    Headers,
    ProxyError,
    RequestHead,
    ResponseHead,
    error_response,
    modify_headers,
    set_forward_header,
)
from nodeagent.proxy.http.replay import ReplayBuffer
from nodeagent.proxy.relay import Relay, reset_transport
from weft.routes import HeaderModifier

log = logging.getLogger("weft.proxy.http")

PIPELINED = "pipelined request waiting"


@dataclass(frozen=True)
class HttpServerConfig:
    limits: Limits = field(default_factory=Limits)
    head_timeout: float = 30.0
    """Seconds from a request's first byte to the end of its head."""
    idle_timeout: float = 600.0
    """Seconds a keep-alive connection may sit with no exchange."""
    high_water: int = 256 * 1024
    low_water: int = 64 * 1024
    relay_idle_timeout: float = 3600.0
    """Idle timeout of an upgraded (opaque) connection."""


class ProxyFailure(Exception):
    """A forwarder could not serve an exchange: answered with ``error`` (status and
    ``weft-proxy-error`` token) if no response byte has been sent yet."""

    def __init__(
        self, error: ProxyError, detail: str, *, reset: bool = False, code: int | None = None
    ) -> None:
        super().__init__(f"{error.token}: {detail}")
        self.error = error
        self.detail = detail
        self.reset = reset
        """Reset the downstream connection (HTTP/2: the stream, REFUSED_STREAM) instead
        of answering: the inbound proxy tells the client node "not processed, try
        elsewhere" this way."""
        self.code = code
        """HTTP/2: the RST_STREAM error code the upstream sent, passed on downstream."""


class Upstream(Protocol):
    """What an exchange is bound to: the upstream connection carrying its request."""

    def write_body(self, data: bytes) -> None: ...
    def end_body(self, trailers: Headers) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def take_transport(self) -> asyncio.Transport:
        """For an upgrade: the transport, detached from the upstream connection."""


class Forwarder(Protocol):
    async def forward(self, exchange: Exchange) -> None:
        """Serve ``exchange``: bind it to an upstream (`Exchange.bind`), which sends the
        request and streams the response into it; return when the response is complete.
        Raise `ProxyFailure` when it cannot be served."""


FastDone = Callable[["Exchange", "ProxyFailure | None", bool], None]


class FastForwarder(Forwarder, Protocol):
    """A forwarder that can also serve an exchange without a task when an upstream is
    at hand (`OutboundForwarder.start`): ``done(exchange, failure, again)`` ends it —
    ``again``: run `forward` for it after all (sent again on a new connection)."""

    def start(self, exchange: Exchange, done: FastDone) -> bool: ...
    def cancel(self, exchange: Exchange) -> None: ...


class Exchange:
    """One request and its response on a downstream connection: per-request state (the
    head, body progress, response framing, timing) lives here, not on the server."""

    __slots__ = (
        "_body_held",
        "_body_held_bytes",
        "_chunked_out",
        "_replay",
        "_server",
        "_upstream",
        "close_after",
        "discarded",
        "head",
        "request_complete",
        "request_trailers",
        "responded",
        "response",
        "response_complete",
        "response_modifier",
        "response_started",
        "retries",
        "retry_gate",
        "sent",
        "started",
        "upgrade_leftover",
    )

    def __init__(self, server: Http1Server, head: RequestHead, started: float) -> None:
        self._server = server
        self.head = head
        self.started = started
        self._upstream: Upstream | None = None
        self._body_held: list[bytes] = []
        self._body_held_bytes = 0
        self.request_complete = False
        self.request_trailers: Headers = []
        self.response: ResponseHead | None = None
        self.response_started = False
        self.sent: float | None = None
        """When the request head went to the upstream that answered (after any dial:
        the balancer's latency is the endpoint's, not the connect's)."""
        self.responded: float | None = None
        """When the response head arrived (the latency metrics' end point)."""
        self.response_complete = False
        self._chunked_out = False
        self.close_after = not head.keep_alive
        self.upgrade_leftover: bytes | None = None
        # Retries (the forwarder's retry stage): the body kept for sending again, the
        # gate that may swallow a failed response, and what it swallowed.
        self._replay: ReplayBuffer | None = None
        self.retry_gate: Callable[[ResponseHead], bool] | None = None
        """Called with a final response head before any of it is written: True
        swallows that response (head, body, end) so the forwarder can try again."""
        self.discarded: ResponseHead | None = None
        self.retries = 0
        self.response_modifier: HeaderModifier | None = None
        """A route's ResponseHeaderModifier, applied to the response head."""
        """Retries this exchange took (``weft-retry-attempts`` on the response)."""

    # --- request side (from the server) --------------------------------------------------

    def keep_for_replay(self, limit: int) -> None:
        """Hold a copy of the request body, up to ``limit`` bytes, so the request can be
        sent again (`rewind`); past the limit it is sent once (not `replayable`)."""
        if self._replay is None:
            held = self._body_held if self._upstream is None else None
            self._replay = ReplayBuffer(limit, held, self._body_held_bytes)

    def _request_body(self, data: bytes) -> None:
        if self._replay is not None:
            self._replay.add(data)
        if self._upstream is not None:
            self._upstream.write_body(data)
        else:
            self._body_held.append(data)
            self._body_held_bytes += len(data)
            if self._body_held_bytes > self._server.config.high_water:
                self._server.flow.hold(HELD_BYTES)

    def _request_end(self, trailers: Headers) -> None:
        self.request_complete = True
        self.request_trailers = trailers
        if self._upstream is not None:
            self._upstream.end_body(trailers)

    def upstream_blocked(self, blocked: bool) -> None:
        """The upstream's write buffer is full (or has drained): stop (resume) reading
        the client, whose bytes would only pile up in front of it."""
        if blocked:
            self._server.flow.hold(PEER_BLOCKED)
        else:
            self._server.flow.release(PEER_BLOCKED)

    def cork(self) -> None:
        """Hold what the response writes until `uncork` (see `Http1Server.cork`)."""
        self._server.cork()

    def uncork(self) -> None:
        self._server.uncork()

    def bind(self, upstream: Upstream) -> None:
        """The forwarder has an upstream for this exchange (its head has been sent):
        request body bytes go there from now on."""
        self._upstream = upstream
        self.sent = self._server._clock()
        held, self._body_held = self._body_held, []
        self._body_held_bytes = 0
        for chunk in held:
            upstream.write_body(chunk)
        self._server.flow.release(HELD_BYTES)
        if self.request_complete:
            upstream.end_body(self.request_trailers)
        if self._server.write_paused:
            upstream.pause_reading()

    def unbind(self) -> None:
        """The upstream attempt failed before any response byte; the forwarder may
        bind another (a retry) if the request is `replayable`: the body kept for replay
        goes to the next upstream first."""
        self._upstream = None
        replay = self._replay
        if replay is not None and replay.chunks is not None:
            self._body_held = list(replay.chunks)
            self._body_held_bytes = replay.size

    def rewind(self) -> None:
        """A swallowed response (`retry_gate`) or a timed-out attempt: forget it and
        unbind, ready for the next attempt."""
        self.unbind()
        self.discarded = None
        self.response = None
        self.response_started = False
        self.response_complete = False
        self.responded = None
        self.sent = None

    @property
    def replayable(self) -> bool:
        """Every body byte that left for an upstream can be sent again: there is none,
        or the body is held (`keep_for_replay`) — when the forwarder knows that sending
        again is safe: see `UpstreamLost.retryable` and the retry stage."""
        return not self.head.has_body or (self._replay is not None and self._replay.intact)

    # --- response side (from the upstream) ------------------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        server = self._server
        if head.informational:
            if head.status == 101 and self.head.upgrade is not None:
                return  # written by `upgrade` with the switch
            server.write(b"HTTP/1.1 %d %s\r\n\r\n" % (head.status, head.reason or b"-"))
            return
        self.responded = server._clock()  # a swallowed response's latency counts too
        gate = self.retry_gate
        if gate is not None and self.head.upgrade is None and gate(head):
            self.discarded = head  # its body and end are dropped too; the forwarder retries
            return
        if self.response_modifier is not None:
            modify_headers(head, self.response_modifier)
        if self.retries:
            set_forward_header(head, RETRY_ATTEMPTS_HEADER, b"%d" % self.retries)
        self.response = head
        self.response_started = True
        bodyless = self.head.method == b"HEAD" or head.status in (204, 304)
        length = head.content_length
        self._chunked_out = False
        if bodyless:
            pass
        elif length is None:
            if self.head.version == b"1.1":
                self._chunked_out = True
            else:
                self.close_after = True  # an HTTP/1.0 client: close-delimited
        if self.head.upgrade is not None:
            self.close_after = True  # declined upgrade: the request parser has stopped
        server.write(
            encode_response_head(
                head,
                length=length,
                chunked=self._chunked_out,
                close=self.close_after,
                upgrade=False,
            )
        )

    def response_body(self, data: bytes) -> None:
        if self.discarded is not None:
            return
        if self._chunked_out:
            self._server.write(encode_chunk(data))
        else:
            self._server.write(data)

    def response_end(self, head: ResponseHead) -> None:
        if self.discarded is not None:
            return
        if self._chunked_out:
            self._server.write(encode_last_chunk(head.trailers))
        self.response_complete = True
        if not self.request_complete:
            self.close_after = True  # the rest of the request body will not be read

    def upgrade(self, head: ResponseHead, leftover: bytes) -> None:
        """``101``: join the two connections as opaque bytes."""
        assert self._upstream is not None
        self.response = head
        self.response_started = True
        self.responded = self._server._clock()
        self.response_complete = True
        self._server.switch_to_relay(self, head, self._upstream.take_transport(), leftover)


class Http1Server(asyncio.Protocol):
    """The protocol of one downstream connection. ``closed`` resolves when it is gone
    (for the stage that accepted it)."""

    def __init__(
        self,
        forwarder: Forwarder,
        *,
        label: str,
        config: HttpServerConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.forwarder = forwarder
        self._fast: FastForwarder | None = (
            cast(FastForwarder, forwarder) if hasattr(forwarder, "start") else None
        )
        self._fast_exchange: Exchange | None = None
        self.label = label
        self.config = config or HttpServerConfig()
        self.codec = RequestCodec(self, self.config.limits)
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl
        self.queue: deque[Exchange] = deque()
        self._parsing: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self.write_paused = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._closing = False
        self._relay: Relay | None = None
        self._head_started: float | None = None
        self._last_activity = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.requests = 0
        self.close_reason: str | None = None
        self._corked = 0
        self._out: list[bytes] = []

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow = FlowControl(transport)
        transport.set_write_buffer_limits(high=self.config.high_water, low=self.config.low_water)
        self._arm_timer(self.config.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._loop.time()
        if self._head_started is None and self._parsing is None:
            self._head_started = self._last_activity
        up = self._active_upstream()
        if up is not None:
            up.cork()
        try:
            leftover = self.codec.feed(data)
        except H1Error as exc:
            self._bad_request(exc)
            return
        finally:
            if up is not None:
                up.uncork()
        if leftover is not None:
            self._upgrade_requested(leftover)

    def eof_received(self) -> bool:
        self.flow.finish()
        if self.queue:
            # A half-close after a complete request is legal (the client waits for the
            # response); answer, then close.
            self.queue[-1].close_after = True
            if self._parsing is not None:
                self._close("client closed mid-request", abort=True)
            return True
        self._close("client closed")
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self._active_upstream()
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self._active_upstream()
        if up is not None:
            up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.finish()
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._stop_forwarding()
        if self.close_reason is None:
            self.close_reason = "client reset" if exc else "client closed"
        if self._relay is None and not self.closed.done():
            self.closed.set_result(None)

    def abandon(self) -> None:
        """Never attached (its tunnel stream ended first): nothing of its own is open."""
        if not self.closed.done():
            self.closed.set_result(None)

    # --- RequestSink (from the codec) ----------------------------------------------------

    def request_head(self, head: RequestHead) -> None:
        self._head_started = None
        self.requests += 1
        exchange = Exchange(self, head, self._clock())
        self._parsing = exchange
        self.queue.append(exchange)
        if len(self.queue) == 1:
            self._start(exchange)
        else:
            self.flow.hold(PIPELINED)

    def request_body(self, data: bytes) -> None:
        assert self._parsing is not None
        self._parsing._request_body(data)

    def request_end(self, trailers: Headers) -> None:
        exchange = self._parsing
        assert exchange is not None
        self._parsing = None
        exchange._request_end(trailers)

    # --- exchanges -----------------------------------------------------------------------

    def _active_upstream(self) -> Upstream | None:
        return self.queue[0]._upstream if self.queue else None

    def _start(self, exchange: Exchange) -> None:
        fast = self._fast
        if fast is not None:
            self._fast_exchange = exchange
            if fast.start(exchange, self._fast_done):
                return
            self._fast_exchange = None
        self._task = self._loop.create_task(self._run(exchange))

    def _fast_done(self, exchange: Exchange, failure: ProxyFailure | None, again: bool) -> None:
        if self._fast_exchange is exchange:
            self._fast_exchange = None
        if self._closing:
            return
        if again:
            self._task = self._loop.create_task(self._run(exchange))
        elif failure is not None:
            self._failed(exchange, failure)
        elif self._relay is None:
            self._finished(exchange)

    def _stop_forwarding(self) -> None:
        """Cancel the exchange being forwarded (the client is gone, or shutting down)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        exchange, self._fast_exchange = self._fast_exchange, None
        if exchange is not None and self._fast is not None:
            self._fast.cancel(exchange)

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self.forwarder.forward(exchange)
        except ProxyFailure as failure:
            self._failed(exchange, failure)
            return
        except asyncio.CancelledError:
            if not self._closing:
                self._close("shut down", abort=True)
            raise
        except Exception as exc:
            head = exchange.head
            target = head.target[:200].decode("latin-1")
            log.exception("%s: forwarding %s %s failed", self.label, head.method.decode(), target)
            self._failed(exchange, ProxyFailure(ProxyError.BAD_RESPONSE, f"internal error ({exc})"))
            return
        if self._relay is not None:
            return
        self._finished(exchange)

    def _failed(self, exchange: Exchange, failure: ProxyFailure) -> None:
        if self._closing:
            return
        if exchange.response_started or failure.reset:
            # Part of the response is out: a reset, so the client does not take a
            # truncated body for a complete one. (Or the failure asks for a reset: the
            # client node then tries another endpoint.)
            when = "mid-response" if exchange.response_started else "before the request"
            log.info("%s: upstream failed %s (%s); resetting the client",
                     self.label, when, failure)  # fmt: skip
            self._close(f"upstream failed mid-response ({failure.error.token})", abort=True)
            return
        close = exchange.close_after or not exchange.request_complete
        self.write(error_response(failure.error, failure.detail, close=close))
        exchange.close_after = close
        exchange.response_complete = True
        self._finished(exchange)

    def _finished(self, exchange: Exchange) -> None:
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if exchange.close_after or self._closing:
            self._close("closed after the exchange (connection: close, or its end was cut)")
            return
        self._last_activity = self._loop.time()
        if len(self.queue) <= 1:
            self.flow.release(PIPELINED)
        if self.queue:
            self._start(self.queue[0])

    # --- writing and closing -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self._closing:
            return
        if self._corked:
            self._out.append(data)
        else:
            self.transport.write(data)

    def cork(self) -> None:
        """Hold writes until `uncork`: what one read of the upstream produced (head,
        body, chunk frames) leaves as one write — one syscall, or one tunnel frame and
        TLS record, instead of one per piece."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked:
            self._flush()

    def _flush(self) -> None:
        out = self._out
        if out and self.transport is not None and not self._closing:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.transport.write(data)
        out.clear()

    def _bad_request(self, exc: H1Error) -> None:
        log.info("%s: %s (%s); closing", self.label, exc.error.status, exc.detail)
        if self.queue and self.queue[0].response_started:
            # Mid-response of an earlier request: an answer cannot be slotted in.
            self._close(f"malformed request ({exc.detail})", abort=True)
            return
        self._stop_forwarding()
        self.write(error_response(exc.error, exc.detail, close=True))
        self._close(f"malformed request ({exc.detail})")

    def _close(self, reason: str, *, abort: bool = False) -> None:
        if self._closing:
            return
        if not abort:
            self._flush()
        self._closing = True
        self.close_reason = reason
        self.flow.hold(CLOSING)
        for exchange in self.queue:
            up = exchange._upstream
            if up is not None and not exchange.response_complete:
                up.pause_reading()
        self._stop_forwarding()
        transport = self.transport
        if transport is None:
            return
        if abort:
            reset_transport(transport)
        else:
            transport.close()

    def _arm_timer(self, delay: float) -> None:
        # Never later than a head deadline could fall: a head may start at any time.
        delay = min(delay, self.config.head_timeout)
        self._timer = self._loop.call_later(max(delay, 0.05), self._check_timers)

    def _check_timers(self) -> None:
        if self._closing:
            return
        now = self._loop.time()
        cfg = self.config
        if self._head_started is not None and now - self._head_started >= cfg.head_timeout:
            log.info("%s: no complete request head within %gs; closing", self.label,
                     cfg.head_timeout)  # fmt: skip
            self.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n"
                b"weft-proxy-error: head-timeout\r\n\r\n"
            )
            self._close("request head timeout")
            return
        if not self.queue and self._head_started is None:
            idle = now - self._last_activity
            if idle >= cfg.idle_timeout:
                self._close("idle")
                return
            delay = cfg.idle_timeout - idle
        else:
            delay = cfg.idle_timeout
        if self._head_started is not None:
            delay = min(delay, self._head_started + cfg.head_timeout - now)
        self._arm_timer(delay)

    # --- upgrades ------------------------------------------------------------------------

    def _upgrade_requested(self, leftover: bytes) -> None:
        """The codec stopped after an upgrade request's head: hold what followed until
        the server answers (101: opaque; anything else: closed after the response)."""
        exchange = self.queue[-1] if self.queue else None
        if exchange is None or exchange.head.upgrade is None:
            self._close("unexpected upgrade state", abort=True)
            return
        exchange.upgrade_leftover = leftover
        exchange.request_complete = True
        self._parsing = None
        self.flow.hold(PIPELINED)

    def switch_to_relay(
        self, exchange: Exchange, head: ResponseHead, upstream: asyncio.Transport, leftover: bytes
    ) -> None:
        transport = self.transport
        assert transport is not None
        self._flush()
        transport.write(
            encode_response_head(head, length=None, chunked=False, close=False, upgrade=True)
        )
        cfg = self.config
        relay = Relay(
            label=f"{self.label} (upgraded: {(exchange.head.upgrade or b'').decode('latin-1')})",
            high_water=cfg.high_water,
            low_water=cfg.low_water,
            idle_timeout=cfg.relay_idle_timeout,
        )
        self._relay = relay
        if self._timer is not None:
            self._timer.cancel()
        self.flow.finish()  # FlowControl of this protocol; the relay has its own
        transport.set_protocol(relay.client)
        upstream.set_protocol(relay.upstream)
        relay.client.connection_made(transport)
        relay.upstream.connection_made(upstream)
        if exchange.upgrade_leftover:
            relay.client.data_received(exchange.upgrade_leftover)
        if leftover:
            relay.upstream.data_received(leftover)
        transport.resume_reading()
        upstream.resume_reading()

        def relayed(_: asyncio.Future[None]) -> None:
            self.close_reason = f"upgraded connection ended ({relay.close_reason})"
            if not self.closed.done():
                self.closed.set_result(None)

        asyncio.ensure_future(relay.wait_closed()).add_done_callback(relayed)
