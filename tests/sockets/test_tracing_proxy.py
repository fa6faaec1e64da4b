"""The outbound span over real loopback sockets: the HTTP/1.1 and HTTP/2 outbound
stages (`OutboundHttp` in a real `Http1Server`/`H2Server`) with a tracer and a
`TraceExporter`, replicas that record the headers they received, and the lab's OTLP
receiver (`weft.lab.otlp`) as the backend.  A sampled request reaches the replica as
the child of the proxy's span, and the receiver holds that one CLIENT span, child of
the caller's; an unsampled one passes untouched and records nothing; a collector that
is down costs the requests nothing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.meshstate import MeshState
from nodeagent.proxy.balance import Balancer, PeakEwma
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover
from nodeagent.proxy.http.client import Http1Pool
from nodeagent.proxy.http.forward import H2, OutboundHttp
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.h2server import H2Server
from nodeagent.proxy.http.server import Http1Server, HttpServerConfig
from nodeagent.proxy.retry import RetryBudget
from nodeagent.tracing import TraceExporter
from tests.h2util import H2Replica
from weft.identity import SpiffeId
from weft.lab.h2peer import H2Peer
from weft.lab.otlp import OtlpReceiver, TraceStore
from weft.mesh import Endpoint, InboundMode, Service, ServicePort, Workload
from weft.meshwire import SnapshotMsg
from weft.routes import Route, parse_route
from weft.tracing import Attr, Resource, Tracer, TracingConfig
from weft.tracing.context import parse_b3_single, parse_traceparent
from weft.traffic import DEFAULT as DEFAULT_TRAFFIC
from weft.traffic import TrafficPolicy, parse_traffic

pytestmark = [pytest.mark.sockets, pytest.mark.timeout(120)]

VIP = ("10.96.0.21", 80)
CLIENT_IP = "127.0.0.1"
REPLICAS = ("127.0.0.2", "127.0.0.3")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{APP_SPAN}-01"
UNSAMPLED = f"00-{TRACE}-{APP_SPAN}-00"


# --- replicas that keep what they received ----------------------------------------------


@dataclass
class Replicas:
    seen: list[dict[str, str]] = field(default_factory=list)
    """Each request's headers (names lower case), in arrival order."""
    failed: int = 0
    servers: list[asyncio.Server] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(headers)
                status = 200
                if lines[0].split(" ")[1] == "/flaky" and not self.failed:
                    self.failed += 1
                    status = 503
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % status)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for w in self.writers:
            w.transport.abort()


def _pod(uid: str, name: str, ip: str, sa: str) -> Workload:
    return Workload(
        uid=uid, name=name, namespace="default", node="n", ips=(ip,), service_account=sa,
        identity=SpiffeId.workload("default", sa), captured=False,
        inbound_mode=InboundMode.PERMISSIVE,
    )  # fmt: skip


ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "to-v2", "namespace": "default"},
    "spec": {
        "parentRefs": [{"kind": "Service", "name": "echo", "port": 80}],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                   "backendRefs": [{"name": "echo-v2", "port": 80}]}],
    },
}  # fmt: skip


def _mesh(port: int, traffic: TrafficPolicy, routes: tuple[Route, ...] = ()) -> MeshState:
    """Service ``echo`` at `VIP` on the two replicas (with ``routes``: to ``echo-v2``,
    the same pods), and the calling app at `CLIENT_IP`."""
    state = MeshState()
    pods = [_pod(f"uid-{i}", f"echo-{i}", ip, "echo") for i, ip in enumerate(REPLICAS)]
    caller = _pod("uid-client", "client-0", CLIENT_IP, "client")

    def service(name: str, vip: str, routes: tuple[Route, ...] = ()) -> Service:
        return Service(
            name=name, namespace="default", vips=(vip,), ports=(ServicePort(80, port),),
            endpoints=tuple(Endpoint(p.ips[0], p.uid, True) for p in pods), traffic=traffic,
            routes=routes,
        )  # fmt: skip

    services = (service("echo", VIP[0], routes), service("echo-v2", "10.96.0.22"))
    state.apply(SnapshotMsg("e", 1, (*pods, caller), services))
    return state


