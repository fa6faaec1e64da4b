"""The inbound SERVER span over real loopback sockets: `InboundHttp` with a tracer, a
client connection standing in for the tunnel stream, relayed to a scripted HTTP/1.1 pod
or an h2c replica. A request whose headers a caller's hop reserved a span in
(`Hop.outgoing(peer=True)`) reaches the pod byte for byte and yields one SERVER span —
the reserved id, the caller's span as parent, the verified client identity, the pod's
workload, status and gRPC status; requests without a reservation, with a stale one or
unsampled record nothing; with tracing off the observer keeps no headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.proxy.http.inbound import InboundHttp
from nodeagent.proxy.http.observe import Http1Observer, _Requests, _TracedRequests
from nodeagent.proxy.tunnel.hooks import connect_target_plaintext
from tests.h2util import H2Replica
from tests.sockets.test_inbound_h2_observer import Harness as H2Harness
from tests.sockets.test_inbound_observer import (
    CLIENT,
    POD,
    Harness,
    Pod,
    _response,
    echo_handler,
    stream_listener,
)
from weft.tracing import Attr, Hop, Sampler, Span, SpanKind, StatusCode, Tracer
from weft.tracing.context import parse_traceparent
from weft.tracing.peer import member

pytestmark = [pytest.mark.sockets, pytest.mark.timeout(120)]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{APP}-01".encode()


def _caller_hop(headers: list[tuple[bytes, bytes]]) -> tuple[Hop, list[tuple[bytes, bytes]]]:
    """What the caller's node sends: its hop, and the headers with a reservation."""
    hop = Tracer(Sampler()).begin(headers)
    assert hop is not None
    return hop, hop.outgoing(headers, peer=True)


