"""The HTTP/1.1 path on 127.0.0.0/8: a real `Http1Server` per client connection, the
outbound forwarder (resolve -> P2C peak-EWMA -> pooled upstream connections) and real
upstream servers ("replicas" on 127.0.0.2 and 127.0.0.3), with http.client and raw
sockets as clients. Everything the per-request proxy promises that sockets can show."""

from __future__ import annotations

import asyncio
import functools
import http.client
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.meshstate import MeshState
from nodeagent.proxy.balance import Balancer, PeakEwma
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover
from nodeagent.proxy.http.client import Http1Pool
from nodeagent.proxy.http.forward import OutboundHttp
from nodeagent.proxy.http.h1 import Limits
from nodeagent.proxy.http.server import Http1Server, HttpServerConfig
from nodeagent.proxy.retry import RetryBudget
from weft.identity import SpiffeId
from weft.mesh import Endpoint, InboundMode, Service, ServicePort, Workload
from weft.meshwire import SnapshotMsg
from weft.traffic import DEFAULT as DEFAULT_TRAFFIC
from weft.traffic import TrafficPolicy

pytestmark = pytest.mark.timeout(120)

VIP = ("10.96.0.20", 80)
TRAILERS: list[bytes] = []
"""Trailer lines of chunked request bodies the replicas received."""
REPLICAS = ("127.0.0.2", "127.0.0.3")


# --- upstream "replicas": a small HTTP/1.1 server with failure injection -------------------


@dataclass
class Replica:
    name: str
    delay: float = 0.0
    served: int = 0
    connections: int = 0
    server: asyncio.Server | None = None
    paths: list[str] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    TRAILERS.append(line.strip())
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return b""


