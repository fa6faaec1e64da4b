"""Live tap: one event per finished request, to whoever is watching (``weft viz tap``).

The data path publishes where it records the golden metrics — the outbound forwarder
(`nodeagent.proxy.http.forward`) and the inbound recorder
(`nodeagent.proxy.http.inbound`) — so an event has exactly the facts the metrics have,
plus the request's method and path. With nobody tapping, the cost is one attribute check
per request (`TapHub.active`): no event is built, and the inbound observers do not keep
method or path (they check the same flag at each request head).

Each subscriber has a filter (`TapFilter`: the resource, ``--to``, ``--from``, method,
path prefix) and a bounded queue: a reader slower than the traffic loses events, which
are counted (`Subscription.dropped`) and said in the stream, and never cost the agent
more than ``queue_size`` events of memory per subscriber. There are at most
``max_subscribers`` at once. Dropping rather than waiting is the point: the data path
must never wait for a terminal, and an unbounded queue would let a stalled reader grow
the agent's memory without limit.

Who may tap is the admin endpoint's business (`nodeagent.admin`: loopback clients only);
this module is sans-I/O apart from the queue's wake-up event.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

MAX_SUBSCRIBERS = 16
QUEUE_SIZE = 1024
"""Events held per subscriber; beyond that they are dropped (and counted)."""
MAX_DURATION = 3600.0
"""The longest a tap stream runs when the client asks for none (it may reconnect)."""


class TapError(ValueError):
    """A tap request that cannot be served (the message says why and what to do)."""


class TapBusy(TapError):
    """Every subscriber slot is taken."""


@dataclass(frozen=True, slots=True)
class TapEvent:
    """One finished request, as the node's proxy saw it."""

    direction: str
    """``outbound`` (the caller's node) or ``inbound`` (the destination's)."""
    method: str
    path: str
    authority: str
    status: int | None
    """The response's status, or the status the proxy answered with (see `error`);
    None when no response came (cancelled)."""
    error: str
    """The ``weft-proxy-error`` token (or ``cancelled``); empty when the upstream answered."""
    latency: float | None
    """Seconds from the request head to the response head; None without a response."""
    src_pod: str
    """Empty on inbound events: the destination knows the caller by its identity only."""
    src_namespace: str
    src_account: str
    """The caller's service account, from its identity."""
    src_identity: str
    dst_pod: str
    dst_namespace: str
    dst_identity: str
    tls: bool
    grpc_status: str = ""
    route: str = ""
    """The Gateway API route the request matched (``ns/name``)."""
    service: str = ""
    """The service the request was sent to (``ns/name``), when the proxy resolved one."""
    endpoint: str = ""
    at: float = field(default_factory=time.time)

    def to_json(self, node: str) -> dict[str, Any]:
        return {
            "time": round(self.at, 6),
            "node": node,
            "direction": self.direction,
            "method": self.method,
            "path": self.path,
            "authority": self.authority,
            "status": self.status,
            "grpc_status": self.grpc_status or None,
            "error": self.error or None,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
            "src": {
                "pod": self.src_pod or None,
                "namespace": self.src_namespace,
                "service_account": self.src_account or None,
                "identity": self.src_identity or None,
            },
            "dst": {
                "pod": self.dst_pod or None,
                "namespace": self.dst_namespace,
                "identity": self.dst_identity or None,
                "endpoint": self.endpoint or None,
                "service": self.service or None,
            },
            "route": self.route or None,
            "tls": self.tls,
        }


def account_of(identity: str) -> str:
    """The service account of ``spiffe://TD/ns/NS/sa/SA`` (empty if it is not one)."""
    head, sep, sa = identity.rpartition("/sa/")
    return sa if sep and "/ns/" in head else ""


@dataclass(frozen=True)
class Ends:
    """What one end of a request must be: pods by name (or a name prefix: a Deployment's
    pods when no topology names them), service accounts (for an end the event knows only
    by identity: the caller of an inbound request), or whole namespaces."""

    pods: frozenset[tuple[str, str]] = frozenset()
    prefixes: tuple[tuple[str, str], ...] = ()
    accounts: frozenset[tuple[str, str]] = frozenset()
    namespaces: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.pods or self.prefixes or self.accounts or self.namespaces)

    def matches(self, pod: str, namespace: str, account: str) -> bool:
        if namespace in self.namespaces:
            return True
        if pod:
            if (namespace, pod) in self.pods:
                return True
            return any(namespace == ns and pod.startswith(p) for ns, p in self.prefixes)
        return bool(account) and (namespace, account) in self.accounts


@dataclass(frozen=True)
class TapFilter:
    """Which events a subscriber wants; an empty part matches everything."""

    resource: Ends = Ends()
    """Either end of the request is this."""
    to: Ends = Ends()
    from_: Ends = Ends()
    method: str = ""
    path: str = ""
    """A path prefix."""

    def matches(self, e: TapEvent) -> bool:
        if self.method and e.method != self.method:
            return False
        if self.path and not e.path.startswith(self.path):
            return False
        src = (e.src_pod, e.src_namespace, e.src_account)
        dst = (e.dst_pod, e.dst_namespace, account_of(e.dst_identity))
        if self.from_ and not self.from_.matches(*src):
            return False
        if self.to and not self.to.matches(*dst):
            return False
        if self.resource:
            return self.resource.matches(*src) or self.resource.matches(*dst)
        return True


