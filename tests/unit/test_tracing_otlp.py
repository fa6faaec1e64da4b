"""Spans encoded as OTLP protobuf, decoded back with opentelemetry-proto's own classes;
the tracing configuration parsed from a mapping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from weft.tracing import (
    Attr,
    Resource,
    Span,
    SpanKind,
    StatusCode,
    TracingConfig,
    TracingConfigError,
    decode,
    encode,
    status_for_http,
)
from weft.tracing.otlp import RequestBuilder, rejected_spans, response


def _span(**kw) -> Span:
    base = dict(
        name="outbound",
        kind=SpanKind.CLIENT,
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x1111222233334444,
        parent_span_id=0x00F067AA0BA902B7,
        start_ns=1_700_000_000_000_000_000,
        end_ns=1_700_000_000_002_500_000,
        attributes={
            Attr.HTTP_METHOD: "GET",
            Attr.HTTP_STATUS: 503,
            Attr.TLS: True,
            "weft.ratio": 0.5,
        },
        status=StatusCode.ERROR,
        status_message="upstream 503",
    )
    base.update(kw)
    return Span(**base)  # type: ignore[arg-type]


def test_encoding_decodes_with_the_protobuf_classes():
    body = encode([_span(), _span(span_id=5, parent_span_id=0, kind=SpanKind.SERVER)],
                  Resource(node="node-1"))  # fmt: skip
    req = ExportTraceServiceRequest.FromString(body)
    assert len(req.resource_spans) == 1
    rs = req.resource_spans[0]
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "weft-proxy"
    assert resource["k8s.node.name"] == "node-1"
    (ss,) = rs.scope_spans
    assert ss.scope.name == "weft.proxy"
    first, second = ss.spans
    assert first.trace_id == bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
    assert first.span_id == bytes.fromhex("1111222233334444")
    assert first.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert first.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert first.name == "outbound"
    assert first.start_time_unix_nano == 1_700_000_000_000_000_000
    assert first.end_time_unix_nano == 1_700_000_000_002_500_000
    attrs = {kv.key: kv.value for kv in first.attributes}
    assert attrs["http.request.method"].string_value == "GET"
    assert attrs["http.response.status_code"].int_value == 503
    assert attrs["weft.tls"].bool_value is True
    assert attrs["weft.ratio"].double_value == 0.5
    assert first.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert first.status.message == "upstream 503"
    assert second.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert second.parent_span_id == b""  # a root
    assert second.span_id == (5).to_bytes(8, "big")


def test_decode_gives_what_a_backend_shows():
    (span,) = decode(encode([_span()], Resource(node="node-2")))
    assert span["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span["spanId"] == "1111222233334444"
    assert span["parentSpanId"] == "00f067aa0ba902b7"
    assert span["kind"] == "CLIENT"
    assert span["status"] == {"code": "ERROR", "message": "upstream 503"}
    assert span["attributes"]["http.response.status_code"] == 503
    assert span["attributes"]["weft.tls"] is True
    assert span["resource"]["service.name"] == "weft-proxy"
    assert span["resource"]["k8s.node.name"] == "node-2"


def test_64_bit_trace_ids_are_zero_padded():
    (span,) = decode(encode([_span(trace_id=0xABC)], Resource()))
    assert span["traceId"] == "0" * 29 + "abc"


def test_unset_status_and_end_before_start():
    (span,) = decode(encode([_span(status=StatusCode.UNSET, end_ns=1)], Resource()))
    assert span["status"]["code"] == "UNSET"
    assert span["endTimeUnixNano"] == span["startTimeUnixNano"]


def test_builder_in_slices_equals_one_go():
    spans = [_span(span_id=i + 1) for i in range(70)]
    builder = RequestBuilder(Resource(node="n"))
    for i in range(0, 70, 32):
        builder.add(spans[i : i + 32])
    assert builder.count == 70
    assert builder.encode() == encode(spans, Resource(node="n"))


def test_responses():
    assert rejected_spans(response()) == (0, "")
    assert rejected_spans(response(3, "too old")) == (3, "too old")
    assert rejected_spans(b"") == (0, "")
    assert rejected_spans(b"\xff\xff not protobuf") == (0, "")
    assert ExportTraceServiceResponse.FromString(response(2)).partial_success.rejected_spans == 2


attr_values = st.one_of(
    st.text(max_size=20), st.integers(-(2**63), 2**63 - 1), st.booleans(),
    st.floats(allow_nan=False),
)  # fmt: skip


@given(
    st.integers(1, (1 << 128) - 1),
    st.integers(1, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
    st.text(max_size=30),
    st.dictionaries(st.text(min_size=1, max_size=10), attr_values, max_size=5),
)
def test_round_trip(trace_id, span_id, parent, name, attributes):
    span = _span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name,
                 attributes=attributes)  # fmt: skip
    (got,) = decode(encode([span], Resource()))
    assert got["traceId"] == f"{trace_id:032x}"
    assert got["spanId"] == f"{span_id:016x}"
    assert got["parentSpanId"] == (f"{parent:016x}" if parent else "")
    assert got["name"] == name
    assert got["attributes"] == attributes


@pytest.mark.parametrize(
    ("kind", "status", "grpc", "expected"),
    [
        (SpanKind.SERVER, 200, "", StatusCode.UNSET),
        (SpanKind.SERVER, 404, "", StatusCode.UNSET),
        (SpanKind.CLIENT, 404, "", StatusCode.ERROR),
        (SpanKind.SERVER, 503, "", StatusCode.ERROR),
        (SpanKind.SERVER, 200, "0", StatusCode.UNSET),
        (SpanKind.SERVER, 200, "14", StatusCode.ERROR),
        (SpanKind.CLIENT, 0, "", StatusCode.ERROR),  # no response at all
    ],
)
def test_status_for_http(kind, status, grpc, expected):
    assert status_for_http(kind, status, grpc) is expected


# --- configuration ------------------------------------------------------------------------


def test_config_defaults_off():
    cfg = TracingConfig.from_mapping({})
    assert not cfg.enabled and cfg.sample_rate == 0.0 and cfg.protocol == "http"


def test_config_from_mapping():
    cfg = TracingConfig.from_mapping(
        {
            "WEFT_TRACE_COLLECTOR": "otel-collector.observability:4318",
            "WEFT_TRACE_SAMPLE_RATE": "0.01",
            "WEFT_TRACE_QUEUE": "100",
            "WEFT_TRACE_BATCH": "10",
            "WEFT_TRACE_INTERVAL": "0.5",
        }
    )
    assert cfg.collector == ("otel-collector.observability", 4318)
    assert cfg.collector_url == "http://otel-collector.observability:4318/v1/traces"
    assert (cfg.sample_rate, cfg.max_queue, cfg.batch_size, cfg.batch_interval) == (
        0.01,
        100,
        10,
        0.5,
    )
    grpc = TracingConfig.from_mapping(
        {"WEFT_TRACE_COLLECTOR": "jaeger", "WEFT_TRACE_PROTOCOL": "grpc"}
    )
    assert grpc.collector == ("jaeger", 4317) and grpc.collector_url == "grpc://jaeger:4317"
    v6 = TracingConfig.from_mapping({"WEFT_TRACE_COLLECTOR": "http://[::1]:4318/v1/traces"})
    assert v6.collector == ("::1", 4318)
    assert TracingConfig.from_mapping({"WEFT_TRACE_COLLECTOR": "tempo"}).collector == (
        "tempo",
        4318,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEFT_TRACE_COLLECTOR": "host:99999"}, "bad port"),
        ({"WEFT_TRACE_COLLECTOR": ":4318"}, "no host"),
        ({"WEFT_TRACE_COLLECTOR": "host:4318/api"}, "path"),
        ({"WEFT_TRACE_SAMPLE_RATE": "2"}, "0..1"),
        ({"WEFT_TRACE_SAMPLE_RATE": "often"}, "number"),
        ({"WEFT_TRACE_PROTOCOL": "zipkin"}, "protocol"),
        ({"WEFT_TRACE_QUEUE": "0"}, "at least 1"),
        ({"WEFT_TRACE_BATCH": "1.5"}, "whole"),
        ({"WEFT_TRACE_INTERVAL": "0"}, "positive"),
    ],
)
def test_config_errors(env, message):
    with pytest.raises(TracingConfigError, match=message):
        TracingConfig.from_mapping(env)
