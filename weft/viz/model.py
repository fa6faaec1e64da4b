"""Sans-I/O aggregation of agents' metrics into what `weft viz` shows.

Input: two `Snapshot`s of every agent's samples, some seconds apart (or one, for totals
since the agents started). Output: rows — per workload (`stat`), per pair of workloads
(`edges`), per route of a service (`routes`), per source/destination/authority (`top`).

Which series describe a workload. Each request through the mesh is measured twice when
its destination is captured: by the client node's proxy (``direction="outbound"``, source
named by pod) and by the destination node's proxy (``direction="inbound"``, source named
by service account, which is all the tunnel proves). `stat` without ``--from``/``--to``
is the destination's view, as Linkerd's is: inbound series, plus outbound series with
``tls="false"`` (a destination outside the mesh has no inbound proxy to count it), so no
request is counted twice. With ``--from`` or ``--to`` the question is about a client, so
only outbound series (which name the client pod) answer it. `edges` and `top` use the
outbound side for the same reason: it knows both pods.

Series labelled ``overflow="true"`` (an agent's cardinality cap was reached) name no
workload and are left out; `overflowed` says how much was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weft.viz.expo import Labels, Sample

REQUESTS = "request_total"
RESPONSES = "response_total"
LATENCY_BUCKET = "response_latency_ms_bucket"
TCP_OPEN_NOW = "tcp_open_connections"
TCP_OPENED = "tcp_open_total"
TCP_READ = "tcp_read_bytes_total"
TCP_WRITE = "tcp_write_bytes_total"
ROUTE_REQUESTS = "outbound_http_route_requests_total"
RETRIES = "outbound_http_retry_total"
RETRIES_SKIPPED = "outbound_http_retry_skipped_total"
TIMEOUTS = "outbound_http_timeout_total"

HTTP_FAMILIES = frozenset({REQUESTS, RESPONSES, LATENCY_BUCKET})
TCP_FAMILIES = frozenset({TCP_OPEN_NOW, TCP_OPENED, TCP_READ, TCP_WRITE})
WORKLOAD_FAMILIES = HTTP_FAMILIES | TCP_FAMILIES
ROUTE_FAMILIES = frozenset({ROUTE_REQUESTS, RETRIES, RETRIES_SKIPPED, TIMEOUTS})
FAMILIES = WORKLOAD_FAMILIES | ROUTE_FAMILIES
"""Every series `weft viz` reads (a Prometheus is asked for these only)."""

GAUGES = frozenset({TCP_OPEN_NOW})

DEFAULT_ROUTE = "[default]"
ALL_ROUTES = "[all]"
NO_ENDPOINT = ("", "unknown")
"""``dst_workload`` values that name no pod (traffic leaving the mesh)."""

KINDS = {
    "pod": "pod", "po": "pod", "pods": "pod",
    "deploy": "deploy", "deployment": "deploy", "deployments": "deploy",
    "svc": "svc", "service": "svc", "services": "svc",
    "ns": "ns", "namespace": "ns", "namespaces": "ns",
}  # fmt: skip
"""Resource kinds as ``kubectl`` spells them → the canonical short name."""


class VizError(ValueError):
    """A question `weft viz` cannot answer as asked; the message says what to give."""


# -- snapshots and deltas ----------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    source: str
    """Which agent (``node-1``) or Prometheus ``instance`` the samples came from."""
    at: float
    """When, in seconds on a clock shared by the snapshots compared."""
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Unreachable:
    source: str
    where: str
    """How it was reached: ``10.240.0.12:15020 in netns lab-node-2``, a Prometheus URL."""
    reason: str

    def describe(self) -> str:
        return f"{self.source} ({self.where}): {self.reason}"


@dataclass(frozen=True)
class Snapshot:
    scrapes: tuple[Scrape, ...]
    unreachable: tuple[Unreachable, ...] = ()


@dataclass(frozen=True)
class Delta:
    """One series over the window."""

    source: str
    name: str
    labels: Labels
    increase: float
    """Counters: how much it grew (from zero after a reset); gauges: the last value."""
    seconds: float | None
    """Length of the window; None for totals since the agent started (no rates)."""

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.increase / self.seconds


def deltas(before: Snapshot | None, after: Snapshot) -> tuple[list[Delta], list[Unreachable]]:
    """Per-series increase from ``before`` to ``after`` (``before`` None: totals), and
    the sources that could not be read in either (those contribute nothing: half a
    window would look like a drop in traffic)."""
    unreachable: dict[str, Unreachable] = {u.source: u for u in after.unreachable}
    earlier: dict[str, Scrape] = {}
    if before is not None:
        for u in before.unreachable:
            unreachable.setdefault(u.source, u)
        earlier = {s.source: s for s in before.scrapes}
    out: list[Delta] = []
    for scrape in after.scrapes:
        if scrape.source in unreachable:
            continue
        first: dict[tuple[str, Labels], float] | None = None
        seconds: float | None = None
        if before is not None:
            prev = earlier.get(scrape.source)
            if prev is None:
                unreachable[scrape.source] = Unreachable(
                    scrape.source,
                    "the start of the window",
                    "no samples then (not answering, or not scraped yet): no rates",
                )
                continue
            first = {(s.name, s.labels): s.value for s in prev.samples if s.name in FAMILIES}
            seconds = scrape.at - prev.at
        for s in scrape.samples:
            if s.name not in FAMILIES or math.isnan(s.value):
                continue
            value = s.value
            if first is not None and s.name not in GAUGES:
                old = first.get((s.name, s.labels))
                # A series that appeared inside the window started at zero; one that went
                # down belongs to a restarted agent and counts from zero, as rate() does.
                if old is not None and value >= old:
                    value -= old
            out.append(Delta(scrape.source, s.name, s.labels, value, seconds))
    return out, sorted(unreachable.values(), key=lambda u: u.source)


def overflowed(ds: Iterable[Delta]) -> float:
    return sum(d.increase for d in ds if d.name == REQUESTS and d.label("overflow") == "true")


# -- figures ----------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (upper bound → count ≤ it), as
    PromQL's ``histogram_quantile``: linear inside the bucket the rank falls in, from 0
    for the first bucket; the highest finite bound when the rank is in ``+Inf``'s; None
    when the histogram holds nothing."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, max(below, count)
    return lower  # pragma: no cover — +Inf holds the total


@dataclass
class Figures:
    """Golden figures of some set of series (a workload, an edge, a route)."""

    requests: float = 0.0
    responses: float = 0.0
    successes: float = 0.0
    request_rate: float | None = None
    buckets: dict[float, float] = field(default_factory=dict)
    tcp_open: float = 0.0
    tcp_opened: float = 0.0
    read_rate: float | None = None
    write_rate: float | None = None
    tls: set[str] = field(default_factory=set)
    client_ids: set[str] = field(default_factory=set)
    server_ids: set[str] = field(default_factory=set)

    def add(self, d: Delta) -> None:
        if d.name in HTTP_FAMILIES or d.name in TCP_FAMILIES:
            self.tls.add(d.label("tls"))
            if cid := d.label("client_id"):
                self.client_ids.add(cid)
            if sid := d.label("server_id"):
                self.server_ids.add(sid)
        if d.name == REQUESTS:
            self.requests += d.increase
            self.request_rate = _add_rate(self.request_rate, d)
        elif d.name == RESPONSES:
            self.responses += d.increase
            if d.label("classification") == "success":
                self.successes += d.increase
        elif d.name == LATENCY_BUCKET:
            le = d.label("le")
            bound = math.inf if le == "+Inf" else float(le)
            self.buckets[bound] = self.buckets.get(bound, 0.0) + d.increase
        elif d.name == TCP_OPEN_NOW:
            self.tcp_open += d.increase
        elif d.name == TCP_OPENED:
            self.tcp_opened += d.increase
        elif d.name == TCP_READ:
            self.read_rate = _add_rate(self.read_rate, d)
        elif d.name == TCP_WRITE:
            self.write_rate = _add_rate(self.write_rate, d)
        elif d.name == ROUTE_REQUESTS:
            self.requests += d.increase
            self.request_rate = _add_rate(self.request_rate, d)

    @property
    def success_rate(self) -> float | None:
        """Successes over classified responses; None when there were none."""
        if self.responses <= 0:
            return None
        return min(1.0, max(0.0, self.successes / self.responses))

    def latency(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)

    @property
    def secured(self) -> str:
        """``yes`` when every series went through the mTLS tunnel, ``no`` when none did."""
        tls = self.tls - {""}
        if tls == {"true"}:
            return "yes"
        if "true" in tls:
            return "partly"
        return "no" if tls else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "success_rate": self.success_rate,
            "rps": self.request_rate,
            "latency_ms_p50": self.latency(0.5),
            "latency_ms_p95": self.latency(0.95),
            "latency_ms_p99": self.latency(0.99),
            "tcp_connections": self.tcp_open,
            "tcp_read_bytes_per_second": self.read_rate,
            "tcp_write_bytes_per_second": self.write_rate,
        }


def _add_rate(acc: float | None, d: Delta) -> float | None:
    rate = d.rate
    if rate is None:
        return acc
    return rate if acc is None else acc + rate


# -- topology -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    owner: str | None = None
    """``Deployment <ns>/<name>`` when a Deployment made the pod."""
    captured: bool = True

    @property
    def deployment(self) -> str:
        """The pod's workload: its Deployment, else its ``app`` label, else itself."""
        if self.owner and self.owner.startswith("Deployment "):
            return self.owner.removeprefix("Deployment ").partition("/")[2] or self.name
        return self.labels.get("app") or self.name


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    selector: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, pod: Pod) -> bool:
        return (
            bool(self.selector)
            and pod.namespace == self.namespace
            and all(pod.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True)
class Topology:
    """What the metrics' pod names belong to. Empty is allowed (a Prometheus without a
    lab): then a pod is its own deployment and no service selects anything."""

    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()

    def pod(self, namespace: str, name: str) -> Pod | None:
        for p in self.pods:
            if (p.namespace, p.name) == (namespace, name):
                return p
        return None

    def service(self, namespace: str, name: str) -> Service | None:
        for s in self.services:
            if (s.namespace, s.name) == (namespace, name):
                return s
        return None

    def groups(self, kind: str, namespace: str, pod_name: str) -> list[str]:
        """Names of the ``kind`` resources (in ``namespace``) that pod belongs to."""
        if kind == "ns":
            return [namespace]
        if kind == "pod":
            return [pod_name]
        pod = self.pod(namespace, pod_name)
        if kind == "deploy":
            return [pod.deployment if pod is not None else pod_name]
        if kind == "svc":
            return [s.name for s in self.services if pod is not None and s.selects(pod)]
        raise VizError(f"unknown resource kind {kind!r}")

    def resources(self, kind: str) -> list[tuple[str, str]]:
        """Every (namespace, name) of ``kind`` the topology knows."""
        if kind == "svc":
            return sorted({(s.namespace, s.name) for s in self.services})
        found: set[tuple[str, str]] = set()
        for p in self.pods:
            found.update((p.namespace, g) for g in self.groups(kind, p.namespace, p.name))
        return sorted(found)

    def nodes(self, kind: str, namespace: str, name: str) -> set[str]:
        """Nodes the resource's pods run on (whose agents count their inbound traffic)."""
        return {
            p.node for p in self.pods
            if p.namespace == namespace and name in self.groups(kind, p.namespace, p.name)
        }  # fmt: skip

    def meshed(self, kind: str, namespace: str, name: str) -> tuple[int, int] | None:
        """(captured pods, pods) of a resource; None when the topology has none."""
        pods = [
            p for p in self.pods
            if p.namespace == namespace and name in self.groups(kind, p.namespace, p.name)
        ]  # fmt: skip
        if not pods:
            return None
        return sum(p.captured for p in pods), len(pods)


@dataclass(frozen=True)
class Target:
    """``deploy/echo`` in a namespace: what ``--from``/``--to`` and ``svc/NAME`` name."""

    kind: str
    name: str
    namespace: str

    def matches(self, topo: Topology, namespace: str, pod: str) -> bool:
        if self.kind == "ns":
            return namespace == self.name
        return namespace == self.namespace and self.name in topo.groups(self.kind, namespace, pod)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def parse_kind(text: str) -> str:
    kind = KINDS.get(text.lower())
    if kind is None:
        raise VizError(f"unknown resource kind {text!r}: give deploy, pod, svc or ns")
    return kind


def parse_target(text: str, namespace: str) -> Target:
    """``deploy/echo``, ``pod/echo-1``, ``svc/echo``, ``ns/default``."""
    kind, sep, name = text.partition("/")
    if not sep or not name:
        raise VizError(f"{text!r}: give KIND/NAME, e.g. deploy/echo, pod/echo-1, svc/echo")
    return Target(parse_kind(kind), name, namespace)


# -- stat ---------------------------------------------------------------------------------


@dataclass
class StatRow:
    kind: str
    namespace: str
    name: str
    figures: Figures
    meshed: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "meshed": None if self.meshed is None else f"{self.meshed[0]}/{self.meshed[1]}",
            **self.figures.to_json(),
        }


