"""A noisy neighbour's floods, run *inside* a lab pod (``weft bench noisy``); prints one
JSON object.

Each flood is closed loop and as fast as the generator goes (no rate cap: the caller
pins it to one CPU instead, so "as fast as possible" means one core's worth):

* ``http HOST PORT SECONDS CONNECTIONS`` — keep-alive HTTP/1.1 on ``CONNECTIONS``
  connections, one request in flight on each; counts 200s, ``503`` answers (the proxy's
  ``weft-proxy-error: overloaded`` ones separately) and failed requests.
* ``tcp HOST PORT SECONDS CONCURRENCY`` — ``CONCURRENCY`` loops of connect, one request
  with ``Connection: close``, read to the end, close: a connection flood (against an
  opaque port, the proxy relays bytes and knows nothing of the request). A connection
  reset or closed before any answer counts as ``refused``.
* ``h2reset HOST PORT SECONDS CONNECTIONS`` — HTTP/2 rapid reset (CVE-2023-44487): on
  each h2c connection, HEADERS then RST_STREAM (CANCEL) for a new stream, over and over,
  writing in batches; a connection the server ends (GOAWAY, counted by error code) is
  replaced at once.

    python -m weft.bench.flood http|tcp|h2reset HOST PORT SECONDS N
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from typing import Any

TIMEOUT = 5.0
"""Seconds one step (connect, a response) may take before it counts as failed."""
RESET_BATCH = 50
"""Streams opened and reset per write in the rapid-reset flood."""

_FAILURES = (OSError, EOFError, ValueError, asyncio.LimitOverrunError, TimeoutError)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def http_flood(host: str, port: int, seconds: float, connections: int) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    request = b"GET /flood HTTP/1.1\r\nHost: flood\r\n\r\n"
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while time.perf_counter() < deadline:
            try:
                async with asyncio.timeout(TIMEOUT):
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    assert reader is not None
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    if n := _length(head):
                        await reader.readexactly(n)
            except _FAILURES:
                counts["failed"] += 1
                if writer is not None:
                    writer.close()
                writer = reader = None
                await asyncio.sleep(0.01)  # a refused connect must not spin
                continue
            status = head[9:12]
            if status == b"200":
                counts["ok"] += 1
            elif b"weft-proxy-error: overloaded" in head.lower():
                counts["overloaded"] += 1
            else:
                counts[f"status_{status.decode(errors='replace')}"] += 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = reader = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return _summary("http", counts, time.perf_counter() - started, connections)


async def tcp_flood(host: str, port: int, seconds: float, concurrency: int) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    request = b"GET /flood HTTP/1.1\r\nHost: flood\r\nConnection: close\r\n\r\n"
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(TIMEOUT):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    answer = await reader.read()  # to EOF: the server closes
            except ConnectionError:
                counts["refused"] += 1
                answer = None
            except _FAILURES:
                counts["failed"] += 1
                answer = None
            finally:
                if writer is not None:
                    writer.close()
            if answer is None:
                await asyncio.sleep(0.01)
            elif answer.startswith(b"HTTP/1.1 200 "):
                counts["ok"] += 1
            elif not answer:
                counts["refused"] += 1  # closed before any answer
                await asyncio.sleep(0.01)
            else:
                counts[f"status_{answer[9:12].decode(errors='replace')}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return _summary("tcp", counts, time.perf_counter() - started, concurrency)


async def h2reset_flood(host: str, port: int, seconds: float, connections: int) -> dict[str, Any]:
    from h2.errors import ErrorCodes

    from weft.lab.h2peer import H2Peer

    counts: collections.Counter[str] = collections.Counter()
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            try:
                async with asyncio.timeout(TIMEOUT):
                    peer = await H2Peer.connect(port, host)
            except _FAILURES:
                counts["connect_failed"] += 1
                await asyncio.sleep(0.01)
                continue
            counts["connections"] += 1
            try:
                while time.perf_counter() < deadline and not peer.lost.done():
                    if peer.terminated is not None:
                        break
                    for _ in range(RESET_BATCH):
                        sid, _ = peer.start("GET", "/flood", authority="flood")
                        peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
                        peer.streams.pop(sid, None)
                    peer.flush()
                    counts["streams_reset"] += RESET_BATCH
                    await asyncio.sleep(0)  # let the answers (and a GOAWAY) in
                    transport = peer.transport
                    if transport is not None and transport.get_write_buffer_size() > 1 << 20:
                        await asyncio.sleep(0.001)  # the server stopped reading
            except Exception:  # the h2 state machine refuses once the server said GOAWAY
                pass
            if peer.terminated is not None:
                code = peer.terminated.error_code
                counts[f"goaway_{getattr(code, 'name', code)}"] += 1
            peer.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return _summary("h2reset", counts, time.perf_counter() - started, connections)


def _summary(mode: str, counts: collections.Counter[str], elapsed: float, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": mode, "concurrency": n, "seconds": round(elapsed, 3)}
    out.update(sorted(counts.items()))
    done = "streams_reset" if mode == "h2reset" else "ok"
    out["per_second"] = round(counts.get(done, 0) / elapsed, 1) if elapsed else 0.0
    refused = ("overloaded", "refused") if mode != "h2reset" else ()
    out["refused"] = sum(counts.get(k, 0) for k in refused) + sum(
        v for k, v in counts.items() if k.startswith("goaway_")
    )
    return out


FLOODS = {"http": http_flood, "tcp": tcp_flood, "h2reset": h2reset_flood}


def main(argv: list[str]) -> None:
    mode, host, port, seconds, n = argv
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    result = run(FLOODS[mode](host, int(port), float(seconds), int(n)))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
