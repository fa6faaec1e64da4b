"""`weft.viz`: exposition parsing, deltas, quantiles and per-workload aggregation.

The expositions are made by the node agent's own collectors (`nodeagent.httpmetrics`,
`nodeagent.retrymetrics`, `nodeagent.metrics`) through prometheus_client, so a renamed
series or label breaks these tests, not the CLI in front of a user.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.httpmetrics import HttpLabels, HttpMetrics
from nodeagent.metrics import ConnLabels, TcpMetrics
from nodeagent.retrymetrics import RETRIED, RetryMetrics
from weft.viz import model
from weft.viz.expo import ExpositionError, Sample, make_labels, parse_query_vector, parse_text
from weft.viz.model import (
    Delta,
    Pod,
    Scrape,
    Service,
    Snapshot,
    Target,
    Topology,
    deltas,
    histogram_quantile,
)
from weft.viz.sources import Agent, AgentSource, PrometheusSource

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"

TOPO = Topology(
    pods=(
        Pod("default", "echo-1", "node-1", {"app": "echo"}),
        Pod("default", "echo-2", "node-2", {"app": "echo"}),
        Pod("default", "client-1", "node-1", {"app": "client"}),
        Pod("default", "hello-1", "node-1", {"app": "x"}, owner="Deployment default/hello"),
        Pod("default", "plain-1", "node-1", {"app": "plain"}, captured=False),
    ),
    services=(Service("default", "echo", {"app": "echo"}),),
)


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("up 1", [("up", {}, 1.0)]),
        ("# HELP x y\n# TYPE x counter\n\nx_total 3.5\n", [("x_total", {}, 3.5)]),
        ('a{b="c",d="e"} 2', [("a", {"b": "c", "d": "e"}, 2.0)]),
        ('a{b="c",} 2 1700000000000', [("a", {"b": "c"}, 2.0)]),
        ('a{b="q\\"uo\\\\te\\n"} 1', [("a", {"b": 'q"uo\\te\n'}, 1.0)]),
        ('a{b="has } and , and ="} 7', [("a", {"b": "has } and , and ="}, 7.0)]),
        ('h_bucket{le="+Inf"} +Inf', [("h_bucket", {"le": "+Inf"}, math.inf)]),
        ("a{} 4e3", [("a", {}, 4000.0)]),
    ],
)
def test_parse_text(text: str, expected: list[tuple[str, dict[str, str], float]]) -> None:
    got = [(s.name, s.label_map, s.value) for s in parse_text(text)]
    assert got == expected


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('a{b="c" 1', "line 1"),
        ("ok 1\nbroken", "line 2"),
        ("a{b=c} 1", "malformed label"),
        ("a one", "not a number"),
        ('a{="x"} 1', "empty label name"),
    ],
)
def test_parse_text_names_the_bad_line(text: str, where: str) -> None:
    with pytest.raises(ExpositionError, match=where):
        parse_text(text)


def test_parse_text_reads_the_agents_own_exposition() -> None:
    http = HttpMetrics()
    http.record(_inbound("echo-1"), status=200, latency=0.004)
    samples = parse_text(_expose(http))
    names = {s.name for s in samples}
    assert {"request_total", "response_total", "response_latency_ms_bucket"} <= names
    req = next(s for s in samples if s.name == "request_total")
    assert req.label("dst_workload") == "echo-1" and req.value == 1


def test_parse_query_vector() -> None:
    answer = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"__name__": "request_total", "instance": "n1:15020", "a": "b"},
                 "value": [1700000000.0, "12"]},
            ],
        },
    }  # fmt: skip
    [s] = parse_query_vector(answer)
    assert (s.name, s.label("instance"), s.label("a"), s.value) == (
        "request_total", "n1:15020", "b", 12.0,
    )  # fmt: skip
    with pytest.raises(ExpositionError, match="bad_data: parse error"):
        parse_query_vector({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(ExpositionError, match="instant vector"):
        parse_query_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})


# -- quantiles ------------------------------------------------------------------------------

INF = math.inf


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        # 50 requests <= 10 ms, 50 more in (10, 20]: the median is the first bucket's top,
        # p95 is 45/50 into the second bucket, p99 49/50 into it.
        ({10: 50, 20: 100, INF: 100}, 0.50, 10.0),
        ({10: 50, 20: 100, INF: 100}, 0.95, 19.0),
        ({10: 50, 20: 100, INF: 100}, 0.99, 19.8),
        # Linkerd's low buckets: 4 requests at (1, 2] ms, 4 at (4, 5]: p50 is the top of
        # (1, 2], p75 halfway through (4, 5] (rank 6: 2 of the bucket's 4).
        ({1: 0, 2: 4, 3: 4, 4: 4, 5: 8, INF: 8}, 0.50, 2.0),
        ({1: 0, 2: 4, 3: 4, 4: 4, 5: 8, INF: 8}, 0.75, 4.5),
        ({1: 0, 2: 4, 3: 4, 4: 4, 5: 8, INF: 8}, 0.25, 1.5),
        # Rank in +Inf's bucket: the highest finite bound, as PromQL says.
        ({1: 0, 50000: 1, INF: 4}, 0.99, 50000.0),
        ({1: 0, INF: 4}, 0.5, 1.0),
        # Nothing observed: no quantile.
        ({1: 0, 2: 0, INF: 0}, 0.5, None),
        ({}, 0.5, None),
    ],
)
def test_histogram_quantile(buckets: dict[float, float], q: float, expected: float | None) -> None:
    got = histogram_quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_quantiles_from_the_agents_histogram() -> None:
    http = HttpMetrics()
    for ms in (1.5,) * 90 + (35.0,) * 10:  # 90 in (1, 2], 10 in (30, 40]
        http.record(_inbound("echo-1"), status=200, latency=ms / 1000)
    [row] = model.stat(_totals(http), TOPO, "pod", name="echo-1")
    assert row.figures.latency(0.5) == pytest.approx(1 + 50 / 90)
    assert row.figures.latency(0.95) == pytest.approx(35.0)  # rank 95: 5 of 10 in (30, 40]
    assert row.figures.latency(0.99) == pytest.approx(39.0)


# -- deltas ---------------------------------------------------------------------------------


def _sample(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, make_labels(labels), value)


def test_deltas_rates_resets_and_new_series() -> None:
    before = Snapshot((Scrape("node-1", 100.0, (
        _sample("request_total", 10, dst_workload="a"),
        _sample("request_total", 50, dst_workload="b"),   # the agent restarted: 50 -> 5
        _sample("tcp_open_connections", 7, dst_workload="a"),
        _sample("weft_unrelated_total", 1),
    )),))  # fmt: skip
    after = Snapshot((Scrape("node-1", 110.0, (
        _sample("request_total", 30, dst_workload="a"),
        _sample("request_total", 5, dst_workload="b"),
        _sample("request_total", 4, dst_workload="c"),     # appeared inside the window
        _sample("tcp_open_connections", 3, dst_workload="a"),
        _sample("weft_unrelated_total", 9),
    )),))  # fmt: skip
    ds, down = deltas(before, after)
    assert down == []
    got = {(d.name, d.label("dst_workload")): (d.increase, d.rate) for d in ds}
    assert got == {
        ("request_total", "a"): (20, 2.0),
        ("request_total", "b"): (5, 0.5),
        ("request_total", "c"): (4, 0.4),
        ("tcp_open_connections", "a"): (3, 0.3),  # a gauge: its last value
    }


def test_deltas_drop_a_source_missing_from_either_snapshot() -> None:
    lost = model.Unreachable("node-2", "10.240.0.12:15020", "connection refused")
    before = Snapshot((Scrape("node-1", 0.0, ()),), (lost,))
    after = Snapshot(
        (Scrape("node-1", 1.0, ()), Scrape("node-2", 1.0, (_sample("request_total", 1),)))
    )
    ds, down = deltas(before, after)
    assert ds == [] and [u.source for u in down] == ["node-2"]
    # Totals (one snapshot): no rates.
    ds, _ = deltas(None, after)
    assert [(d.source, d.increase, d.rate) for d in ds] == [("node-2", 1, None)]


# -- stat -------------------------------------------------------------------------------------


def _inbound(dst: str, authority: str = "echo") -> HttpLabels:
    return HttpLabels("inbound", authority, "client", "default", dst, "default", "true",
                      CLIENT, ECHO)  # fmt: skip


def _outbound(src: str, dst: str, tls: bool = True, authority: str = "echo") -> HttpLabels:
    return HttpLabels("outbound", authority, src, "default", dst, "default",
                      "true" if tls else "false", CLIENT, ECHO if tls else "")  # fmt: skip


def _expose(*collectors: object) -> str:
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def _totals(*collectors: object, source: str = "node-1") -> list[Delta]:
    snap = Snapshot((Scrape(source, 0.0, tuple(parse_text(_expose(*collectors)))),))
    return deltas(None, snap)[0]


def _drill() -> tuple[list[Delta], HttpMetrics, HttpMetrics]:
    """client-1 on node-1 calls echo-1 (node-1) 20 times, all fine, and echo-2 (node-2)
    20 times, half failing; each request is counted outbound and inbound."""
    node1, node2 = HttpMetrics(), HttpMetrics()
    for i in range(20):
        node1.record(_outbound("client-1", "echo-1"), status=200, latency=0.001)
        node1.record(_inbound("echo-1"), status=200, latency=0.001)
        status = 503 if i % 2 else 200
        node1.record(_outbound("client-1", "echo-2"), status=status, latency=0.002)
        node2.record(_inbound("echo-2"), status=status, latency=0.002)
    return _totals(node1) + _totals(node2, source="node-2"), node1, node2


def test_stat_pods_is_the_destinations_view_and_counts_each_request_once() -> None:
    ds, _, _ = _drill()
    rows = {r.name: r for r in model.stat(ds, TOPO, "pod")}
    assert set(rows) == {"echo-1", "echo-2", "client-1", "hello-1", "plain-1"}
    assert rows["echo-1"].figures.success_rate == 1.0
    assert rows["echo-2"].figures.success_rate == 0.5
    assert rows["echo-1"].figures.requests == 20 and rows["echo-2"].figures.requests == 20
    assert rows["client-1"].figures.success_rate is None  # it receives nothing
    assert rows["plain-1"].meshed == (0, 1) and rows["echo-1"].meshed == (1, 1)


@pytest.mark.parametrize(
    ("kind", "name", "requests", "success"),
    [
        ("deploy", "echo", 40, 0.75),  # the app label
        ("svc", "echo", 40, 0.75),  # the pods the service selects
        ("ns", "default", 40, 0.75),
        ("pod", "echo-2", 20, 0.5),
    ],
)
def test_stat_groups(kind: str, name: str, requests: float, success: float) -> None:
    ds, _, _ = _drill()
    [row] = model.stat(ds, TOPO, kind, name=name)
    assert (row.figures.requests, row.figures.success_rate) == (requests, success)


def test_deploy_is_the_owner_then_the_app_label_then_the_pod() -> None:
    assert TOPO.groups("deploy", "default", "hello-1") == ["hello"]
    assert TOPO.groups("deploy", "default", "echo-1") == ["echo"]
    assert Topology().groups("deploy", "default", "echo-1") == ["echo-1"]
    assert Topology().groups("svc", "default", "echo-1") == []


def test_stat_from_and_to_use_the_clients_side() -> None:
    ds, _, _ = _drill()
    src = Target("deploy", "client", "default")
    rows = {r.name: r.figures.success_rate for r in model.stat(ds, TOPO, "pod", source=src)}
    assert rows == {"echo-1": 1.0, "echo-2": 0.5}
    dst = Target("pod", "echo-2", "default")
    [row] = model.stat(ds, TOPO, "deploy", dest=dst)
    assert (row.name, row.figures.requests) == ("client", 20)
    with pytest.raises(model.VizError, match="not both"):
        model.stat(ds, TOPO, "pod", source=src, dest=dst)


def test_stat_counts_plaintext_destinations_from_the_client() -> None:
    node1 = HttpMetrics()
    node1.record(_outbound("client-1", "plain-1", tls=False), status=200, latency=0.001)
    node1.record(_outbound("client-1", "", tls=False, authority="1.2.3.4:80"), status=200,
                 latency=0.001)  # fmt: skip
    rows = {r.name: r.figures.requests for r in model.stat(_totals(node1), TOPO, "pod")}
    assert rows["plain-1"] == 1 and "" not in rows


def test_overflow_series_are_not_attributed() -> None:
    http = HttpMetrics(max_series=1)
    http.record(_inbound("echo-1"), status=200, latency=0.001)
    http.record(_inbound("echo-2"), status=200, latency=0.001)  # over the cap
    ds = _totals(http)
    assert model.overflowed(ds) == 1
    rows = {r.name: r.figures.requests for r in model.stat(ds, TOPO, "pod")}
    assert rows["echo-1"] == 1 and rows["echo-2"] == 0


def test_tcp_connections_and_bytes() -> None:
    tcp = TcpMetrics()
    labels = ConnLabels("inbound", "client", "default", "echo-1", "default", "true", CLIENT, ECHO)
    meters = [tcp.open(labels) for _ in range(3)]
    meters[0].bytes_out = 100
    meters[0].close()
    [row] = model.stat(_totals(tcp), TOPO, "pod", name="echo-1")
    assert row.figures.tcp_open == 2 and row.figures.tcp_opened == 3


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["echo-1", "echo-2"]),
            st.sampled_from([200, 201, 404, 500, 503, None]),
            st.sampled_from(["", "0", "14"]),
        ),
        max_size=60,
    ),
    st.integers(min_value=0, max_value=5),
)
def test_success_rate_is_a_fraction(
    requests: list[tuple[str, int | None, str]], restart_after: int
) -> None:
    before, after = HttpMetrics(), HttpMetrics()
    for i, (dst, status, grpc) in enumerate(requests):
        if i < restart_after:  # counters of a restarted agent go down
            before.record(_inbound(dst), status=status, grpc_status=grpc, latency=0.001)
        after.record(_inbound(dst), status=status, grpc_status=grpc, latency=0.001)
    ds, _ = deltas(
        Snapshot((Scrape("n", 0.0, tuple(parse_text(_expose(before)))),)),
        Snapshot((Scrape("n", 5.0, tuple(parse_text(_expose(after)))),)),
    )
    for kind in ("pod", "deploy", "svc", "ns"):
        for row in model.stat(ds, TOPO, kind):
            sr = row.figures.success_rate
            assert sr is None or 0.0 <= sr <= 1.0
            for q in (0.5, 0.95, 0.99):
                lat = row.figures.latency(q)
                assert lat is None or lat >= 0


# -- edges, routes, top -----------------------------------------------------------------------


def test_edges_name_both_identities_and_mtls() -> None:
    ds, _, _ = _drill()
    http = HttpMetrics()
    http.record(_outbound("client-1", "plain-1", tls=False), status=200, latency=0.001)
    ds += _totals(http)
    rows = {(r.src, r.dst): r for r in model.edges(ds, TOPO, "deploy")}
    assert set(rows) == {("client", "echo"), ("client", "plain")}
    echo = rows[("client", "echo")].to_json()
    assert echo["mtls"] and echo["client_id"] == [CLIENT] and echo["server_id"] == [ECHO]
    assert echo["requests"] == 40
    assert rows[("client", "plain")].figures.secured == "no"
    pods = {(r.src, r.dst) for r in model.edges(ds, TOPO, "pod")}
    assert pods == {("client-1", "echo-1"), ("client-1", "echo-2"), ("client-1", "plain-1")}
    with pytest.raises(model.VizError):
        model.edges(ds, TOPO, "svc")


def test_routes_default_when_the_service_has_none() -> None:
    ds, _, _ = _drill()
    retries = RetryMetrics()
    retries.count(RETRIED, "default/echo", "status")
    ds += _totals(retries)
    [row] = model.routes(ds, TOPO, TOPO.services[0])
    assert row.route == "[default]" and row.retries == 1
    assert row.figures.requests == 40 and row.figures.success_rate == 0.75


def test_routes_per_route_counts_and_the_service_on_all() -> None:
    ds, _, _ = _drill()
    retries = RetryMetrics()
    for _ in range(3):
        retries.routed("default/echo", "default/api", "default/echo")
    retries.routed("default/echo", "[no-match]", "")
    retries.count(RETRIED, "default/echo", "status", "default/api")
    ds += _totals(retries)
    rows = {r.route: r for r in model.routes(ds, TOPO, TOPO.services[0])}
    assert list(rows) == ["[no-match]", "default/api", "[all]"]
    assert rows["default/api"].figures.requests == 3 and rows["default/api"].retries == 1
    assert rows["default/api"].figures.success_rate is None  # not measured per route
    assert rows["[all]"].figures.success_rate == 0.75


def test_top_is_by_authority_without_a_path_label() -> None:
    ds, _, _ = _drill()
    assert not model.has_path(ds)
    rows = model.top(ds)
    assert [(r.src, r.dst, r.what, r.figures.requests) for r in rows] == [
        ("client-1", "echo-1", "echo", 20),
        ("client-1", "echo-2", "echo", 20),
    ]


def test_top_uses_a_path_label_when_there_is_one() -> None:
    labels = {"direction": "outbound", "src_workload": "c", "src_namespace": "d",
              "dst_workload": "e", "dst_namespace": "d", "authority": "echo"}  # fmt: skip
    snap = Snapshot((Scrape("n", 0.0, (
        _sample("request_total", 5, path="/a", **labels),
        _sample("request_total", 9, path="/b", **labels),
    )),))  # fmt: skip
    ds, _ = deltas(None, snap)
    assert model.has_path(ds)
    assert [(r.what, r.figures.requests) for r in model.top(ds)] == [("/b", 9), ("/a", 5)]


# -- sources (I/O seams faked) ------------------------------------------------------------------


def test_agent_source_names_the_agent_that_did_not_answer() -> None:
    text = _expose(_drill()[1])

    def fetch(agent: Agent, timeout: float) -> str:
        if agent.name == "node-2":
            raise ConnectionRefusedError(111, "Connection refused")
        return text

    clock = iter([0.0, 0.0, 10.0, 10.0])
    source = AgentSource(
        [Agent("node-1", "10.240.0.11", netns="x-node-1"), Agent("node-2", "10.240.0.12")],
        fetch=fetch, clock=lambda: next(clock), sleep=lambda s: None,
    )  # fmt: skip
    said: list[str] = []
    before, after = source.window(10, said.append)
    assert "again in 10 s" in said[0]
    ds, down = deltas(before, after)
    assert [u.source for u in down] == ["node-2"]
    assert "connection refused" in down[0].reason and down[0].where == "10.240.0.12:15020"
    assert all(d.source == "node-1" for d in ds)


def test_prometheus_source_queries_two_instants() -> None:
    asked: list[str] = []

    def opener(url: str, timeout: float) -> bytes:
        asked.append(url)
        at = float(url.rpartition("time=")[2])
        if "up+%3D%3D+0" in url:
            result = [{"metric": {"__name__": "up", "instance": "n2:15020", "job": "weft"},
                       "value": [at, "0"]}]  # fmt: skip
        else:
            value = "10" if at < 1000 else "30"
            metric = {"__name__": "request_total", "instance": "n1:15020", "job": "weft",
                      "dst_workload": "a"}  # fmt: skip
            result = [{"metric": metric, "value": [at, value]}]
        data = {"resultType": "vector", "result": result}
        return json.dumps({"status": "success", "data": data}).encode()

    source = PrometheusSource("http://prom:9090/", clock=lambda: 1010.0, opener=opener)
    before, after = source.window(20, lambda m: None)
    ds, down = deltas(before, after)
    assert [(d.source, d.increase, d.rate) for d in ds] == [("n1:15020", 20, 1.0)]
    assert ds[0].label("job") == "" and [u.source for u in down] == ["n2:15020"]
    assert asked[0].startswith("http://prom:9090/api/v1/query?query=")


def test_help_names_every_command_and_nothing_missing() -> None:
    from weft.cli import cli

    result = CliRunner().invoke(cli, ["viz", "--help"])
    assert result.exit_code == 0, result.output
    assert "Not yet" not in result.output and "being built" not in result.output
    for command in ("stat", "top", "edges", "routes", "tap", "dashboard"):
        assert command in result.output
