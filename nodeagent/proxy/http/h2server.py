"""The HTTP/2 server stage: one per downstream h2 connection (an app's h2c connection on
the outbound side, a tunnel stream the client node sent as ``h2`` on the inbound side).

Each stream is an `H2Exchange` handed to the same `Forwarder` the HTTP/1.1 server uses
(outbound: resolve -> balance -> pooled upstream; inbound: the local pod), in a task of
its own: streams are independent, so each is balanced on its own and a slow one delays
no other. What is per connection lives here:

* **flow control** end to end: request DATA is acknowledged to the client only when it
  has left towards the upstream (`Outbox.ack`), response DATA waits for the client's
  window, so a stream never holds more than the window it was given;
* **resets** both ways: a client's RST_STREAM cancels the stream's forwarding (and
  resets its upstream stream); an upstream's reset after the response started resets
  the client's stream with the same code; a failure before it answers with a status
  (gRPC requests: ``grpc-status``, as a gRPC client expects) and ``weft-proxy-error``;
* **floods** answered with GOAWAY (`H2Endpoint`), malformed frames with GOAWAY
  PROTOCOL_ERROR (`h2`); other connections are not affected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)

from nodeagent.proxy.http.h2conn import H2Config, H2Endpoint, Headers, Outbox
from nodeagent.proxy.http.message import (
    PROXY_ERROR_HEADER,
    RETRY_ATTEMPTS_HEADER,
    ProxyError,
    RequestHead,
    ResponseHead,
    header,
    modify_headers,
)
from nodeagent.proxy.http.replay import ReplayBuffer
from nodeagent.proxy.http.server import Forwarder, ProxyFailure
from weft.routes import HeaderModifier

log = logging.getLogger("weft.proxy.http")

_CONTROL = {
    PingReceived: "PING",
    RemoteSettingsChanged: "SETTINGS",
    PriorityUpdated: "PRIORITY",
    UnknownFrameReceived: "unknown frame",
}


def request_head(headers: Headers, ended: bool) -> RequestHead:
    """A `RequestHead` from an HTTP/2 header block (h2 has validated it)."""
    method = path = authority = None
    scheme = b"http"
    regular: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
        else:
            regular.append((name, value))
    length = header(regular, b"content-length")
    content_length = int(length) if length is not None and length.isdigit() else None
    return RequestHead(
        method=method or b"",
        target=path or b"",
        version=b"2",
        headers=regular,
        keep_alive=True,
        content_length=content_length,
        chunked=not ended and content_length is None,
        pseudo_authority=authority,
        scheme=scheme,
    )


def response_head(headers: Headers) -> ResponseHead:
    status = 0
    regular: Headers = []
    for name, value in headers:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif name[:1] != b":":
            regular.append((name, value))
    length = header(regular, b"content-length")
    return ResponseHead(
        status=status,
        reason=b"",
        version=b"2",
        headers=regular,
        keep_alive=True,
        content_length=int(length) if length is not None and length.isdigit() else None,
    )


def _reset_code(failure: ProxyFailure, response_started: bool) -> ErrorCodes:
    """The RST_STREAM code for a failure that cannot be answered with a status: not
    processed (REFUSED_STREAM, the client node retries), the upstream's own code, or
    INTERNAL_ERROR."""
    if failure.reset and not response_started:
        return ErrorCodes.REFUSED_STREAM
    if failure.code is not None:
        try:
            return ErrorCodes(failure.code)
        except ValueError:
            pass
    return ErrorCodes.INTERNAL_ERROR


class H2Exchange:
    """One stream: its request and response. Offers the forwarders what `Exchange`
    offers (head, timing, response, ``replayable``, `bind`/`unbind`)."""

    __slots__ = (
        "_acked",
        "_attempt_acked",
        "_held",
        "_replay",
        "_server",
        "_upstream",
        "cancelled",
        "discarded",
        "grpc",
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
        "stream_id",
        "task",
    )

    def __init__(self, server: H2Server, stream_id: int, head: RequestHead, started: float):
        self._server = server
        self.stream_id = stream_id
        self.head = head
        self.started = started
        self.grpc = (header(head.headers, b"content-type") or b"").startswith(b"application/grpc")
        self._held: list[bytes] = []
        self._upstream: H2Upstream | None = None
        self.request_complete = False
        self.request_trailers: Headers | None = None
        self.response: ResponseHead | None = None
        self.response_started = False
        self.response_complete = False
        self.sent: float | None = None
        self.responded: float | None = None
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None
        # Retries, as `Exchange` has them; and request bytes acknowledged to the client
        # (a replayed body is acknowledged by the next upstream again: not passed on).
        self._replay: ReplayBuffer | None = None
        self._acked = 0
        self._attempt_acked = 0
        self.retry_gate: Callable[[ResponseHead], bool] | None = None
        self.discarded: ResponseHead | None = None
        self.retries = 0
        self.response_modifier: HeaderModifier | None = None
        """A route's ResponseHeaderModifier, applied to the response head."""

    # --- request side (from the server) --------------------------------------------------

    def keep_for_replay(self, limit: int) -> None:
        """As `Exchange.keep_for_replay`."""
        if self._replay is None:
            held = self._held if self._upstream is None else None
            self._replay = ReplayBuffer(limit, held, sum(map(len, self._held)))

    def _request_body(self, data: bytes) -> None:
        if self._replay is not None:
            self._replay.add(data)
        if self._upstream is not None:
            self._upstream.write_body(data)
        else:
            # Not acknowledged yet: the client cannot send more than its window.
            self._held.append(data)

    def _request_end(self) -> None:
        self.request_complete = True
        if self._upstream is not None:
            self._upstream.end_body(self.request_trailers)

    def request_acked(self, n: int) -> None:
        """``n`` request bytes left for the upstream: the client may send as many more
        (once: bytes sent again on a retry were acknowledged the first time)."""
        self._attempt_acked += n
        new = self._attempt_acked - self._acked
        if new > 0:
            self._acked += new
            self._server.ack(self.stream_id, new)

    def bind(self, upstream: H2Upstream) -> None:
        self._upstream = upstream
        self.sent = self._server._loop.time()
        box = self._server.outboxes.get(self.stream_id)
        if box is not None:
            box.ack = upstream.response_acked
        held, self._held = self._held, []
        for chunk in held:
            upstream.write_body(chunk)
        if self.request_complete:
            upstream.end_body(self.request_trailers)

    def unbind(self) -> None:
        self._upstream = None
        self._attempt_acked = 0
        replay = self._replay
        if replay is not None and replay.chunks is not None:
            self._held = list(replay.chunks)

    def rewind(self) -> None:
        """As `Exchange.rewind`."""
        self.unbind()
        self.discarded = None
        self.response = None
        self.response_started = False
        self.response_complete = False
        self.responded = None
        self.sent = None

    @property
    def replayable(self) -> bool:
        return not self.head.has_body or (self._replay is not None and self._replay.intact)

    @property
    def held_body(self) -> bool:
        """Request body bytes are waiting for an upstream."""
        return bool(self._held)

    # --- response side (from the upstream) ------------------------------------------------

    def response_head(self, head: ResponseHead, *, ends: bool = False) -> None:
        """``ends``: the head ended the stream (gRPC's trailers-only responses carry
        ``grpc-status`` so, and must arrive so)."""
        if head.informational:
            return  # 100-continue and the like are for the hop they came on
        self.responded = self._server._loop.time()  # a swallowed response's counts too
        gate = self.retry_gate
        if gate is not None and gate(head):
            self.discarded = head  # its body and end are dropped too; the forwarder retries
            return
        if self.response_modifier is not None:
            modify_headers(head, self.response_modifier)
        if self.retries:
            head.headers.append((RETRY_ATTEMPTS_HEADER, b"%d" % self.retries))
        self.response = head
        self.response_started = True
        server = self._server
        server.send_head(self.stream_id, head.status, head.headers, end=ends)
        if ends:
            self.response_complete = True
            server.outboxes.pop(self.stream_id, None)

    def response_body(self, data: bytes) -> None:
        if self.discarded is None:
            self._server.send_data(self.stream_id, data)

    def response_end(self, head: ResponseHead) -> None:
        if self.response_complete or self.discarded is not None:
            return
        self.response_complete = True
        self._server.end_stream(self.stream_id, head.trailers)


