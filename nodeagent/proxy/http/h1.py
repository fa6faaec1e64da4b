"""HTTP/1.1 codec, sans-I/O: `httptools` (llhttp, the parser of Node.js) parses, these
classes add a proxy's limits and turn its callbacks into heads and body events, and the
encoders write heads back out with the proxy's own framing.

llhttp is strict by default, which is what a proxy wants against request smuggling: a
``Content-Length`` beside ``Transfer-Encoding``, two different lengths, a
``Transfer-Encoding`` that does not end in ``chunked``, bare LF line ends, whitespace
before a colon or obsolete line folding are all parse errors (400 and a close), never
guesses. Limits (`Limits`) bound what a peer can make us hold: the request line, the
number of headers and the whole head. Bodies are never buffered here: each chunk is
handed on as it is parsed (chunked bodies decoded; the encoder re-chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httptools

from nodeagent.proxy.http.message import (
    HOP_BY_HOP,
    ROUTE_HEADER,
    Headers,
    ProxyError,
    RequestHead,
    ResponseHead,
    connection_tokens,
    end_to_end,
    header,
)


@dataclass(frozen=True)
class Limits:
    max_request_line: int = 8192
    """Bytes of the request-target (414 beyond)."""
    max_headers: int = 100
    """Header fields in a head (431 beyond)."""
    max_head: int = 64 * 1024
    """Bytes of a whole head, request line included (431 beyond)."""

    def __post_init__(self) -> None:
        if min(self.max_request_line, self.max_headers, self.max_head) < 1:
            raise ValueError("HTTP limits must be positive")


class H1Error(Exception):
    """The peer sent something that is not acceptable HTTP/1.1."""

    def __init__(self, error: ProxyError, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


class Stop(Exception):
    """Raised inside a parser callback to stop parsing (the reason is kept aside)."""


class RequestSink(Protocol):
    def request_head(self, head: RequestHead) -> None: ...
    def request_body(self, data: bytes) -> None: ...
    def request_end(self, trailers: Headers) -> None:
        """The request is complete; ``trailers``: a chunked body's trailer fields."""


class ResponseSink(Protocol):
    def response_head(self, head: ResponseHead) -> None:
        """A final or informational (1xx) response head."""

    def response_body(self, data: bytes) -> None: ...
    def response_end(self, head: ResponseHead) -> None: ...


_NOT_FORWARDED = HOP_BY_HOP | {b"content-length"}
"""Dropped from a forwarded head (framing is re-declared by the encoders)."""
_REQUEST_NOTABLE = _NOT_FORWARDED | {b"host", b"expect", ROUTE_HEADER}
"""(``weft-route`` is the mesh's own: one an app sends is dropped, so that the route a
destination judges by is the one the client node matched.)"""
_RESPONSE_NOTABLE = _NOT_FORWARDED | {b"grpc-status"}
_SIMPLE_CONNECTION = frozenset({b"keep-alive", b"close"})
"""``Connection`` values that name no other header: the end-to-end headers are then
known as the head is parsed. Any other value (``upgrade, x-foo``) sends the head through
`end_to_end`, which removes the headers it names."""
"""The fields the codecs look at. Each header name is lower-cased once, as it is parsed,
and the first value of a notable one kept: no head is scanned again per lookup."""


_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


def _version(text: str) -> bytes:
    return _VERSIONS.get(text) or text.encode()


def _length(value: bytes | None) -> int | None:
    return int(value) if value is not None else None  # llhttp has validated it


def _notable(
    found: dict[bytes, bytes], forward: list[tuple[bytes, bytes]], name: bytes, lname: bytes,
    value: bytes,
) -> bool:  # fmt: skip
    """A header a codec looks at (framing, hop-by-hop, Host...): its first value kept in
    ``found``, forwarded unless hop-by-hop; True if it is a ``Connection`` header that
    names more than keep-alive/close (the head then goes through the generic filter)."""
    if lname not in found:
        found[lname] = value
    if lname not in _NOT_FORWARDED:
        forward.append((name, value))
    return lname == b"connection" and value.lower() not in _SIMPLE_CONNECTION


