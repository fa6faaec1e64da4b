"""Gateway API routes in the outbound HTTP path on 127.0.0.0/8: an HTTPRoute attached to
service ``echo`` (GAMMA) sends requests to backend services ``echo-a`` (replica on
127.0.0.2) and ``echo-b`` (127.0.0.3) by match and weight, with header modifiers and
rule timeouts; a real `Http1Server`, the outbound forwarder, real replicas."""

from __future__ import annotations

import asyncio
import functools
import http.client
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.meshstate import MeshState
from nodeagent.proxy.balance import Balancer, PeakEwma
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover
from nodeagent.proxy.http.client import Http1Pool
from nodeagent.proxy.http.forward import OutboundHttp
from nodeagent.proxy.http.server import Http1Server
from nodeagent.proxy.retry import RetryBudget
from nodeagent.retrymetrics import RETRIED, TIMEOUT
from tests.sockets.test_http_proxy import REPLICAS, VIP, _pod
from tests.sockets.test_http_retries import Replica, _serve
from weft.mesh import Endpoint, Service, ServicePort
from weft.meshwire import SnapshotMsg
from weft.routes import parse_route

pytestmark = pytest.mark.timeout(120)


def _httproute(
    rules: list[dict[str, Any]], name: str = "split", annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}},
        "spec": {"parentRefs": [{"kind": "Service", "name": "echo", "port": 80}], "rules": rules},
    }  # fmt: skip


@pytest.fixture
async def make_mesh(unused_tcp_port: int) -> AsyncIterator:
    made: list[tuple[list[Replica], OutboundHttp, asyncio.Server]] = []

    async def make(
        rules: list[dict[str, Any]], *more: dict[str, Any]
    ) -> tuple[dict[str, Replica], OutboundHttp, int]:
        port = unused_tcp_port
        replicas = {"a": Replica("replica-a"), "b": Replica("replica-b")}
        for ip, r in zip(REPLICAS, replicas.values(), strict=True):
            r.server = await asyncio.start_server(functools.partial(_serve, r), ip, port,
                                                  reuse_address=True)  # fmt: skip
        pods = [_pod(i, ip) for i, ip in enumerate(REPLICAS)]
        routes = (parse_route(_httproute(rules)), *(parse_route(obj) for obj in more))

        def service(name: str, vip: str, pods_: list, routes: tuple = ()) -> Service:
            return Service(name=name, namespace="default", vips=(vip,),
                           ports=(ServicePort(80, port),),
                           endpoints=tuple(Endpoint(p.ips[0], p.uid, True) for p in pods_),
                           routes=routes)  # fmt: skip

        state = MeshState()
        state.apply(SnapshotMsg("e", 1, tuple(pods), (
            service("echo", VIP[0], pods, routes),
            service("echo-a", "10.96.0.21", pods[:1]),
            service("echo-b", "10.96.0.22", pods[1:]),
        )))  # fmt: skip
        outbound_http = OutboundHttp(
            mesh=state,
            failover=Failover(attempts=3, budget=RetryBudget(),
                              balancer=Balancer(latency=PeakEwma())),
            dialer=Dialer(tunnel=None, attempt_timeout=5.0),
            pool=Http1Pool(),
            metrics=HttpMetrics(),
        )  # fmt: skip

        def server() -> Http1Server:
            return Http1Server(outbound_http.forwarder(("127.0.0.1", 1), VIP, "t"), label="t")

        proxy = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        made.append((list(replicas.values()), outbound_http, proxy))
        return replicas, outbound_http, proxy.sockets[0].getsockname()[1]

    yield make
    for replicas, outbound_http, proxy in made:
        proxy.close()
        outbound_http.pool.close()
        for r in replicas:
            assert r.server is not None
            r.server.close()
    await asyncio.sleep(0.1)


def _get(port: int, paths: list[str], headers: dict[str, str] | None = None) -> list[tuple]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    try:
        for p in paths:
            conn.request("GET", p, headers={"Host": "echo.default", **(headers or {})})
            r = conn.getresponse()
            out.append((r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}))
    finally:
        conn.close()
    return out


async def test_a_weighted_split_lands_within_two_percent(make_mesh):
    rules = [{"backendRefs": [{"name": "echo-a", "port": 80, "weight": 90},
                              {"name": "echo-b", "port": 80, "weight": 10}]}]  # fmt: skip
    _, outbound_http, port = await make_mesh(rules)
    results = await asyncio.to_thread(_get, port, ["/"] * 3000)
    assert all(s == 200 for s, _, _ in results)
    by = Counter(b.decode() for _, b, _ in results)
    assert abs(by["replica-b"] / 3000 - 0.10) < 0.02, by  # one connection, per request
    m = outbound_http.retry_metrics
    assert m.routed_count("default/echo", "default/split", "default/echo-b") == by["replica-b"]