def _outbound(state: MeshState, tracer: Tracer, exporter: TraceExporter) -> OutboundHttp:
    return OutboundHttp(
        mesh=state,
        failover=Failover(attempts=3, budget=RetryBudget(), balancer=Balancer(latency=PeakEwma())),
        dialer=Dialer(tunnel=None, attempt_timeout=10.0),
        pool=Http1Pool(),
        metrics=HttpMetrics(),
        tracer=tracer,
        record_span=exporter.record,
    )


@dataclass
class Rig:
    replicas: Replicas
    http: OutboundHttp
    exporter: TraceExporter
    store: TraceStore
    port: int
    """The proxy's (HTTP/1.1)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = OtlpReceiver(TraceStore())
    await r.start("127.0.0.1", 0)
    try:
        yield r
    finally:
        await r.stop()


async def _rig(
    port: int,
    collector: tuple[str, int],
    store: TraceStore,
    *,
    rate: float = 0.0,
    traffic: TrafficPolicy = DEFAULT_TRAFFIC,
    routes: tuple[Route, ...] = (),
) -> tuple[Rig, list[Any]]:
    replicas = Replicas()
    for ip in REPLICAS:
        replicas.servers.append(
            await asyncio.start_server(replicas.serve, ip, port, reuse_address=True)
        )
    config = TracingConfig(
        collector=collector, sample_rate=rate, batch_interval=0.05, export_timeout=10.0,
        backoff_initial=0.05, backoff_max=0.2, shutdown_timeout=5.0,
    )  # fmt: skip
    exporter = TraceExporter(config, Resource(node="n"))
    exporter.start()
    http = _outbound(_mesh(port, traffic, routes), Tracer.for_config(config), exporter)
    servers: list[Http1Server] = []

    def factory() -> Http1Server:
        s = Http1Server(http.forwarder((CLIENT_IP, 40000), VIP, "test"), label="test",
                        config=HttpServerConfig(head_timeout=10.0))  # fmt: skip
        servers.append(s)
        return s

    proxy = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    rig = Rig(replicas, http, exporter, store, proxy.sockets[0].getsockname()[1])
    return rig, [proxy, servers]


async def _teardown(rig: Rig, extra: list[Any]) -> None:
    proxy, servers = extra
    proxy.close()
    for s in servers:
        if s.transport is not None:
            s.transport.abort()
    rig.http.pool.close()
    rig.replicas.close()
    await rig.exporter.close()
    await asyncio.sleep(0.05)


@pytest.fixture
async def rig(unused_tcp_port: int, receiver: OtlpReceiver) -> AsyncIterator[Rig]:
    assert receiver.http_address is not None
    r, extra = await _rig(unused_tcp_port, receiver.http_address, receiver.store)
    try:
        yield r
    finally:
        await _teardown(r, extra)


async def _requests(port: int, requests: list[tuple[str, str]]) -> list[int]:
    """Statuses of ``(path, extra header lines)`` sent one after another on one
    keep-alive connection (the second and later take the fast path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        for path, extra in requests:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: echo.default\r\n{extra}\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), 30)
            statuses.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()
    return statuses


async def _spans(store: TraceStore, n: int) -> list[dict[str, Any]]:
    return await store.wait_for_spans(n, within=30)


# --- HTTP/1.1 ---------------------------------------------------------------------------


