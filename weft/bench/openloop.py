"""Open-loop HTTP/1.1 load at a fixed rate, run inside a lab pod; prints one JSON object.

Why open loop: a closed-loop client (send, wait, send) slows down when the server does,
so a stall of 50 ms delays the requests that *would* have been sent meanwhile and they
never get measured — coordinated omission.  Here request ``i`` is due at
``start + i / rate`` no matter what; its latency is measured from that *intended* time to
the end of its response, so time spent queued behind a slow request counts.

Shape: ``connections`` keep-alive connections (HTTP/1.1, one request in flight each).  A
dispatcher releases requests on schedule into a queue (in batches when the event loop
wakes late, so the schedule holds on average); each connection takes the next due
request when it is free.  If all connections are busy, due requests wait in the queue —
and that wait is part of their latency, as it would be for a real client.

Failures are results: a request that fails (reset, closed, no answer within
``REQUEST_TIMEOUT``) is counted in ``errors`` *and* in the latency percentiles, charged as
a timeout (its latency is at least ``REQUEST_TIMEOUT``), so a setup cannot look fast by
dropping its slow requests.  The connection is then replaced and the run goes on.

Modes:
  rate HOST PORT RATE SECONDS [CONNECTIONS]   fixed-rate latency (p50..p99.9, max)
  saturate HOST PORT SECONDS [CONNECTIONS]    closed loop, as fast as it goes: max req/s
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any

clock = time.perf_counter
"""Not ``loop.time()``: uvloop's clock ticks in whole milliseconds, coarser than what we
measure."""

REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n"
UNIQUE_PATHS = os.environ.get("WEFT_BENCH_UNIQUE_PATHS") == "1"
"""Each request to a path of its own (``/bench/<n>``): nothing on the way can remember a
decision about the previous one (``weft bench policy``)."""
TRACEPARENT = os.environ.get("WEFT_BENCH_TRACEPARENT") == "1"
"""Each request carries a sampled W3C ``traceparent`` of a trace of its own, as from an
app that traces every request (``weft bench tracing``): the caller's decision, not the
proxy's sample rate, makes every proxy hop record a span."""
_sequence = itertools.count(1)


def _request_bytes() -> bytes:
    if UNIQUE_PATHS:
        return b"GET /bench/%d HTTP/1.1\r\nHost: bench\r\n\r\n" % next(_sequence)
    if TRACEPARENT:
        # A counter, not random ids: the same few hundred nanoseconds per request in
        # every round, and never the all-zero id the spec forbids.
        return (b"GET /bench HTTP/1.1\r\nHost: bench\r\n"
                b"traceparent: 00-%032x-00f067aa0ba902b7-01\r\n\r\n" % next(_sequence))  # fmt: skip
    return REQUEST


REQUEST_TIMEOUT = float(os.environ.get("WEFT_BENCH_REQUEST_TIMEOUT", "2.0"))
"""Seconds a request may take before it counts as failed (and is charged this long);
``WEFT_BENCH_REQUEST_TIMEOUT`` sets it (`weft.bench.noisy`'s lab test: a generous one,
since the test asserts failures, not latency)."""

_FAILURES = (OSError, EOFError, ValueError, asyncio.LimitOverrunError, TimeoutError)
"""What a failed request raises: resets, closes mid-response (IncompleteReadError is an
EOFError), a malformed head, no answer in time."""


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self) -> None:
        """One request; raises one of ``_FAILURES`` (the connection is then closed)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if self.writer is None:
                    await self.open()
                assert self.reader is not None and self.writer is not None
                self.writer.write(_request_bytes())
                head = await self.reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 "):
                    raise ValueError(f"not a 200 answer: {head[:40]!r}")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await self.reader.readexactly(length)
        except _FAILURES:
            self.close()  # the next request opens a new one
            raise


async def _connect(host: str, port: int, n: int) -> list[_Conn]:
    conns = []
    for _ in range(n):
        conn = _Conn(host, port)
        await conn.open()
        conns.append(conn)
    return conns


def _charged(started: float) -> float:
    """A failed request's latency in µs: at least the timeout, whatever failed first."""
    return max(clock() - started, REQUEST_TIMEOUT) * 1e6


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(latencies_us: list[float], elapsed: float, errors: int) -> dict[str, Any]:
    """Percentiles over every request, failed ones included (charged as timeouts);
    ``per_second`` counts answered requests only."""
    latencies_us.sort()
    answered = len(latencies_us) - errors
    return {
        "count": len(latencies_us),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "per_second": round(answered / elapsed, 1) if elapsed else 0.0,
        "p50_us": round(_pct(latencies_us, 0.50), 1),
        "p90_us": round(_pct(latencies_us, 0.90), 1),
        "p99_us": round(_pct(latencies_us, 0.99), 1),
        "p999_us": round(_pct(latencies_us, 0.999), 1),
        "max_us": round(latencies_us[-1], 1) if latencies_us else 0.0,
    }


