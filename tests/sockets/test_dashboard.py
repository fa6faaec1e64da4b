"""`weft viz dashboard`'s server on 127.0.0.1: its endpoints over real sockets, fed by a
source whose expositions the agent's own collectors make, traces read from a real
`weft.lab.otlp` receiver's JSON API, and the live tap relayed from a real agent admin
port's ``/tap`` (`nodeagent.admin`) as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nodeagent.admin import AdminServer, Readiness
from nodeagent.httpmetrics import HttpMetrics
from nodeagent.tap import TapEvent, TapHub
from tests.unit.test_viz import TOPO, _expose, _inbound, _outbound
from weft.lab.otlp import OtlpReceiver
from weft.viz import dashboard as dash
from weft.viz.expo import parse_text
from weft.viz.model import Scrape, Snapshot
from weft.viz.sources import Agent

pytestmark = [pytest.mark.sockets, pytest.mark.timeout(60)]


class Traffic:
    """A source: every snapshot, client-1 has sent echo-1 and echo-2 ten more requests
    (echo-2 failing half)."""

    def __init__(self) -> None:
        self.node1, self.node2 = HttpMetrics(), HttpMetrics()
        self.snapshots = 0

    def describe(self) -> str:
        return "2 fake agents"

    def snapshot(self) -> Snapshot:
        self.snapshots += 1
        for i in range(10):
            self.node1.record(_outbound("client-1", "echo-1"), status=200, latency=0.001)
            self.node1.record(_inbound("echo-1"), status=200, latency=0.001)
            status = 503 if i % 2 else 200
            self.node1.record(_outbound("client-1", "echo-2"), status=status, latency=0.002)
            self.node2.record(_inbound("echo-2"), status=status, latency=0.002)
        now = time.monotonic()
        return Snapshot(
            (
                Scrape("node-1", now, tuple(parse_text(_expose(self.node1)))),
                Scrape("node-2", now, tuple(parse_text(_expose(self.node2)))),
            )
        )

    def window(self, seconds: float, waiting: Callable[[str], None]) -> tuple[Snapshot, Snapshot]:
        raise AssertionError("the dashboard keeps its own history of agent snapshots")


CONFIG = dash.DashboardConfig(port=0, interval=0.05, window=0.2)


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = OtlpReceiver()
    await r.start("127.0.0.1", 0)
    try:
        yield r
    finally:
        await r.stop()


async def _serve(traces: dash.TraceReceiver | None, source: object = None):
    poller = dash.Poller(source or Traffic(), TOPO, CONFIG, "2 fake agents")  # type: ignore[arg-type]
    running = await dash.start(poller, CONFIG, traces)
    return poller, running


async def _until(poller: dash.Poller, polls: int) -> None:
    async with asyncio.timeout(20):
        await poller.wait_for_polls(polls)


async def test_the_endpoints_answer_the_views(receiver: OtlpReceiver) -> None:
    assert receiver.http_address is not None
    host, port = receiver.http_address
    receiver.store.add(
        [
            {"traceId": "ab" * 16, "spanId": "01" * 8, "parentSpanId": "", "name": "outbound",
             "kind": "CLIENT", "startTimeUnixNano": 10, "endTimeUnixNano": 2_000_010,
             "attributes": {"weft.src.workload": "client-1", "weft.dst.workload": "echo-2"},
             "status": {"code": "UNSET", "message": ""},
             "resource": {"service.name": "weft-proxy", "k8s.node.name": "node-1"},
             "scope": {"name": "weft", "version": ""}},
        ]
    )  # fmt: skip
    traces = dash.receiver_from_url(f"http://{host}:{port}")
    poller, running = await _serve(traces)
    try:
        assert running.url.startswith("http://127.0.0.1:") and not running.url.endswith(":0/")
        await _until(poller, 6)
        async with aiohttp.ClientSession() as s:
            async with s.get(running.url) as r:
                assert r.status == 200 and "cytoscape.min.js" in await r.text()
                assert r.headers["Cache-Control"] == "no-store"
            async with s.get(running.url + "static/dashboard.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"
            async with s.get(running.url + "static/..%2Fdashboard.py") as r:
                assert r.status == 404
            async with s.get(running.url + "api/graph") as r:
                graph = await r.json()
            edges = {e["id"]: e for e in graph["edges"]}
            edge = edges["default/client->default/echo"]
            assert edge["mtls"] and edge["active"] and edge["success_rate"] == 0.75
            assert graph["window_seconds"] is not None and graph["error"] is None
            assert graph["source"] == "2 fake agents" and graph["polls"] >= 6
            async with s.get(running.url + "api/stat?kind=pod") as r:
                rows = {row["name"]: row for row in (await r.json())["rows"]}
            assert rows["echo-2"]["success_rate"] == 0.5 and rows["echo-2"]["trend"]
            async with s.get(running.url + "api/stat?kind=bogus") as r:
                assert r.status == 400
            async with s.get(running.url + "api/traces") as r:
                doc = await r.json()
            assert doc["enabled"] and doc["error"] is None
            [trace] = doc["traces"]
            assert trace["trace_id"] == "ab" * 16 and trace["hops"][0]["dst"] == "echo-2"
            # A page elsewhere reaching 127.0.0.1 through a name it controls: refused.
            async with s.get(running.url + "api/graph", headers={"Host": "evil.example"}) as r:
                assert r.status == 403
    finally:
        await running.stop()


async def test_without_a_receiver_the_traces_panel_says_so() -> None:
    _, running = await _serve(None)
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "api/traces") as r:
            doc = await r.json()
        assert not doc["enabled"] and doc["note"].startswith("tracing not enabled")
    finally:
        await running.stop()


async def test_a_receiver_that_is_down_is_named() -> None:
    traces = dash.receiver_from_url("http://127.0.0.1:9")
    _, running = await _serve(traces)
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "api/traces") as r:
            doc = await r.json()
        assert doc["enabled"] and "127.0.0.1:9" in doc["error"] and doc["traces"] == []
    finally:
        await running.stop()


async def test_a_poller_that_dies_is_reported() -> None:
    class Broken(Traffic):
        def snapshot(self) -> Snapshot:
            raise RuntimeError("bug")

    _, running = await _serve(None, Broken())
    try:
        async with asyncio.timeout(10):
            failure = await running.failed
        assert isinstance(failure, RuntimeError)
    finally:
        await running.stop()


# -- the live tap: /api/tap relays a real agent admin port's /tap ---------------------------

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"
ACCOUNTS = {("default", "client-1"): "client", ("default", "echo-1"): "echo",
            ("default", "echo-2"): "echo"}  # fmt: skip


def _tap_event(dst: str = "echo-1", status: int = 200, path: str = "/") -> TapEvent:
    return TapEvent(
        "outbound", "GET", path, "echo", status, "", 0.002, "client-1", "default", "client",
        CLIENT_ID, dst, "default", ECHO_ID, True,
    )  # fmt: skip


@pytest.fixture
async def agent() -> AsyncIterator[tuple[TapHub, Agent]]:
    """A node agent's admin port on 127.0.0.1 with its tap hub."""
    hub = TapHub("node-1", queue_size=64)
    admin = AdminServer(Readiness(), lambda: {}, CollectorRegistry(), tap=hub)
    server = await asyncio.start_server(admin.handle, "127.0.0.1", 0)
    try:
        yield hub, Agent("node-1", "127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        hub.close()
        server.close()
        await server.wait_closed()


async def _tap_serve(taps: dash.Taps) -> dash.Running:
    poller = dash.Poller(Traffic(), TOPO, CONFIG, "2 fake agents")
    return await dash.start(poller, CONFIG, None, taps=taps)


async def _events(
    response: aiohttp.ClientResponse, until: Callable[[list[tuple[str, dict]]], bool]
) -> list[tuple[str, dict]]:
    """The server-sent events read until ``until`` holds of them (or the stream ends)."""
    got: list[tuple[str, dict]] = []
    name = ""
    async with asyncio.timeout(20):
        while not until(got):
            line = (await response.content.readline()).decode()
            if not line:
                break
            if line.startswith("event: "):
                name = line[7:].strip()
            elif line.startswith("data: "):
                got.append((name, json.loads(line[6:])))
    return got


async def _until_true(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not cond():  # noqa: ASYNC110 - polls the hub's plain flag
            await asyncio.sleep(0.02)


async def test_the_tap_relays_the_workloads_requests(agent: tuple[TapHub, Agent]) -> None:
    hub, where = agent
    source = dash.TapSource([where], TOPO, ACCOUNTS, "a test agent")
    running = await _tap_serve(dash.Taps(source))
    try:
        async with aiohttp.ClientSession() as s:
            url = running.url + "api/tap?workload=default/echo"
            async with s.get(url) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                [(kind, status)] = await _events(r, lambda got: len(got) >= 1)
                assert kind == "status" and status["agents"] == ["node-1"]
                assert status["workload"] == "default/echo" and status["tapping"] == 1
                await _until_true(lambda: hub.active)
                [sub] = hub.subscribers
                hub.publish(_tap_event("echo-2", 503, "/fail"))
                hub.publish(_tap_event("echo-1", 200, "/ok"))
                got = await _events(r, lambda got: len(got) >= 2)
            assert [k for k, _ in got] == ["request", "request"]
            failed, ok = got[0][1], got[1][1]
            assert (failed["path"], failed["status_code"], failed["dst"]) == (
                "/fail", 503, "default/echo-2")  # fmt: skip
            assert failed["client_id"] == CLIENT_ID and failed["server_id"] == ECHO_ID
            assert ok["status"] == "200" and ok["direction"] == "out" and ok["node"] == "node-1"
            # The page went away: the agent's stream is closed (its slot freed).
            await _until_true(lambda: not hub.active)
            assert sub not in hub.subscribers
            async with s.get(running.url + "api/tap?workload=default/nope") as r:
                [(kind, data)] = await _events(r, lambda got: False)
            assert kind == "refused" and "no deploy/nope" in data["message"]
    finally:
        await running.stop()


async def test_the_tap_is_bounded_per_page_and_in_pages(agent: tuple[TapHub, Agent]) -> None:
    hub, where = agent
    source = dash.TapSource([where], TOPO, ACCOUNTS, "a test agent")
    running = await _tap_serve(dash.Taps(source, queue=4, max_pages=1))
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "api/tap") as r:
            await _events(r, lambda got: len(got) >= 1)
            await _until_true(lambda: hub.active)
            # A second page while the first taps: refused with the reason, not queued.
            async with s.get(running.url + "api/tap") as second:
                [(kind, data)] = await _events(second, lambda got: False)
            assert kind == "refused" and "at most 1" in data["message"]
            # A burst faster than the page is read: at most 4 wait, the rest are counted.
            for i in range(60):  # the agent holds 64
                hub.publish(_tap_event(path=f"/{i}"))
            got = await _events(r, lambda got: any(k == "status" and d["dropped"] for k, d in got))
            requests = [d for k, d in got if k == "request"]
            [status] = [d for k, d in got if k == "status"]
            assert status["dropped"] > 0 and status["agent_dropped"] == {}
            assert len(requests) + status["dropped"] <= 60
    finally:
        await running.stop()


async def test_the_tap_names_an_agent_it_cannot_reach_and_without_one_says_so() -> None:
    source = dash.TapSource([Agent("node-9", "127.0.0.1", 9)], TOPO, ACCOUNTS, "nowhere")
    running = await _tap_serve(dash.Taps(source))
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "api/tap") as r:
            got = await _events(r, lambda got: any(d.get("ended") for _, d in got))
        assert "connection refused" in got[-1][1]["ended"]["node-9"], got
        assert got[-1][1]["tapping"] == 0
    finally:
        await running.stop()
    running = await _tap_serve(dash.Taps(None))
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "api/tap") as r:
            [(kind, data)] = await _events(r, lambda got: False)
        assert kind == "unavailable" and "loopback clients only" in data["message"]
    finally:
        await running.stop()