async def test_sampled_traceparent_makes_the_proxy_span_the_upstreams_parent(rig: Rig) -> None:
    header = f"traceparent: {SAMPLED}\r\ntracestate: vendor=1\r\n"
    assert await _requests(rig.port, [("/a", header), ("/b", header)]) == [200, 200]
    spans = await _spans(rig.store, 2)
    assert len(spans) == 2  # one per request: the general path, then the fast path
    for seen, span in zip(rig.replicas.seen, sorted(spans, key=lambda s: s["startTimeUnixNano"]),
                          strict=True):  # fmt: skip
        sent = parse_traceparent(seen["traceparent"].encode())
        assert sent is not None and sent.sampled
        assert f"{sent.trace_id:032x}" == TRACE
        assert f"{sent.parent_id:016x}" == span["spanId"] != APP_SPAN
        assert seen["tracestate"] == "vendor=1"
        assert span["traceId"] == TRACE and span["parentSpanId"] == APP_SPAN
        assert span["kind"] == "CLIENT" and span["name"] == "outbound"
        a = span["attributes"]
        assert a[Attr.DIRECTION] == "outbound"
        assert a[Attr.SRC_WORKLOAD] == "client-0" and a[Attr.SRC_NAMESPACE] == "default"
        assert a[Attr.CLIENT_ID] == str(SpiffeId.workload("default", "client"))
        assert a[Attr.DST_WORKLOAD] in ("echo-0", "echo-1")
        assert a[Attr.DST_SERVICE] == "default/echo"
        assert a[Attr.ENDPOINT].rsplit(":", 1)[0] in REPLICAS
        assert a[Attr.HTTP_STATUS] == 200 and a[Attr.RETRIES] == 0
        assert a[Attr.HTTP_METHOD] == "GET"
        assert span["status"]["code"] == "UNSET"
        assert span["resource"]["k8s.node.name"] == "n"
    assert {s["attributes"][Attr.URL_PATH] for s in spans} == {"/a", "/b"}


async def test_b3_single_header(rig: Rig) -> None:
    app = "e457b5a2e4d86bd1"
    trace = "80f198ee56343ba864fe8b2a57d3eff7"
    assert await _requests(rig.port, [("/", f"b3: {trace}-{app}-1\r\n")]) == [200]
    (span,) = await _spans(rig.store, 1)
    sent = parse_b3_single(rig.replicas.seen[0]["b3"].encode())
    assert sent is not None and sent.sampled is True
    assert f"{sent.trace_id:032x}" == trace == span["traceId"]
    assert f"{sent.span_id:016x}" == span["spanId"]
    assert f"{sent.parent_id:016x}" == app == span["parentSpanId"]
    assert "traceparent" not in rig.replicas.seen[0]  # the app chose B3: not added


async def test_unsampled_and_untraced_requests_pass_untouched(rig: Rig) -> None:
    statuses = await _requests(
        rig.port,
        [("/u1", f"traceparent: {UNSAMPLED}\r\n"), ("/u2", f"traceparent: {UNSAMPLED}\r\n"),
         ("/none", ""), ("/b3-no", f"b3: {TRACE}-{APP_SPAN}-0\r\n")],
    )  # fmt: skip
    assert statuses == [200] * 4
    seen = rig.replicas.seen
    assert seen[0]["traceparent"] == seen[1]["traceparent"] == UNSAMPLED
    assert "traceparent" not in seen[2] and "b3" not in seen[2]
    assert seen[3]["b3"] == f"{TRACE}-{APP_SPAN}-0"
    # Nothing was recorded: a sampled request after them is the only span received.
    assert await _requests(rig.port, [("/s", f"traceparent: {SAMPLED}\r\n")]) == [200]
    spans = await _spans(rig.store, 1)
    await asyncio.sleep(0.3)  # a stray span would have been exported by now
    assert [s["attributes"][Attr.URL_PATH] for s in rig.store.spans()] == ["/s"]
    assert len(spans) == 1 and rig.exporter.queued == 0


async def test_retries_are_one_span(unused_tcp_port: int, receiver: OtlpReceiver) -> None:
    assert receiver.http_address is not None
    traffic = parse_traffic({"weft.io/retry-http": "5xx"})
    rig, extra = await _rig(unused_tcp_port, receiver.http_address, receiver.store,
                            traffic=traffic)  # fmt: skip
    try:
        assert await _requests(rig.port, [("/flaky", f"traceparent: {SAMPLED}\r\n")]) == [200]
        (span,) = await _spans(rig.store, 1)
        await asyncio.sleep(0.3)
        assert rig.store.span_count == 1
        assert span["attributes"][Attr.RETRIES] == 1
        assert span["attributes"][Attr.HTTP_STATUS] == 200
        # Both attempts carried this one span as their parent.
        parents = {parse_traceparent(s["traceparent"].encode()) for s in rig.replicas.seen}
        assert len(rig.replicas.seen) == 2
        assert {f"{p.parent_id:016x}" for p in parents if p is not None} == {span["spanId"]}
    finally:
        await _teardown(rig, extra)


