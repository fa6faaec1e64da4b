"""The retry stage and timeouts of the outbound HTTP/1.1 path on 127.0.0.0/8: a real
`Http1Server`, the outbound forwarder and two real replicas whose answers the tests set
(a status, a hang), with http.client and raw sockets as clients. The policy comes from
the service's `TrafficPolicy`, as discovery delivers it from annotations."""

from __future__ import annotations

import asyncio
import functools
import http.client
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from nodeagent.proxy.http.forward import H2, OutboundHttp
from nodeagent.proxy.http.grpctimeout import parse_grpc_timeout
from nodeagent.proxy.http.h2server import H2Server
from nodeagent.proxy.http.server import Http1Server, HttpServerConfig
from nodeagent.proxy.retry import RetryBudget
from nodeagent.retrymetrics import EJECTED, RETRIED, SKIPPED, TIMEOUT
from tests.h2util import H2Replica
from tests.sockets.test_http_proxy import REPLICAS, VIP, _read_body, _read_head, outbound
from weft.lab.h2peer import H2Peer as H2TestClient
from weft.traffic import parse_traffic

pytestmark = pytest.mark.timeout(120)

SERVICE = "default/echo"


@dataclass
class Replica:
    name: str
    status: int = 200
    hang: bool = False
    server: asyncio.Server | None = None
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    """(method, headers, body) of every request it read."""
    lost: int = 0
    """Connections that went away while it was hanging (the proxy cancelled)."""


async def _serve(r: Replica, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while (got := await _read_head(reader)) is not None:
            line, headers = got
            body = await _read_body(reader, headers)
            r.seen.append((line.split(" ")[0], headers, body))
            if r.hang:
                try:
                    gone = not await reader.read(1)
                except ConnectionError:
                    gone = True  # reset: what a cancelled attempt looks like
                r.lost += gone
                return
            me = r.name.encode()
            writer.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s"
                         % (r.status, len(me), me))  # fmt: skip
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


@dataclass
class Mesh:
    replicas: list[Replica]
    http: OutboundHttp
    port: int

    def good_and_bad(self, bad_status: int = 503) -> tuple[Replica, Replica]:
        good, bad = self.replicas
        bad.status = bad_status
        return good, bad

    def count(self, family: str, why: str) -> int:
        return self.http.retry_metrics.get(family, SERVICE, why)


@pytest.fixture
async def make_mesh(unused_tcp_port: int) -> AsyncIterator:
    """A factory: the mesh with the service's policy from these annotations."""
    made: list[tuple[list[Replica], OutboundHttp, asyncio.Server]] = []

    async def make(annotations: dict[str, str]) -> Mesh:
        port = unused_tcp_port
        replicas = [Replica(f"replica-{ip[-1]}") for ip in REPLICAS]
        for ip, r in zip(REPLICAS, replicas, strict=True):
            r.server = await asyncio.start_server(
                functools.partial(_serve, r), ip, port, reuse_address=True
            )
        _, outbound_http, _ = outbound(port, traffic=parse_traffic(annotations))
        loop = asyncio.get_running_loop()
        config = HttpServerConfig(head_timeout=5.0)

        def server() -> Http1Server:
            forwarder = outbound_http.forwarder(("127.0.0.1", 1), VIP, "test")
            return Http1Server(forwarder, label="test", config=config)

        proxy = await loop.create_server(server, "127.0.0.1", 0)
        made.append((replicas, outbound_http, proxy))
        return Mesh(replicas, outbound_http, proxy.sockets[0].getsockname()[1])

    yield make
    for replicas, outbound_http, proxy in made:
        proxy.close()
        outbound_http.pool.close()
        for r in replicas:
            assert r.server is not None
            r.server.close()
    await asyncio.sleep(0.1)


def _requests(
    port: int, n: int, method: str = "GET", body: bytes | None = None
) -> list[tuple[int, bytes, dict[str, str]]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    try:
        for _ in range(n):
            conn.request(method, "/", body=body, headers={"Host": "echo.default"})
            resp = conn.getresponse()
            out.append((resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}))
    finally:
        conn.close()
    return out


async def test_a_failing_replica_costs_the_client_nothing(make_mesh):
    mesh = await make_mesh({"weft.io/retry-http": "5xx"})
    good, bad = mesh.good_and_bad()
    results = await asyncio.to_thread(_requests, mesh.port, 200)
    assert [s for s, _, _ in results] == [200] * 200
    assert {b for _, b, _ in results} == {good.name.encode()}
    retried = [h for _, _, h in results if "weft-retry-attempts" in h]
    assert retried and all(h["weft-retry-attempts"] == "1" for h in retried)
    assert len(retried) == len(bad.seen) == mesh.count(RETRIED, "status")
    # The retried requests reached the good replica marked as retries.
    marked = [h for _, h, _ in good.seen if h.get("weft-retry-attempt") == "1"]
    assert len(marked) == len(bad.seen)
    assert all("weft-retry-attempt" not in h for _, h, _ in bad.seen)