class H2Upstream(Protocol):
    """What an `H2Exchange` is bound to: its stream on an upstream connection."""

    def write_body(self, data: bytes) -> None: ...
    def end_body(self, trailers: Headers | None) -> None: ...
    def response_acked(self, n: int) -> None: ...


class H2Server(H2Endpoint):
    """The protocol of one downstream HTTP/2 connection; ``closed`` resolves when it is
    gone (for the stage that accepted it)."""

    client_side = False

    def __init__(
        self,
        forwarder: Forwarder,
        *,
        label: str,
        config: H2Config | None = None,
    ) -> None:
        super().__init__(label=label, config=config)
        self.forwarder = forwarder
        self.exchanges: dict[int, H2Exchange] = {}
        self.requests = 0
        self._goaway = False

    def abandon(self) -> None:
        """Never attached (its tunnel stream ended first): the pod's pooled h2c
        connection is shared, so nothing of its own is open."""
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def streams_open(self) -> int:
        return len(self.exchanges) + len(self.outboxes)

    # --- events ----------------------------------------------------------------------

    def _event(self, event: object, now: float) -> bool:
        kind = type(event)
        if kind is RequestReceived:
            assert isinstance(event, RequestReceived)
            self._request(event, now)
        elif kind is DataReceived:
            assert isinstance(event, DataReceived)
            return self._data(event, now)
        elif kind is StreamEnded:
            exchange = self.exchanges.get(event.stream_id)  # type: ignore[attr-defined]
            if exchange is not None and not exchange.request_complete:
                exchange._request_end()
        elif kind is TrailersReceived:
            assert isinstance(event, TrailersReceived)
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.request_trailers = list(event.headers)
        elif kind is WindowUpdated:
            assert isinstance(event, WindowUpdated)
            self.window_opened(event.stream_id or 0)
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            if event.remote_reset and self.peer_reset(now):
                return True
            self._cancel(event.stream_id)
        elif kind is ConnectionTerminated:
            self._goaway = True
            if not self.exchanges:
                self._close("the client sent GOAWAY", goaway=False)
        elif kind in _CONTROL:
            if self.control_frame(_CONTROL[kind], now):
                return True
            if kind is RemoteSettingsChanged:
                self.window_opened(0)
        return self.closing

    def _request(self, event: RequestReceived, now: float) -> None:
        stream_id = event.stream_id
        head = request_head(list(event.headers or ()), event.stream_ended is not None)
        self.requests += 1
        exchange = H2Exchange(self, stream_id, head, now)
        self.exchanges[stream_id] = exchange
        self.outboxes[stream_id] = Outbox()
        if head.method == b"CONNECT":
            self._answer(exchange, ProxyFailure(ProxyError.NOT_SUPPORTED, "CONNECT is not proxied"))
            return
        exchange.task = self._loop.create_task(self._run(exchange))

    def _data(self, event: DataReceived, now: float) -> bool:
        stream_id = event.stream_id
        data = event.data or b""
        if not data and event.stream_ended is None and self.empty_data(now):
            return True
        exchange = self.exchanges.get(stream_id)
        length = event.flow_controlled_length or 0
        if exchange is None or exchange.request_complete or exchange.response_complete:
            self.ack(stream_id, length)  # answered or gone: nobody waits for these bytes
            return False
        if length > len(data):
            self.ack(stream_id, length - len(data))  # padding
        if data:
            exchange._request_body(data)
        return False

    def _cancel(self, stream_id: int) -> None:
        """The client reset the stream: stop forwarding it (the forwarder resets the
        upstream stream as its task is cancelled)."""
        self.outboxes.pop(stream_id, None)
        exchange = self.exchanges.pop(stream_id, None)
        if exchange is not None and exchange.task is not None and not exchange.task.done():
            exchange.cancelled = True
            exchange.task.cancel()
        self._maybe_done()

    # --- forwarding ------------------------------------------------------------------

    async def _run(self, exchange: H2Exchange) -> None:
        try:
            await self.forwarder.forward(exchange)  # type: ignore[arg-type]
        except ProxyFailure as failure:
            self._answer(exchange, failure)
        except asyncio.CancelledError:
            if exchange.cancelled or self.closing:
                return
            raise
        except Exception as exc:
            head = exchange.head
            log.exception(
                "%s: forwarding stream %d (%s %s) failed",
                self.label,
                exchange.stream_id,
                head.method.decode("latin-1"),
                head.target[:200].decode("latin-1"),
            )
            self._answer(exchange, ProxyFailure(ProxyError.BAD_RESPONSE, f"internal error ({exc})"))
        finally:
            if self.exchanges.get(exchange.stream_id) is exchange:
                del self.exchanges[exchange.stream_id]
            self._maybe_done()

    def _answer(self, exchange: H2Exchange, failure: ProxyFailure) -> None:
        """The forwarder could not serve the stream: a status (or a reset)."""
        stream_id = exchange.stream_id
        if self.closing or stream_id not in self.outboxes:
            return
        exchange.response_complete = True
        if exchange.response_started or failure.reset:
            code = _reset_code(failure, exchange.response_started)
            log.info("%s: stream %d: %s; resetting it (%s)", self.label, stream_id, failure,
                     code.name)  # fmt: skip
            self.reset_stream(stream_id, code)
            return
        error = failure.error
        token = error.token.encode()
        if exchange.grpc:
            # Trailers-only, as a gRPC server (and Linkerd's proxy) answers failures.
            message = quote(failure.detail[:512], safe=" ").encode()
            self.send_head(
                stream_id,
                200,
                [
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"%d" % error.grpc_code),
                    (b"grpc-message", message),
                    (PROXY_ERROR_HEADER, token),
                ],
                end=True,
            )
            self.outboxes.pop(stream_id, None)
            return
        body = f"{error.token}: {failure.detail}\n".encode("utf-8", "replace")
        self.send_head(
            stream_id,
            error.status,
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
                (PROXY_ERROR_HEADER, token),
            ],
        )
        self.send_data(stream_id, body)
        self.end_stream(stream_id)

    def send_head(
        self, stream_id: int, status: int, headers: Headers, *, end: bool = False
    ) -> None:
        if self.closing or stream_id not in self.outboxes:
            return
        try:
            block = [(b":status", b"%d" % status), *headers]
            self.h2.send_headers(stream_id, block, end_stream=end)
        except Exception as exc:  # h2 refuses headers it would not send (connection-specific)
            log.info("%s: stream %d: response head not sendable (%s); resetting", self.label,
                     stream_id, exc)  # fmt: skip
            self.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            return
        self._schedule_flush()

    def pump(self, stream_id: int) -> None:
        super().pump(stream_id)
        if self._goaway:
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._goaway and not self.exchanges and not self.outboxes:
            self._close("the client sent GOAWAY and its streams are done", goaway=False)

    def _lost(self) -> None:
        for exchange in list(self.exchanges.values()):
            if exchange.task is not None and not exchange.task.done():
                exchange.cancelled = True
                exchange.task.cancel()
        self.exchanges.clear()
        self.outboxes.clear()
