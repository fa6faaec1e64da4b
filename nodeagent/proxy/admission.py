"""Admission control for expensive connection set-ups (the tunnel's TLS handshakes).

Why: a TLS 1.3 handshake costs the node proxy a few milliseconds of CPU on its one event
loop.  When an application opens 2,000 connections at once, starting 2,000 handshakes at
once makes every one of them slow: each attempt's timeout fires while its handshake is
still queued behind the others *on our own loop*, healthy endpoints are blamed ("no
answer in time") and ejected, and the retries add yet more handshakes.  A local
overload must never look like a remote failure.

So at most ``limit`` set-ups run at once and the rest wait, first come first served, in
a bounded queue.  An attempt's timeouts start only once it holds a slot, so they measure
the remote end, not our queue.  Waiting is bounded twice: by ``max_queued`` (beyond it a
set-up is refused at once, so memory stays bounded whatever the burst) and by
``queue_timeout``.  Either refusal is `Overloaded`: a statement about this node, which
callers must not count against the endpoint and must not retry elsewhere (every other
endpoint would wait in the same queue).

**Fair between workloads** (issue #18): the waiters queue per key — the source workload
that wants the connection — and free slots go round-robin over the keys with waiters,
oldest first within a key. A workload that opens 2,000 connections at once queues behind
itself, not in front of everyone else: another workload's one set-up waits for at most
one slot per busy workload. Each key's queue is bounded too (``max_queued_per_key``):
the noisy workload is refused first (`Overloaded`, counted per key in ``refused_by_key``),
while the others still queue.

The alternatives: an ``asyncio.Semaphore`` has no queue bound, no queue deadline and no
statistics; a token bucket limits the rate, not the concurrency, and would have to be
tuned to each machine's speed, while a concurrency limit adapts to it by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class Overloaded(ConnectionError):
    """This node has too many set-ups queued, or one waited too long for its turn.
    Says nothing about the destination."""


@dataclass
class AdmissionStats:
    """Counters for /debug/state and metrics."""

    in_flight: int = 0
    """Set-ups holding a slot now."""
    queued: int = 0
    """Set-ups waiting for a slot now."""
    queued_peak: int = 0
    """Most set-ups ever waiting at once."""
    admitted: int = 0
    """Set-ups that got a slot (at once or after waiting)."""
    waited: int = 0
    """Of those, the ones that had to wait."""
    wait_seconds: float = 0.0
    """Total time admitted set-ups spent waiting."""
    refused_full: int = 0
    """Refused at once: ``max_queued`` set-ups were already waiting."""
    refused_timeout: int = 0
    """Refused after waiting ``queue_timeout`` seconds."""
    refused_by_key: dict[str, int] = field(default_factory=dict)
    """Refusals (either kind) per key (source workload); bounded like the keys."""


MAX_KEYS_COUNTED = 1_000
"""Keys kept in `AdmissionStats.refused_by_key` (beyond: under ``[other]``)."""


class Admission:
    """At most ``limit`` concurrent holders of `slot`; waiters beyond that queue per key
    and are served round-robin over the keys (FIFO within one)."""

    def __init__(
        self,
        limit: int,
        *,
        max_queued: int = 10_000,
        queue_timeout: float = 30.0,
        max_queued_per_key: int | None = None,
    ):
        if limit < 1 or max_queued < 0 or queue_timeout <= 0:
            raise ValueError(
                f"need limit >= 1, max_queued >= 0, queue_timeout > 0; got {limit}, "
                f"{max_queued}, {queue_timeout}"
            )
        self.limit = limit
        self.max_queued = max_queued
        self.max_queued_per_key = max_queued if max_queued_per_key is None else max_queued_per_key
        self.queue_timeout = queue_timeout
        self.stats = AdmissionStats()
        self._queues: dict[str, collections.deque[asyncio.Future[None]]] = {}
        """key -> its waiters; a key is present while it has waiters, in the order keys
        take turns (the next key served is the first; served keys go to the back)."""
        self._queued = 0

    @contextlib.asynccontextmanager
    async def slot(self, key: str = "") -> AsyncIterator[None]:
        """Hold one slot for the body; raises `Overloaded` instead of entering it."""
        await self.acquire(key)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, key: str = "") -> None:
        """Wait for a slot (raises `Overloaded`); every success needs one `release`.
        ``key``: whose set-up this is (the source workload), for fairness."""
        stats = self.stats
        if stats.in_flight < self.limit and not self._queued:
            stats.in_flight += 1
            stats.admitted += 1
            return
        queue = self._queues.get(key)
        if self._queued >= self.max_queued or (
            queue is not None and len(queue) >= self.max_queued_per_key
        ):
            stats.refused_full += 1
            self._refused(key)
            mine = len(queue) if queue is not None else 0
            raise Overloaded(
                f"{self._queued} connection set-ups already wait for one of {self.limit} "
                f"handshake slots on this node ({mine} of them {key or 'this source'}'s)"
            )
        waiter = asyncio.get_running_loop().create_future()
        if queue is None:
            queue = self._queues[key] = collections.deque()
        queue.append(waiter)
        self._queued += 1
        stats.queued = self._queued
        stats.queued_peak = max(stats.queued_peak, stats.queued)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                stats.in_flight -= 1
                self._wake()
            else:
                waiter.cancel()
                self._forget(key, waiter)
            stats.queued = self._queued
            if isinstance(exc, TimeoutError):
                stats.refused_timeout += 1
                self._refused(key)
                raise Overloaded(
                    f"waited {self.queue_timeout:g}s for one of {self.limit} handshake slots "
                    "on this node (it is overloaded)"
                ) from None
            raise
        stats.waited += 1
        stats.admitted += 1
        stats.wait_seconds += time.monotonic() - started

    def release(self) -> None:
        self.stats.in_flight -= 1
        self._wake()

    def queued(self, key: str) -> int:
        """Waiters of ``key`` now."""
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def _forget(self, key: str, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
            self._queued -= 1
        if not queue:
            del self._queues[key]

    def _refused(self, key: str) -> None:
        counts = self.stats.refused_by_key
        if key not in counts and len(counts) >= MAX_KEYS_COUNTED:
            key = "[other]"
        counts[key] = counts.get(key, 0) + 1

    def _wake(self) -> None:
        """Hand free slots to waiters, one key at a time round-robin, the oldest of each
        key first (the slot changes hands while counted)."""
        queues = self._queues
        while queues and self.stats.in_flight < self.limit:
            key = next(iter(queues))
            queue = queues.pop(key)
            waiter = queue.popleft()
            self._queued -= 1
            if queue:
                queues[key] = queue  # to the back: the other keys go first
            if waiter.done():
                continue  # cancelled and not yet removed by its owner
            self.stats.in_flight += 1
            waiter.set_result(None)
        self.stats.queued = self._queued