def _ends(d: Delta) -> tuple[tuple[str, str], tuple[str, str]]:
    return (
        (d.label("src_namespace"), d.label("src_workload")),
        (d.label("dst_namespace"), d.label("dst_workload")),
    )


def _workload_series(ds: Iterable[Delta]) -> Iterable[Delta]:
    for d in ds:
        if d.name not in WORKLOAD_FAMILIES or d.label("overflow") == "true":
            continue
        if d.label("dst_workload") in NO_ENDPOINT:
            continue
        yield d


def server_side(d: Delta) -> bool:
    """Whether the series counts the destination's view (see the module docstring)."""
    direction = d.label("direction")
    return direction == "inbound" or (direction == "outbound" and d.label("tls") != "true")


def stat(
    ds: Iterable[Delta],
    topo: Topology,
    kind: str,
    *,
    namespace: str | None = None,
    name: str | None = None,
    source: Target | None = None,
    dest: Target | None = None,
) -> list[StatRow]:
    """Rows of ``kind`` (in ``namespace``; None: all), optionally only ``name``.

    ``source`` (``--from``): only requests from it, rows are their destinations.
    ``dest`` (``--to``): only requests to it, rows are their sources.
    """
    if source is not None and dest is not None:
        raise VizError("give --from or --to, not both")
    rows: dict[tuple[str, str], Figures] = {}
    for d in _workload_series(ds):
        src, dst = _ends(d)
        if source is not None or dest is not None:
            if d.label("direction") != "outbound" or not src[1]:
                continue
            if source is not None and not source.matches(topo, *src):
                continue
            if dest is not None and not dest.matches(topo, *dst):
                continue
            end = dst if source is not None else src
        else:
            if not server_side(d):
                continue
            end = dst
        for group in topo.groups(kind, *end):
            rows.setdefault((end[0], group), Figures()).add(d)
    if source is None and dest is None:
        for key in topo.resources(kind):
            rows.setdefault(key, Figures())
    out = []
    for (ns, row_name), figures in sorted(rows.items()):
        if namespace is not None and kind != "ns" and ns != namespace:
            continue
        if name is not None and row_name != name:
            continue
        out.append(StatRow(kind, ns, row_name, figures, topo.meshed(kind, ns, row_name)))
    return out