async def test_without_the_annotation_nothing_is_retried(make_mesh):
    mesh = await make_mesh({})
    _, bad = mesh.good_and_bad()
    results = await asyncio.to_thread(_requests, mesh.port, 100)
    failed = [s for s, _, _ in results if s == 503]
    assert len(failed) == len(bad.seen) > 0
    assert mesh.count(RETRIED, "status") == 0


async def test_statuses_outside_the_policy_pass_through(make_mesh):
    mesh = await make_mesh({"weft.io/retry-http": "502,504"})
    _, bad = mesh.good_and_bad(503)
    results = await asyncio.to_thread(_requests, mesh.port, 60)
    assert sum(s == 503 for s, _, _ in results) == len(bad.seen) > 0


async def test_a_post_is_not_retried(make_mesh):
    mesh = await make_mesh({"weft.io/retry-http": "5xx"})
    _, bad = mesh.good_and_bad()
    results = await asyncio.to_thread(_requests, mesh.port, 60, "POST", b"charge=1")
    assert sum(s == 503 for s, _, _ in results) == len(bad.seen) > 0
    assert mesh.count(SKIPPED, "not-idempotent") == len(bad.seen)


async def test_a_body_is_sent_again_whole_and_a_large_one_is_not_retried(make_mesh):
    mesh = await make_mesh({"weft.io/retry-http": "5xx"})
    good, bad = mesh.good_and_bad()
    small = bytes(range(256)) * 40  # 10 KiB
    results = await asyncio.to_thread(_requests, mesh.port, 40, "PUT", small)
    assert [s for s, _, _ in results] == [200] * 40
    assert bad.seen and all(b == small for _, _, b in good.seen + bad.seen)
    large = b"x" * (64 * 1024 + 1)
    results = await asyncio.to_thread(_requests, mesh.port, 40, "PUT", large)
    assert any(s == 503 for s, _, _ in results)
    assert mesh.count(SKIPPED, "body-too-large") == sum(s == 503 for s, _, _ in results)


async def test_retries_stay_within_the_limit_and_the_budget(make_mesh):
    mesh = await make_mesh({"weft.io/retry-http": "5xx", "weft.io/retry-limit": "3"})
    for r in mesh.replicas:
        r.status = 503  # every replica fails: retries must not multiply the load
    budget = mesh.http._budgets[SERVICE] = RetryBudget(ratio=0.2, min_per_second=0.0, ttl=10)
    results = await asyncio.to_thread(_requests, mesh.port, 100)
    assert [s for s, _, _ in results] == [503] * 100
    sent = sum(len(r.seen) for r in mesh.replicas)
    retries = mesh.count(RETRIED, "status")
    assert sent == 100 + retries
    assert retries <= 0.2 * 100 + 1, retries
    assert mesh.count(SKIPPED, "budget") >= 100 - retries - 10
    assert budget.skipped == mesh.count(SKIPPED, "budget")
    assert max(int(h.get("weft-retry-attempts", 0)) for _, _, h in results) <= 3


async def test_a_hung_replica_costs_one_per_try_timeout(make_mesh):
    mesh = await make_mesh({"weft.io/retry-timeout": "200ms", "weft.io/retry-limit": "1"})
    good, bad = mesh.replicas
    bad.hang = True
    t0 = time.monotonic()
    results = await asyncio.to_thread(_requests, mesh.port, 20)
    took = time.monotonic() - t0
    assert [b for _, b, _ in results] == [good.name.encode()] * 20
    tries = mesh.count(TIMEOUT, "try")
    assert tries == len(bad.seen) > 0
    assert took < 20 * 0.05 + tries * 0.2 + 5.0  # each hang cost one per-try timeout
    assert mesh.count(RETRIED, "timeout") == tries
    await asyncio.sleep(0.2)
    assert bad.lost == tries  # every hung attempt's connection was cancelled


async def test_the_request_timeout_answers_504_and_cancels_upstream(make_mesh):
    mesh = await make_mesh({"weft.io/timeout-request": "300ms"})
    for r in mesh.replicas:
        r.hang = True
    t0 = time.monotonic()
    results = await asyncio.to_thread(_requests, mesh.port, 3)
    took = time.monotonic() - t0
    assert [s for s, _, _ in results] == [504] * 3
    assert all(h["weft-proxy-error"] == "timeout" for _, _, h in results)
    assert b"timeout-request" in results[0][1]
    assert 0.9 <= took < 10
    assert mesh.count(TIMEOUT, "request") == 3
    await asyncio.sleep(0.2)
    assert sum(r.lost for r in mesh.replicas) == 3