@dataclass(frozen=True)
class TapRequest:
    """A parsed ``/tap`` query: the filter and when the stream ends."""

    filter: TapFilter
    max_events: int | None = None
    duration: float = MAX_DURATION


_END_KEYS = {"pod", "prefix", "sa", "ns"}
_PARAMS = {"method", "path", "max", "duration"}


def _qualified(key: str, value: str) -> tuple[str, str]:
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name:
        raise TapError(f"{key}={value!r}: give NAMESPACE/NAME")
    return ns, name


def parse_query(query: str) -> TapRequest:
    """``pod=ns/name&sa=ns/account&to.pod=...&from.ns=...&method=GET&path=/api&max=5
    &duration=10`` (every end key repeatable) into a `TapRequest`; `TapError` if not."""
    ends: dict[str, dict[str, list[str]]] = {"": {}, "to": {}, "from": {}}
    single: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, max_num_fields=256):
        side, dot, what = key.rpartition(".")
        if dot and side not in ("to", "from"):
            raise TapError(f"unknown tap parameter {key!r}")
        if what in _END_KEYS:
            ends[side].setdefault(what, []).append(value)
        elif not dot and what in _PARAMS:
            single[what] = value
        else:
            raise TapError(
                f"unknown tap parameter {key!r}: try pod, prefix, sa, ns (each also as "
                "to.* and from.*), method, path, max, duration"
            )

    def build(side: str) -> Ends:
        got = ends[side]
        prefix = f"{side}." if side else ""
        return Ends(
            frozenset(_qualified(prefix + "pod", v) for v in got.get("pod", ())),
            tuple(_qualified(prefix + "prefix", v) for v in got.get("prefix", ())),
            frozenset(_qualified(prefix + "sa", v) for v in got.get("sa", ())),
            frozenset(got.get("ns", ())),
        )

    max_events = None
    if "max" in single:
        if not single["max"].isdigit() or int(single["max"]) < 1:
            raise TapError(f"max={single['max']!r}: give a whole number of events, at least 1")
        max_events = int(single["max"])
    duration = MAX_DURATION
    if "duration" in single:
        try:
            duration = float(single["duration"])
        except ValueError:
            raise TapError(f"duration={single['duration']!r}: give seconds") from None
        if not 0 < duration <= MAX_DURATION:
            raise TapError(f"duration must be over 0 and at most {MAX_DURATION:g} seconds")
    method = single.get("method", "").upper()
    path = single.get("path", "")
    if path and not path.startswith("/"):
        raise TapError(f"path={path!r}: give a path prefix starting with /")
    return TapRequest(
        TapFilter(build(""), build("to"), build("from"), method, path), max_events, duration
    )


class Subscription:
    """One tap client: its filter and bounded queue."""

    __slots__ = ("_queue", "_wake", "closed", "delivered", "dropped", "filter", "limit")

    def __init__(self, tap_filter: TapFilter, limit: int = QUEUE_SIZE) -> None:
        self.filter = tap_filter
        self.limit = limit
        self._queue: deque[TapEvent] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0
        """Events that matched while the queue was full (the reader was too slow)."""
        self.delivered = 0
        self.closed = False

    def offer(self, event: TapEvent) -> None:
        if len(self._queue) >= self.limit:
            self.dropped += 1
            return
        self._queue.append(event)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    def pending(self) -> int:
        return len(self._queue)

    def take(self) -> TapEvent | None:
        """The next queued event without waiting (None: none queued)."""
        if self._queue:
            self.delivered += 1
            return self._queue.popleft()
        return None

    async def get(self) -> TapEvent | None:
        """The next event, waiting for one; None once the subscription is closed (what
        was queued before is still delivered first)."""
        while not self._queue:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        self.delivered += 1
        return self._queue.popleft()


class TapHub:
    """The node's subscribers. The data path checks `active` and, only when it is set,
    builds a `TapEvent` and calls `publish`."""

    def __init__(
        self,
        node: str = "",
        *,
        max_subscribers: int = MAX_SUBSCRIBERS,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.node = node
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.active = False
        """Someone is tapping: the one attribute the data path looks at per request."""
        self._subscribers: list[Subscription] = []
        self.published = 0

    @property
    def subscribers(self) -> tuple[Subscription, ...]:
        return tuple(self._subscribers)

    def subscribe(self, tap_filter: TapFilter) -> Subscription:
        if len(self._subscribers) >= self.max_subscribers:
            raise TapBusy(
                f"{self.max_subscribers} taps are already running on this node; "
                "try again when one ends"
            )
        sub = Subscription(tap_filter, self.queue_size)
        self._subscribers.append(sub)
        self.active = True
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        if sub in self._subscribers:
            self._subscribers.remove(sub)
        self.active = bool(self._subscribers)

    def publish(self, event: TapEvent) -> None:
        self.published += 1
        for sub in self._subscribers:
            if sub.filter.matches(event):
                sub.offer(event)

    def close(self) -> None:
        """End every subscription (the agent is stopping)."""
        for sub in list(self._subscribers):
            self.unsubscribe(sub)

    def state(self) -> dict[str, Any]:
        """For ``/debug/state``."""
        return {
            "subscribers": len(self._subscribers),
            "published": self.published,
            "dropped": sum(s.dropped for s in self._subscribers),
        }


OFF = TapHub("off", max_subscribers=0)
"""A hub nobody can subscribe to: what a data path built without one checks."""