# -- edges --------------------------------------------------------------------------------


@dataclass
class EdgeRow:
    src_namespace: str
    src: str
    dst_namespace: str
    dst: str
    figures: Figures

    def to_json(self) -> dict[str, Any]:
        f = self.figures
        return {
            "src_namespace": self.src_namespace,
            "src": self.src,
            "dst_namespace": self.dst_namespace,
            "dst": self.dst,
            "client_id": sorted(f.client_ids),
            "server_id": sorted(f.server_ids),
            "secured": f.secured,
            "mtls": f.secured == "yes",
            "connections": f.tcp_opened,
            "tcp_connections": f.tcp_open,
            "requests": f.requests,
            "success_rate": f.success_rate,
            "rps": f.request_rate,
        }


def edges(
    ds: Iterable[Delta], topo: Topology, kind: str, *, namespace: str | None = None
) -> list[EdgeRow]:
    """Who talks to whom, from the client side (outbound series name both pods)."""
    if kind not in ("deploy", "pod"):
        raise VizError(f"edges are between deploy or pod, not {kind}")
    rows: dict[tuple[str, str, str, str], Figures] = {}
    for d in _workload_series(ds):
        src, dst = _ends(d)
        if d.label("direction") != "outbound" or not src[1]:
            continue
        for s in topo.groups(kind, *src):
            for t in topo.groups(kind, *dst):
                rows.setdefault((src[0], s, dst[0], t), Figures()).add(d)
    return [
        EdgeRow(*key, figures)
        for key, figures in sorted(rows.items())
        if namespace is None or namespace in (key[0], key[2])
    ]