class RequestCodec:
    """Parses the requests of one downstream connection into ``sink`` events.

    `feed` raises `H1Error` for a malformed or over-limit request; after an upgrade
    request (``Upgrade``, once its head is parsed) it stops parsing and returns the bytes
    that followed the head, which belong to the upgraded protocol (or, if the server
    declines, to the next request: `resume`)."""

    __slots__ = (
        "_complex",
        "_error",
        "_fed_in_head",
        "_fields",
        "_forward",
        "_found",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_parser",
        "_trailers",
        "_url",
        "limits",
        "sink",
        "upgraded",
    )

    def __init__(self, sink: RequestSink, limits: Limits | None = None) -> None:
        self.sink = sink
        self.limits = limits or Limits()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._found: dict[bytes, bytes] = {}
        self._forward: Headers = []
        self._complex = False
        self._headers: Headers = []
        self._trailers: Headers = []
        self._in_head = False
        self._head_bytes = 0
        self._fields = 0
        self._fed_in_head = 0
        self._error: H1Error | None = None
        self.upgraded = False

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``; returns the bytes after an upgrade request's head, else None."""
        if self.upgraded:
            return data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            return data[upgrade.args[0] :]
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            reraise_callback_bug(exc)
            raise H1Error(ProxyError.BAD_REQUEST, parser_error_detail(exc)) from None
        if self._in_head:
            # Bytes fed while a head is incomplete bound what httptools accumulates of
            # a header it has not finished (a name or value without its line end).
            self._fed_in_head += len(data)
            if self._fed_in_head > self.limits.max_head:
                raise H1Error(
                    ProxyError.HEADERS_TOO_LARGE,
                    f"request head over {self.limits.max_head} bytes",
                )
        else:
            self._fed_in_head = 0
        return None

    def resume(self, data: bytes) -> None:
        """The server declined an upgrade: parse what followed as the next request."""
        self.upgraded = False
        self._parser = httptools.HttpRequestParser(self)
        if data:
            self.feed(data)

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._fields = 0
        self._url = b""
        self._found = {}
        self._forward = []
        self._complex = False
        self._headers = []
        self._trailers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if len(self._url) > self.limits.max_request_line:
            self._error = H1Error(
                ProxyError.URI_TOO_LONG,
                f"request-target over {self.limits.max_request_line} bytes",
            )
            raise Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, fields are a chunked body's trailers: the same limits apply
        # to head and trailers together.
        if self._in_head:
            lname = name.lower()
            if lname in _REQUEST_NOTABLE:
                if lname != ROUTE_HEADER:
                    self._headers.append((name, value))
                    self._complex |= _notable(self._found, self._forward, name, lname, value)
            else:
                self._headers.append((name, value))
                self._forward.append((name, value))
        else:
            self._trailers.append((name, value))
        self._fields += 1
        self._head_bytes += len(name) + len(value) + 4
        limits = self.limits
        if self._head_bytes > limits.max_head:
            self._error = H1Error(
                ProxyError.HEADERS_TOO_LARGE, f"request head over {limits.max_head} bytes"
            )
            raise Stop
        if self._fields > limits.max_headers:
            self._error = H1Error(
                ProxyError.HEADERS_TOO_LARGE, f"more than {limits.max_headers} headers"
            )
            raise Stop

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        headers = self._headers
        method = parser.get_method()
        if method == b"CONNECT":
            self._error = H1Error(ProxyError.NOT_SUPPORTED, "CONNECT is not proxied")
            raise Stop
        found = self._found
        upgrade = None
        if parser.should_upgrade():
            upgrade = found.get(b"upgrade")
        expect = found.get(b"expect")
        host = found.get(b"host")
        head = RequestHead(
            method=method,
            target=self._url,
            version=_version(parser.get_http_version()),
            headers=headers,
            keep_alive=parser.should_keep_alive(),
            content_length=_length(found.get(b"content-length")),
            chunked=b"transfer-encoding" in found,
            upgrade=upgrade,
            expect_continue=expect is not None and expect.lower() == b"100-continue",
            host=host if host is not None else b"",
            forward=None if self._complex else self._forward,
            te=found.get(b"te"),
        )
        if host is None and head.version == b"1.1":
            self._error = H1Error(ProxyError.BAD_REQUEST, "HTTP/1.1 request without Host")
            raise Stop
        self.sink.request_head(head)

    def on_body(self, body: bytes) -> None:
        self.sink.request_body(body)

    def on_message_complete(self) -> None:
        self.sink.request_end(self._trailers)


