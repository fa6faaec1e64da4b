"""``weft viz tap`` without I/O (`weft.viz.tap`): a resource and its filters as the
agents' ``/tap`` query, with and without a lab's topology, events as table rows, and the
dashboard's relay: events as the page's rows and server-sent events, and its bounded
queue (`TapRelay`)."""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qsl

import pytest
from click.testing import CliRunner

from weft.viz.model import Pod, Service, Target, Topology, VizError
from weft.viz.tap import Relayed, TapRelay, TapRow, line, page_row, row, sse, tap_query

TOPO = Topology(
    pods=(
        Pod("default", "client-1", "node-1", {"app": "client"}),
        Pod("default", "echo-1", "node-1", {"app": "echo"}),
        Pod("default", "echo-2", "node-2", {"app": "echo"}),
    ),
    services=(Service("default", "echo", {"app": "echo"}),),
)
ACCOUNTS = {("default", "client-1"): "client", ("default", "echo-1"): "echo",
            ("default", "echo-2"): "echo"}  # fmt: skip


def q(text: str) -> list[tuple[str, str]]:
    return parse_qsl(text)


def test_a_deployment_is_its_pods_and_their_accounts() -> None:
    query = tap_query(Target("deploy", "echo", "default"), TOPO, ACCOUNTS, max_events=5)
    assert q(query) == [("pod", "default/echo-1"), ("pod", "default/echo-2"),
                        ("sa", "default/echo"), ("max", "5")]  # fmt: skip
    query = tap_query(
        Target("svc", "echo", "default"), TOPO, ACCOUNTS,
        to=Target("pod", "echo-2", "default"), from_=Target("deploy", "client", "default"),
        method="get", path="/api", duration=2.5,
    )  # fmt: skip
    assert ("to.pod", "default/echo-2") in q(query) and ("to.sa", "default/echo") in q(query)
    assert ("from.pod", "default/client-1") in q(query)
    assert ("from.sa", "default/client") in q(query)
    assert ("method", "GET") in q(query) and ("path", "/api") in q(query)
    assert ("duration", "2.5") in q(query)
    assert q(tap_query(Target("ns", "shop", "default"), TOPO, ACCOUNTS)) == [("ns", "shop")]


def test_without_a_topology_a_deployment_is_named_by_its_pods_prefix() -> None:
    query = tap_query(Target("deploy", "echo", "shop"), Topology(), {})
    assert q(query) == [("pod", "shop/echo"), ("prefix", "shop/echo-"), ("sa", "shop/echo")]
    assert q(tap_query(Target("pod", "x-1", "shop"), Topology(), {})) == [("pod", "shop/x-1")]
    with pytest.raises(VizError, match="svc needs one"):
        tap_query(Target("svc", "echo", "shop"), Topology(), {})


def test_unknown_resources_and_bad_paths_are_refused() -> None:
    with pytest.raises(VizError, match="no deploy/nope"):
        tap_query(Target("deploy", "nope", "default"), TOPO, ACCOUNTS)
    with pytest.raises(VizError, match="starting with /"):
        tap_query(Target("deploy", "echo", "default"), TOPO, ACCOUNTS, path="api")


def test_rows() -> None:
    out = row({
        "direction": "outbound", "node": "node-1", "method": "GET", "path": "/", "authority":
        "echo", "status": 200, "latency_ms": 1.25, "route": None,
        "src": {"pod": "client-1", "namespace": "default", "identity": "spiffe://a"},
        "dst": {"pod": "echo-1", "namespace": "default", "identity": "spiffe://b"},
    })  # fmt: skip
    assert out.cells() == ("out", "node-1", "GET", "/", "echo", "200", "1.2ms",
                           "default/client-1", "default/echo-1", "spiffe://a", "spiffe://b",
                           "-")  # fmt: skip
    failed = row({
        "direction": "inbound", "status": 503, "error": "no-endpoints", "latency_ms": None,
        "src": {"pod": None, "namespace": "default", "service_account": "client"}, "dst": {},
    })  # fmt: skip
    assert failed.direction == "in" and failed.status == "503 no-endpoints"
    assert failed.src == "default/sa:client" and failed.dst == "-" and failed.latency == "-"