async def fixed_rate(
    host: str, port: int, rate: float, seconds: float, connections: int = 16
) -> dict[str, Any]:
    conns = await _connect(host, port, connections)
    warmup_errors = 0
    for c in conns:  # warm each connection (and the proxies' paths) once, unmeasured
        try:
            await c.request()
        except _FAILURES:  # closed; its first measured request opens it again
            warmup_errors += 1
    total = int(rate * seconds)
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0
    start = clock() + 0.05
    interval = 1.0 / rate

    def dispatch() -> None:
        # A thread, not a coroutine: event loop timers tick in whole milliseconds, which
        # at 2,000 req/s would release requests in bursts and add up to 1 ms of our own
        # lateness to every latency.  time.sleep() is precise to tens of microseconds.
        i = 0
        while i < total:
            now = clock()
            batch: list[float | None] = []
            while i < total and start + i * interval <= now:
                batch.append(start + i * interval)
                i += 1
            if batch:
                loop.call_soon_threadsafe(_release, batch)
            if i < total:
                time.sleep(max(0.0, start + i * interval - clock()))
        stop: list[float | None] = [None] * len(conns)
        loop.call_soon_threadsafe(_release, stop)

    def _release(batch: list[float | None]) -> None:
        for t in batch:
            due.put_nowait(t)

    async def work(conn: _Conn) -> None:
        nonlocal errors
        while (intended := await due.get()) is not None:
            try:
                await conn.request()
            except _FAILURES:
                errors += 1
                latencies.append(_charged(intended))
                continue
            latencies.append((clock() - intended) * 1e6)

    loop = asyncio.get_running_loop()
    dispatcher = asyncio.to_thread(dispatch)
    await asyncio.gather(dispatcher, *(work(c) for c in conns))
    elapsed = clock() - start
    for c in conns:
        c.close()
    out = _summary(latencies, elapsed, errors)
    out |= {"mode": "rate", "target_rate": rate, "connections": connections,
            "warmup_errors": warmup_errors}  # fmt: skip
    return out


async def saturate(host: str, port: int, seconds: float, connections: int = 16) -> dict[str, Any]:
    conns = await _connect(host, port, connections)
    for c in conns:
        await c.request()
    latencies: list[float] = []
    errors = 0
    start = clock()
    deadline = start + seconds

    async def work(conn: _Conn) -> None:
        nonlocal errors
        while clock() < deadline:
            t0 = clock()
            try:
                await conn.request()
            except _FAILURES:
                errors += 1
                latencies.append(_charged(t0))
                continue
            latencies.append((clock() - t0) * 1e6)

    await asyncio.gather(*(work(c) for c in conns))
    elapsed = clock() - start
    for c in conns:
        c.close()
    out = _summary(latencies, elapsed, errors)
    out |= {"mode": "saturate", "connections": connections}
    return out


def main(argv: list[str]) -> None:
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    mode = argv[0]
    if mode == "rate":
        host, port, rate, seconds = argv[1], int(argv[2]), float(argv[3]), float(argv[4])
        conns = int(argv[5]) if len(argv) > 5 else 16
        result = run(fixed_rate(host, port, rate, seconds, conns))
    elif mode == "saturate":
        host, port, seconds = argv[1], int(argv[2]), float(argv[3])
        conns = int(argv[4]) if len(argv) > 4 else 16
        result = run(saturate(host, port, seconds, conns))
    else:
        raise SystemExit(f"unknown mode {mode!r}: rate or saturate")
    result["started_at"] = time.time()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
