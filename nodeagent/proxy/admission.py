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
from dataclasses import dataclass


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


class Admission:
    """At most ``limit`` concurrent holders of `slot`; FIFO waiters beyond that."""

    def __init__(self, limit: int, *, max_queued: int = 10_000, queue_timeout: float = 30.0):
        if limit < 1 or max_queued < 0 or queue_timeout <= 0:
            raise ValueError(
                f"need limit >= 1, max_queued >= 0, queue_timeout > 0; got {limit}, "
                f"{max_queued}, {queue_timeout}"
            )
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.stats = AdmissionStats()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body; raises `Overloaded` instead of entering it."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Wait for a slot (raises `Overloaded`); every success needs one `release`."""
        stats = self.stats
        if stats.in_flight < self.limit and not self._waiters:
            stats.in_flight += 1
            stats.admitted += 1
            return
        if len(self._waiters) >= self.max_queued:
            stats.refused_full += 1
            raise Overloaded(
                f"{len(self._waiters)} connection set-ups already wait for one of "
                f"{self.limit} handshake slots on this node"
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        stats.queued = len(self._waiters)
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
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            stats.queued = len(self._waiters)
            if isinstance(exc, TimeoutError):
                stats.refused_timeout += 1
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

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters (the slot changes hands while counted)."""
        while self._waiters and self.stats.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue  # cancelled and not yet removed by its owner
            self.stats.in_flight += 1
            waiter.set_result(None)
        self.stats.queued = len(self._waiters)
