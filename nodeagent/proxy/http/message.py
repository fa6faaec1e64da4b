"""What the HTTP stages pass around: request and response heads, the proxy's own error
responses, and the rules a proxy applies to headers (hop-by-hop, framing).

Heads keep header names as received (case and order): a proxy that rewrites them breaks
apps that (wrongly, but commonly) depend on either. Lookups are case-insensitive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from weft.routes import HeaderModifier

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers that describe one connection, not the message (RFC 9110 §7.6.1): never
forwarded as received. (``Upgrade`` and ``Connection: upgrade`` are re-added for an
upgrade request; framing is re-added by the encoder.)"""

PROXY_ERROR_HEADER = b"weft-proxy-error"
ROUTE_HEADER = b"weft-route"
"""On an HTTP/1.1 request a Gateway API route matched: the route (``ns/name``), set by
the client's node for the destination's per-route policies; an app's own is dropped."""
RETRY_ATTEMPT_HEADER = b"weft-retry-attempt"
"""On a retried request: which retry this is (1, 2, ...), so the app can tell."""
RETRY_ATTEMPTS_HEADER = b"weft-retry-attempts"
"""On a response to the client: how many retries it took (absent when none)."""

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods a proxy may send again after a connection failure left it unknown whether
the first attempt was processed (RFC 9110 §9.2.2)."""


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def connection_tokens(headers: Headers) -> set[bytes]:
    """The lower-cased tokens of every ``Connection`` header."""
    tokens: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            tokens.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return tokens


def end_to_end(headers: Headers) -> Headers:
    """``headers`` without the hop-by-hop ones, including those ``Connection`` names."""
    named = connection_tokens(headers)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(k, v) for k, v in headers if k.lower() not in drop and k.lower() != b"content-length"]


def modify_headers(head: RequestHead | ResponseHead, modifier: HeaderModifier) -> None:
    """Apply a route's header modifier to the headers ``head`` is sent with."""
    h2 = head.version == b"2"
    forward = head.headers if h2 else head.forward
    if forward is None:
        if isinstance(head, RequestHead):
            head.te = header(head.headers, b"te")
        forward = end_to_end(head.headers)
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in forward]
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in modifier.apply(pairs)]
    if h2:
        head.headers = out
    else:
        head.forward = out


def set_forward_header(head: RequestHead | ResponseHead, name: bytes, value: bytes) -> None:
    """Send ``head`` with header ``name`` (lower case) set to ``value``, replacing any
    the peer sent: the proxy's own headers (retry counts)."""
    forward = head.forward
    if forward is None:
        if isinstance(head, RequestHead):
            head.te = header(head.headers, b"te")
        forward = end_to_end(head.headers)
    head.forward = [(k, v) for k, v in forward if k.lower() != name]
    head.forward.append((name, value))


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    """The request-target as received (origin form ``/path?q``, or absolute form)."""
    version: bytes
    """``1.1`` or ``1.0``."""
    headers: Headers
    keep_alive: bool
    """Whether the client keeps the connection open after this exchange."""
    content_length: int | None = None
    chunked: bool = False
    upgrade: bytes | None = None
    """The ``Upgrade`` protocol asked for (``websocket``), or None."""
    expect_continue: bool = False
    pseudo_authority: bytes | None = None
    """HTTP/2: ``:authority`` (the headers hold no pseudo-headers)."""
    scheme: bytes = b"http"
    """HTTP/2: ``:scheme``."""
    host: bytes | None = None
    """HTTP/1.1: the Host header as the codec found it (``b""``: none); None: not
    looked at (look it up)."""
    forward: Headers | None = None
    """The end-to-end headers (what `end_to_end` returns), collected by the HTTP/1.1
    codec as it parsed; None: compute them."""
    te: bytes | None = None
    """HTTP/1.1: the ``TE`` header the codec found (when `forward` is set)."""

    @property
    def authority(self) -> str:
        host = self.pseudo_authority
        if host is None:
            host = self.host
            if host is None:
                host = header(self.headers, b"host")
        return host.decode("latin-1") if host else ""

    @property
    def path(self) -> str:
        """The path, without the query (what routes match on)."""
        target = self.target
        if target.startswith((b"http://", b"https://")):
            slash = target.find(b"/", target.find(b"//") + 2)
            target = target[slash:] if slash >= 0 else b"/"
        return target.split(b"?", 1)[0].decode("latin-1")

    @property
    def has_body(self) -> bool:
        """HTTP/1.1: chunked or a non-zero length; HTTP/2: the HEADERS frame did not end
        the stream (``chunked`` is set: a body whose length is not known in advance)."""
        return self.chunked or bool(self.content_length)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    """Whether the server keeps the connection open after this response."""
    content_length: int | None = None
    chunked: bool = False
    trailers: Headers = field(default_factory=list)
    forward: Headers | None = None
    """As `RequestHead.forward`."""
    grpc: bytes | None = None
    """``grpc-status`` from the head or the trailers, when `scanned`."""
    scanned: bool = False
    """The codec looked for ``grpc-status`` as it parsed (HTTP/1.1): `grpc` is it."""

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200

    @property
    def grpc_status(self) -> str:
        if self.scanned:
            value = self.grpc
        else:
            value = header(self.headers, b"grpc-status") or header(self.trailers, b"grpc-status")
        return value.decode("latin-1") if value is not None else ""


