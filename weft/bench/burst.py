"""A connection burst, run *inside* a lab pod (stdlib only): ``N`` connections opened at
once, each sending one keep-alive HTTP/1.1 request and holding its connection open
until every one has its answer, so that all ``N`` are open together.  Prints one JSON
object: how many completed, the failures' reasons, the slowest, which replicas answered.

Run: ``python -m weft.bench.burst HOST PORT N [HOLD]``.  With ``HOLD`` seconds, once
every connection has answered it prints ``{"held": K}`` (K answered), keeps them all
open and idle for ``HOLD`` seconds, then closes and prints the result: what
``weft bench`` measures the proxies' memory with 1,000 idle connections on.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

TIMEOUT = 60.0
"""Seconds each connection may take for each step; far beyond any healthy figure."""


async def _one(host: str, port: int, all_done: asyncio.Event, results: list[Any]) -> None:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), TIMEOUT))
        results.append(("ok", time.monotonic() - started, body["pod"]))
        await all_done.wait()
        writer.close()
    except Exception as e:  # every failure is a result, named
        results.append(("failed", time.monotonic() - started, repr(e)))


async def burst(host: str, port: int, n: int, hold: float = 0.0) -> dict[str, Any]:
    all_done = asyncio.Event()
    results: list[Any] = []
    tasks = [asyncio.create_task(_one(host, port, all_done, results)) for _ in range(n)]
    # Until every connection has answered or failed; answered ones stay open meanwhile.
    while len(results) < n:  # noqa: ASYNC110 (results, not tasks, say when)
        await asyncio.sleep(0.05)
    if hold > 0:
        print(json.dumps({"held": sum(1 for r in results if r[0] == "ok")}), flush=True)
        await asyncio.sleep(hold)
    all_done.set()
    await asyncio.gather(*tasks)
    ok = [r for r in results if r[0] == "ok"]
    failed = [r[2] for r in results if r[0] == "failed"]
    pods: dict[str, int] = {}
    for r in ok:
        pods[r[2]] = pods.get(r[2], 0) + 1
    durations = sorted(r[1] for r in ok)
    return {
        "connections": n,
        "ok": len(ok),
        "failed": len(failed),
        "errors": sorted(set(failed))[:10],
        "median_s": round(durations[len(durations) // 2], 3) if durations else None,
        "slowest_s": round(durations[-1], 3) if durations else None,
        "pods": pods,
    }


def main() -> None:
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hold = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asyncio.run(burst(host, port, n, hold))))


if __name__ == "__main__":
    main()
