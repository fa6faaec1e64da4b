"""The agent's admin port over real sockets: routes, refusals, and a failing state."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter

from nodeagent.admin import AdminServer, Readiness

pytestmark = pytest.mark.sockets


async def _ask(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_admin_routes_and_refusals():
    registry = CollectorRegistry()
    Counter("weft_test_things", "things", registry=registry).inc(3)
    readiness = Readiness("ebpf", "pods")
    state = {"ok": {"node": "node-1"}}

    def snapshot() -> dict:
        if "boom" in state:
            raise RuntimeError("state broke")
        return state["ok"]

    admin = AdminServer(readiness, snapshot, registry)
    server = await asyncio.start_server(admin.handle, "127.0.0.1", 0, limit=16 * 1024)
    port = server.sockets[0].getsockname()[1]
    try:
        get = lambda path: f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()  # noqa: E731
        assert await _ask(port, get("/live")) == (200, b"live\n")
        assert await _ask(port, get("/ready")) == (503, b"not ready: waiting for ebpf, pods\n")
        readiness.done("ebpf")
        readiness.done("pods")
        assert await _ask(port, get("/ready?verbose=1")) == (200, b"ready\n")
        status, body = await _ask(port, get("/metrics"))
        assert status == 200 and b"weft_test_things_total 3.0" in body
        assert await _ask(port, get("/debug/state")) == (200, b'{\n  "node": "node-1"\n}')
        state["boom"] = {}
        status, body = await _ask(port, get("/debug/state"))
        assert status == 500 and b"internal error" in body
        assert (await _ask(port, get("/nope")))[0] == 404
        assert (await _ask(port, b"POST /live HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))[0] == 405
        assert (await _ask(port, b"GET /live HTTP/1.0\r\n\r\n"))[0] == 505
        assert (await _ask(port, b"garbage\r\n\r\n"))[0] == 400
        # A head larger than the reader's limit is refused, not buffered.
        status, _ = await _ask(port, b"GET /live HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        assert status in (400, 431)
    finally:
        server.close()
        await server.wait_closed()


def test_debug_state_answers_only_the_node_itself() -> None:
    from weft.http import RequestHead

    admin = AdminServer(Readiness(), lambda: {"node": "n"}, CollectorRegistry())
    head = RequestHead("GET", "/debug/state", {})
    assert admin.route(head, "127.0.0.1")[0] == 200
    assert admin.route(head, "::1")[0] == 200
    assert admin.route(head, "::ffff:127.0.0.1")[0] == 200
    status, body, _ = admin.route(head, "10.240.0.12")
    assert status == 403 and b"only on the node itself" in body
    assert admin.route(RequestHead("GET", "/metrics", {}), "10.240.0.12")[0] == 200
    assert admin.route(head, "")[0] == 403  # unknown peer: refused
