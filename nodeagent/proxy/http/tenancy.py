"""Each pod's share of the node proxy at L7 (issue #18): in-flight requests per source
pod, node-wide, over all its connections and streams.

A node proxy serves every pod of its node from one process, so one pod's flood must not
take everyone's capacity. Two bounds, both per source pod:

* **the hard share** (``limit``, ``--max-requests-per-pod``): beyond ``limit`` requests
  in flight or waiting, a pod's next request is answered ``503`` with
  ``weft-proxy-error: overloaded`` (gRPC ``RESOURCE_EXHAUSTED``) without resolving,
  balancing or dialing anything, and the other pods' requests go on. Counted per pod
  (`RequestShares.refused`).
* **the fair share under contention** (`RequestShares.cap`): the hard share alone does
  not keep a pod that stays under it from filling the event loop. On one loop, every
  request in flight adds to every loop iteration, so another pod's request, which needs
  a few iterations per hop, waits behind all of them: the victim's latency grows with the
  flooder's concurrency, not its own. So while the loop runs late — a timer every
  ``TICK`` s measures how late it fires — and more than one pod sends requests, the most
  any pod may have in flight shrinks (x ``DECREASE`` per late tick, down to
  ``FAIR_FLOOR``), and grows back (x ``INCREASE`` + 1 per punctual tick) up to
  ``limit``. A pod below the cap is not touched — a quiet pod's few requests start at
  once; the flooder's requests beyond it *wait* (per pod, first come first served) for
  one of its own to end or for the cap to grow, up to ``WAIT_TIMEOUT`` (then 503).
  The cap binds only the **heavy** pods: those starting requests at least as fast as
  the mean of the active pods (a decayed count per pod, updated every tick). A victim
  whose latency grew with the flood has more requests in flight than usual, but it
  starts them no faster than before; capping it would make it wait for a lag it did not
  cause — the flood may not even be requests (a connection flood, HTTP/2 rapid reset).

Why wait rather than answer 503 at once: a closed-loop client answered at once sends its
next request at once, and parsing and answering a flood costs the loop nearly what
serving it does; a waiting request costs nothing until it goes. For the same reason a
pod refused at its hard share while the cap is down gets its 503 after
``REFUSAL_DELAY``: its refusals cannot become a flood of their own.

The alternatives: a per-pod rate limit would have to be tuned to each node's speed (the
lag signal adapts to it by itself, as `nodeagent.proxy.admission`'s concurrency limit
does for handshakes); one global FIFO of requests is what this replaces; weighted fair
queueing of loop time would need every stage to account its CPU per pod.

`SharedForwarder` wraps a connection's forwarder (`OutboundForwarder`): the fast path
(`start`) and the general one (`forward`) both take a share when a request begins and
give it back exactly once when it ends (its response done, failed, cancelled or sent
again). The bookkeeping is a dictionary increment per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

from nodeagent.proxy.http.message import ProxyError
from nodeagent.proxy.http.server import Exchange, FastDone, FastForwarder, ProxyFailure

log = logging.getLogger("weft.proxy.http")

DEFAULT_LIMIT = 2048
MAX_COUNTED = 1000
"""Pods kept in `RequestShares.refused` (beyond: under ``[other]``)."""
FAIR_FLOOR = 8
"""The cap never goes below this: what any pod may have in flight however loaded."""
TICK = 0.025
"""Seconds between two lag probes while requests flow."""
LATE = 0.002
"""A probe this much later than due says the loop is overloaded."""
DECREASE = 0.7
INCREASE = 1.1
START_DECAY = 0.9
"""Per tick: a pod's count of started requests fades with a ~0.16 s half-life."""
ACTIVE_WINDOW = 1.0
"""A pod that started a request within this many seconds counts as active; with fewer
than two active, nobody is held back (there is no one to protect)."""
WAIT_TIMEOUT = 5.0
"""Seconds a request may wait for its pod's share before it is answered 503."""
REFUSAL_DELAY = 0.1
"""While the cap is down, a 503 at the hard share is sent after this long."""