def _response(status: int, body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def _serve(replica: Replica, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    replica.connections += 1
    replica.writers.add(writer)
    here = 0
    try:
        while True:
            got = await _read_head(reader)
            if got is None:
                return
            line, headers = got
            method, target, _ = line.split(" ")
            replica.paths.append(target)
            here += 1
            if target == "/race" and here > 1:
                # The keep-alive race: the replica closes the idle connection just as the
                # proxy reuses it (the request is never processed).
                writer.close()
                return
            if headers.get("expect") == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await _read_body(reader, headers)
            replica.served += 1
            if replica.delay:
                await asyncio.sleep(replica.delay)
            me = replica.name.encode()
            if target == "/close-mid":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                await writer.drain()
                writer.transport.abort()
                return
            if target == "/no-length":
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-close " + me)
                await writer.drain()
                writer.close()
                return
            if target == "/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for part in (b"one ", b"two ", me):
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                writer.write(b"0\r\n\r\n")
            elif target == "/big":
                size = 32 * 1024 * 1024
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                chunk = b"x" * 65536
                for _ in range(size // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
            elif target == "/ws":
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                    b"upgrade: websocket\r\n\r\nhello-from-" + me
                )
                await writer.drain()
                while data := await reader.read(65536):
                    writer.write(b"echo:" + data)
                    await writer.drain()
                writer.close()
                return
            elif target.startswith("/status/"):
                writer.write(_response(int(target.rsplit("/", 1)[1]), me))
            elif method == "HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
            else:
                writer.write(_response(200, me + b" " + body, f"x-replica: {replica.name}\r\n"))
            await writer.drain()
            if headers.get("connection") == "close":
                writer.close()
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return


@dataclass
class Mesh:
    replicas: dict[str, Replica]
    http: OutboundHttp
    metrics: HttpMetrics
    proxy_port: int
    servers: list[Http1Server]


def _pod(i: int, ip: str) -> Workload:
    return Workload(
        uid=f"uid-{i}", name=f"echo-{i}", namespace="default", node="n",
        ips=(ip,), service_account="echo", identity=SpiffeId.workload("default", "echo"),
        captured=False, inbound_mode=InboundMode.PERMISSIVE,
    )  # fmt: skip


def outbound(
    port: int, traffic: TrafficPolicy = DEFAULT_TRAFFIC
) -> tuple[MeshState, OutboundHttp, HttpMetrics]:
    """The mesh state (service ``echo`` at `VIP`, the two replicas on ``port``, with
    ``traffic`` as its retry/timeout policy) and an outbound HTTP stage over it, dialing
    plaintext: what every proxy test forwards by."""
    state = MeshState()
    pods = [_pod(i, ip) for i, ip in enumerate(REPLICAS)]
    svc = Service(
        name="echo", namespace="default", vips=(VIP[0],), ports=(ServicePort(80, port),),
        endpoints=tuple(Endpoint(p.ips[0], p.uid, True) for p in pods), traffic=traffic,
    )  # fmt: skip
    state.apply(SnapshotMsg("e", 1, tuple(pods), (svc,)))
    metrics = HttpMetrics()
    http = OutboundHttp(
        mesh=state,
        failover=Failover(attempts=3, budget=RetryBudget(), balancer=Balancer(latency=PeakEwma())),
        dialer=Dialer(tunnel=None, attempt_timeout=5.0),
        pool=Http1Pool(),
        metrics=metrics,
    )
    return state, http, metrics


@pytest.fixture
async def mesh(unused_tcp_port: int) -> AsyncIterator[Mesh]:
    port = unused_tcp_port
    replicas = {ip: Replica(f"replica-{ip[-1]}") for ip in REPLICAS}
    for ip, r in replicas.items():
        r.server = await asyncio.start_server(
            functools.partial(_serve, r), ip, port, reuse_address=True
        )
    _, http, metrics = outbound(port)
    servers: list[Http1Server] = []
    config = HttpServerConfig(head_timeout=1.0, limits=Limits(max_head=8192))
    loop = asyncio.get_running_loop()

    def factory() -> Http1Server:
        s = Http1Server(http.forwarder(("127.0.0.1", 1), VIP, "test"), label="test",
                        config=config)  # fmt: skip
        servers.append(s)
        return s

    proxy = await loop.create_server(factory, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    try:
        yield Mesh(replicas, http, metrics, proxy_port, servers)
    finally:
        proxy.close()
        for s in servers:
            if s.transport is not None:
                s.transport.abort()
        http.pool.close()
        for r in replicas.values():
            assert r.server is not None
            r.server.close()
            for w in r.writers:
                w.transport.abort()
        await asyncio.sleep(0.1)


def _requests(port: int, paths: list[str], method: str = "GET") -> list[tuple[int, bytes, dict]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    try:
        for p in paths:
            conn.request(method, p, headers={"Host": "echo.default"})
            resp = conn.getresponse()
            out.append((resp.status, resp.read(), dict(resp.getheaders())))
    finally:
        conn.close()
    return out


def _raw(port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                chunks.append(got)
                if not read_until_close:
                    break
        except (ConnectionResetError, TimeoutError):
            chunks.append(b"<reset>")
        return b"".join(chunks)


# --- per-request balancing ------------------------------------------------------------------


async def test_one_keep_alive_connection_spreads_over_both_replicas(mesh: Mesh):
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"] * 400)
    assert all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:3]
    by = Counter(body.split()[0].decode() for _, body, _ in results)
    assert set(by) == {"replica-2", "replica-3"}
    # Per-request, not per-connection: a pinned connection would give 400/0. How evenly
    # two equal replicas split is the latency-aware balancer's business, and it follows
    # real latencies, which on a loaded 2-vCPU machine differ by noise (CI once saw
    # 242/158): the 45/55 target lives in `weft bench balance`, unit tests pin the
    # arithmetic (tests/unit/test_balance.py); here only "clearly both".
    assert 0.25 <= by["replica-2"] / 400 <= 0.75, by
    # One client connection; the proxy keeps one pooled upstream connection per replica.
    assert len(mesh.servers) == 1
    assert all(r.connections == 1 for r in mesh.replicas.values())


async def test_a_slower_replica_gets_few_requests(mesh: Mesh):
    mesh.replicas["127.0.0.3"].delay = 0.020
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"] * 200)
    by = Counter(body.split()[0].decode() for _, body, _ in results)
    assert by["replica-3"] / 200 < 0.10, by


async def test_metrics_count_requests_with_classification(mesh: Mesh):
    await asyncio.to_thread(_requests, mesh.proxy_port, ["/", "/status/503", "/status/404"])
    text = "\n".join(
        f"{s.name} {s.labels} {s.value}" for m in mesh.metrics.collect() for s in m.samples
    )
    assert "'classification': 'failure', 'status_code': '503'" in text
    assert "'classification': 'success', 'status_code': '404'" in text
    assert "'authority': 'echo.default'" in text
    requests = sum(
        s.value for m in mesh.metrics.collect() if m.name == "request" for s in m.samples
    )
    assert requests == 3


# --- framing ----------------------------------------------------------------------------------


async def test_chunked_and_close_delimited_responses_keep_the_client_connection(mesh: Mesh):
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/chunked", "/no-length", "/"])
    assert results[0][1].startswith(b"one two replica-")
    assert results[1][1].startswith(b"until-close replica-")
    assert results[1][2].get("transfer-encoding") == "chunked"  # re-framed for the client
    assert results[2][0] == 200
    assert len(mesh.servers) == 1


async def test_request_bodies_chunked_and_sized_reach_the_replica(mesh: Mesh):
    def post() -> list[bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.proxy_port, timeout=30)
        conn.request("POST", "/", body=b"sized-body", headers={"Host": "echo"})
        a = conn.getresponse().read()
        conn.request("POST", "/", body=iter([b"chunk-", b"ed"]), headers={"Host": "echo"},
                     encode_chunked=True)  # fmt: skip
        b = conn.getresponse().read()
        conn.close()
        return [a, b]

    a, b = await asyncio.to_thread(post)
    assert a.endswith(b" sized-body") and b.endswith(b" chunk-ed")


async def test_request_trailers_reach_the_replica(mesh: Mesh):
    TRAILERS.clear()
    raw = (
        b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.proxy_port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert TRAILERS == [b"x-checksum: 42"]


async def test_pipelined_requests_are_answered_in_order(mesh: Mesh):
    reqs = b"".join(
        b"GET /status/%d HTTP/1.1\r\nHost: echo\r\n\r\n" % code for code in (201, 202, 203)
    )
    reqs += b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"
    out = await asyncio.to_thread(_raw, mesh.proxy_port, reqs)
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]
    assert statuses == [201, 202, 203, 200]


async def test_head_and_expect_continue(mesh: Mesh):
    head = await asyncio.to_thread(_requests, mesh.proxy_port, ["/", "/"], "HEAD")
    assert [h[0] for h in head] == [200, 200] and head[0][1] == b""
    out = await asyncio.to_thread(
        _raw, mesh.proxy_port,
        b"POST / HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\nhi",
    )  # fmt: skip
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    assert out.endswith(b" hi")


async def test_websocket_upgrade_becomes_opaque(mesh: Mesh):
    def ws() -> bytes:
        with socket.create_connection(("127.0.0.1", mesh.proxy_port), timeout=10) as s:
            s.sendall(
                b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"\r\n"
            )
            got = b""
            while b"hello-from-" not in got:
                got += s.recv(4096)
            s.sendall(b"\x81\x05frame")
            while b"echo:" not in got:
                got += s.recv(4096)
            return got

    got = await asyncio.to_thread(ws)
    assert got.startswith(b"HTTP/1.1 101 ")
    assert b"upgrade: websocket" in got.lower()
    assert got.endswith(b"echo:\x81\x05frame")


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
        (b"GET / HTTP/1.1\r\nHo st: e\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: e\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: e\r\nX: " + b"a" * 10000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: e\r\n\r\n", 414),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 501),
    ],
)  # fmt: skip
async def test_malformed_and_smuggling_requests_get_a_status_and_a_close(
    mesh: Mesh, request_bytes: bytes, status: int
):
    out = await asyncio.to_thread(_raw, mesh.proxy_port, request_bytes)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert b"weft-proxy-error: " in out and b"connection: close" in out
    assert sum(r.served for r in mesh.replicas.values()) == 0
    # ... and the proxy keeps serving everyone else.
    ok = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"])
    assert ok[0][0] == 200


async def test_half_a_request_then_a_stall_gets_408(mesh: Mesh):
    out = await asyncio.to_thread(_raw, mesh.proxy_port, b"GET / HTTP/1.1\r\nHost: e\r\n")
    assert out.startswith(b"HTTP/1.1 408 ")


async def test_upstream_closing_mid_response_resets_the_client(mesh: Mesh):
    out = await asyncio.to_thread(
        _raw, mesh.proxy_port, b"GET /close-mid HTTP/1.1\r\nHost: e\r\n\r\n"
    )
    # The head and the partial body arrived, then a reset — never a complete response.
    assert out.startswith(b"HTTP/1.1 200 "), out
    body = out.split(b"\r\n\r\n", 1)[1].removesuffix(b"<reset>")
    assert body == b"partial", out  # 7 of the 100 bytes promised, then the reset


async def test_connect_failures_fail_over_then_502(mesh: Mesh):
    down = mesh.replicas["127.0.0.2"]
    assert down.server is not None
    down.server.close()
    await down.server.wait_closed()
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"] * 6)
    assert all(s == 200 and body.startswith(b"replica-3") for s, body, _ in results)
    up = mesh.replicas["127.0.0.3"]
    assert up.server is not None
    up.server.close()
    await up.server.wait_closed()
    mesh.http.pool.close()
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"])
    status, body, headers = results[0]
    assert status == 502 and headers["weft-proxy-error"] == "connect-failed", body


async def test_no_endpoints_is_503(mesh: Mesh):
    mesh.http.mesh.apply(SnapshotMsg("e", 2, (), ()))
    empty = Service("echo", "default", (VIP[0],), (ServicePort(80, 80),), ())
    mesh.http.mesh.apply(SnapshotMsg("e", 3, (), (empty,)))
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"])
    status, body, headers = results[0]
    assert status == 503 and headers["weft-proxy-error"] == "no-endpoints"
    assert b"no ready endpoint" in body


async def test_a_slow_reader_is_not_buffered_without_bound(mesh: Mesh):
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", mesh.proxy_port))
    await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: e\r\n\r\n")
    await asyncio.sleep(2.0)  # the replica wants to send 32 MiB; nobody reads
    server = mesh.servers[-1]
    assert server.transport is not None
    buffered = server.transport.get_write_buffer_size()
    assert buffered <= 2 * 1024 * 1024, buffered
    sock.close()


async def test_the_keep_alive_race_is_replayed_for_idempotent_requests_only(mesh: Mesh):
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/race"] * 8)
    assert [r[0] for r in results] == [200] * 8
    assert mesh.http.replayed >= 1  # requests that met a closing pooled connection
    posts = await asyncio.to_thread(_requests, mesh.proxy_port, ["/race"] * 8, "POST")
    statuses = [r[0] for r in posts]
    assert 502 in statuses  # a POST may have been processed: never sent twice
    lost = [r for r in posts if r[0] == 502]
    assert all(r[2].get("weft-proxy-error") == "upstream-reset" for r in lost)


async def test_idle_upstream_connections_age_out(mesh: Mesh):
    mesh.http.pool.idle_timeout = 0.2
    await asyncio.to_thread(_requests, mesh.proxy_port, ["/", "/"])
    assert mesh.http.pool.idle >= 1
    await asyncio.sleep(0.6)
    assert mesh.http.pool.idle == 0
    results = await asyncio.to_thread(_requests, mesh.proxy_port, ["/"])
    assert results[0][0] == 200  # a new upstream connection, no error
