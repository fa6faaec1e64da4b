"""The HTTP/2 path on 127.0.0.0/8: a real `H2Server` per client connection, the outbound
forwarder (resolve -> P2C peak-EWMA -> pooled, multiplexed upstream connections) and
real h2c replicas on 127.0.0.2 and 127.0.0.3; clients are `tests.h2util`'s h2 client,
curl (``--http2-prior-knowledge``) and raw frames for the floods."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hyperframe.frame import ContinuationFrame, HeadersFrame

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.meshstate import MeshState
from nodeagent.proxy.http.forward import H2, OutboundHttp
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.h2server import H2Server
from tests.h2util import H2Replica
from tests.sockets.test_http_proxy import REPLICAS, VIP, outbound
from weft.lab.h2peer import H2Peer as H2TestClient
from weft.mesh import Service
from weft.meshwire import SnapshotMsg

pytestmark = pytest.mark.timeout(120)


@dataclass
class H2Mesh:
    replicas: dict[str, H2Replica]
    http: OutboundHttp
    metrics: HttpMetrics
    port: int
    servers: list[H2Server]
    state: MeshState


@pytest.fixture
async def mesh(unused_tcp_port: int) -> AsyncIterator[H2Mesh]:
    port = unused_tcp_port
    replicas = {ip: H2Replica(f"replica-{ip[-1]}") for ip in REPLICAS}
    for ip, r in replicas.items():
        await r.start(ip, port)
    state, http, metrics = outbound(port)
    servers: list[H2Server] = []
    config = H2Config(stream_window=64 * 1024, connection_window=256 * 1024)
    loop = asyncio.get_running_loop()

    def factory() -> H2Server:
        s = H2Server(http.forwarder(("127.0.0.1", 1), VIP, "test", H2), label="test", config=config)
        servers.append(s)
        return s

    proxy = await loop.create_server(factory, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    try:
        yield H2Mesh(replicas, http, metrics, proxy_port, servers, state)
    finally:
        proxy.close()
        for s in servers:
            s.abort()
        http.h2_pool.close()
        for r in replicas.values():
            r.close()
        await asyncio.sleep(0.1)


def _series(metrics: HttpMetrics) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(metrics)
    return generate_latest(reg).decode()


# --- per-stream balancing ---------------------------------------------------------------


async def test_one_h2_connection_spreads_streams_over_both_replicas(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    try:
        seen: Counter[str] = Counter()
        for _ in range(10):  # 10 rounds of 20 concurrent streams
            got = await asyncio.gather(*(client.request("GET", "/") for _ in range(20)))
            for r in got:
                assert r.status == 200 and r.reset is None, r
                seen[json.loads(r.body)["replica"]] += 1
        assert sum(seen.values()) == 200
        assert min(seen.values()) >= 60, seen  # both replicas, roughly even
        # Multiplexed upstream: a handful of connections, not one per stream.
        assert sum(len(r.conns) for r in mesh.replicas.values()) <= 4
    finally:
        client.close()
    text = _series(mesh.metrics)
    assert 'direction="outbound"' in text and 'authority="echo.default"' in text
    assert 'classification="success"' in text and 'status_code="200"' in text


async def test_curl_prior_knowledge_gets_answers_from_the_replicas(mesh: H2Mesh):
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (make setup installs it)")
    url = f"http://127.0.0.1:{mesh.port}/"
    replicas = set()
    # One URL per run: Debian 12's curl 7.88.1 fails the second request it multiplexes
    # on a reused h2c connection (the same against a bare h2 server, without the proxy).
    for _ in range(6):
        proc = await asyncio.create_subprocess_exec(
            curl, "-sSv", "--http2-prior-knowledge", "-w", "\\n%{http_version} %{response_code}",
            url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        body, status = out.decode().rsplit("\n", 1)
        assert status == "2 200", out
        replicas.add(json.loads(body)["replica"])
    assert replicas <= {"replica-2", "replica-3"} and replicas


async def test_a_slower_replica_gets_few_streams(mesh: H2Mesh):
    mesh.replicas["127.0.0.3"].delay = 0.02
    client = await H2TestClient.connect(mesh.port)
    try:
        seen: Counter[str] = Counter()
        # 150 rounds of 2 concurrent streams. (A burst of many concurrent streams sends
        # the slow replica more: the pick between the P2C pair is weighted by cost, and
        # the fast one's cost grows with its outstanding streams — docs/architecture.md.)
        for _ in range(150):
            got = await asyncio.gather(*(client.request("GET", "/") for _ in range(2)))
            seen.update(json.loads(r.body)["replica"] for r in got)
    finally:
        client.close()
    assert sum(seen.values()) == 300
    assert seen["replica-3"] < 0.15 * 300, seen


# --- gRPC -------------------------------------------------------------------------------


async def test_grpc_status_in_trailers_classifies_and_passes_through(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    grpc = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    try:
        ok = await client.request("POST", "/grpc-ok", body=b"\x00\x00\x00\x00\x00", headers=grpc)
        bad = await client.request("POST", "/grpc-fail", body=b"\x00\x00\x00\x00\x00", headers=grpc)
    finally:
        client.close()
    assert ok.status == 200 and ok.trailers[b"grpc-status"] == b"0"
    assert bad.status == 200 and bad.trailers[b"grpc-status"] == b"14"
    assert ok.body == b"\x00\x00\x00\x00\x02hi"
    # te: trailers reached the replica (gRPC servers insist on it).
    assert all(h.get(b"te") == b"trailers" for h in next(iter(mesh.replicas.values())).headers_seen)
    text = _series(mesh.metrics)
    assert 'classification="failure"' in text and 'grpc_status="14"' in text
    assert 'classification="success"' in text and 'grpc_status="0"' in text


async def test_no_endpoints_answers_503_or_grpc_unavailable(mesh: H2Mesh):
    svc = next(iter(mesh.state.services.values()))
    empty = Service(name=svc.name, namespace=svc.namespace, vips=svc.vips, ports=svc.ports,
                    endpoints=())  # fmt: skip
    mesh.state.apply(SnapshotMsg("e", 2, tuple(mesh.state.workloads.values()), (empty,)))
    client = await H2TestClient.connect(mesh.port)
    try:
        plain = await client.request("GET", "/")
        grpc = await client.request(
            "POST", "/grpc-ok", body=b"\x00" * 5,
            headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        )  # fmt: skip
    finally:
        client.close()
    assert plain.status == 503 and plain.headers[b"weft-proxy-error"] == b"no-endpoints"
    assert grpc.status == 200 and grpc.headers[b"grpc-status"] == b"14"
    assert grpc.headers[b"weft-proxy-error"] == b"no-endpoints"


# --- resets both ways -------------------------------------------------------------------


async def test_an_upstream_reset_mid_response_resets_only_that_stream(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    try:
        reset, ok = await asyncio.gather(
            client.request("GET", "/reset"), client.request("GET", "/")
        )
        assert reset.reset == ErrorCodes.INTERNAL_ERROR, reset
        assert ok.status == 200 and ok.reset is None
        again = await client.request("GET", "/")
        assert again.status == 200
    finally:
        client.close()


async def test_a_refused_stream_is_sent_to_the_other_replica(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    try:
        got = [await client.request("POST", "/refuse-replica-2") for _ in range(20)]
    finally:
        client.close()
    assert all(r.status == 200 for r in got), [r.status for r in got]
    assert {json.loads(r.body)["replica"] for r in got} == {"replica-3"}
    assert mesh.replicas["127.0.0.2"].refused >= 1  # some went there first, and came back
    assert mesh.http.replayed == mesh.replicas["127.0.0.2"].refused


async def test_a_client_reset_cancels_the_upstream_stream(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    try:
        sid, _ = client.start("GET", "/delay/2000")
        await asyncio.sleep(0.3)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        for _ in range(100):
            if sum(r.resets_seen for r in mesh.replicas.values()):
                break
            await asyncio.sleep(0.02)
        assert sum(r.resets_seen for r in mesh.replicas.values()) == 1
        assert (await client.request("GET", "/")).status == 200  # the connection lives on
    finally:
        client.close()
    # The abandoned request is counted: a failure without a status, error "cancelled".
    cancelled = [
        line for line in _series(mesh.metrics).splitlines()
        if line.startswith("response_total{") and 'error="cancelled"' in line
    ]  # fmt: skip
    assert len(cancelled) == 1 and 'classification="failure"' in cancelled[0], cancelled
    assert 'status_code=""' in cancelled[0] and cancelled[0].endswith(" 1.0")


# --- flow control and bounded memory ----------------------------------------------------


async def test_request_and_response_bodies_stream_under_flow_control(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    body = bytes(range(256)) * 8192  # 2 MiB, far above every window
    try:
        r = await client.request("POST", "/echo", body=body)
        big = await client.request("GET", "/big/3000000")
    finally:
        client.close()
    assert r.status == 200 and r.body == body
    assert big.status == 200 and len(big.body) == 3_000_000


async def test_a_client_that_stops_reading_holds_at_most_a_window(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port, window=65535, read=False)
    try:
        client.start("GET", "/big/50000000")
        await asyncio.sleep(1.5)
        sent = sum(r.sent for r in mesh.replicas.values())
        # The replica may send what the proxy's windows allow and no more: the proxy
        # acknowledges only what the client took.
        assert sent <= 64 * 1024 + 256 * 1024 + 65535, sent
        other = await H2TestClient.connect(mesh.port)
        try:
            assert (await other.request("GET", "/")).status == 200
        finally:
            other.close()
    finally:
        client.close()


async def test_an_upstream_that_stops_reading_stalls_the_upload_only(mesh: H2Mesh):
    client = await H2TestClient.connect(mesh.port)
    try:
        sid, _ = client.start("POST", "/stall", body=b"y" * 20_000_000)
        await asyncio.sleep(1.5)
        window_left = client.conn.local_flow_control_window(sid)
        assert window_left == 0  # the client is held back by the proxy's window
        assert (await client.request("GET", "/")).status == 200  # other streams flow
    finally:
        client.close()


# --- floods and malformed input: GOAWAY, everyone else unaffected -----------------------


async def _goaway_after(mesh: H2Mesh, send) -> H2TestClient:
    client = await H2TestClient.connect(mesh.port)
    await send(client)
    await asyncio.wait_for(client.lost, 30)
    other = await H2TestClient.connect(mesh.port)
    try:
        assert (await other.request("GET", "/")).status == 200
    finally:
        other.close()
    return client


async def test_rapid_reset_flood_gets_goaway(mesh: H2Mesh):
    async def flood(client: H2TestClient) -> None:
        for _ in range(2000):
            if client.transport is None or client.transport.is_closing():
                return
            try:
                sid, _ = client.start("GET", "/delay/1000")
                client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            except Exception:
                return
            client.flush()
            await asyncio.sleep(0)

    client = await _goaway_after(mesh, flood)
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda conn, i: conn.ping(i.to_bytes(8, "big")), id="PING"),
        pytest.param(lambda conn, i: conn.update_settings({0x3: 100 + i % 10}), id="SETTINGS"),
    ],
)
async def test_a_control_frame_flood_gets_goaway(mesh: H2Mesh, frame):
    async def flood(client: H2TestClient) -> None:
        for i in range(5000):
            if client.transport is None or client.transport.is_closing():
                return
            try:
                frame(client.conn, i)
            except ProtocolError:
                return  # the proxy's GOAWAY arrived
            client.flush()
            if i % 50 == 0:
                await asyncio.sleep(0)

    client = await _goaway_after(mesh, flood)
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM


async def test_continuation_flood_gets_goaway(mesh: H2Mesh):
    async def flood(client: H2TestClient) -> None:
        assert client.transport is not None
        head = HeadersFrame(1)
        head.data = b"\x82"  # :method GET, no END_HEADERS
        frames = [head.serialize()]
        for _ in range(200):
            cont = ContinuationFrame(1)
            cont.data = b"\x00" * 1000
            frames.append(cont.serialize())
        client.transport.write(b"".join(frames))

    client = await _goaway_after(mesh, flood)
    assert client.terminated is not None
    assert client.terminated.error_code != ErrorCodes.NO_ERROR


async def test_an_hpack_bomb_gets_goaway(mesh: H2Mesh):
    async def bomb(client: H2TestClient) -> None:
        # One 4 KiB header added to the dynamic table, then referenced 100 times: a
        # small frame that decodes to 400 KiB, over the 64 KiB header list limit.
        client.start("GET", "/", headers=[(b"x-bomb", b"b" * 4000)] * 101)

    client = await _goaway_after(mesh, bomb)
    assert client.terminated is not None


async def test_garbage_after_the_preface_gets_goaway(mesh: H2Mesh):
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
    # A DATA frame on stream 0: a connection error (PROTOCOL_ERROR).
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00junk")
    data = await asyncio.wait_for(reader.read(), 30)  # until the proxy closes
    writer.close()
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    goaway = [payload for kind, payload in frames if kind == 0x7]
    assert goaway, frames
    assert int.from_bytes(goaway[0][4:8], "big") == ErrorCodes.PROTOCOL_ERROR
    other = await H2TestClient.connect(mesh.port)
    try:
        assert (await other.request("GET", "/")).status == 200
    finally:
        other.close()


# --- a real gRPC client (grpcio) through the proxy to real gRPC servers ---------------------


async def test_one_grpc_channel_spreads_over_both_replicas(unused_tcp_port: int):
    import grpc

    from weft.lab.echo import EchoServer
    from weft.lab.echo_grpc import FULL_METHOD, start_grpc

    port = unused_tcp_port
    servers = [
        start_grpc(EchoServer(f"echo-{ip[-1]}", "n", "default"), ip, port) for ip in REPLICAS
    ]
    _, http, metrics = outbound(port)
    loop = asyncio.get_running_loop()
    proxy = await loop.create_server(
        lambda: H2Server(http.forwarder(("127.0.0.1", 1), VIP, "grpc", H2), label="grpc"),
        "127.0.0.1", 0,
    )  # fmt: skip
    proxy_port = proxy.sockets[0].getsockname()[1]

    def calls() -> tuple[Counter[str], Counter[str]]:
        pods: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        with grpc.insecure_channel(f"127.0.0.1:{proxy_port}") as channel:
            call = channel.unary_unary(FULL_METHOD)
            for i in range(200):
                meta = (("status", "echo-3:503"),) if i >= 180 else None
                try:
                    pods[json.loads(call(b"ping", timeout=30, metadata=meta))["pod"]] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
        return pods, codes

    try:
        pods_seen, codes = await asyncio.to_thread(calls)
    finally:
        proxy.close()
        http.h2_pool.close()
        for s in servers:
            s.stop(0)
    assert sum(pods_seen.values()) + sum(codes.values()) == 200
    # Both replicas, of the first 180. Not an even split: loopback latency on a loaded
    # machine is noisy, and a spike on one replica makes it costlier for seconds, by
    # design (peak EWMA) — 12 of 180 was seen during a full run. The even split of equal
    # replicas is measured by `weft bench balance`, not asserted here.
    assert min(pods_seen["echo-2"], pods_seen["echo-3"]) >= 9, pods_seen
    assert set(codes) <= {"UNAVAILABLE"}  # echo-3 fails the last 20 when picked
    text = _series(metrics)
    assert 'grpc_status="0"' in text and 'classification="success"' in text
    if codes:
        assert 'grpc_status="14"' in text and 'classification="failure"' in text