def test_the_command_refuses_prometheus_and_a_missing_name() -> None:
    from weft.cli import cli

    result = CliRunner().invoke(cli, ["viz", "--prometheus", "http://p", "tap", "deploy/echo"])
    assert result.exit_code == 1 and "not Prometheus" in result.output
    result = CliRunner().invoke(cli, ["viz", "--agent", "127.0.0.1:1", "tap", "deploy"])
    assert result.exit_code == 1 and "give KIND/NAME" in result.output


def test_an_agent_that_cannot_be_tapped_is_named() -> None:
    from weft.cli import cli

    result = CliRunner().invoke(
        cli, ["viz", "--agent", "127.0.0.1:1", "tap", "deploy/echo", "--duration", "2"]
    )
    assert result.exit_code == 1
    assert "could not tap the agent of 127.0.0.1:1" in result.output
    assert "connection refused" in result.output and "no agent could be tapped" in result.output


def test_lines_line_up_and_cut_long_cells() -> None:
    header = line(TapRow.HEADERS)
    cells = row({"direction": "outbound", "path": "/" + "p" * 40, "route": "default/a-long-route"})
    text = line(cells.cells())
    assert header.index("PATH") == text.index("/p")
    assert "p…" in text and text.endswith("default/a-long-route")  # the last is not cut
    assert header.index("CLIENT_ID") == text.index("-  ", header.index("CLIENT_ID"))


# -- the dashboard's relay ------------------------------------------------------------------

EVENT = {
    "time": 1700000000.5, "direction": "inbound", "node": "node-2", "method": "GET",
    "path": "/x", "authority": "echo", "status": 503, "error": "connect-failed",
    "latency_ms": 12.0, "tls": True, "route": None,
    "src": {"pod": None, "namespace": "default", "service_account": "client",
            "identity": "spiffe://cluster.local/ns/default/sa/client"},
    "dst": {"pod": "echo-2", "namespace": "default",
            "identity": "spiffe://cluster.local/ns/default/sa/echo"},
}  # fmt: skip


def test_page_rows_are_the_table_cells_by_name() -> None:
    r = page_row(EVENT)
    assert (r["direction"], r["node"], r["status"], r["status_code"]) == (
        "in", "node-2", "503 connect-failed", 503)  # fmt: skip
    assert r["src"] == "default/sa:client" and r["dst"] == "default/echo-2"
    assert r["client_id"].endswith("/sa/client") and r["server_id"].endswith("/sa/echo")
    assert r["latency"] == "12ms" and r["tls"] is True and r["time"] == 1700000000.5


def test_a_server_sent_event_is_one_data_line() -> None:
    out = sse("request", {"path": "/a\nb", "text": "two\nlines"})
    assert out.startswith(b"event: request\ndata: {") and out.endswith(b"}\n\n")
    assert out.count(b"\n") == 3  # the newlines in the values are escaped
    assert json.loads(out.split(b"data: ", 1)[1]) == {"path": "/a\nb", "text": "two\nlines"}


def test_the_relay_drops_beyond_its_limit_and_counts() -> None:
    wakes: list[int] = []
    relay = TapRelay(3, lambda: wakes.append(1))
    for i in range(5):
        relay.put(Relayed("node-1", {"n": i}))
    relay.put(Relayed("node-2", None, "refused"))  # an end is never dropped
    assert len(wakes) == 1  # one wake-up for the burst, not one per event
    items = relay.take()
    assert [i.event["n"] for i in items if i.event] == [0, 1, 2] and relay.dropped == 2
    assert items[-1] == Relayed("node-2", None, "refused")
    assert relay.take() == [] and len(wakes) == 1
    relay.put(Relayed("node-1", {"n": 5}))  # room again after a take, and a new wake-up
    assert [i.event for i in relay.take()] == [{"n": 5}] and len(wakes) == 2


def test_the_relay_takes_from_many_threads() -> None:
    relay = TapRelay(10_000, lambda: None)

    def put(agent: str) -> None:
        for i in range(1000):
            relay.put(Relayed(agent, {"n": i}))

    threads = [threading.Thread(target=put, args=(f"node-{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    got: list[Relayed] = []
    while any(t.is_alive() for t in threads):
        got += relay.take()
    for t in threads:
        t.join()
    got += relay.take()
    assert len(got) == 4000 and relay.dropped == 0
    for n in range(4):  # each agent's events in the order its thread put them
        assert [(i.event or {})["n"] for i in got if i.agent == f"node-{n}"] == list(range(1000))
