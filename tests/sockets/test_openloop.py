"""The open-loop load generator (weft.bench.openloop) against small servers on 127.0.0.1:
no coordinated omission, and failures counted and charged instead of left out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from weft.bench import openloop

pytestmark = pytest.mark.sockets

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Callable[[int], str]], asyncio.Future[int]]]:
    """``await server(behaviour)`` starts an HTTP server whose answer to the n-th request
    (0-based, across connections) is ``behaviour(n)``: "ok", "stall" (0.5 s, then ok)
    or "reset"; returns its port."""
    servers: list[asyncio.Server] = []

    async def start(behaviour: Callable[[int], str]) -> int:
        seen = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal seen
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    n, seen = seen, seen + 1
                    what = behaviour(n)
                    if what == "reset":
                        writer.transport.abort()
                        return
                    if what == "stall":
                        await asyncio.sleep(0.5)
                    writer.write(OK)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    yield start  # type: ignore[misc]
    for srv in servers:
        srv.close()
        await srv.wait_closed()


async def test_a_stall_is_charged_to_every_request_scheduled_behind_it(server):
    # One connection, 100 requests/s for 2 s; the 10th request stalls 0.5 s. A closed-loop
    # client would record one slow request; the ~50 due during the stall waited too.
    port = await server(lambda n: "stall" if n == 10 else "ok")
    result = await openloop.fixed_rate("127.0.0.1", port, 100, 2.0, connections=1)
    assert result["count"] == 200 and result["errors"] == 0
    # The 20 slowest (10 %) were all due in the first part of the stall: each waited
    # > 0.2 s. However slow this machine is, that only adds latency.
    assert result["p90_us"] >= 200_000, result


async def test_failed_requests_are_counted_and_charged_as_timeouts(server, monkeypatch):
    monkeypatch.setattr(openloop, "REQUEST_TIMEOUT", 0.3)
    # Every 10th request's connection is reset (one warm-up request per connection
    # comes first); the run goes on over new connections.
    port = await server(lambda n: "reset" if n % 10 == 5 else "ok")
    result = await openloop.fixed_rate("127.0.0.1", port, 100, 2.0, connections=4)
    assert result["count"] == 200
    assert 15 <= result["errors"] <= 25, result
    # 10 % failed, each charged at least the timeout: the p99 is a timeout, not a fast
    # answer from the requests that happened to succeed.
    assert result["p99_us"] >= 300_000, result
    assert result["per_second"] < 100  # answered requests only


async def test_a_hung_request_fails_at_the_timeout_instead_of_hanging_the_run(server, monkeypatch):
    monkeypatch.setattr(openloop, "REQUEST_TIMEOUT", 0.2)
    port = await server(lambda n: "stall" if n >= 2 else "ok")  # 0.5 s > the timeout
    result = await openloop.saturate("127.0.0.1", port, 1.0, connections=2)
    assert result["errors"] >= 2 and result["count"] >= result["errors"], result
    assert result["max_us"] >= 200_000
