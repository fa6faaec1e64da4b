"""The admin port's ``/tap`` stream over loopback: events arrive as newline-delimited
JSON in a chunked response, a slow reader is told what it lost, the stream ends at
``max``, at ``duration``, when the client leaves or the agent stops, and a peer that is
not on the node is refused 403 with the reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.admin import AdminServer, Readiness
from nodeagent.tap import TapEvent, TapHub
from weft.viz.sources import Agent, TapStream

pytestmark = pytest.mark.sockets

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"


def event(path: str = "/", dst: str = "echo-1", status: int = 200) -> TapEvent:
    return TapEvent(
        "outbound", "GET", path, "echo", status, "", 0.001, "client-1", "default", "client",
        CLIENT, dst, "default", ECHO, True,
    )  # fmt: skip


class _PeerAs:
    """A writer that says its peer is ``host`` (a pod calling the node's address)."""

    def __init__(self, writer: asyncio.StreamWriter, host: str) -> None:
        self._writer = writer
        self._host = host

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self._host, 40000)
        return self._writer.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


async def _serve(hub: TapHub, peer: str | None = None) -> AsyncIterator[int]:
    admin = AdminServer(Readiness(), lambda: {}, CollectorRegistry(), tap=hub)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await admin.handle(reader, _PeerAs(writer, peer) if peer else writer)  # type: ignore[arg-type]

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def hub() -> TapHub:
    return TapHub("node-1", queue_size=8)


@pytest.fixture
async def port(hub: TapHub) -> AsyncIterator[int]:
    async for p in _serve(hub):
        yield p


async def _open(port: int, query: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /tap?{query} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _until(cond: Any, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not cond():  # noqa: ASYNC110 - polls the hub's plain flag
            await asyncio.sleep(0.01)


def _dechunk(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON lines of a chunked body, and whether its last chunk came."""
    data, ended = b"", False
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            ended = True
            break
        data += rest[:size]
        body = rest[size + 2 :]
    return [json.loads(line) for line in data.splitlines()], ended


async def test_events_stream_until_max(hub: TapHub, port: int) -> None:
    reader, writer = await _open(port, "pod=default/echo-1&max=2")
    await _until(lambda: hub.active)
    hub.publish(event("/a", dst="echo-2"))  # filtered out
    hub.publish(event("/b"))
    hub.publish(event("/c"))
    hub.publish(event("/d"))
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Transfer-Encoding: chunked" in head and b"application/x-ndjson" in head
    lines, ended = _dechunk(body)
    assert ended
    assert [e["path"] for e in lines[:2]] == ["/b", "/c"]
    assert lines[0]["node"] == "node-1" and lines[0]["src"]["identity"] == CLIENT
    assert lines[-1] == {"end": "max", "events": 2, "dropped": 0}
    await _until(lambda: not hub.active)


async def test_the_stream_ends_at_its_duration(hub: TapHub, port: int) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await _open(port, "duration=0.3")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert 0.25 <= loop.time() - began < 3
    lines, ended = _dechunk(raw.partition(b"\r\n\r\n")[2])
    assert ended and lines == [{"end": "duration", "events": 0, "dropped": 0}]
    assert not hub.active


async def test_a_slow_reader_is_told_what_it_lost(hub: TapHub, port: int) -> None:
    reader, writer = await _open(port, "max=20&duration=0.5")
    await _until(lambda: hub.active)
    for i in range(30):  # one loop turn: the queue (8) overflows before anything is written
        hub.publish(event(f"/{i}"))
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    lines, _ = _dechunk(raw.partition(b"\r\n\r\n")[2])
    assert [e["path"] for e in lines if "path" in e] == [f"/{i}" for i in range(8)]
    assert lines[0] == {"dropped": 22}  # said before the next event it could send
    assert lines[-1] == {"end": "duration", "events": 8, "dropped": 22}


async def test_the_client_leaving_ends_its_subscription(hub: TapHub, port: int) -> None:
    reader, writer = await _open(port, "")
    await _until(lambda: hub.active)
    hub.publish(event())
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await _until(lambda: not hub.active)


async def test_the_agent_stopping_ends_the_stream(hub: TapHub, port: int) -> None:
    reader, writer = await _open(port, "")
    await _until(lambda: hub.active)
    hub.close()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    lines, ended = _dechunk(raw.partition(b"\r\n\r\n")[2])
    assert ended and lines == [{"end": "agent stopping", "events": 0, "dropped": 0}]


async def test_a_bad_query_is_answered_400(port: int) -> None:
    reader, writer = await _open(port, "max=0")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400 ") and b"whole number" in raw


async def test_a_peer_off_the_node_is_refused_403() -> None:
    hub = TapHub("node-1")
    async for port in _serve(hub, peer="10.240.0.21"):
        for path in ("/tap?max=1", "/debug/state"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 10.240.0.11\r\n\r\n".encode())
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 403 "), raw
            assert b"only on the node itself" in raw
        assert b"kubectl port-forward" in raw or path == "/debug/state"
        assert not hub.active and hub.published == 0


async def test_the_cli_side_reads_the_stream(hub: TapHub, port: int) -> None:
    """`weft.viz.sources.TapStream` (what ``weft viz tap`` runs per agent, in a thread)."""
    stream = TapStream(Agent("node-1", "127.0.0.1", port), "max=2", timeout=5)
    got: list[dict[str, Any]] = []
    task = asyncio.get_running_loop().run_in_executor(None, lambda: got.extend(stream))
    await _until(lambda: hub.active)
    hub.publish(event("/x"))
    hub.publish(event("/y"))
    await asyncio.wait_for(task, 5)
    assert [e.get("path") for e in got] == ["/x", "/y", None]
    assert got[-1]["end"] == "max"
