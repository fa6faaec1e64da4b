"""``weft viz tap`` without I/O: the ``/tap`` query a resource and its filters become, and
the rows the events print as.

The agents know pods, not Deployments or Services (their events name pods, and the
caller of an inbound request only by its identity), so the resource is resolved here,
from the lab's topology, into what the agent matches (`nodeagent.tap.Ends`): the pods'
names, and their service accounts for an end known only by identity. Without a topology
(``--agent`` outside a lab) ``deploy/NAME`` is the pods named ``NAME-…`` — how a
Deployment names its pods — or ``NAME``, and callers whose service account is ``NAME``.

The dashboard's tap panel (`weft.viz.dashboard`) relays the same events to a browser as
server-sent events: `page_row` is an event as the page shows it, `sse` one message, and
`TapRelay` the bounded queue between the threads reading the agents and the browser's
connection.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from weft.viz.model import Target, Topology, VizError

Accounts = Mapping[tuple[str, str], str]
"""(namespace, pod) -> service account."""


def end_params(
    target: Target, topology: Topology, accounts: Accounts, side: str = ""
) -> list[tuple[str, str]]:
    """The query parameters of one end (``side``: ``""``, ``to`` or ``from``)."""
    key = f"{side}." if side else ""
    ns, name = target.namespace, target.name
    if target.kind == "ns":
        return [(key + "ns", name)]
    pods = [
        p.name
        for p in topology.pods
        if p.namespace == ns and name in topology.groups(target.kind, ns, p.name)
    ]
    if not pods:
        if target.kind == "pod":
            return [(key + "pod", f"{ns}/{name}")]
        if target.kind == "deploy" and not topology.pods:
            return [
                (key + "pod", f"{ns}/{name}"),
                (key + "prefix", f"{ns}/{name}-"),
                (key + "sa", f"{ns}/{name}"),
            ]
        where = "the lab" if topology.pods else "a lab (svc needs one: give pod/ or deploy/)"
        raise VizError(f"no {target} in namespace {ns} in {where}")
    params = [(key + "pod", f"{ns}/{p}") for p in sorted(pods)]
    params += [
        (key + "sa", f"{ns}/{sa}")
        for sa in sorted({accounts[(ns, p)] for p in pods if (ns, p) in accounts})
    ]
    return params


def tap_query(
    resource: Target,
    topology: Topology,
    accounts: Accounts,
    *,
    to: Target | None = None,
    from_: Target | None = None,
    method: str | None = None,
    path: str | None = None,
    max_events: int | None = None,
    duration: float | None = None,
) -> str:
    """The ``/tap`` query string for the agents."""
    params = end_params(resource, topology, accounts)
    if to is not None:
        params += end_params(to, topology, accounts, "to")
    if from_ is not None:
        params += end_params(from_, topology, accounts, "from")
    if method:
        params.append(("method", method.upper()))
    if path:
        if not path.startswith("/"):
            raise VizError(f"--path {path!r}: give a path prefix starting with /")
        params.append(("path", path))
    if max_events is not None:
        params.append(("max", str(max_events)))
    if duration is not None:
        params.append(("duration", f"{duration:g}"))
    return urlencode(params, safe="/")


@dataclass(frozen=True)
class TapRow:
    """An event as the table prints it."""

    direction: str
    node: str
    method: str
    path: str
    authority: str
    status: str
    latency: str
    src: str
    dst: str
    client_id: str
    server_id: str
    route: str

    HEADERS = (
        "DIR", "NODE", "METHOD", "PATH", "AUTHORITY", "STATUS", "LATENCY", "SRC", "DST",
        "CLIENT_ID", "SERVER_ID", "ROUTE",
    )  # fmt: skip
    WIDTHS = (3, 7, 6, 24, 16, 18, 7, 22, 22, 44, 44, 0)
    """Each column's width (0: the last, as long as it is); longer cells end in ``…``."""

    def cells(self) -> tuple[str, ...]:
        return (
            self.direction, self.node, self.method, self.path, self.authority, self.status,
            self.latency, self.src, self.dst, self.client_id, self.server_id, self.route,
        )  # fmt: skip


