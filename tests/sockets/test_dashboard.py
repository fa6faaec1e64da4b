"""`weft viz dashboard`'s server on 127.0.0.1: its endpoints over real sockets, fed by a
source whose expositions the agent's own collectors make, and traces read from a real
`weft.lab.otlp` receiver's JSON API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from nodeagent.httpmetrics import HttpMetrics
from tests.unit.test_viz import TOPO, _expose, _inbound, _outbound
from weft.lab.otlp import OtlpReceiver
from weft.viz import dashboard as dash
from weft.viz.expo import parse_text
from weft.viz.model import Scrape, Snapshot

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
