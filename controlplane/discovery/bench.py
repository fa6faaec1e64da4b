"""Discovery fan-out: how long one change takes to reach every subscribed agent.

The real control plane path — :class:`~controlplane.identity.server.ApiServer` with its
:class:`~.stream.DiscoveryStream`, TLS 1.3 with a node certificate per agent — serving a
synthetic cluster (``workloads`` pods over ``agents`` nodes, one service per ten pods)
to ``agents`` light clients.  The clients run in a second process (this machine has two
cores: one serves, one plays the agents), each on its own mTLS connection.  A light
client does what the agent's network side does — read, decrypt, split frames — and
reads the revisions of delta frames; it skips JSON-decoding snapshots, which the real
agent does off its event loop.

Measured:

* **initial sync**: from the first connect until every agent holds its snapshot;
* **change latency**: ``changes`` single-workload updates, ``spacing`` seconds apart;
  for each (change, agent) the time from :meth:`DiscoveryStore.update` returning to the
  delta frame being read by that agent.  Both processes read ``CLOCK_MONOTONIC``, which
  is system-wide on Linux, so the times compare directly;
* **memory**: the serving process's RSS with the cluster loaded and every agent
  subscribed, and its peak (``VmHWM``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import ssl
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from controlplane.discovery.model import DiscoveryStore
from controlplane.discovery.stream import DiscoveryStream, StreamConfig
from controlplane.identity.binding import StoreNodeBinding
from controlplane.identity.ca import init_ca, validate_ca
from controlplane.identity.server import ApiServer, ServerConfig
from controlplane.identity.signer import Signer
from weft.identity import SpiffeId, cert_pem, generate_key, key_pem
from weft.mesh import Endpoint, InboundMode, Service, ServicePort, Workload
from weft.meshwire import DISCOVERY_PATH, Subscribe

TD = "cluster.local"
_LEN = struct.Struct("!I")
_SNAPSHOT_PREFIX = b'{"type":"snapshot"'

Report = Callable[[str], None]


class _NoTokens:
    def node_for(self, token: str) -> str | None:
        return None


def synthetic_cluster(workloads: int, nodes: int) -> tuple[list[Workload], list[Service]]:
    """``workloads`` pods spread over ``nodes``, 10 per service account and service."""
    pods = []
    for i in range(workloads):
        node = i % nodes
        app = f"app-{i // 10}"
        pods.append(
            Workload(
                uid=f"uid-{i:06d}",
                name=f"{app}-{i % 10}",
                namespace=f"ns-{i // 1000}",
                node=f"node-{node}",
                node_ip=f"10.{(node >> 8) & 255}.{node & 255}.1",
                ips=(f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",),
                service_account=app,
                identity=SpiffeId.workload(f"ns-{i // 1000}", app, TD),
                captured=True,
                inbound_mode=InboundMode.PERMISSIVE,
            )
        )
    services = []
    for s in range(0, workloads, 10):
        members = pods[s : s + 10]
        services.append(
            Service(
                name=members[0].service_account,
                namespace=members[0].namespace,
                vips=(f"10.96.{(s // 10) >> 8}.{(s // 10) & 255}",),
                ports=(ServicePort(80, 8080),),
                endpoints=tuple(Endpoint(p.ips[0], p.uid, True) for p in members),
            )
        )
    return pods, services


def _rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- clients


class _LightAgent(asyncio.Protocol):
    """Reads one discovery stream: head, then frames; notes delta revisions' arrival."""

    def __init__(self, arrivals: dict[int, list[float]], synced: Callable[[], None]) -> None:
        self.arrivals = arrivals
        self.synced = synced
        self.buf = bytearray()
        self.head_done = False
        self.skip = 0
        self.has_snapshot = False
        self.bytes = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.bytes += len(data)
        if self.skip:
            take = min(self.skip, len(data))
            self.skip -= take
            data = data[take:]
            if not self.skip and not self.has_snapshot:
                self.has_snapshot = True
                self.synced()
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"subscribe refused: {bytes(self.buf[:200])!r}")
            del self.buf[: end + 4]
            self.head_done = True
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            body = self.buf[4 : 4 + n]
            if body[: len(_SNAPSHOT_PREFIX)] == _SNAPSHOT_PREFIX and len(body) < n:
                # A snapshot: skip it without buffering megabytes per agent.
                self.skip = n - len(body)
                del self.buf[:]
                return
            if len(body) < n:
                return
            del self.buf[: 4 + n]
            if body[: len(_SNAPSHOT_PREFIX)] == _SNAPSHOT_PREFIX:
                if not self.has_snapshot:
                    self.has_snapshot = True
                    self.synced()
                continue
            msg = json.loads(body)
            if msg["type"] == "deltas":
                for d in msg["deltas"]:
                    self.arrivals.setdefault(d["revision"], []).append(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _clients(conn: Connection, port: int, anchor: bytes, creds: list[tuple[bytes, bytes]]
                   ) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    arrivals: dict[int, list[float]] = {}
    remaining = len(creds)
    all_synced = loop.create_future()

    def synced() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not all_synced.done():
            all_synced.set_result(time.monotonic())

    tmp = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    gate = asyncio.Semaphore(64)
    agents: list[tuple[asyncio.Transport, _LightAgent]] = []
    body = Subscribe().encode()
    request = (
        f"POST {DISCOVERY_PATH} HTTP/1.1\r\nHost: controlplane\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def connect(i: int, chain: bytes, key: bytes) -> None:
        path = tmp / f"{i}.pem"
        path.write_bytes(chain + key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=anchor.decode())
        ctx.load_cert_chain(path)
        path.unlink()
        async with gate:
            transport, proto = await loop.create_connection(
                lambda: _LightAgent(arrivals, synced), "127.0.0.1", port, ssl=ctx,
                server_hostname="controlplane",
            )  # fmt: skip
        transport.write(request)
        agents.append((transport, proto))

    started = time.monotonic()
    await asyncio.gather(*(connect(i, c, k) for i, (c, k) in enumerate(creds)))
    connected = time.monotonic()
    synced_at = await all_synced
    conn.send(
        {
            "connect_seconds": connected - started,
            "sync_seconds": synced_at - started,
            "bytes": sum(p.bytes for _, p in agents),
        }
    )
    await asyncio.to_thread(conn.recv)  # "report"
    lost = sum(1 for _, p in agents if p.lost.done())
    conn.send({"arrivals": arrivals, "lost": lost})
    for t, _ in agents:
        t.close()
    os.rmdir(tmp)


def _client_process(conn: Connection, port: int, anchor: bytes, creds: list[tuple[bytes, bytes]]
                    ) -> None:  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_clients(conn, port, anchor, creds))


# --------------------------------------------------------------------------- server


def bench_fanout(
    workloads: int = 10_000,
    agents: int = 1_000,
    changes: int = 20,
    spacing: float = 0.25,
    report: Report = lambda m: None,
) -> dict[str, Any]:
    return asyncio.run(_fanout(workloads, agents, changes, spacing, report))


async def _fanout(workloads: int, agents: int, changes: int, spacing: float, report: Report
                  ) -> dict[str, Any]:  # fmt: skip
    rss_start = _rss()
    bundle = init_ca(TD)
    issuer = validate_ca(
        cert_pem(bundle.anchor), cert_pem(bundle.issuer), key_pem(bundle.issuer_key)
    )
    report(f"issuing {agents} node certificates")
    creds = []
    for i in range(agents):
        key = generate_key()
        leaf = issuer.sign_leaf(
            key.public_key(), SpiffeId.node(f"node-{i}", TD), lifetime=dt.timedelta(hours=1)
        )
        creds.append((cert_pem(leaf) + cert_pem(issuer.cert), key_pem(key)))
    pods, services = synthetic_cluster(workloads, agents)
    store = DiscoveryStore()
    store.replace(pods, services)
    store.mark_synced()
    registry = CollectorRegistry()
    stream = DiscoveryStream(store, StreamConfig(), registry)
    snapshot_bytes = len(stream.snapshot_bytes()[1])
    rss_loaded = _rss()
    signer = Signer(issuer, StoreNodeBinding(store), _NoTokens(), TD, registry=registry)
    server = ApiServer(
        signer, ServerConfig(listen_address="127.0.0.1", api_port=0, admin_port=0),
        registry=registry, stream=stream,
    )  # fmt: skip
    for name in ("weft.discovery", "weft.audit", "weft.controlplane"):
        logging.getLogger(name).setLevel(logging.WARNING)
    await server.start()
    report(
        f"serving {workloads} workloads / {len(services)} services "
        f"(snapshot {snapshot_bytes / 1e6:.1f} MB) to {agents} agents over mTLS"
    )
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_client_process, args=(child, server.port, cert_pem(bundle.anchor), creds),
        daemon=True,
    )  # fmt: skip
    proc.start()
    try:
        sync = await asyncio.to_thread(parent.recv)
        report(
            f"all {agents} agents hold the snapshot after {sync['sync_seconds']:.1f} s "
            f"(connected in {sync['connect_seconds']:.1f} s)"
        )
        rss_subscribed = _rss()
        sent: dict[int, float] = {}
        for k in range(changes):
            w = pods[(k * 7919) % len(pods)]
            changed = replace(w, ready=not w.ready)
            pods[(k * 7919) % len(pods)] = changed
            store.update([changed])
            sent[store.revision] = time.monotonic()
            await asyncio.sleep(spacing)
        await asyncio.sleep(max(1.0, spacing * 4))
        rss_end = _rss()
        parent.send("report")
        result = await asyncio.to_thread(parent.recv)
    finally:
        await server.stop()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    latencies_ms: list[float] = []
    missing = 0
    per_change: list[dict[str, float]] = []
    for rev, t0 in sent.items():
        got = [(t - t0) * 1000 for t in result["arrivals"].get(rev, [])]
        missing += agents - len(got)
        latencies_ms.extend(got)
        per_change.append({"revision": rev, "max_ms": max(got) if got else float("nan")})
    out = {
        "workloads": workloads,
        "services": len(services),
        "agents": agents,
        "changes": changes,
        "snapshot_bytes": snapshot_bytes,
        "initial_sync_seconds": round(sync["sync_seconds"], 3),
        "connect_seconds": round(sync["connect_seconds"], 3),
        "change_latency_ms": {
            "p50": round(_pctl(latencies_ms, 0.50), 2),
            "p90": round(_pctl(latencies_ms, 0.90), 2),
            "p99": round(_pctl(latencies_ms, 0.99), 2),
            "max": round(max(latencies_ms), 2) if latencies_ms else None,
            "mean": round(statistics.fmean(latencies_ms), 2) if latencies_ms else None,
        },
        "deliveries_missing": missing,
        "connections_lost": result["lost"],
        "per_change": per_change,
        "rss_bytes": {
            "start": rss_start["VmRSS"],
            "cluster_loaded": rss_loaded["VmRSS"],
            "agents_subscribed": rss_subscribed["VmRSS"],
            "end": rss_end["VmRSS"],
            "peak": rss_end["VmHWM"],
        },
        "machine": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
    }
    return out