class ProxyError(enum.Enum):
    """Why the proxy itself answered a request; the value is (status, token) and the
    token goes into the ``weft-proxy-error`` header, so a client (and a person reading a
    curl -v) can tell the mesh's failures from the app's."""

    BAD_REQUEST = (400, "bad-request")
    HEADERS_TOO_LARGE = (431, "headers-too-large")
    URI_TOO_LONG = (414, "uri-too-long")
    NOT_SUPPORTED = (501, "not-supported")
    NO_ENDPOINTS = (503, "no-endpoints")
    PLAINTEXT_REFUSED = (502, "plaintext-refused")
    CONNECT_FAILED = (502, "connect-failed")
    IDENTITY_MISMATCH = (502, "identity-mismatch")
    UPSTREAM_RESET = (502, "upstream-reset")
    BAD_RESPONSE = (502, "bad-response")
    UNAUTHORIZED = (403, "unauthorized")
    TIMEOUT = (504, "timeout")
    NO_ROUTE = (404, "no-route")
    """Routes are attached to the service and none matches the request (GAMMA)."""
    ROUTE_BACKEND = (500, "route-backend-unusable")
    """The matched rule has no usable backend: all weights 0, or an invalid reference
    (the Gateway API says 500)."""
    OVERLOADED = (503, "overloaded")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def grpc_code(self) -> int:
        """The gRPC status a gRPC client gets instead (as Linkerd answers them)."""
        return _GRPC_CODES.get(self, 14)  # UNAVAILABLE

    @property
    def token(self) -> str:
        return self.value[1]


_GRPC_CODES = {
    ProxyError.NO_ROUTE: 12,  # UNIMPLEMENTED
    ProxyError.ROUTE_BACKEND: 13,
    ProxyError.BAD_REQUEST: 13,  # INTERNAL
    ProxyError.HEADERS_TOO_LARGE: 8,  # RESOURCE_EXHAUSTED
    ProxyError.NOT_SUPPORTED: 12,  # UNIMPLEMENTED
    ProxyError.BAD_RESPONSE: 13,
    ProxyError.UNAUTHORIZED: 7,  # PERMISSION_DENIED
    ProxyError.TIMEOUT: 4,  # DEADLINE_EXCEEDED
    ProxyError.OVERLOADED: 8,
}

REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def error_response(error: ProxyError, detail: str, *, close: bool) -> bytes:
    """A complete HTTP/1.1 response for a request the proxy could not serve."""
    body = f"{error.token}: {detail}\n".encode("utf-8", "replace")
    status = error.status
    lines = [
        b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error")),
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(body),
        PROXY_ERROR_HEADER + b": " + error.token.encode(),
    ]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