class RequestShares:
    """In-flight requests per source pod (its address), node-wide; `cap` while the loop
    runs late."""

    def __init__(self, limit: int = DEFAULT_LIMIT, *, name: Callable[[str], str] = str) -> None:
        if limit < 1:
            raise ValueError(f"the requests one pod may have in flight must be >= 1, got {limit}")
        self.limit = limit
        self.name = name
        """Names a pod address in logs (the agent: ``ns/pod``)."""
        self.in_flight: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.waited: dict[str, int] = {}
        """Requests that had to wait for their pod's share, per pod (bounded like
        `refused`)."""
        self.cap = float(limit)
        """The most one pod may have in flight now (``limit`` unless the loop runs late)."""
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._active: dict[str, float] = {}
        """Pod -> when it last started a request (pruned by the probe)."""
        self._probe: asyncio.TimerHandle | None = None
        self._logged = 0.0
        self._starts: dict[str, float] = {}
        """Pod -> its requests started, decayed by ``START_DECAY`` per tick."""
        self.heavy: frozenset[str] = frozenset()
        """The pods the cap binds (empty before the first tick: then it binds all)."""

    # --- the fast checks ---------------------------------------------------------------

    def _allowed(self, source: str | None = None) -> int:
        if self.cap >= self.limit or (self.heavy and source not in self.heavy):
            return self.limit
        return max(1, min(self.limit, int(self.cap)))

    def may_start(self, source: str) -> bool:
        """Whether a request of ``source`` may start now (nobody of its own waits, and it
        is under its share)."""
        self._seen(source)
        return source not in self._waiters and self.in_flight.get(source, 0) < self._allowed(source)

    def full(self, source: str) -> bool:
        return self.in_flight.get(source, 0) >= self.limit

    def take(self, source: str) -> bool:
        """Take a share now if there is one (`may_start`); False counts a refusal only at
        the hard share."""
        if self.may_start(source):
            self.in_flight[source] = self.in_flight.get(source, 0) + 1
            return True
        if self.in_flight.get(source, 0) + self.queued(source) >= self.limit:
            self._refuse(source)
        return False

    def give(self, source: str) -> None:
        n = self.in_flight[source] - 1
        if n:
            self.in_flight[source] = n
        else:
            del self.in_flight[source]
        if source in self._waiters:
            self._wake(source)

    def queued(self, source: str) -> int:
        waiters = self._waiters.get(source)
        return len(waiters) if waiters else 0

    # --- waiting -----------------------------------------------------------------------

    async def acquire(self, source: str) -> None:
        """Take a share, waiting for it if the pod is at the cap; raises the overloaded
        `ProxyFailure` at the hard share or after ``WAIT_TIMEOUT``."""
        if self.take(source):
            return
        if self.in_flight.get(source, 0) + self.queued(source) >= self.limit:
            if self.cap < self.limit:
                await asyncio.sleep(REFUSAL_DELAY)
            raise self.failure(source)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(source, collections.deque()).append(waiter)
        self._count(self.waited, source)
        try:
            async with asyncio.timeout(WAIT_TIMEOUT):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.give(source)  # handed to us as we were cancelled: pass it on
            else:
                waiter.cancel()
                self._forget(source, waiter)
            if isinstance(exc, TimeoutError):
                self._refuse(source)
                raise self.failure(source) from None
            raise

    def _forget(self, source: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(source)
        if waiters is None:
            return
        with contextlib.suppress(ValueError):
            waiters.remove(waiter)
        if not waiters:
            del self._waiters[source]

    def _wake(self, source: str) -> None:
        """Hand ``source``'s free shares to its waiters, oldest first (counted while the
        share changes hands)."""
        waiters = self._waiters.get(source)
        allowed = self._allowed(source)
        while waiters and self.in_flight.get(source, 0) < allowed:
            waiter = waiters.popleft()
            if waiter.done():
                continue  # cancelled, not yet removed by its owner
            self.in_flight[source] = self.in_flight.get(source, 0) + 1
            waiter.set_result(None)
        if not waiters:
            self._waiters.pop(source, None)

    # --- the lag probe -----------------------------------------------------------------

    def _seen(self, source: str) -> None:
        now = time.monotonic()
        self._active[source] = now
        self._starts[source] = self._starts.get(source, 0.0) + 1.0
        if self._probe is None:
            with contextlib.suppress(RuntimeError):  # no running loop: a sync caller
                loop = asyncio.get_running_loop()
                self._probe = loop.call_later(TICK, self._tick, now + TICK)

    def _tick(self, due: float) -> None:
        """Every ``TICK`` s while requests flow: how late this call is steers `cap`."""
        try:
            now = time.monotonic()
            self._active = {s: t for s, t in self._active.items() if now - t < ACTIVE_WINDOW}
            self._starts = {s: n * START_DECAY for s, n in self._starts.items()
                            if s in self._active}  # fmt: skip
            mean = sum(self._starts.values()) / len(self._starts) if self._starts else 0.0
            heavy = frozenset(s for s, n in self._starts.items() if n >= mean)
            lightened = self.heavy - heavy
            self.heavy = heavy
            before = self.cap
            if now - due > LATE and len(self._active) > 1:
                self.cap = max(float(FAIR_FLOOR), self.cap * DECREASE)
            else:
                self.cap = min(float(self.limit), self.cap * INCREASE + 1.0)
            if self.cap < before and before == self.limit:
                self._log_cap()
            if self.cap > before or lightened:
                for source in list(self._waiters):
                    self._wake(source)
        except Exception:  # a bug here must not stop the probe for good
            log.exception("request shares: the lag probe failed")
        if self._active or self.in_flight or self._waiters or self.cap < self.limit:
            loop = asyncio.get_running_loop()
            self._probe = loop.call_later(TICK, self._tick, time.monotonic() + TICK)
        else:
            self._probe = None  # idle: the next request starts it again

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    # --- counting ----------------------------------------------------------------------

    @staticmethod
    def _count(counts: dict[str, int], source: str) -> str:
        key = source if source in counts or len(counts) < MAX_COUNTED else "[other]"
        counts[key] = counts.get(key, 0) + 1
        return key

    def _refuse(self, source: str) -> None:
        key = self._count(self.refused, source)
        now = time.monotonic()
        if now - self._logged >= 1.0:
            self._logged = now
            log.warning("%s has %d requests in flight and %d waiting through this node's "
                        "proxy (its share): its next are answered 503 overloaded (%d so far)",
                        self.name(source), self.in_flight.get(source, 0),
                        self.queued(source), self.refused[key])  # fmt: skip

    def _log_cap(self) -> None:
        now = time.monotonic()
        if now - self._logged >= 1.0:
            self._logged = now
            busiest = max(self.in_flight, key=self.in_flight.__getitem__, default=None)
            log.warning("the proxy's event loop runs late with %d pods sending: each pod's "
                        "requests in flight are capped below %d until it catches up (the "
                        "most in flight: %s)", len(self._active), self.limit,
                        self.name(busiest) if busiest else "none")  # fmt: skip

    def failure(self, source: str) -> ProxyFailure:
        return ProxyFailure(
            ProxyError.OVERLOADED,
            f"{self.name(source)} has {self.in_flight.get(source, 0)} requests in flight "
            f"through this node's proxy (its share is {self._allowed(source)} now, {self.limit} "
            "at most); retry later",
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

    def _give(self, exchange: Exchange) -> None:
        key = id(exchange)
        if key in self._held:
            self._held.discard(key)
            self.shares.give(self.source)

    def start(self, exchange: Exchange, done: FastDone) -> bool:
        if not self.shares.may_start(self.source):
            return False  # `forward` waits for a share, or answers it (overloaded)
        self.shares.in_flight[self.source] = self.shares.in_flight.get(self.source, 0) + 1
        self._held.add(id(exchange))

        def finished(ex: Exchange, failure: ProxyFailure | None, again: bool) -> None:
            self._give(ex)
            done(ex, failure, again)

        if self.inner.start(exchange, finished):
            return True
        self._give(exchange)
        return False

    async def forward(self, exchange: Exchange) -> None:
        await self.shares.acquire(self.source)
        self._held.add(id(exchange))
        try:
            await self.inner.forward(exchange)
        finally:
            self._give(exchange)

    def cancel(self, exchange: Exchange) -> None:
        self._give(exchange)
        self.inner.cancel(exchange)
