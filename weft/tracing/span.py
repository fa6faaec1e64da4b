"""The span a proxy hop reports: what OTLP needs, nothing more.

One span per proxy hop: ``CLIENT`` on the caller's node (the outbound proxy calls the
destination for the app), ``SERVER`` on the destination's node (the inbound proxy
serves the request for the app), so a trace reads app → proxy → proxy → app.

Attribute names follow OpenTelemetry's HTTP semantic conventions where one exists
(`Attr`), and ``weft.*`` for what only the mesh knows (workloads, identities, the
endpoint the balancer chose).  Values are str, int, float or bool: what OTLP's
``AnyValue`` carries without nesting.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SpanKind(enum.IntEnum):
    """OTLP's ``Span.SpanKind`` values."""

    INTERNAL = 1
    SERVER = 2
    CLIENT = 3


class StatusCode(enum.IntEnum):
    """OTLP's ``Status.StatusCode`` values."""

    UNSET = 0
    OK = 1
    ERROR = 2


AttrValue = str | int | float | bool


class Attr:
    """Attribute names for a proxy hop's span."""

    HTTP_METHOD = "http.request.method"
    HTTP_STATUS = "http.response.status_code"
    URL_PATH = "url.path"
    URL_SCHEME = "url.scheme"
    SERVER_ADDRESS = "server.address"
    PROTOCOL_VERSION = "network.protocol.version"
    RPC_GRPC_STATUS = "rpc.grpc.status_code"
    ERROR_TYPE = "error.type"
    DIRECTION = "weft.direction"
    SRC_WORKLOAD = "weft.src.workload"
    SRC_NAMESPACE = "weft.src.namespace"
    DST_WORKLOAD = "weft.dst.workload"
    DST_NAMESPACE = "weft.dst.namespace"
    DST_SERVICE = "weft.dst.service"
    CLIENT_ID = "weft.client.id"
    SERVER_ID = "weft.server.id"
    ROUTE = "weft.route"
    RETRIES = "weft.retries"
    ENDPOINT = "weft.endpoint"
    TLS = "weft.tls"
    PROXY_ERROR = "weft.proxy.error"


@dataclass(slots=True)
class Span:
    name: str
    kind: SpanKind
    trace_id: int
    """128-bit; a 64-bit B3 trace id is the same number (high half zero)."""
    span_id: int
    parent_span_id: int
    """0: a root span."""
    start_ns: int
    """Unix nanoseconds."""
    end_ns: int
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    status: StatusCode = StatusCode.UNSET
    status_message: str = ""

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"


def status_for_http(kind: SpanKind, status: int, grpc_status: str = "") -> StatusCode:
    """The span status OpenTelemetry's conventions give an HTTP (or gRPC) outcome: a
    server span errs on 5xx only (a 4xx is the client's fault), a client span on 4xx too;
    gRPC: any non-zero ``grpc-status`` (a server span ignores the client's own mistakes
    the same way only in newer conventions; keeping it simple here)."""
    if grpc_status and grpc_status != "0":
        return StatusCode.ERROR
    if status >= 500 or (kind is SpanKind.CLIENT and status >= 400) or status <= 0:
        return StatusCode.ERROR
    return StatusCode.UNSET
