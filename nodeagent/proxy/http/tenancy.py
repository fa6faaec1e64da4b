"""Each pod's share of the node proxy at L7 (issue #18): in-flight requests per source
pod, node-wide, over all its connections and streams.

A node proxy serves every pod of its node from one process, so one pod's flood must not
take everyone's capacity: beyond ``limit`` requests in flight, a pod's next request is
answered at once — ``503`` with ``weft-proxy-error: overloaded``, gRPC
``RESOURCE_EXHAUSTED`` — without resolving, balancing or dialing anything, and the other
pods' requests go on. Counted per pod (`RequestShares.refused`).

`SharedForwarder` wraps a connection's forwarder (`OutboundForwarder`): the fast path
(`start`) and the general one (`forward`) both take a share when a request begins and
give it back exactly once when it ends (its response done, failed, cancelled or sent
again). The bookkeeping is a dictionary increment per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from nodeagent.proxy.http.message import ProxyError
from nodeagent.proxy.http.server import Exchange, FastDone, FastForwarder, ProxyFailure

log = logging.getLogger("weft.proxy.http")

DEFAULT_LIMIT = 2048
MAX_COUNTED = 1000
"""Pods kept in `RequestShares.refused` (beyond: under ``[other]``)."""


class RequestShares:
    """In-flight requests per source pod (its address), node-wide."""

    def __init__(self, limit: int = DEFAULT_LIMIT, *, name: Callable[[str], str] = str) -> None:
        if limit < 1:
            raise ValueError(f"the requests one pod may have in flight must be >= 1, got {limit}")
        self.limit = limit
        self.name = name
        """Names a pod address in logs (the agent: ``ns/pod``)."""
        self.in_flight: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self._logged = 0.0

    def full(self, source: str) -> bool:
        return self.in_flight.get(source, 0) >= self.limit

    def take(self, source: str) -> bool:
        n = self.in_flight.get(source, 0)
        if n >= self.limit:
            key = source if source in self.refused or len(self.refused) < MAX_COUNTED else "[other]"
            self.refused[key] = self.refused.get(key, 0) + 1
            now = time.monotonic()
            if now - self._logged >= 1.0:
                self._logged = now
                log.warning("%s has %d requests in flight through this node's proxy (its "
                            "share): its next are answered 503 overloaded (%d so far)",
                            self.name(source), n, self.refused[key])  # fmt: skip
            return False
        self.in_flight[source] = n + 1
        return True

    def give(self, source: str) -> None:
        n = self.in_flight[source] - 1
        if n:
            self.in_flight[source] = n
        else:
            del self.in_flight[source]

    def failure(self, source: str) -> ProxyFailure:
        return ProxyFailure(
            ProxyError.OVERLOADED,
            f"{self.name(source)} has {self.limit} requests in flight through this node's "
            "proxy (its share); retry later",
        )


class SharedForwarder:
    """A connection's forwarder that takes the source pod's share per request."""

    __slots__ = ("_held", "inner", "shares", "source")

    def __init__(self, inner: FastForwarder, shares: RequestShares, source: str) -> None:
        self.inner = inner
        self.shares = shares
        self.source = source
        self._held: set[int] = set()
        """Exchanges (by id) holding a share now."""

    def _take(self, exchange: Exchange) -> bool:
        if not self.shares.take(self.source):
            return False
        self._held.add(id(exchange))
        return True

    def _give(self, exchange: Exchange) -> None:
        key = id(exchange)
        if key in self._held:
            self._held.discard(key)
            self.shares.give(self.source)

    def start(self, exchange: Exchange, done: FastDone) -> bool:
        if self.shares.full(self.source) or not self._take(exchange):
            return False  # `forward` answers it (overloaded), and counts it

        def finished(ex: Exchange, failure: ProxyFailure | None, again: bool) -> None:
            self._give(ex)
            done(ex, failure, again)

        if self.inner.start(exchange, finished):
            return True
        self._give(exchange)
        return False

    async def forward(self, exchange: Exchange) -> None:
        if not self._take(exchange):
            raise self.shares.failure(self.source)
        try:
            await self.inner.forward(exchange)
        finally:
            self._give(exchange)

    def cancel(self, exchange: Exchange) -> None:
        self._give(exchange)
        self.inner.cancel(exchange)