def _head(path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = b"".join(b"%s: %s\r\n" % kv for kv in headers)
    return b"GET %s HTTP/1.1\r\nHost: echo.default\r\n%s\r\n" % (path.encode(), lines)


async def _h1_harness(spans: list[Span], tracing: bool) -> tuple[Harness, asyncio.Server]:
    pod = Pod()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = bytearray()
        pod.received.append(sink)
        try:
            await echo_handler(reader, writer, sink)
        except ConnectionError:
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pod.port = server.sockets[0].getsockname()[1]
    metrics = HttpMetrics()
    http = InboundHttp(
        connect=connect_target_plaintext, metrics=metrics, workload_at=lambda ip: POD,
        tracer=Tracer(Sampler()) if tracing else None, record_span=spans.append,
    )  # fmt: skip
    return Harness(pod, http, metrics, stream_listener()), server


@pytest.fixture
async def spans() -> list[Span]:
    return []


@pytest.fixture
async def traced(spans: list[Span]) -> AsyncIterator[Harness]:
    harness, server = await _h1_harness(spans, tracing=True)
    try:
        yield harness
    finally:
        await harness.close()
        harness.listener.close()
        server.close()


async def test_h1_reserved_request_is_one_server_span(traced: Harness, spans: list[Span]):
    hop, reserved = _caller_hop([(b"traceparent", SAMPLED), (b"tracestate", b"vendor=1")])
    stale = [(b"traceparent", SAMPLED), (b"tracestate", member(0x1, 0x2))]
    unsampled = [(b"traceparent", f"00-{TRACE}-{hop.peer_id:016x}-00".encode()),
                 (b"tracestate", member(hop.span_id, hop.peer_id))]  # fmt: skip
    requests = [
        _head("/none", []),
        _head("/plain", [(b"traceparent", SAMPLED)]),
        _head("/stale", stale),
        _head("/unsampled", unsampled),
        _head("/traced?q=1", reserved),
    ]
    reader, writer = await traced.stream()
    began = time.time_ns()
    for request in requests:
        writer.write(request)
        head, _ = await _response(reader)
        assert head.startswith(b"HTTP/1.1 200")
    ended = time.time_ns()
    writer.close()
    assert bytes(traced.pod.received[0]) == b"".join(requests)  # relayed byte for byte
    (span,) = spans
    assert span.trace_id_hex == TRACE
    assert span.span_id == hop.peer_id and span.parent_span_id == hop.span_id
    # The app is handed the reserved span as its parent.
    sent = parse_traceparent(dict(reserved)[b"traceparent"])
    assert sent is not None and sent.parent_id == span.span_id
    assert span.kind is SpanKind.SERVER and span.name == "inbound"
    assert began <= span.start_ns <= span.end_ns <= ended
    a = span.attributes
    assert a[Attr.CLIENT_ID] == str(CLIENT) and a[Attr.SRC_NAMESPACE] == "shop"
    assert a[Attr.DST_WORKLOAD] == "echo-1" and a[Attr.DST_NAMESPACE] == "default"
    assert a[Attr.HTTP_STATUS] == 200 and a[Attr.HTTP_METHOD] == "GET"
    assert a[Attr.URL_PATH] == "/traced" and a[Attr.PROTOCOL_VERSION] == "1.1"
    assert a[Attr.DIRECTION] == "inbound" and a[Attr.TLS] is True
    assert span.status is StatusCode.UNSET


async def test_h1_tracing_off_keeps_no_headers(spans: list[Span]):
    harness, server = await _h1_harness(spans, tracing=False)
    try:
        _, reserved = _caller_hop([(b"traceparent", SAMPLED)])
        reader, writer = await harness.stream()
        writer.write(_head("/", reserved))
        head, _ = await _response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        assert spans == []
    finally:
        await harness.close()
        harness.listener.close()
        server.close()


def test_the_parser_callbacks_cost_nothing_without_tracing():
    # The callback class is chosen per observer: without tracing, llhttp calls the
    # plain `on_header`, which looks at no trace header.
    sink = HttpMetrics()  # any object: no exchange happens here
    off = Http1Observer(sink, label="t", clock=time.monotonic)  # type: ignore[arg-type]
    on = Http1Observer(sink, label="t", clock=time.monotonic, tracing=True)  # type: ignore[arg-type]
    assert type(off._requests) is _Requests and type(on._requests) is _TracedRequests


async def test_h2_reserved_grpc_stream(unused_tcp_port: int, spans: list[Span]):
    pod = H2Replica("echo-1")
    await pod.start("127.0.0.1", unused_tcp_port)
    listener = stream_listener()
    metrics = HttpMetrics()
    http = InboundHttp(
        connect=connect_target_plaintext, metrics=metrics, workload_at=lambda ip: POD,
        tracer=Tracer(Sampler()), record_span=spans.append,
    )  # fmt: skip
    harness = H2Harness(pod, unused_tcp_port, http, metrics, listener)
    try:
        peer = await harness.stream()
        grpc = [(b"content-type", b"application/grpc")]
        hop, reserved = _caller_hop([(b"traceparent", SAMPLED), *grpc])
        plain = await peer.request("POST", "/grpc-ok", headers=[(b"traceparent", SAMPLED), *grpc])
        bad = await peer.request("POST", "/grpc-fail", headers=reserved)
        assert plain.trailers[b"grpc-status"] == b"0" and bad.trailers[b"grpc-status"] == b"14"
        await harness.until(lambda: len(harness.responses()) == 2, "two streams")
        (span,) = spans
        assert span.span_id == hop.peer_id and span.parent_span_id == hop.span_id
        assert span.attributes[Attr.RPC_GRPC_STATUS] == 14
        assert span.attributes[Attr.URL_PATH] == "/grpc-fail"
        assert span.attributes[Attr.PROTOCOL_VERSION] == "2"
        assert span.status is StatusCode.ERROR
        seen = pod.headers_seen[-1]
        assert seen[b"tracestate"] == member(hop.span_id, hop.peer_id)
    finally:
        for p in harness.peers:
            p.close()
        listener.close()
        pod.close()