def line(cells: tuple[str, ...] | list[str]) -> str:
    """One line of the table: cells padded or cut to `TapRow.WIDTHS`, so rows printed as
    they arrive line up under the header (a table drawn at the end could not stream)."""
    out = []
    for cell, width in zip(cells, TapRow.WIDTHS, strict=True):
        if width and len(cell) > width:
            cell = cell[: width - 1] + "…"
        out.append(cell.ljust(width))
    return "  ".join(out).rstrip()


def _end(end: Mapping[str, Any]) -> str:
    ns = end.get("namespace") or "?"
    if end.get("pod"):
        return f"{ns}/{end['pod']}"
    if end.get("service_account"):
        return f"{ns}/sa:{end['service_account']}"  # inbound: the caller by identity
    return "-"


def _latency(ms: object) -> str:
    if not isinstance(ms, int | float):
        return "-"
    return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"


def row(event: Mapping[str, Any]) -> TapRow:
    src = event.get("src") or {}
    dst = event.get("dst") or {}
    status = "" if event.get("status") is None else str(event["status"])
    if event.get("grpc_status"):
        status += f" grpc={event['grpc_status']}"
    if event.get("error"):
        status = f"{status} {event['error']}".strip()
    return TapRow(
        "out" if event.get("direction") == "outbound" else "in",
        str(event.get("node") or ""),
        str(event.get("method") or "-"),
        str(event.get("path") or "-"),
        str(event.get("authority") or "-"),
        status or "-",
        _latency(event.get("latency_ms")),
        _end(src),
        _end(dst),
        str(src.get("identity") or "-"),
        str(dst.get("identity") or "-"),
        str(event.get("route") or "-"),
    )


# -- the dashboard's relay --------------------------------------------------------------------


def page_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """An event as the dashboard's tap panel shows it: `row`'s cells by name, and the raw
    facts the page colours and filters by."""
    r = row(event)
    return {
        "time": event.get("time"),
        "direction": r.direction,
        "node": r.node,
        "method": r.method,
        "authority": r.authority,
        "path": r.path,
        "status": r.status,
        "status_code": event.get("status"),
        "error": event.get("error"),
        "latency": r.latency,
        "src": r.src,
        "dst": r.dst,
        "client_id": r.client_id,
        "server_id": r.server_id,
        "route": r.route,
        "tls": bool(event.get("tls")),
    }


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event (``json.dumps`` escapes newlines, so ``data`` is one line)."""
    return f"event: {event}\ndata: {json.dumps(data, sort_keys=True)}\n\n".encode()


SSE_KEEPALIVE = b": keep-alive\n\n"
"""A comment line: the browser ignores it; writing it finds out that the browser left."""


@dataclass(frozen=True)
class Relayed:
    """What an agent's reader thread hands the browser's connection."""

    agent: str
    """The agent's name (its node)."""
    event: Mapping[str, Any] | None = None
    """A request; or None: the stream ended (``problem``: why, empty if it just ended)."""
    problem: str = ""


class TapRelay:
    """One browser connection's queue of the agents' tap events, between the threads that
    read the agents' streams (`put`) and the connection's writer (`take`).

    Bounded like the agent's own queue (`nodeagent.tap.Subscription`): a browser slower
    than the traffic loses requests, which are counted and said on the page, rather than
    growing the dashboard's memory. A stream's end is never dropped (there is one per
    agent). ``wake`` is called — from the putting thread — only when the queue goes from
    empty to not, so a burst costs the event loop one wake-up, not one per event."""

    def __init__(self, limit: int, wake: Callable[[], None]) -> None:
        self.limit = limit
        self._wake = wake
        self._lock = threading.Lock()
        self._items: deque[Relayed] = deque()
        self._events = 0
        self._woken = False
        self.dropped = 0
        """Requests lost because the queue was full (since the connection opened)."""

    def put(self, item: Relayed) -> None:
        with self._lock:
            if item.event is not None:
                if self._events >= self.limit:
                    self.dropped += 1
                    return
                self._events += 1
            self._items.append(item)
            wake, self._woken = not self._woken, True
        if wake:
            self._wake()

    def take(self) -> list[Relayed]:
        """Everything queued, oldest first; the next `put` wakes the reader again."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._events = 0
            self._woken = False
        return items
