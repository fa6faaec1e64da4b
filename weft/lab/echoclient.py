"""Clients for the lab's echo service that show per-request balancing: many requests on
**one** connection (HTTP/1.1 keep-alive, h2c streams) or one gRPC channel, counting
which pod answered each.

    python -m weft.lab.echoclient http1 echo:80 -n 100
    python -m weft.lab.echoclient h2 echo:80 -n 100 --concurrency 10
    python -m weft.lab.echoclient grpc echo:9090 -n 100
    python -m weft.lab.echoclient websocket echo:80 -n 10

Prints ``{"pods": {"echo-1": 52, "echo-2": 48}, "errors": {}, "connections": 1, ...}``,
with each pod's latency as this client saw it (``latency_ms``: p50, p99 and mean per pod) and
how often consecutive answers came from different pods (``switches``) — what tells a
balancer that follows a real latency difference from one stuck on a replica (with
``--list``: also every answer's pod in order). Run it in a captured pod
(``weft lab exec client-1 -- …``) to see the node proxy spread one connection's requests
over the replicas; in ``plain-1`` (not captured) every request goes to the one pod the
connection reached.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import socket
import statistics
import sys
import time
from collections import Counter
from typing import Any

Answers = tuple[list[str], list[float], Counter[str]]
"""Each answer's pod, its latency in seconds (same order), and the errors."""


def _split(target: str, default_port: int) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host:
        return target, default_port
    return host, int(port)


def run_http1(target: str, n: int, path: str) -> Answers:
    host, port = _split(target, 80)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    pods: list[str] = []
    took: list[float] = []
    errors: Counter[str] = Counter()
    try:
        for _ in range(n):
            started = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                took.append(time.perf_counter() - started)
                pods.append(json.loads(body)["pod"])
            else:
                errors[str(resp.status)] += 1
    finally:
        conn.close()
    return pods, took, errors


async def run_h2(target: str, n: int, path: str, concurrency: int) -> Answers:
    from weft.lab.h2peer import H2Peer, Response

    host, port = _split(target, 80)
    addr = socket.gethostbyname(host)
    peer = await H2Peer.connect(port, addr)
    pods: list[str] = []
    took: list[float] = []
    errors: Counter[str] = Counter()

    async def one() -> tuple[Response, float]:
        started = time.perf_counter()
        r = await peer.request("GET", path, authority=target)
        return r, time.perf_counter() - started

    try:
        done = 0
        while done < n:
            batch = min(concurrency, n - done)
            answers = await asyncio.gather(*(one() for _ in range(batch)))
            for r, seconds in answers:
                if r.reset is not None:
                    errors[f"reset {r.reset}"] += 1
                elif r.status == 200:
                    pods.append(json.loads(r.body)["pod"])
                    took.append(seconds)
                else:
                    errors[str(r.status)] += 1
            done += batch
    finally:
        peer.close()
    return pods, took, errors


async def run_websocket(target: str, n: int) -> Answers:
    """One upgraded connection, ``n`` messages echoed: the pod is the one that took the
    upgrade (an upgraded connection is opaque: it stays on that pod)."""
    from weft.lab.echo_ws import client_handshake, client_message

    host, port = _split(target, 80)
    reader, writer = await asyncio.open_connection(host, port)
    pods: list[str] = []
    took: list[float] = []
    errors: Counter[str] = Counter()
    try:
        headers = await client_handshake(reader, writer, host)
        pod = headers.get("x-echo-pod", "?")
        for i in range(n):
            text = f"message {i}"
            started = time.perf_counter()
            if await asyncio.wait_for(client_message(reader, writer, text), 30) == text:
                pods.append(pod)
                took.append(time.perf_counter() - started)
            else:
                errors["wrong echo"] += 1
    finally:
        writer.close()
    return pods, took, errors


def run_grpc(target: str, n: int, metadata: list[tuple[str, str]]) -> Answers:
    import grpc

    from weft.lab.echo_grpc import FULL_METHOD

    pods: list[str] = []
    took: list[float] = []
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(FULL_METHOD)
        for _ in range(n):
            started = time.perf_counter()
            try:
                answer = call(b"ping", timeout=30, metadata=metadata or None)
            except grpc.RpcError as exc:
                errors[exc.code().name] += 1
                continue
            took.append(time.perf_counter() - started)
            pods.append(json.loads(answer)["pod"])
    return pods, took, errors


def summary(pods: list[str], took: list[float], errors: Counter[str]) -> dict[str, Any]:
    """The JSON this client prints (see the module docstring)."""
    by_pod: dict[str, list[float]] = {}
    for pod, seconds in zip(pods, took, strict=True):
        by_pod.setdefault(pod, []).append(seconds * 1000.0)
    return {
        "pods": dict(sorted(Counter(pods).items())),
        "errors": dict(errors),
        "connections": 1,
        "latency_ms": {
            pod: {
                "p50": round(statistics.median(v), 3),
                "p99": round(sorted(v)[min(len(v) - 1, int(len(v) * 0.99))], 3),
                "mean": round(statistics.fmean(v), 3),
            }
            for pod, v in sorted(by_pod.items())
        },
        "switches": sum(1 for a, b in itertools.pairwise(pods) if a != b),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("protocol", choices=("http1", "h2", "grpc", "websocket"))
    p.add_argument("target", help="HOST:PORT (echo:80, echo:9090)")
    p.add_argument("-n", type=int, default=100, help="requests (default 100)")
    p.add_argument("--path", default="/", help="HTTP path and query (failure injection)")
    p.add_argument("--concurrency", type=int, default=10, help="h2: streams at once")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="gRPC metadata (delay_ms=echo-2:20)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="also print every answer's pod")
    args = p.parse_args(argv)
    if args.protocol == "http1":
        pods, took, errors = run_http1(args.target, args.n, args.path)
    elif args.protocol == "h2":
        pods, took, errors = asyncio.run(run_h2(args.target, args.n, args.path, args.concurrency))
    elif args.protocol == "websocket":
        pods, took, errors = asyncio.run(run_websocket(args.target, args.n))
    else:
        meta = [(k, v) for k, _, v in (m.partition("=") for m in args.metadata)]
        pods, took, errors = run_grpc(args.target, args.n, meta)
    out = summary(pods, took, errors)
    if args.list:
        out["answers"] = pods
    print(json.dumps(out))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