async def test_the_route_matched_is_named(unused_tcp_port: int, receiver: OtlpReceiver) -> None:
    assert receiver.http_address is not None
    rig, extra = await _rig(unused_tcp_port, receiver.http_address, receiver.store,
                            routes=(parse_route(ROUTE),))  # fmt: skip
    try:
        assert await _requests(rig.port, [("/v2/x", f"traceparent: {SAMPLED}\r\n")]) == [200]
        (span,) = await _spans(rig.store, 1)
        assert span["attributes"][Attr.ROUTE] == "default/to-v2"
        assert span["attributes"][Attr.DST_SERVICE] == "default/echo-v2"
        assert span["parentSpanId"] == APP_SPAN
    finally:
        await _teardown(rig, extra)


async def test_sample_rate_starts_traces(unused_tcp_port: int, receiver: OtlpReceiver) -> None:
    assert receiver.http_address is not None
    rig, extra = await _rig(unused_tcp_port, receiver.http_address, receiver.store, rate=1.0)
    try:
        assert await _requests(rig.port, [("/", "")]) == [200]
        (span,) = await _spans(rig.store, 1)
        assert span["parentSpanId"] == ""  # this hop is the root
        sent = parse_traceparent(rig.replicas.seen[0]["traceparent"].encode())
        assert sent is not None and f"{sent.parent_id:016x}" == span["spanId"]
    finally:
        await _teardown(rig, extra)


async def test_collector_down_costs_requests_nothing(unused_tcp_port: int) -> None:
    store = TraceStore()
    rig, extra = await _rig(unused_tcp_port, ("127.0.0.1", _free_port()), store)
    try:
        header = f"traceparent: {SAMPLED}\r\n"
        loop = asyncio.get_running_loop()
        began = loop.time()
        statuses = await _requests(rig.port, [("/", header)] * 50)
        assert statuses == [200] * 50
        assert loop.time() - began < 20  # generous: a loaded VM; not blocked on export
        for seen in rig.replicas.seen:  # still propagated as a traced hop
            assert seen["traceparent"] != SAMPLED
    finally:
        await _teardown(rig, extra)


# --- HTTP/2 -----------------------------------------------------------------------------


async def test_h2_sampled_request(unused_tcp_port: int, receiver: OtlpReceiver) -> None:
    assert receiver.http_address is not None
    port = unused_tcp_port
    replicas = {ip: H2Replica(f"replica-{ip[-1]}") for ip in REPLICAS}
    for ip, r in replicas.items():
        await r.start(ip, port)
    config = TracingConfig(collector=receiver.http_address, batch_interval=0.05)
    exporter = TraceExporter(config, Resource(node="n"))
    exporter.start()
    http = _outbound(_mesh(port, DEFAULT_TRAFFIC), Tracer.for_config(config), exporter)
    servers: list[H2Server] = []

    def factory() -> H2Server:
        s = H2Server(http.forwarder((CLIENT_IP, 40000), VIP, "test", H2), label="test",
                     config=H2Config())  # fmt: skip
        servers.append(s)
        return s

    proxy = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    peer = await H2Peer.connect(proxy.sockets[0].getsockname()[1])
    try:
        plain = await peer.request("GET", "/", headers=[(b"traceparent", UNSAMPLED.encode())])
        traced = await peer.request("GET", "/", headers=[(b"traceparent", SAMPLED.encode())])
        assert plain.status == traced.status == 200
        (span,) = await _spans(receiver.store, 1)
        seen = [h for r in replicas.values() for h in r.headers_seen]
        sent = sorted(h[b"traceparent"] for h in seen)
        assert UNSAMPLED.encode() in sent and len(sent) == 2
        (child,) = (parse_traceparent(v) for v in sent if v != UNSAMPLED.encode())
        assert child is not None and f"{child.parent_id:016x}" == span["spanId"]
        assert span["parentSpanId"] == APP_SPAN and span["kind"] == "CLIENT"
        assert span["attributes"][Attr.PROTOCOL_VERSION] == "2"
    finally:
        peer.close()
        proxy.close()
        for s in servers:
            s.abort()
        http.h2_pool.close()
        for r in replicas.values():
            r.close()
        await exporter.close()
        await asyncio.sleep(0.05)
