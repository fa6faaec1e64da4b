"""`weft.viz.board` (the dashboard's views, sans-I/O) and how the dashboard finds a lab's
trace receiver. Expositions come from the node agent's own collectors, as in test_viz."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from nodeagent.httpmetrics import HttpMetrics
from tests.unit.test_viz import TOPO, _expose, _inbound, _outbound
from weft.lab.plan import plan_lab
from weft.lab.state import LabPaths, LabState, ProcessRecord
from weft.viz import board
from weft.viz.dashboard import (
    DashboardConfig,
    TraceReceiver,
    lab_trace_receiver,
    read_traces,
    receiver_from_url,
)
from weft.viz.expo import parse_text
from weft.viz.model import Scrape, Snapshot, Unreachable, VizError
from weft.viz.sources import Agent


def _snap(at: float, *metrics: HttpMetrics, down: tuple[Unreachable, ...] = ()) -> Snapshot:
    scrapes = tuple(
        Scrape(f"node-{i + 1}", at, tuple(parse_text(_expose(m)))) for i, m in enumerate(metrics)
    )
    return Snapshot(scrapes, down)


def _traffic(node1: HttpMetrics, node2: HttpMetrics, n: int) -> None:
    """client-1 (node-1) calls echo-1 (node-1) and echo-2 (node-2, failing half) n times
    each, through the mesh; and plain-1 once without mTLS."""
    for i in range(n):
        node1.record(_outbound("client-1", "echo-1"), status=200, latency=0.001)
        node1.record(_inbound("echo-1"), status=200, latency=0.001)
        status = 503 if i % 2 else 200
        node1.record(_outbound("client-1", "echo-2"), status=status, latency=0.004)
        node2.record(_inbound("echo-2"), status=status, latency=0.004)


def test_history_keeps_one_baseline_a_window_old() -> None:
    h = board.History(10)
    assert h.pair() == (None, None)
    snaps = [Snapshot(()) for _ in range(8)]
    h.add(0, snaps[0])
    assert h.pair() == (None, snaps[0])
    for i, at in enumerate((2, 4, 6, 8, 10, 12, 14), start=1):
        h.add(at, snaps[i])
    # At 14 s the newest snapshot at least 10 s old is the one taken at 4 s.
    assert h.pair() == (snaps[2], snaps[7])
    with pytest.raises(ValueError):
        board.History(0)


def test_graph_nodes_are_workloads_and_edges_carry_the_windows_figures() -> None:
    node1, node2 = HttpMetrics(), HttpMetrics()
    _traffic(node1, node2, 10)
    node1.record(_outbound("plain-1", "echo-1", tls=False), status=200, latency=0.001)
    before = _snap(0, node1, node2)
    _traffic(node1, node2, 20)  # in the window: plain-1 sends nothing more
    after = _snap(10, node1, node2)
    doc = board.graph(board.figuring(before, after), TOPO)
    assert doc["window_seconds"] == 10
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert set(nodes) >= {"default/client", "default/echo", "default/plain", "default/hello"}
    echo = nodes["default/echo"]
    assert echo["success_rate"] == 0.75 and echo["rps"] == 4.0 and echo["meshed"] == "2/2"
    assert echo["captured"] and not nodes["default/plain"]["captured"]
    assert echo["latency_ms_p99"] is not None and echo["missing_agents"] == []
    edges = {e["id"]: e for e in doc["edges"]}
    mesh = edges["default/client->default/echo"]
    assert mesh["mtls"] and mesh["active"] and mesh["secured"] == "yes"
    assert mesh["rps"] == 4.0 and mesh["success_rate"] == 0.75
    assert mesh["client_id"] and mesh["server_id"]
    # Seen since the agents started but quiet in the window: drawn, idle, plaintext.
    plain = edges["default/plain->default/echo"]
    assert not plain["active"] and not plain["rps"] and plain["secured"] == "no"


def test_graph_before_a_second_snapshot_has_edges_but_no_rates() -> None:
    node1, node2 = HttpMetrics(), HttpMetrics()
    _traffic(node1, node2, 4)
    fig = board.figuring(None, _snap(0, node1, node2))
    doc = board.graph(fig, TOPO)
    assert doc["window_seconds"] is None
    [edge] = [e for e in doc["edges"] if e["id"] == "default/client->default/echo"]
    assert edge["mtls"] and not edge["active"] and edge["rps"] is None


def test_an_unreachable_agent_is_named_on_its_workloads() -> None:
    node1, node2 = HttpMetrics(), HttpMetrics()
    _traffic(node1, node2, 4)
    down = (Unreachable("node-2", "10.240.0.12:15020", "connection refused"),)
    before = Snapshot(_snap(0, node1).scrapes, down)
    after = Snapshot(_snap(5, node1).scrapes, down)
    fig = board.figuring(before, after)
    nodes = {n["id"]: n for n in board.graph(fig, TOPO)["nodes"]}
    assert nodes["default/echo"]["missing_agents"] == ["node-2"]
    assert nodes["default/client"]["missing_agents"] == []
    assert board.unreachable_json(fig.unreachable)[0]["source"] == "node-2"


def test_stat_rows_and_their_trend() -> None:
    node1, node2 = HttpMetrics(), HttpMetrics()
    trends = board.Trends(points=3)
    snaps = [_snap(0, node1, node2)]
    for t in range(1, 5):
        _traffic(node1, node2, 2 * t)
        snaps.append(_snap(float(t), node1, node2))
    docs = [
        board.stat(board.figuring(a, b), TOPO, "pod", trends=trends, at=float(i))
        for i, (a, b) in enumerate(itertools.pairwise(snaps))
    ]
    rows = {r["name"]: r for r in docs[-1]["rows"]}
    assert rows["echo-2"]["success_rate"] == 0.5 and rows["echo-1"]["requests"] == 8
    assert [p["rps"] for p in rows["echo-1"]["trend"]] == [4.0, 6.0, 8.0]  # the last 3
    assert docs[-1]["kind"] == "pod" and docs[-1]["window_seconds"] == 1.0
    # No trend point without a window (a first snapshot).
    board.stat(board.figuring(None, snaps[-1]), TOPO, "pod", trends=trends, at=9.0)
    assert len(trends.of("pod", "default", "echo-1")) == 3


def test_traces_summaries_with_their_hops() -> None:
    summaries = [
        {"traceId": "ab" * 16, "spans": 2, "root": "outbound", "start": 10**18,
         "durationMs": 3.5, "services": ["weft-proxy"]},
        {"traceId": "cd" * 16, "spans": 1, "root": "inbound", "start": 10**18,
         "durationMs": 1.0, "services": ["weft-proxy"]},
    ]  # fmt: skip
    span = {
        "name": "outbound",
        "kind": "CLIENT",
        "startTimeUnixNano": 1_000_000,
        "endTimeUnixNano": 3_500_000,
        "attributes": {"weft.src.workload": "client-1", "weft.dst.workload": "echo-2",
                       "http.response.status_code": 503, "weft.tls": True},
        "status": {"code": "ERROR", "message": ""},
        "resource": {"service.name": "weft-proxy", "k8s.node.name": "node-1"},
    }  # fmt: skip
    out = board.traces(summaries, {"ab" * 16: [span]})
    assert out[0]["hops"] == [
        {"name": "outbound", "kind": "CLIENT", "node": "node-1", "src": "client-1",
         "dst": "echo-2", "route": "", "status": 503, "error": True, "tls": True,
         "duration_ms": 2.5}
    ]  # fmt: skip
    assert out[1]["hops"] is None and out[1]["trace_id"] == "cd" * 16


def _state(processes: list[ProcessRecord] = (), agent_args: list[str] = ()) -> LabState:  # type: ignore[assignment]
    paths = LabPaths(Path("/nonexistent"), None, Path("/nonexistent"))
    return LabState(
        plan=plan_lab("t", nodes=2, demo=True),
        phase="ready",
        paths=paths,
        processes=list(processes),
        agent_args=list(agent_args),
    )


def test_a_lab_names_its_receiver_by_its_record_process_or_the_agents_collector() -> None:
    assert lab_trace_receiver(_state()) is None
    rec = ProcessRecord("otlp", 1, 1, ["python", "-m", "weft.lab.otlp", "--listen",
                                       "0.0.0.0:4318"], "/log", "cp")  # fmt: skip
    found = lab_trace_receiver(_state([rec]))
    assert found is not None
    assert found.endpoint == Agent("otlp", "127.0.0.1", 4318, "t-cp")
    by_flag = lab_trace_receiver(_state(agent_args=["--trace-collector=10.240.0.1:4318"]))
    assert by_flag is not None and by_flag.endpoint == Agent(
        "trace collector", "10.240.0.1", 4318, "t-node-1"
    )
    traced = _state([rec])
    traced.traces = {"collector": "10.240.0.2:4318", "netns": "t-cp", "sample_rate": 1.0}
    by_record = lab_trace_receiver(traced)
    assert by_record is not None
    assert by_record.endpoint == Agent("otlp", "10.240.0.2", 4318, "t-cp")
    assert receiver_from_url("http://127.0.0.1:4318").endpoint == Agent("traces", "127.0.0.1", 4318)
    with pytest.raises(VizError):
        receiver_from_url("https://x")


def test_read_traces_fetches_the_newest_whole_and_says_when_it_cannot() -> None:
    receiver = TraceReceiver(Agent("otlp", "127.0.0.1", 4318, "t-cp"), "test")
    asked: list[str] = []

    def fetch(agent: Agent, path: str, timeout: float) -> object:
        asked.append(path)
        if path.startswith("/api/traces?"):
            return [{"traceId": "ab" * 16, "spans": 0, "root": "x", "start": 0,
                     "durationMs": 0, "services": []}]  # fmt: skip
        return {"traceId": "ab" * 16, "spans": []}

    doc = read_traces(receiver, fetch)
    assert doc["enabled"] and doc["error"] is None and doc["traces"][0]["hops"] == []
    assert asked == ["/api/traces?limit=20", "/api/traces/" + "ab" * 16]

    def refused(agent: Agent, path: str, timeout: float) -> object:
        raise ConnectionRefusedError("refused")

    down = read_traces(receiver, refused)
    assert down["enabled"] and "cannot be read" in down["error"] and down["traces"] == []


def test_config_is_checked_once() -> None:
    with pytest.raises(VizError, match="--window"):
        DashboardConfig(interval=5, window=2)
    with pytest.raises(VizError, match="--interval"):
        DashboardConfig(interval=0)