async def test_the_client_connection_survives_retries_and_timeouts(make_mesh):
    """Pipelined requests, some of whose responses are swallowed and retried: every
    one is answered 200 on the one client connection."""
    mesh = await make_mesh({"weft.io/retry-http": "503"})
    mesh.good_and_bad()

    def pipelined() -> bytes:
        with socket.create_connection(("127.0.0.1", mesh.port), timeout=30) as s:
            req = b"GET /%d HTTP/1.1\r\nhost: echo.default\r\n\r\n"
            s.sendall(b"".join(req % i for i in range(30)))
            data = b""
            while data.count(b"HTTP/1.1 200") < 30:
                got = s.recv(65536)
                if not got:
                    break
                data += got
            return data

    data = await asyncio.to_thread(pipelined)
    assert data.count(b"HTTP/1.1 200") == 30
    assert b"503" not in data


# --- HTTP/2 and gRPC ----------------------------------------------------------------------


@pytest.fixture
async def make_h2_mesh(unused_tcp_port: int) -> AsyncIterator:
    made: list[tuple[list[H2Replica], OutboundHttp, asyncio.Server, list[H2Server]]] = []

    async def make(annotations: dict[str, str]) -> tuple[list[H2Replica], OutboundHttp, int]:
        port = unused_tcp_port
        replicas = [H2Replica(f"replica-{ip[-1]}") for ip in REPLICAS]
        for ip, r in zip(REPLICAS, replicas, strict=True):
            await r.start(ip, port)
        _, outbound_http, _ = outbound(port, traffic=parse_traffic(annotations))
        servers: list[H2Server] = []

        def server() -> H2Server:
            s = H2Server(outbound_http.forwarder(("127.0.0.1", 1), VIP, "test", H2), label="t")
            servers.append(s)
            return s

        proxy = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        made.append((replicas, outbound_http, proxy, servers))
        return replicas, outbound_http, proxy.sockets[0].getsockname()[1]

    yield make
    for replicas, outbound_http, proxy, servers in made:
        proxy.close()
        for s in servers:
            s.abort()
        outbound_http.h2_pool.close()
        for r in replicas:
            r.close()
    await asyncio.sleep(0.1)


GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


async def test_grpc_unavailable_is_retried_with_its_message(make_h2_mesh):
    replicas, outbound_http, port = await make_h2_mesh({"weft.io/retry-grpc": "unavailable"})
    bad = replicas[1]
    client = await H2TestClient.connect(port)
    message = b"\x00\x00\x00\x00\x05hello"
    try:
        got = await asyncio.gather(*(
            client.request("POST", f"/unavailable-{bad.name}", body=message, headers=GRPC)
            for _ in range(40)
        ))  # fmt: skip
    finally:
        client.close()
    assert all(r.reset is None and r.trailers.get(b"grpc-status") == b"0" for r in got), got[:2]
    assert all(r.body == message for r in got)
    retried = [r for r in got if r.headers.get(b"weft-retry-attempts") == b"1"]
    hit_bad = sum(p.startswith("/unavailable-") for p in bad.paths)
    assert len(retried) == hit_bad > 0
    assert outbound_http.retry_metrics.get(RETRIED, SERVICE, "status") == hit_bad
    marked = [h for h in replicas[0].headers_seen if h.get(b"weft-retry-attempt") == b"1"]
    assert len(marked) == hit_bad


async def test_h2_503_is_retried_for_get_and_not_without_the_policy(make_h2_mesh):
    replicas, outbound_http, port = await make_h2_mesh({"weft.io/retry-http": "503"})
    bad = replicas[1]
    client = await H2TestClient.connect(port)
    try:
        got = await asyncio.gather(
            *(client.request("GET", f"/unavailable-{bad.name}") for _ in range(30))
        )
        posts = await asyncio.gather(
            *(client.request("POST", f"/unavailable-{bad.name}", body=b"x") for _ in range(30))
        )
    finally:
        client.close()
    assert [r.status for r in got] == [200] * 30
    assert (
        sum(r.status == 503 for r in posts)
        == outbound_http.retry_metrics.get(SKIPPED, SERVICE, "not-idempotent")
        > 0
    )


async def test_grpc_request_timeout_is_deadline_exceeded(make_h2_mesh):
    _, outbound_http, port = await make_h2_mesh({"weft.io/timeout-request": "200ms"})
    client = await H2TestClient.connect(port)
    try:
        r = await client.request("POST", "/delay/5000", body=b"\x00\x00\x00\x00\x00",
                                 headers=GRPC)  # fmt: skip
    finally:
        client.close()
    assert r.reset is None
    assert (r.headers.get(b"grpc-status") or r.trailers.get(b"grpc-status")) == b"4", r
    assert outbound_http.retry_metrics.get(TIMEOUT, SERVICE, "request") == 1


