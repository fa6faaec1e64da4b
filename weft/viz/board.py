"""Sans-I/O views of `weft viz dashboard`: what ``/api/graph`` and ``/api/stat`` answer.

The dashboard's server polls a source every few seconds (`weft.viz.sources`) and keeps
the snapshots here; this module turns them into the JSON the page draws, with the same
arithmetic as the terminal commands (`weft.viz.model.stat` for the workloads,
`weft.viz.model.edges` for the graph), so a figure on the page and one from
``weft viz stat deploy`` over the same window agree.

Two time spans, as ``weft viz edges`` and ``stat`` have: an edge is drawn once it was
ever seen (totals since the agents started: a quiet caller still shows who talks to
whom), its rates and success over the window only (``--window``, default 10 s). A
snapshot history rather than a fresh pair per poll keeps the window steady while
polling often: the baseline is the newest snapshot at least ``window`` seconds old.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weft.tracing import Attr
from weft.viz import model
from weft.viz.model import Delta, Figures, Snapshot, Topology, Unreachable

TREND_POINTS = 60
"""Points of each workload's trend kept (one per poll): two minutes at the default 2 s."""


@dataclass(frozen=True)
class Taken:
    at: float
    """When the snapshot was taken (the clock `History` is given; seconds)."""
    snapshot: Snapshot


class History:
    """Snapshots of the last ``window`` seconds and a little more, oldest first."""

    def __init__(self, window: float) -> None:
        if window <= 0:
            raise ValueError("the dashboard's window must be positive (seconds)")
        self.window = window
        self._held: collections.deque[Taken] = collections.deque()

    def add(self, at: float, snapshot: Snapshot) -> None:
        self._held.append(Taken(at, snapshot))
        # Keep exactly one snapshot at least a window old: the baseline.
        while len(self._held) > 1 and at - self._held[1].at >= self.window:
            self._held.popleft()

    def pair(self) -> tuple[Snapshot | None, Snapshot | None]:
        """(baseline, latest); the baseline is None until two snapshots are held."""
        if not self._held:
            return None, None
        if len(self._held) == 1:
            return None, self._held[-1].snapshot
        return self._held[0].snapshot, self._held[-1].snapshot


@dataclass(frozen=True)
class Figuring:
    """The deltas one view is made of."""

    window: list[Delta]
    """Over the window (empty, with ``seconds`` None, until there are two snapshots)."""
    totals: list[Delta]
    """Since the agents started (the latest snapshot alone)."""
    seconds: float | None
    unreachable: list[Unreachable]


def figuring(before: Snapshot | None, after: Snapshot) -> Figuring:
    totals, down = model.deltas(None, after)
    if before is None:
        return Figuring([], totals, None, down)
    window, down = model.deltas(before, after)
    seconds = next((d.seconds for d in window if d.seconds is not None), None)
    return Figuring(window, totals, seconds, down)


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _latencies(f: Figures) -> dict[str, float | None]:
    return {
        "latency_ms_p50": f.latency(0.5),
        "latency_ms_p95": f.latency(0.95),
        "latency_ms_p99": f.latency(0.99),
    }


def _missing(topo: Topology, kind: str, namespace: str, name: str, down: set[str]) -> list[str]:
    return sorted(topo.nodes(kind, namespace, name) & down)


def graph(fig: Figuring, topo: Topology, *, namespace: str | None = None) -> dict[str, Any]:
    """Workloads (``deploy``) as nodes with their golden figures, and edges between them
    (client side, as ``weft viz edges deploy``) with RPS, success, latency and mTLS."""
    down = {u.source for u in fig.unreachable}
    nodes: dict[str, dict[str, Any]] = {}
    for row in model.stat(fig.window, topo, "deploy", namespace=namespace):
        f = row.figures
        key = _key(row.namespace, row.name)
        nodes[key] = {
            "id": key,
            "namespace": row.namespace,
            "name": row.name,
            "meshed": None if row.meshed is None else f"{row.meshed[0]}/{row.meshed[1]}",
            "captured": row.meshed is not None and row.meshed[0] == row.meshed[1] > 0,
            "success_rate": f.success_rate,
            "rps": f.request_rate,
            "requests": f.requests,
            **_latencies(f),
            "tcp_connections": f.tcp_open,
            "missing_agents": _missing(topo, "deploy", row.namespace, row.name, down),
        }
    recent = {
        (e.src_namespace, e.src, e.dst_namespace, e.dst): e
        for e in model.edges(fig.window, topo, "deploy", namespace=namespace)
    }
    edges = []
    for e in model.edges(fig.totals, topo, "deploy", namespace=namespace):
        now = recent.get((e.src_namespace, e.src, e.dst_namespace, e.dst))
        f = now.figures if now is not None else Figures()
        active = bool(f.requests or f.tcp_opened or f.tcp_open)
        # The lock drawn is the window's when the edge carried traffic in it, else what
        # was seen since the agents started.
        secured = f.secured if active else e.figures.secured
        src, dst = _key(e.src_namespace, e.src), _key(e.dst_namespace, e.dst)
        for end, ns, name in ((src, e.src_namespace, e.src), (dst, e.dst_namespace, e.dst)):
            nodes.setdefault(end, _bare(ns, name))
        edges.append(
            {
                "id": f"{src}->{dst}",
                "source": src,
                "target": dst,
                "secured": secured,
                "mtls": secured == "yes",
                "active": active,
                "rps": f.request_rate,
                "requests": f.requests,
                "success_rate": f.success_rate,
                **_latencies(f),
                "tcp_connections": f.tcp_open,
                "client_id": sorted(e.figures.client_ids),
                "server_id": sorted(e.figures.server_ids),
            }
        )
    return {
        "window_seconds": fig.seconds,
        "nodes": [nodes[k] for k in sorted(nodes)],
        "edges": edges,
    }


