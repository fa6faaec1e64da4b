"""A sidecar's app probes (`nodeagent.probes`) over real sockets on 127.0.0.1: the
kubelet's rewritten probe asks the admin server, which runs the original against the
app — HTTP status ranges, headers, TCP, gRPC health, timeouts, refusals — and says 200
or 503."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.admin import AdminServer, Readiness
from nodeagent.probes import AppProber, health_request, parse_table

pytestmark = pytest.mark.sockets


class App:
    """An app with a health endpoint: /healthz 200, /redirect 302, /sick 500, /slow hangs."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            path = head.split(b" ")[1]
            if path == b"/slow":
                await asyncio.sleep(30)
            status = {b"/healthz": b"200 OK", b"/redirect": b"302 Found"}.get(
                path, b"500 Internal Server Error"
            )
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 6\r\n\r\nsecret")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    a = App()
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


async def _closed_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


def _table(app: App, closed: int) -> dict[str, Any]:
    def http(path: str, timeout: float = 1, **extra: Any) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": app.port, "scheme": "HTTP", **extra},
                "timeoutSeconds": timeout}  # fmt: skip

    return {
        "/app-health/app/readyz": http(
            "/healthz", httpHeaders=[{"name": "X-Probe", "value": "yes"}]
        ),
        "/app-health/app/livez": {"tcpSocket": {"port": app.port}, "timeoutSeconds": 1},
        "/app-health/app/startupz": http("/redirect"),
        "/app-health/sick/readyz": http("/sick"),
        "/app-health/slow/readyz": http("/slow", timeout=0.3),
        "/app-health/gone/livez": {"tcpSocket": {"port": closed}, "timeoutSeconds": 1},
    }


async def test_probes_answer_for_the_app(app: App) -> None:
    prober = AppProber(parse_table(json.dumps(_table(app, await _closed_port()))), "127.0.0.1")
    status, body, _ = await prober.answer("/app-health/app/readyz")
    assert (status, body) == (200, f"http probe of port {app.port}: HTTP 200\n".encode())
    head = app.heads[-1].decode()
    assert head.startswith("GET /healthz HTTP/1.1\r\n")
    assert "X-Probe: yes\r\n" in head and "User-Agent: kube-probe/weft\r\n" in head
    assert f"Host: 127.0.0.1:{app.port}\r\n" in head
    assert (await prober.answer("/app-health/app/livez"))[0] == 200
    assert (await prober.answer("/app-health/app/startupz"))[0] == 200  # 3xx is a success
    status, body, _ = await prober.answer("/app-health/sick/readyz")
    assert status == 503 and b"HTTP 500" in body and b"secret" not in body  # no app body
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body, _ = await prober.answer("/app-health/slow/readyz")
    assert status == 503 and b"no answer within 0.3s" in body
    assert loop.time() - started < 2
    status, body, _ = await prober.answer("/app-health/gone/livez")
    assert status == 503 and b"ConnectionRefusedError" in body
    assert (await prober.answer("/app-health/nobody/readyz"))[0] == 404
    assert prober.runs["/app-health/sick/readyz"] == {"ok": 0, "failed": 1}


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_the_admin_port_serves_the_probes_beside_its_own(app: App) -> None:
    """What the kubelet sees: the rewritten probe's GET on the sidecar's admin port."""
    prober = AppProber(parse_table(json.dumps(_table(app, await _closed_port()))), "127.0.0.1")
    admin = AdminServer(Readiness(), dict, CollectorRegistry(), probes=prober)
    server = await asyncio.start_server(admin.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await _get(port, "/app-health/app/readyz") == (
            200, f"http probe of port {app.port}: HTTP 200\n".encode(),
        )  # fmt: skip
        assert (await _get(port, "/app-health/sick/readyz"))[0] == 503
        assert (await _get(port, "/ready"))[0] == 200  # the sidecar's own, unchanged
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def grpc_app() -> Iterator[int]:
    """A gRPC server (grpcio, an implementation independent of ours) whose health
    service says SERVING for "" and shop.Cart, NOT_SERVING for shop.Down, NOT_FOUND else."""
    import grpc

    answers = {health_request(""): b"\x08\x01", health_request("shop.Cart"): b"\x08\x01",
               health_request("shop.Down"): b"\x08\x02"}  # fmt: skip

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request not in answers:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return answers[request]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    ),))  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


async def test_grpc_probes_ask_the_apps_health_service(grpc_app: int, app: App) -> None:
    def grpc_probe(service: str = "", port: int = grpc_app) -> dict[str, Any]:
        return {"grpc": {"port": port, "service": service}, "timeoutSeconds": 2}

    table = {
        "/app-health/a/readyz": grpc_probe(),
        "/app-health/b/readyz": grpc_probe("shop.Cart"),
        "/app-health/c/readyz": grpc_probe("shop.Down"),
        "/app-health/d/readyz": grpc_probe("shop.Nobody"),
        "/app-health/e/readyz": grpc_probe(port=app.port),  # HTTP/1.1, not gRPC
    }
    prober = AppProber(parse_table(json.dumps(table)), "127.0.0.1")
    assert await prober.answer("/app-health/a/readyz") == (
        200, f"grpc probe of port {grpc_app}: SERVING\n".encode(), "text/plain; charset=utf-8",
    )  # fmt: skip
    assert (await prober.answer("/app-health/b/readyz"))[0] == 200
    status, body, _ = await prober.answer("/app-health/c/readyz")
    assert (status, body) == (503, f"grpc probe of port {grpc_app} failed: NOT_SERVING\n".encode())
    status, body, _ = await prober.answer("/app-health/d/readyz")
    assert status == 503 and b"grpc-status 5: unknown service" in body
    assert (await prober.answer("/app-health/e/readyz"))[0] == 503