# -- routes -------------------------------------------------------------------------------


@dataclass
class RouteRow:
    route: str
    figures: Figures
    retries: float = 0.0
    retries_skipped: float = 0.0
    timeouts: float = 0.0
    backends: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            **self.figures.to_json(),
            "retries": self.retries,
            "retries_skipped": self.retries_skipped,
            "timeouts": self.timeouts,
            "backends": sorted(self.backends),
        }


def routes(ds: Sequence[Delta], topo: Topology, service: Service) -> list[RouteRow]:
    """Per-route rows of ``service``. The agents count requests per route
    (``outbound_http_route_requests_total``) and retries and timeouts per route, but
    success and latency only per workload: those are the service's (its endpoints',
    destination view), on the ``[default]`` row of a service without routes or on an
    ``[all]`` row after its routes."""
    rows: dict[str, RouteRow] = {}

    def row(route: str) -> RouteRow:
        return rows.setdefault(route or DEFAULT_ROUTE, RouteRow(route or DEFAULT_ROUTE, Figures()))

    routed = False
    for d in ds:
        if d.name not in ROUTE_FAMILIES or d.label("service") != service.key:
            continue
        r = row(d.label("route"))
        if d.name == ROUTE_REQUESTS:
            routed = True
            r.figures.add(d)
            if backend := d.label("backend"):
                r.backends.add(backend)
        elif d.name == RETRIES:
            r.retries += d.increase
        elif d.name == RETRIES_SKIPPED:
            r.retries_skipped += d.increase
        elif d.name == TIMEOUTS and d.label("kind") == "request":
            r.timeouts += d.increase
    whole = Figures()
    for d in _workload_series(ds):
        if not server_side(d):
            continue
        ns, pod_name = _ends(d)[1]
        pod = topo.pod(ns, pod_name)
        if pod is not None and service.selects(pod):
            whole.add(d)
    # Without routes nothing counted requests on the [default] row (retries carry no
    # request counts): the service's figures are the route's.
    row(ALL_ROUTES if routed else DEFAULT_ROUTE).figures = whole
    return sorted(rows.values(), key=lambda r: (r.route in (DEFAULT_ROUTE, ALL_ROUTES), r.route))


