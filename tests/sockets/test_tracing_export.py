"""Spans over real loopback sockets: the exporter to the lab's OTLP receiver (HTTP and
gRPC), through two proxy hops; a collector that is down, slow, or answering errors
costs the requests nothing; the receiver's API and its process entry point."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import time

import pytest

from nodeagent.tracing import EXPORT_FAILED, QUEUE_FULL, OtlpHttpSender, TraceExporter
from weft.lab.otlp import OtlpReceiver, TraceStore, launch
from weft.tracing import Attr, Resource, Sampler, SpanKind, Tracer, TracingConfig, encode
from weft.tracing.context import parse_traceparent

pytestmark = [pytest.mark.sockets, pytest.mark.timeout(120)]

APP_SPAN = "00f067aa0ba902b7"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def http(port: int, method: str, path: str, body: bytes = b"", headers: str = ""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            f"{headers}Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


def cfg(address, **kw) -> TracingConfig:
    base = dict(collector=address, batch_size=64, batch_interval=0.05, export_timeout=10.0)
    base.update(kw)
    return TracingConfig(**base)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def loop_lag(duration: float) -> float:
    """The longest the event loop was late for a 10 ms tick over ``duration``."""
    loop = asyncio.get_running_loop()
    worst, end = 0.0, loop.time() + duration
    while loop.time() < end:
        before = loop.time()
        await asyncio.sleep(0.01)
        worst = max(worst, loop.time() - before - 0.01)
    return worst


@pytest.fixture
async def receiver():
    r = OtlpReceiver(TraceStore(max_spans=1000))
    grpc = None
    try:
        import grpc as _  # noqa: F401

        grpc = ("127.0.0.1", 0)
    except ImportError:
        pass
    await r.start("127.0.0.1", 0, grpc=grpc)
    yield r
    await r.stop()


async def test_two_hops_reach_the_receiver_parented(receiver):
    """app → outbound proxy (node-1) → inbound proxy (node-2) → app: the receiver holds
    one trace whose CLIENT span's parent is the app's span and whose SERVER span's parent
    is the CLIENT span, each from its node's resource."""
    node1 = TraceExporter(cfg(receiver.http_address), Resource(node="node-1"))
    node2 = TraceExporter(cfg(receiver.http_address), Resource(node="node-2"))
    node1.start()
    node2.start()
    app_headers = [(b"Host", b"echo"), (b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode()),
                   (b"tracestate", b"congo=t61rcWkgMzE")]  # fmt: skip
    out_hop = Tracer().begin(app_headers)
    assert out_hop is not None
    on_the_wire = out_hop.outgoing(app_headers)
    in_hop = Tracer().begin(on_the_wire, lowercase=False)
    assert in_hop is not None
    to_app = in_hop.outgoing(on_the_wire)
    assert (b"tracestate", b"congo=t61rcWkgMzE") in to_app
    delivered = parse_traceparent(dict(to_app)[b"traceparent"])
    assert delivered is not None and delivered.parent_id == in_hop.span_id

    node2.record(in_hop.finish("inbound", SpanKind.SERVER, attributes={Attr.HTTP_STATUS: 200}))
    node1.record(out_hop.finish("outbound", SpanKind.CLIENT, attributes={Attr.HTTP_STATUS: 200}))
    await receiver.store.wait_for_spans(2, within=30)
    await node1.close()
    await node2.close()

    status, body = await http(receiver.http_address[1], "GET", f"/api/traces/{TRACE}")
    assert status == 200
    spans = {s["kind"]: s for s in json.loads(body)["spans"]}
    assert spans["CLIENT"]["parentSpanId"] == APP_SPAN
    assert spans["CLIENT"]["spanId"] == out_hop.span_id_hex
    assert spans["SERVER"]["parentSpanId"] == out_hop.span_id_hex
    assert spans["SERVER"]["spanId"] == in_hop.span_id_hex
    assert spans["CLIENT"]["resource"]["k8s.node.name"] == "node-1"
    assert spans["SERVER"]["resource"]["k8s.node.name"] == "node-2"
    assert spans["SERVER"]["resource"]["service.name"] == "weft-proxy"
    status, body = await http(receiver.http_address[1], "GET", "/api/traces")
    (summary,) = json.loads(body)
    assert summary["traceId"] == TRACE and summary["spans"] == 2
    assert node1.metrics.exported == 1 and node2.metrics.exported == 1


async def test_grpc_export_reaches_the_receiver(receiver):
    pytest.importorskip("grpc")
    exporter = TraceExporter(cfg(receiver.grpc_address, protocol="grpc"), Resource(node="n"))
    exporter.start()
    tracer = Tracer(Sampler(1.0))
    hops = [tracer.begin([]) for _ in range(50)]
    for hop in hops:
        assert hop is not None
        exporter.record(hop.finish("outbound", SpanKind.CLIENT))
    spans = await receiver.store.wait_for_spans(50, within=30)
    await exporter.close()
    assert {s["spanId"] for s in spans} == {h.span_id_hex for h in hops if h is not None}
    assert exporter.metrics.exported == 50


