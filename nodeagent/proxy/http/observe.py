"""The inbound HTTP/1.1 observer: the destination node watches, and does not rewrite,
the requests its client node already handled.

The client node parsed the app's requests, balanced each one to an endpoint, removed the
hop-by-hop headers and re-framed the message; it sends them to this node on a tunnel
stream (OPEN ``http/1.1``) that carries one exchange at a time. Nothing this node does
per request needs the message changed, so the stream is relayed byte for byte to one
connection to the pod (`nodeagent.proxy.relay.Relay`) and this `Tap` parses both
directions with llhttp as they pass — no head is rebuilt, no byte copied — for what the
destination must still do:

* **refuse what is not valid HTTP/1.1**: the peer is an authenticated workload, not
  necessarily a Weft agent, so the strict parser and the limits of the outbound server
  apply (smuggling-shaped framing, bare LF, CONNECT, a missing Host, more than
  ``max_headers`` fields or a head over ``max_head`` bytes). The answer is the status and
  a close when no exchange is in flight, else a reset; nothing of the bad read reaches
  the pod;
* **count each exchange** in the golden metrics with the client's verified identity
  (`ExchangeSink`): status, and latency from the request head to the response head;
* **tap** (only while someone taps: one check of `TapHub.active` per request head):
  keep the request's method and target for the sink (`nodeagent.tap`);
* **trace** (only when the node traces: the request parser is then made with callbacks
  that keep a head's ``traceparent``/``tracestate``/B3 headers, so an observer that does
  not trace pays nothing per header): hand the sink the span the client node reserved
  for this hop (`weft.tracing.peer`), with the head and response times;
* **upgrades**: bytes after an upgrade request's head wait (and reading stops) until the
  pod answers — ``101`` makes the relay opaque, any other answer closes the connection
  after it, so nothing can be smuggled behind a declined upgrade;
* **HEAD**: llhttp cannot know that a response to HEAD has no body, so the response
  parser is renewed after that head. A request pipelined behind a HEAD would make the
  rest of that read unparseable; such a connection is reset instead (a Weft client node
  never pipelines on a tunnel stream).

A response the pod frames wrongly resets the stream; the client node answers its client
(502, or a reset mid-response) and records it too. Bodies cost no Python call: only the
heads call back (a handful of calls per exchange, where parsing into heads and writing
them out again took over a hundred).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol

import httptools

from nodeagent.proxy.http.h1 import H1Error, Limits, Stop, parser_error_detail, reraise_callback_bug
from nodeagent.proxy.http.message import ProxyError, error_response
from nodeagent.proxy.relay import Relay
from nodeagent.tap import OFF, TapHub
from weft.tracing.peer import INBOUND_HEADERS, INBOUND_LENGTHS, PeerSpan, peer_span

log = logging.getLogger("weft.proxy.http")

CANCELLED = "cancelled"
HEAD_TIMEOUT = 30.0
"""Seconds a request head may take from its first partial read (the outbound server's
``head_timeout``); a head that stops arriving altogether ends at the relay's idle timeout."""
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n"
    b"weft-proxy-error: head-timeout\r\n\r\n"
)
_FRAMING = (b"content-length", b"transfer-encoding")


class Traced(NamedTuple):
    """A traced exchange's span, as the observer saw it (its clock's times)."""

    span: PeerSpan
    """The span the client node reserved for this hop (`weft.tracing.peer`)."""
    method: bytes
    target: bytes
    """The request-target (HTTP/2: ``:path``)."""
    started: int
    """When the request head was complete (unix ns, the observer's ``span_clock``)."""
    ended: int
    """When the response head came (or the exchange was lost)."""


Reserved = tuple[PeerSpan, bytes, bytes, int]
"""(span, method, request-target, start in unix ns) of a request the client node
reserved a span for."""
_Pending = tuple[float, bool, bytes | None, Reserved | None, tuple[bytes, bytes] | None]


class ExchangeSink(Protocol):
    def exchange(
        self,
        authority: bytes | None,
        status: int | None,
        latency: float | None,
        error: str,
        grpc_status: str = "",
        trace: Traced | None = None,
        asked: tuple[bytes, bytes] | None = None,
    ) -> None:
        """One exchange ended: ``status`` None and ``error`` set when no response came
        (``grpc_status``: an HTTP/2 stream's trailers said so; ``trace``: the client
        node reserved a span for this hop, only when the observer traces; ``asked``:
        the request's method and target, only while someone taps)."""