# -- top ----------------------------------------------------------------------------------


@dataclass
class TopRow:
    src_namespace: str
    src: str
    dst_namespace: str
    dst: str
    what: str
    """The path when the metrics carry one, else the authority (Host)."""
    figures: Figures
    recent_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "src_namespace": self.src_namespace,
            "src": self.src,
            "dst_namespace": self.dst_namespace,
            "dst": self.dst,
            "path_or_authority": self.what,
            "count": self.figures.requests,
            "rps": self.recent_rate if self.recent_rate is not None else self.figures.request_rate,
            "success_rate": self.figures.success_rate,
            "latency_ms_p50": self.figures.latency(0.5),
            "latency_ms_p99": self.figures.latency(0.99),
        }


def has_path(ds: Iterable[Delta]) -> bool:
    return any(d.name == REQUESTS and d.label("path") for d in ds)


def _top_key(d: Delta, by_path: bool) -> tuple[str, str, str, str, str]:
    src, dst = _ends(d)
    return (*src, *dst, d.label("path") if by_path else d.label("authority"))


def top(
    since: Sequence[Delta], recent: Sequence[Delta] | None = None, *, namespace: str | None = None
) -> list[TopRow]:
    """The busiest (source pod, destination pod, path or authority), busiest first:
    counts and figures over ``since``, the rate over ``recent`` (the last refresh)."""
    by_path = has_path(since)
    rows: dict[tuple[str, str, str, str, str], Figures] = {}
    for d in _workload_series(since):
        if d.name in HTTP_FAMILIES and d.label("direction") == "outbound":
            rows.setdefault(_top_key(d, by_path), Figures()).add(d)
    rates: dict[tuple[str, str, str, str, str], float] = {}
    for d in _workload_series(recent or ()):
        if d.name == REQUESTS and d.label("direction") == "outbound" and d.rate is not None:
            key = _top_key(d, by_path)
            rates[key] = rates.get(key, 0.0) + d.rate
    out = [
        TopRow(*key, figures, rates.get(key, 0.0) if recent is not None else None)
        for key, figures in rows.items()
        if (namespace is None or namespace in (key[0], key[2]))
        and (figures.requests > 0 or rates.get(key))
    ]
    out.sort(key=lambda r: (-r.figures.requests, r.src, r.dst, r.what))
    return out


@dataclass
class RouteTraffic:
    service: str
    route: str
    backend: str
    figures: Figures


def route_traffic(ds: Iterable[Delta]) -> list[RouteTraffic]:
    """Requests per (service, route, backend), busiest first."""
    rows: dict[tuple[str, str, str], Figures] = {}
    for d in ds:
        if d.name == ROUTE_REQUESTS and d.label("service") != "overflow":
            key = (d.label("service"), d.label("route"), d.label("backend"))
            rows.setdefault(key, Figures()).add(d)
    out = [RouteTraffic(*key, f) for key, f in rows.items()]
    out.sort(key=lambda r: (-r.figures.requests, r.service, r.route))
    return out