async def test_a_shorter_grpc_timeout_wins_and_the_upstream_is_told_what_is_left(make_h2_mesh):
    replicas, outbound_http, port = await make_h2_mesh({"weft.io/timeout-request": "10s"})
    client = await H2TestClient.connect(port)
    message = b"\x00\x00\x00\x00\x00"
    try:
        t0 = time.monotonic()
        r = await client.request("POST", "/delay/5000", body=message,
                                 headers=[*GRPC, (b"grpc-timeout", b"300m")])  # fmt: skip
        took = time.monotonic() - t0
        ok = await client.request("POST", "/grpc-ok", body=message,
                                  headers=[*GRPC, (b"grpc-timeout", b"5S")])  # fmt: skip
        garbage = await client.request("POST", "/grpc-ok", body=message,
                                       headers=[*GRPC, (b"grpc-timeout", b"soon")])  # fmt: skip
    finally:
        client.close()
    # Answered as the configured timeout is, but after the client's 300 ms, not 10 s.
    assert r.reset is None and r.status == 200
    assert r.headers.get(b"grpc-status") == b"4", r  # trailers-only DEADLINE_EXCEEDED
    assert r.headers.get(b"weft-proxy-error") == b"timeout"
    assert b"grpc-timeout" in r.headers.get(b"grpc-message", b"")
    assert 0.3 <= took < 3.0, took
    assert outbound_http.retry_metrics.get(TIMEOUT, SERVICE, "request") == 1
    await asyncio.sleep(0.2)
    assert sum(rep.resets_seen for rep in replicas) == 1  # the upstream stream was cancelled
    # Each upstream request carried what was left of its deadline.
    seen = {h[b":path"]: h for rep in replicas for h in rep.headers_seen}
    delay = parse_grpc_timeout(seen[b"/delay/5000"][b"grpc-timeout"])
    assert 0.2 < delay <= 0.3
    assert ok.trailers.get(b"grpc-status") == b"0" and garbage.trailers.get(b"grpc-status") == b"0"
    sent = [parse_grpc_timeout(h[b"grpc-timeout"]) for rep in replicas for h in rep.headers_seen
            if h[b":path"] == b"/grpc-ok"]  # fmt: skip
    # 5S < 10s: the client's; "soon" is malformed: ignored, the configured 10 s apply.
    assert sorted(round(t) for t in sent) == [5, 10] and all(t <= 10 for t in sent)


async def test_a_grpc_timeout_applies_without_a_configured_one(make_h2_mesh):
    replicas, outbound_http, port = await make_h2_mesh({})
    client = await H2TestClient.connect(port)
    try:
        r = await client.request("POST", "/delay/5000", body=b"\x00\x00\x00\x00\x00",
                                 headers=[*GRPC, (b"grpc-timeout", b"200000u")])  # fmt: skip
        plain = await client.request("POST", "/grpc-ok", body=b"\x00\x00\x00\x00\x00",
                                     headers=GRPC)  # fmt: skip
    finally:
        client.close()
    assert r.headers.get(b"grpc-status") == b"4", r
    assert outbound_http.retry_metrics.get(TIMEOUT, SERVICE, "request") == 1
    assert plain.trailers.get(b"grpc-status") == b"0"
    # No deadline anywhere: none is invented for the upstream.
    ok_seen = [h for rep in replicas for h in rep.headers_seen if h[b":path"] == b"/grpc-ok"]
    assert len(ok_seen) == 1 and b"grpc-timeout" not in ok_seen[0]


async def test_failure_accrual_routes_around_a_failing_replica(make_mesh):
    mesh = await make_mesh({
        "weft.io/failure-accrual": "consecutive",
        "weft.io/failure-accrual-consecutive-max-failures": "3",
        "weft.io/failure-accrual-consecutive-min-penalty": "30s",
        "weft.io/retry-http": "5xx",
    })  # fmt: skip
    _, bad = mesh.good_and_bad()
    results = await asyncio.to_thread(_requests, mesh.port, 300)
    assert [s for s, _, _ in results] == [200] * 300
    assert 3 <= len(bad.seen) <= 3 + 1, len(bad.seen)  # ejected after 3 failures in a row
    assert mesh.count(EJECTED, "failures") == 1
    assert mesh.http.failover.balancer.state((REPLICAS[1], mesh.replicas[1].server.sockets[0]
                                              .getsockname()[1])) == "ejected"  # fmt: skip