def _bare(namespace: str, name: str) -> dict[str, Any]:
    """A workload known only as an edge's end (outside the namespace shown, or the lab)."""
    return {
        "id": _key(namespace, name),
        "namespace": namespace,
        "name": name,
        "meshed": None,
        "captured": False,
        "success_rate": None,
        "rps": None,
        "requests": 0.0,
        "latency_ms_p50": None,
        "latency_ms_p95": None,
        "latency_ms_p99": None,
        "tcp_connections": 0.0,
        "missing_agents": [],
    }


class Trends:
    """Each row's recent RPS and success rate, one point per poll, bounded."""

    def __init__(self, points: int = TREND_POINTS) -> None:
        self.points = points
        self._rows: dict[str, collections.deque[tuple[float, float | None, float | None]]] = {}

    def add(self, at: float, kind: str, rows: Sequence[model.StatRow]) -> None:
        """One point for each of ``kind``'s rows; rows of ``kind`` no longer shown go."""
        seen = set()
        for r in rows:
            key = f"{kind}/{_key(r.namespace, r.name)}"
            seen.add(key)
            trend = self._rows.setdefault(key, collections.deque(maxlen=self.points))
            trend.append((at, r.figures.request_rate, r.figures.success_rate))
        for gone in {k for k in self._rows if k.startswith(f"{kind}/")} - seen:
            del self._rows[gone]

    def of(self, kind: str, namespace: str, name: str) -> list[dict[str, float | None]]:
        trend = self._rows.get(f"{kind}/{_key(namespace, name)}", ())
        return [{"at": at, "rps": rps, "success_rate": sr} for at, rps, sr in trend]


def stat(
    fig: Figuring,
    topo: Topology,
    kind: str,
    *,
    namespace: str | None = None,
    trends: Trends | None = None,
    at: float = 0.0,
) -> dict[str, Any]:
    """Per-``kind`` golden figures over the window (``weft viz stat KIND -o json``'s rows),
    with each row's trend when ``trends`` is kept (this window's point added, ``at``)."""
    down = {u.source for u in fig.unreachable}
    rows = []
    found = model.stat(fig.window, topo, kind, namespace=namespace)
    if trends is not None and fig.seconds is not None:
        trends.add(at, kind, found)
    for r in found:
        row = {**r.to_json(), "missing_agents": _missing(topo, kind, r.namespace, r.name, down)}
        if trends is not None:
            row["trend"] = trends.of(kind, r.namespace, r.name)
        rows.append(row)
    return {"kind": kind, "window_seconds": fig.seconds, "rows": rows}


def unreachable_json(down: Sequence[Unreachable]) -> list[dict[str, str]]:
    return [{"source": u.source, "where": u.where, "reason": u.reason} for u in down]


# -- traces -----------------------------------------------------------------------------------


def _hop(span: dict[str, Any]) -> dict[str, Any]:
    a = span.get("attributes") or {}
    start, end = span.get("startTimeUnixNano", 0), span.get("endTimeUnixNano", 0)
    return {
        "name": span.get("name", ""),
        "kind": span.get("kind", ""),
        "node": (span.get("resource") or {}).get("k8s.node.name", ""),
        "src": a.get(Attr.SRC_WORKLOAD, ""),
        "dst": a.get(Attr.DST_WORKLOAD, ""),
        "route": a.get(Attr.ROUTE, ""),
        "status": a.get(Attr.HTTP_STATUS, a.get(Attr.RPC_GRPC_STATUS, "")),
        "error": (span.get("status") or {}).get("code") == "ERROR",
        "tls": a.get(Attr.TLS),
        "duration_ms": max(0, end - start) / 1e6,
    }


def traces(
    summaries: Sequence[dict[str, Any]], spans: dict[str, Sequence[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The receiver's trace summaries (newest first), each with its hops when its spans
    were fetched (``spans`` by trace id): who called whom through which proxy."""
    out = []
    for s in summaries:
        trace_id = str(s.get("traceId", ""))
        held = spans.get(trace_id)
        out.append(
            {
                "trace_id": trace_id,
                "root": s.get("root", ""),
                "spans": s.get("spans", 0),
                "start_unix_ns": s.get("start", 0),
                "duration_ms": s.get("durationMs"),
                "services": list(s.get("services") or []),
                "hops": [_hop(x) for x in held] if held is not None else None,
            }
        )
    return out