class ResponseCodec:
    """Parses the responses of one upstream connection into ``sink`` events.

    Call `expect` before each request is sent (a response to HEAD has no body, which the
    parser cannot know). After a ``101`` the codec stops and `feed` returns the bytes
    that followed, which belong to the upgraded protocol."""

    __slots__ = (
        "_complex",
        "_error",
        "_forward",
        "_found",
        "_head",
        "_head_bytes",
        "_head_request",
        "_headers",
        "_in_head",
        "_parser",
        "_reason",
        "_skipped",
        "limits",
        "reusable",
        "sink",
        "upgraded",
    )

    def __init__(self, sink: ResponseSink, limits: Limits | None = None) -> None:
        self.sink = sink
        self.limits = limits or Limits()
        self._parser = httptools.HttpResponseParser(self)
        self._head: ResponseHead | None = None
        self._found: dict[bytes, bytes] = {}
        self._forward: Headers = []
        self._complex = False
        self._headers: Headers = []
        self._reason = b""
        self._head_request = False
        self._skipped = False
        self._error: H1Error | None = None
        self._in_head = False
        self._head_bytes = 0
        self.upgraded = False
        self.reusable = True
        """False once the connection cannot carry another exchange (HEAD's body-less
        response leaves llhttp in a state only a new parser resets)."""

    def expect(self, method: bytes) -> None:
        self._head_request = method == b"HEAD"

    def feed(self, data: bytes) -> bytes | None:
        if self.upgraded:
            return data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            return data[upgrade.args[0] :]
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            if self._skipped:
                self._skipped = False  # a HEAD response ended the parse on purpose
                return None
            reraise_callback_bug(exc)
            raise H1Error(ProxyError.BAD_RESPONSE, parser_error_detail(exc)) from None
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head:
                raise H1Error(
                    ProxyError.BAD_RESPONSE, f"response head over {self.limits.max_head} bytes"
                )
        return None

    def feed_eof(self) -> bool:
        """The connection ended: True if that completed a close-delimited response."""
        head = self._head
        if head is not None and head.content_length is None and not head.chunked:
            self._head = None
            self.sink.response_end(head)
            return True
        return False

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._found = {}
        self._forward = []
        self._complex = False
        self._reason = b""
        self._in_head = True
        self._head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is not None:
            head.trailers.append((name, value))
            if head.grpc is None and name.lower() == b"grpc-status":
                head.grpc = value
            return
        self._headers.append((name, value))
        lname = name.lower()
        if lname in _RESPONSE_NOTABLE:
            self._complex |= _notable(self._found, self._forward, name, lname, value)
        else:
            self._forward.append((name, value))
        if len(self._headers) > self.limits.max_headers:
            self._error = H1Error(
                ProxyError.BAD_RESPONSE, f"more than {self.limits.max_headers} headers"
            )
            raise Stop

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        found = self._found
        head = ResponseHead(
            status=parser.get_status_code(),
            reason=self._reason,
            version=_version(parser.get_http_version()),
            headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            content_length=_length(found.get(b"content-length")),
            chunked=b"transfer-encoding" in found,
            forward=None if self._complex else self._forward,
            grpc=found.get(b"grpc-status"),
            scanned=True,
        )
        if head.informational:
            self.sink.response_head(head)
            return
        self._head = head
        self.sink.response_head(head)
        if self._head_request:
            # No body follows, whatever the head says; llhttp would wait for one.
            self._head = None
            self.reusable = False
            self.sink.response_end(head)
            self._parser = httptools.HttpResponseParser(self)
            self._skipped = True
            raise Stop

    def on_body(self, body: bytes) -> None:
        self.sink.response_body(body)

    def on_message_complete(self) -> None:
        head = self._head
        if head is None:
            return  # the end of a 1xx
        self._head = None
        self.sink.response_end(head)


def reraise_callback_bug(exc: Exception) -> None:
    """A sink raised inside a parser callback: that is our bug, not the peer's bad
    input; raise it as itself rather than answer 400."""
    cause = exc.__context__
    callback = isinstance(exc, httptools.HttpParserCallbackError)
    if callback and cause is not None and not isinstance(cause, (Stop, H1Error)):
        raise cause


def parser_error_detail(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


# --- encoding ---------------------------------------------------------------------------


def encode_request_head(head: RequestHead) -> bytes:
    """The head to send upstream: HTTP/1.1, end-to-end headers as received, framing
    re-declared (a chunked body is re-chunked), an upgrade kept."""
    out = [b"%s %s HTTP/1.1\r\n" % (head.method, head.target)]
    forward = head.forward
    for k, v in forward if forward is not None else end_to_end(head.headers):
        out.append(b"%s: %s\r\n" % (k, v))
    if head.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        out.append(b"content-length: %d\r\n" % head.content_length)
    if head.upgrade is not None:
        out.append(b"connection: upgrade\r\nupgrade: %s\r\n" % head.upgrade)
    elif (
        (not head.keep_alive and head.version == b"1.1")  # the codec saw Connection: close
        if forward is not None
        else b"close" in connection_tokens(head.headers)
    ):
        out.append(b"connection: close\r\n")
    te = head.te if forward is not None else header(head.headers, b"te")
    if te is not None and b"trailers" in te.lower():
        out.append(b"te: trailers\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def encode_response_head(
    head: ResponseHead, *, length: int | None, chunked: bool, close: bool, upgrade: bool
) -> bytes:
    """The head to send downstream, with the framing the caller chose: ``length``
    (Content-Length), ``chunked``, or neither (no body, or close-delimited)."""
    reason = head.reason or b"-"
    out = [b"HTTP/1.1 %d %s\r\n" % (head.status, reason)]
    forward = head.forward
    for k, v in forward if forward is not None else end_to_end(head.headers):
        out.append(b"%s: %s\r\n" % (k, v))
    if length is not None:
        out.append(b"content-length: %d\r\n" % length)
    elif chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        value = header(head.headers, b"upgrade") or b""
        out.append(b"connection: upgrade\r\nupgrade: %s\r\n" % value)
    elif close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def encode_last_chunk(trailers: Headers) -> bytes:
    if not trailers:
        return LAST_CHUNK
    return b"0\r\n" + b"".join(b"%s: %s\r\n" % kv for kv in trailers) + b"\r\n"