class RequestGate(Protocol):
    """Judges each request head before any of it reaches the pod (authorization)."""

    @property
    def needs_headers(self) -> bool:
        """Whether `judge` looks at headers (else they are not collected)."""

    def judge(self, method: str, target: bytes, headers: dict[str, str]) -> str | None:
        """None to let the request through, else why not (answered 403)."""


class _Requests:
    """llhttp callbacks of the request direction."""

    __slots__ = ("_observer", "count", "headers", "host", "in_head", "trace", "url")

    def __init__(self, observer: Http1Observer) -> None:
        self._observer = observer
        self.trace: list[tuple[bytes, bytes]] = []
        """The head's trace headers (lowercase names), kept by `_TracedRequests` only."""
        self.host: bytes | None = None
        self.count = 0
        self.in_head = False
        self.url = b""
        self.headers: dict[str, str] | None = None

    def on_message_begin(self) -> None:
        self.host = None
        self.count = 0
        self.in_head = True
        self.url = b""
        gate = self._observer.gate
        self.headers = {} if gate is not None and gate.needs_headers else None

    def on_url(self, url: bytes) -> None:
        self.url += url  # bounded by the head limit

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailers arrive here too: the limit covers head and trailers together.
        self.count += 1
        if self.count > self._observer.limits.max_headers:
            self._observer.fail(
                H1Error(
                    ProxyError.HEADERS_TOO_LARGE,
                    f"more than {self._observer.limits.max_headers} headers",
                )
            )
        if self.in_head and len(name) == 4 and name.lower() == b"host":
            self.host = value
        if self.in_head and self.headers is not None:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]},{text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._observer.request_head(self.host)


class _TracedRequests(_Requests):
    """`_Requests` that also keep a head's trace headers (`INBOUND_HEADERS`): the
    parser of an observer that traces is made with this class, so one that does not
    pays nothing per header."""

    __slots__ = ()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.trace:
            self.trace = []

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if self.in_head and len(name) in INBOUND_LENGTHS:
            lname = name.lower()
            if lname in INBOUND_HEADERS and len(self.trace) < 16:
                self.trace.append((lname, value))


class _Responses:
    """llhttp callbacks of the response direction."""

    __slots__ = ("_observer", "count", "framed", "informational", "skipped")

    def __init__(self, observer: Http1Observer) -> None:
        self._observer = observer
        self.count = 0
        self.framed = False
        self.informational = False
        self.skipped = False

    def on_message_begin(self) -> None:
        self.count = 0
        self.framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        if self.count > self._observer.limits.max_headers:
            self._observer.fail(
                H1Error(
                    ProxyError.BAD_RESPONSE,
                    f"more than {self._observer.limits.max_headers} headers",
                )
            )
        n = len(name)
        if (n == 14 or n == 17) and name.lower() in _FRAMING:
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self._observer.response_parser.get_status_code()
        if status < 200:
            self.informational = True  # 100 Continue, 103, or the 101 of an upgrade
            return
        self._observer.response_head(status)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self._observer.response_end()


class Http1Observer:
    """The `Tap` of one inbound HTTP/1.1 relay (see the module docstring). Make it, make
    the `Relay` with ``tap=observer``, then set `relay`."""

    __slots__ = (
        "_clock",
        "_fed_in_head",
        "_finish",
        "_head_started",
        "_held",
        "_opaque",
        "_requests",
        "_responded",
        "_responded_ns",
        "_responses",
        "_span_clock",
        "_status",
        "error",
        "gate",
        "label",
        "limits",
        "pending",
        "relay",
        "request_parser",
        "response_parser",
        "sink",
        "tap",
        "tracing",
    )

    def __init__(
        self,
        sink: ExchangeSink,
        *,
        label: str,
        clock: Callable[[], float],
        limits: Limits | None = None,
        gate: RequestGate | None = None,
        tracing: bool = False,
        span_clock: Callable[[], int] = time.time_ns,
        tap: TapHub | None = None,
    ) -> None:
        self.sink = sink
        self.gate = gate
        self.tap = tap if tap is not None else OFF
        self._span_clock = span_clock
        """Wall-clock ns for spans, read only for traced requests (``clock`` is the
        loop's, which uvloop caches per iteration at millisecond resolution)."""
        self._responded_ns = 0
        self.label = label
        self.limits = limits or Limits()
        self._clock = clock
        self.relay: Relay | None = None
        self.tracing = tracing
        """Read each head's trace headers for a span the client node reserved."""
        self._requests = _TracedRequests(self) if tracing else _Requests(self)
        self._responses = _Responses(self)
        self.request_parser = httptools.HttpRequestParser(self._requests)
        self.response_parser = httptools.HttpResponseParser(self._responses)
        self.pending: deque[_Pending] = deque()
        """Requests sent to the pod and not yet answered: (head time, HEAD?, Host, the
        span reserved for this hop, (method, target) while someone taps)."""
        self.error: H1Error | None = None
        self._fed_in_head = 0
        self._head_started: float | None = None
        self._opaque = False
        self._held: bytes | None = None
        """Bytes after an upgrade request, waiting for the pod's answer."""
        self._status: int | None = None
        self._responded = 0.0
        self._finish = False

    @property
    def opaque(self) -> bool:
        return self._opaque

    # --- Tap -----------------------------------------------------------------------------

    def client_data(self, data: bytes) -> bytes:
        if self._opaque:
            return data
        if self._held is not None:
            self._held += data  # at most one read: reading is held
            return b""
        try:
            self.request_parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            self._held = data[offset:]
            relay = self.relay
            assert relay is not None
            relay.hold(relay.client, True)
            return data[:offset]
        except httptools.HttpParserError as exc:
            self._bad_request(exc)
            return b""
        if self._requests.in_head:
            # What llhttp holds of an unfinished header line is bounded by this count.
            self._fed_in_head += len(data)
            if self._fed_in_head > self.limits.max_head:
                limit = self.limits.max_head
                self._refuse(
                    H1Error(ProxyError.HEADERS_TOO_LARGE, f"request head over {limit} bytes")
                )
                return b""
            # A head trickled over many reads (slowloris) must still end in time; only a
            # head cut across reads reads the clock.
            now = self._clock()
            if self._head_started is None:
                self._head_started = now
            elif now - self._head_started > HEAD_TIMEOUT:
                self._head_timeout()
                return b""
        else:
            self._fed_in_head = 0
            self._head_started = None
        return data

    def upstream_data(self, data: bytes) -> bytes:
        if self._opaque:
            return data
        responses = self._responses
        try:
            self.response_parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded()
            return data
        except httptools.HttpParserError as exc:
            if not responses.skipped:
                self._bad_response(exc)
                return b""
            # A response to HEAD ended the parse on purpose (see `response_head`).
            responses.skipped = False
            self.response_parser = httptools.HttpResponseParser(responses)
            if self.pending:
                self._desync("a request pipelined behind HEAD")
                return b""
        if self._finish:
            relay = self.relay
            assert relay is not None
            relay.send(relay.client, data)
            relay.reply(b"", "closed after declining an upgrade")
            return b""
        return data

    def upstream_eof(self) -> None:
        if self._status is None or self._opaque:
            return
        if self._responses.framed:
            self._lost_all(ProxyError.UPSTREAM_RESET, "the pod closed mid-response")
        else:
            self.response_end()  # close-delimited: the end of the connection ends it

    def client_eof(self) -> None:
        pass  # a request may be answered after the client's half-close

    def ended(self, reason: str, upstream_failed: bool) -> None:
        if upstream_failed:
            self._lost_all(ProxyError.UPSTREAM_RESET, reason)
        else:
            while self.pending:
                self._lost(self.pending.popleft(), None, CANCELLED)

    # --- from the parsers' callbacks -----------------------------------------------------

    def fail(self, error: H1Error) -> None:
        """A limit was crossed inside a callback: stop parsing with ``error``."""
        self.error = error
        raise Stop

    def request_head(self, host: bytes | None) -> None:
        parser = self.request_parser
        method = parser.get_method()
        if method == b"CONNECT":
            self.fail(H1Error(ProxyError.NOT_SUPPORTED, "CONNECT is not proxied"))
        if host is None and parser.get_http_version() == "1.1":
            self.fail(H1Error(ProxyError.BAD_REQUEST, "HTTP/1.1 request without Host"))
        gate = self.gate
        if gate is not None:
            req = self._requests
            why = gate.judge(method.decode("latin-1"), req.url, req.headers or {})
            if why is not None:
                self.fail(H1Error(ProxyError.UNAUTHORIZED, why))
        reserved = None
        if self.tracing:
            found = self._requests.trace
            if found:
                span = peer_span(found)
                if span is not None:
                    reserved = (span, method, self._requests.url, self._span_clock())
        asked = (method, self._requests.url) if self.tap.active else None
        self.pending.append((self._clock(), method == b"HEAD", host, reserved, asked))

    def response_head(self, status: int) -> None:
        pending = self.pending
        if not pending:
            self.fail(H1Error(ProxyError.BAD_RESPONSE, "a response without a request"))
        self._status = status
        self._responded = self._clock()
        if pending[0][3] is not None:
            self._responded_ns = self._span_clock()
        if self._held is not None:
            self._finish = True  # the upgrade was declined: close after this response
        if pending[0][1]:
            # HEAD: no body follows whatever the head says, and llhttp would wait for one.
            self.response_end()
            self._responses.skipped = True
            raise Stop

    def response_end(self) -> None:
        started, _, host, span, asked = self.pending.popleft()
        status, self._status = self._status, None
        if span is None and asked is None:
            self.sink.exchange(host, status, self._responded - started, "")
        else:
            traced = Traced(*span, self._responded_ns) if span is not None else None
            self.sink.exchange(
                host, status, self._responded - started, "", trace=traced, asked=asked
            )

    def _lost(self, entry: _Pending, status: int | None, error: str) -> None:
        """A request that got no response (``host`` is not kept for these: the labels
        of a lost exchange name no authority)."""
        _, _, _, span, asked = entry
        if span is None and asked is None:
            self.sink.exchange(None, status, None, error)
        else:
            traced = Traced(*span, self._span_clock()) if span is not None else None
            self.sink.exchange(None, status, None, error, trace=traced, asked=asked)

    # --- endings -------------------------------------------------------------------------

    def _upgraded(self) -> None:
        """``101``: the rest of the connection is the upgraded protocol, both ways."""
        relay = self.relay
        assert relay is not None
        self._opaque = True
        if self.pending:
            started, _, host, span, asked = self.pending.popleft()
            now = self._clock()
            traced = Traced(*span, self._span_clock()) if span is not None else None
            self.sink.exchange(host, 101, now - started, "", trace=traced, asked=asked)
        held, self._held = self._held, None
        relay.hold(relay.client, False)
        if held:
            relay.send(relay.upstream, held)

    def _lost_all(self, error: ProxyError, detail: str) -> None:
        if self.pending:
            log.info("%s: %d request(s) lost: %s", self.label, len(self.pending), detail)
        while self.pending:
            self._lost(self.pending.popleft(), error.status, error.token)
        self._status = None

    def _bad_request(self, exc: Exception) -> None:
        error = self.error
        if error is None:
            reraise_callback_bug(exc)
            error = H1Error(ProxyError.BAD_REQUEST, parser_error_detail(exc))
        self._refuse(error)

    def _refuse(self, error: H1Error) -> None:
        relay = self.relay
        assert relay is not None
        log.info("%s: %s (%s); closing", self.label, error.error.status, error.detail)
        what = "unauthorized" if error.error is ProxyError.UNAUTHORIZED else "malformed"
        if self.pending:
            # An exchange is in flight: an answer cannot be slotted in before its own.
            relay.abort(f"{what} request ({error.detail})")
        else:
            relay.reply(
                error_response(error.error, error.detail, close=True),
                f"{what} request ({error.detail})",
            )

    def _head_timeout(self) -> None:
        relay = self.relay
        assert relay is not None
        log.info("%s: no complete request head within %gs; closing", self.label, HEAD_TIMEOUT)
        if self.pending:
            relay.abort("request head timeout")
        else:
            relay.reply(REQUEST_TIMEOUT, "request head timeout")

    def _bad_response(self, exc: Exception) -> None:
        error = self.error
        if error is None:
            reraise_callback_bug(exc)
            error = H1Error(ProxyError.BAD_RESPONSE, parser_error_detail(exc))
        log.info("%s: malformed response from the pod (%s); resetting", self.label, error.detail)
        self._lost_all(ProxyError.BAD_RESPONSE, error.detail)
        assert self.relay is not None
        self.relay.abort(f"malformed response ({error.detail})")

    def _desync(self, why: str) -> None:
        log.info("%s: %s cannot be observed; resetting the connection", self.label, why)
        self._lost_all(ProxyError.UPSTREAM_RESET, why)
        assert self.relay is not None
        self.relay.abort(why)