async def test_stopping_the_dashboard_closes_the_agents_streams(
    agent: tuple[TapHub, Agent],
) -> None:
    hub, where = agent
    running = await _tap_serve(dash.Taps(dash.TapSource([where], TOPO, ACCOUNTS, "test")))
    async with aiohttp.ClientSession() as s, s.get(running.url + "api/tap") as r:
        await _events(r, lambda got: len(got) >= 1)
        await _until_true(lambda: hub.active)
        async with asyncio.timeout(10):
            await running.stop()
        await _until_true(lambda: not hub.active)


async def test_an_agent_ending_its_tap_is_said_with_its_reason(
    agent: tuple[TapHub, Agent],
) -> None:
    hub, where = agent
    running = await _tap_serve(dash.Taps(dash.TapSource([where], TOPO, ACCOUNTS, "test")))
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "api/tap") as r:
            await _events(r, lambda got: len(got) >= 1)
            await _until_true(lambda: hub.active)
            hub.close()  # the agent stopping
            got = await _events(r, lambda got: any(d.get("ended") for _, d in got))
            # Every agent's stream ended: so does the page's (the browser reconnects).
            assert (await r.content.read()).strip() == b""
        [(_, status)] = got
        assert status["ended"] == {"node-1": "the agent ended its tap: agent stopping"}
        assert status["tapping"] == 0
    finally:
        await running.stop()
