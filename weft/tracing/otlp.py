"""Spans to OTLP protobuf (``ExportTraceServiceRequest``) and back.

Encoding uses `opentelemetry-proto`'s generated classes, so the bytes are what any OTLP
receiver (OpenTelemetry Collector, Jaeger, Tempo) decodes; the same body goes over
OTLP/HTTP (``POST /v1/traces``, ``application/x-protobuf``) and OTLP/gRPC
(``TraceService/Export``).  One request carries one resource — the proxy of one node,
``service.name=weft-proxy`` — and one instrumentation scope.

`decode` reads a request the way a tracing backend would and returns plain JSON-ready
dicts (hex ids, attribute values unwrapped): the lab's receiver and the tests use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from weft import __version__
from weft.tracing.span import AttrValue, Span

SERVICE_NAME = "weft-proxy"
SCOPE_NAME = "weft.proxy"
CONTENT_TYPE = "application/x-protobuf"
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class Resource:
    """Who emitted the spans: the service (``weft-proxy``) and the node it runs on."""

    node: str = ""
    service: str = SERVICE_NAME
    attributes: Mapping[str, AttrValue] = field(default_factory=dict)

    def items(self) -> list[tuple[str, AttrValue]]:
        out: list[tuple[str, AttrValue]] = [
            ("service.name", self.service),
            ("service.version", __version__),
        ]
        if self.node:
            out += [("k8s.node.name", self.node), ("host.name", self.node)]
        out += [(k, v) for k, v in self.attributes.items()]
        return out


def _set_value(value: AnyValue, v: AttrValue) -> None:
    # bool before int: bool is an int subclass.
    if isinstance(v, bool):
        value.bool_value = v
    elif isinstance(v, int):
        value.int_value = v
    elif isinstance(v, float):
        value.double_value = v
    else:
        value.string_value = str(v)


def _add_attributes(target: Any, items: Iterable[tuple[str, AttrValue]]) -> None:
    for key, v in items:
        kv: KeyValue = target.add()
        kv.key = key
        _set_value(kv.value, v)


class RequestBuilder:
    """An export request filled a few spans at a time.

    Setting protobuf fields from Python costs some 25 µs a span: a whole batch at once
    would hold an event loop for milliseconds, so the exporter adds a slice, yields,
    and adds the next.  Serializing the finished message is one fast C call."""

    def __init__(self, resource: Resource) -> None:
        self.request = ExportTraceServiceRequest()
        rs = self.request.resource_spans.add()
        _add_attributes(rs.resource.attributes, resource.items())
        ss = rs.scope_spans.add()
        ss.scope.name = SCOPE_NAME
        ss.scope.version = __version__
        self._spans = ss.spans
        self.count = 0

    def add(self, spans: Iterable[Span]) -> None:
        out = self._spans
        for span in spans:
            s = out.add()
            s.trace_id = span.trace_id.to_bytes(16, "big")
            s.span_id = span.span_id.to_bytes(8, "big")
            if span.parent_span_id:
                s.parent_span_id = span.parent_span_id.to_bytes(8, "big")
            s.name = span.name
            s.kind = int(span.kind)  # type: ignore[assignment]
            s.start_time_unix_nano = span.start_ns
            s.end_time_unix_nano = max(span.end_ns, span.start_ns)
            _add_attributes(s.attributes, span.attributes.items())
            if span.status:
                s.status.code = int(span.status)  # type: ignore[assignment]
                if span.status_message:
                    s.status.message = span.status_message
            self.count += 1

    def encode(self) -> bytes:
        return self.request.SerializeToString()


def request(spans: Iterable[Span], resource: Resource) -> ExportTraceServiceRequest:
    """The export request for ``spans``."""
    builder = RequestBuilder(resource)
    builder.add(spans)
    return builder.request


def encode(spans: Iterable[Span], resource: Resource) -> bytes:
    """The protobuf body of an OTLP export of ``spans``."""
    return request(spans, resource).SerializeToString()


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def _attrs(items: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in trace_pb2.Span.SpanKind.items()}
_CODES = {
    value: name.removeprefix("STATUS_CODE_") for name, value in trace_pb2.Status.StatusCode.items()
}


def decode(body: bytes) -> list[dict[str, Any]]:
    """Every span of an OTLP/protobuf export request, as a backend would show it:
    ``traceId``/``spanId``/``parentSpanId`` in lowercase hex (parent ``""`` for a root),
    ``kind`` (``CLIENT``, ``SERVER``, ...), times in unix ns, attributes as a dict,
    ``status`` {``code``, ``message``}, and the span's ``resource`` attributes and
    ``scope``.  Raises ``google.protobuf.message.DecodeError`` on a malformed body."""
    req = ExportTraceServiceRequest.FromString(body)
    return spans_of(req)


def spans_of(req: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = {"name": ss.scope.name, "version": ss.scope.version}
            for s in ss.spans:
                out.append(
                    {
                        "traceId": s.trace_id.hex(),
                        "spanId": s.span_id.hex(),
                        "parentSpanId": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": _KINDS.get(s.kind, str(s.kind)),
                        "startTimeUnixNano": s.start_time_unix_nano,
                        "endTimeUnixNano": s.end_time_unix_nano,
                        "attributes": _attrs(s.attributes),
                        "status": {
                            "code": _CODES.get(s.status.code, str(s.status.code)),
                            "message": s.status.message,
                        },
                        "resource": resource,
                        "scope": scope,
                    }
                )
    return out


def response(rejected: int = 0, message: str = "") -> bytes:
    """An ``ExportTraceServiceResponse`` body (``partial_success`` when spans were
    rejected)."""
    resp = ExportTraceServiceResponse()
    if rejected or message:
        resp.partial_success.rejected_spans = rejected
        resp.partial_success.error_message = message
    return resp.SerializeToString()


def rejected_spans(body: bytes) -> tuple[int, str]:
    """(rejected spans, error message) of an export response body; (0, "") for an empty
    or unreadable one (a collector that answers 2xx accepted the request)."""
    try:
        resp = ExportTraceServiceResponse.FromString(body)
    except Exception:
        return 0, ""
    return resp.partial_success.rejected_spans, resp.partial_success.error_message