async def test_matches_pick_the_rule_and_unmatched_requests_get_404(make_mesh):
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/b"}}],
         "backendRefs": [{"name": "echo-b", "port": 80}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/"},
                      "headers": [{"name": "x-canary", "value": "yes"}]}],
         "backendRefs": [{"name": "echo-b", "port": 80}]},
        {"matches": [{"path": {"type": "Exact", "value": "/a"}}],
         "backendRefs": [{"name": "echo-a", "port": 80}]},
    ]  # fmt: skip
    _, outbound_http, port = await make_mesh(rules)
    got = await asyncio.to_thread(_get, port, ["/b/1", "/a", "/bx", "/a/1"])
    assert [(s, b) for s, b, _ in got[:2]] == [(200, b"replica-b"), (200, b"replica-a")]
    assert [s for s, _, _ in got[2:]] == [404, 404]  # /bx is not under /b; /a is Exact
    assert got[2][2]["weft-proxy-error"] == "no-route"
    canary = await asyncio.to_thread(_get, port, ["/other", "/a"], {"X-Canary": "yes"})
    assert canary[0][1] == b"replica-b"  # only the header rule matches /other
    assert canary[1][1] == b"replica-a"  # an Exact path outranks a prefix with headers
    m = outbound_http.retry_metrics
    assert m.routed_count("default/echo", "[no-match]", "") == 2


async def test_header_modifiers_and_zero_weights(make_mesh):
    rules = [
        {"matches": [{"path": {"value": "/mod"}}],
         "backendRefs": [{"name": "echo-a", "port": 80}],
         "filters": [
             {"type": "RequestHeaderModifier",
              "requestHeaderModifier": {"set": [{"name": "x-route", "value": "mod"}],
                                        "remove": ["x-secret"]}},
             {"type": "ResponseHeaderModifier",
              "responseHeaderModifier": {"add": [{"name": "x-served-by", "value": "weft"}]}},
         ]},
        {"matches": [{"path": {"value": "/nowhere"}}],
         "backendRefs": [{"name": "echo-a", "port": 80, "weight": 0}]},
    ]  # fmt: skip
    replicas, _, port = await make_mesh(rules)
    got = await asyncio.to_thread(_get, port, ["/mod"], {"X-Secret": "s", "X-Route": "old"})
    assert got[0][0] == 200 and got[0][2]["x-served-by"] == "weft"
    _, seen, _ = replicas["a"].seen[-1]
    assert seen["x-route"] == "mod" and "x-secret" not in seen
    got = await asyncio.to_thread(_get, port, ["/nowhere"])
    assert got[0][0] == 500 and got[0][2]["weft-proxy-error"] == "route-backend-unusable"


async def test_a_rule_timeout_answers_504(make_mesh):
    rules = [{"backendRefs": [{"name": "echo-a", "port": 80}],
              "timeouts": {"request": "300ms"}}]  # fmt: skip
    replicas, outbound_http, port = await make_mesh(rules)
    replicas["a"].hang = True
    got = await asyncio.to_thread(_get, port, ["/"])
    assert got[0][0] == 504 and got[0][2]["weft-proxy-error"] == "timeout"
    assert outbound_http.retry_metrics.get(TIMEOUT, "default/echo-a", "request") == 1


async def test_a_route_annotation_retries_its_requests_only(make_mesh):
    """Two routes on echo to the same two replicas, one of which answers 503: the route
    annotated ``weft.io/retry-http: 503`` retries its requests (with its own budget),
    the other route's requests get the 503s (the Service has no retry policy)."""
    plain = [{"matches": [{"path": {"value": "/plain"}}],
              "backendRefs": [{"name": "echo", "port": 80}]}]  # fmt: skip
    retrying = _httproute([{"matches": [{"path": {"value": "/retrying"}}],
                            "backendRefs": [{"name": "echo", "port": 80}]}],
                          name="retrying", annotations={"weft.io/retry-http": "503"})  # fmt: skip
    replicas, outbound_http, port = await make_mesh(plain, retrying)
    replicas["b"].status = 503
    got = await asyncio.to_thread(_get, port, ["/retrying"] * 100)
    assert [s for s, _, _ in got] == [200] * 100
    assert sum("weft-retry-attempts" in h for _, _, h in got) == len(replicas["b"].seen) > 0
    before = len(replicas["b"].seen)
    got = await asyncio.to_thread(_get, port, ["/plain"] * 100)
    assert sum(s == 503 for s, _, _ in got) == len(replicas["b"].seen) - before > 0
    assert not any("weft-retry-attempts" in h for _, _, h in got)
    # The budget is the route's: the Service's own (and the other route's) is untouched.
    assert set(outbound_http._budgets) == {"default/echo HTTPRoute default/retrying"}
    # ... and so are the counters: the retries are the route's.
    m = outbound_http.retry_metrics
    retried = m.get(RETRIED, "default/echo", "status", route="default/retrying")
    assert retried == len(replicas["b"].seen[:before]) > 0
    assert m.get(RETRIED, "default/echo", "status", route="") == 0
    text = "".join(str(s) for f in m.collect() for s in f.samples)
    assert "'route': 'default/retrying'" in text