async def test_collector_down_costs_requests_nothing(caplog):
    """Nothing listens: record() stays a bounded append (the queue never grows past its
    cap, the rest is counted), the event loop is never held, and the failure is logged
    once with the collector's address."""
    caplog.set_level(logging.WARNING, "weft.tracing")
    port = free_port()
    exporter = TraceExporter(
        cfg(("127.0.0.1", port), max_queue=500, backoff_initial=0.05, backoff_max=0.2),
        Resource(node="n"),
    )
    exporter.start()
    tracer = Tracer(Sampler(1.0))
    span = tracer.begin([])
    assert span is not None
    finished = span.finish("outbound", SpanKind.CLIENT)
    n = 50_000
    lag = asyncio.create_task(loop_lag(2.0))
    started = time.perf_counter()
    for i in range(n):
        exporter.record(finished)
        if i % 1000 == 0:
            await asyncio.sleep(0)  # let the exporter try (and fail) meanwhile
    per_record = (time.perf_counter() - started) / n
    worst_lag = await lag
    await asyncio.sleep(0.5)
    assert exporter.queued <= 500
    dropped = exporter.metrics.dropped
    assert dropped[QUEUE_FULL] >= n - 500 - 64
    assert exporter.metrics.exported == 0 and exporter.metrics.failures >= 1
    assert worst_lag < 1.0, f"the event loop was held {worst_lag:.3f}s"
    failed = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
    assert len(failed) == 1
    assert f"http://127.0.0.1:{port}/v1/traces" in failed[0]
    assert "connection refused" in failed[0]
    print(f"\nrecord() with the collector down: {per_record * 1e9:.0f} ns per span")
    await exporter.close()


async def test_slow_collector_times_out_without_slowing_anyone(caplog):
    """A collector that accepts and never answers: each export times out, the batch is
    dropped after retry_for, and meanwhile the loop keeps its pace."""
    caplog.set_level(logging.WARNING, "weft.tracing")
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    exporter = TraceExporter(
        cfg(("127.0.0.1", port), export_timeout=0.3, retry_for=1.0, backoff_initial=0.05,
            backoff_max=0.1, max_queue=100),
        Resource(),
    )  # fmt: skip
    exporter.start()
    hop = Tracer(Sampler(1.0)).begin([])
    assert hop is not None
    for _ in range(10):
        exporter.record(hop.finish("x", SpanKind.CLIENT))
    worst_lag = await loop_lag(1.5)
    try:
        async with asyncio.timeout(30):
            while exporter.metrics.dropped[EXPORT_FAILED] < 10:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.05)
    finally:
        await exporter.close()
        for w in held:
            w.transport.abort()
        server.close()
        await server.wait_closed()
    assert worst_lag < 1.0
    assert exporter.metrics.failures >= 2
    failed = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
    assert len(failed) == 1 and "no answer within 0.3s" in failed[0]


async def test_http_errors_retry_after_then_chunked_success():
    """503 with Retry-After is retried; a 200 with a chunked body is taken as success."""
    answers = [
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 4\r\n\r\nbusy",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    bodies: list[bytes] = []

    async def collector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        bodies.append(await reader.readexactly(length))
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(collector, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = OtlpHttpSender("127.0.0.1", port)
    body = encode([], Resource())
    first = await sender.send(body, 10)
    assert not first.ok and first.retryable and first.reason == "HTTP 503: busy"
    assert first.retry_after == 0.0
    second = await sender.send(body, 10)
    assert second.ok
    server.close()
    await server.wait_closed()
    assert bodies == [body, body]


async def test_receiver_api_and_refusals(receiver):
    port = receiver.http_address[1]
    body = encode(
        [Tracer(Sampler(1.0)).begin([]).finish("a", SpanKind.CLIENT)],  # type: ignore[union-attr]
        Resource(),
    )
    pb = "Content-Type: application/x-protobuf\r\n"
    json_type = "Content-Type: application/json\r\n"
    assert (await http(port, "POST", "/v1/traces", body, json_type))[0] == 415
    assert (await http(port, "POST", "/v1/traces", b"\xff\xff\xff", pb))[0] == 400
    assert (await http(port, "GET", "/v1/traces"))[0] == 405
    status, _ = await http(port, "POST", "/v1/traces", gzip.compress(body),
                                pb + "Content-Encoding: gzip\r\n")  # fmt: skip
    assert status == 200
    assert receiver.store.span_count == 1
    assert (await http(port, "GET", "/api/traces/" + "0" * 32))[0] == 404
    assert (await http(port, "GET", "/healthz"))[0] == 200
    assert (await http(port, "DELETE", "/api/traces"))[0] == 200
    assert json.loads((await http(port, "GET", "/api/traces"))[1]) == []


async def test_receiver_keeps_a_bounded_number_of_spans():
    store = TraceStore(max_spans=10)
    tracer = Tracer(Sampler(1.0))
    for _ in range(25):
        hop = tracer.begin([])
        assert hop is not None
        store.add([{"traceId": hop.trace_id_hex, "spanId": hop.span_id_hex, "parentSpanId": "",
                    "name": "x", "startTimeUnixNano": 1, "endTimeUnixNano": 2,
                    "resource": {}}])  # fmt: skip
    assert store.span_count == 10 and store.evicted_spans == 15
    assert len(store.summaries()) == 10


async def test_keep_alive_exports(receiver):
    port = receiver.http_address[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = encode([], Resource())
    try:
        for _ in range(3):
            writer.write(
                b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-protobuf\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()


def test_launch_runs_the_receiver_in_another_process():
    launched = launch("127.0.0.1:0", timeout=60)
    try:

        async def go() -> list:
            exporter = TraceExporter(cfg(launched.http), Resource(node="n"))
            exporter.start()
            hop = Tracer(Sampler(1.0)).begin([])
            assert hop is not None
            exporter.record(hop.finish("outbound", SpanKind.CLIENT))
            await exporter.close()
            assert exporter.metrics.exported == 1
            _, body = await http(launched.http[1], "GET", f"/api/traces/{hop.trace_id_hex}")
            return json.loads(body)["spans"]

        (span,) = asyncio.run(go())
        assert span["name"] == "outbound"
        assert launched.url.startswith("http://127.0.0.1:")
    finally:
        launched.stop()
    assert launched.process.returncode is not None
