"""Retry policy of the node proxy: which failures may be tried again elsewhere, and a
budget that keeps retries from multiplying load.

`retryable` is the classification: another endpoint may be tried only when nothing of
the application's can have reached anyone, and the cause is not one that every endpoint
would repeat (policy, identity, this node's own overload).

`RetryBudget` is the brake (Finagle's and Linkerd's retry budget, in miniature): retries
may add at most ``ratio`` of the first attempts seen in the last ``ttl`` seconds, plus
``min_per_second`` so that a quiet service can still fail over.  When every endpoint is
failing — a brownout, an overloaded peer — a retry per failure would double or triple the
load on exactly the replicas that cannot take it; the budget caps that at +20 %.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from nodeagent.proxy.admission import Overloaded
from nodeagent.proxy.resolve import NoRoute
from nodeagent.proxy.tunnel import TunnelError


def retryable(exc: BaseException) -> bool:
    """Whether a failed connect attempt may be repeated on another endpoint.  The relay
    starts only after a connect succeeded, so no application byte went anywhere yet."""
    if isinstance(exc, (NoRoute, Overloaded)):
        return False
    if isinstance(exc, TunnelError):
        return exc.retryable
    return isinstance(exc, (OSError, TimeoutError))


class RetryBudget:
    """Retries allowed: ``ratio`` * first attempts in the last ``ttl`` seconds, plus
    ``min_per_second`` * ``ttl``; counted in one-second buckets."""

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or ttl < 1:
            raise ValueError(
                f"need ratio >= 0, min_per_second >= 0, ttl >= 1; got {ratio}, "
                f"{min_per_second}, {ttl}"
            )
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._clock = clock
        self._slots = math.ceil(ttl)
        self._attempts = [0] * self._slots
        self._retries = [0] * self._slots
        self._second = math.floor(clock())
        self.skipped = 0
        """Retries refused because the budget was spent."""

    def attempt(self) -> None:
        """Record a first attempt (it earns ``ratio`` of a retry)."""
        self._advance()
        self._attempts[self._second % self._slots] += 1

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it; False (and counted) if not."""
        self._advance()
        allowed = self.ratio * sum(self._attempts) + self.min_per_second * self.ttl
        if sum(self._retries) + 1 > allowed:
            self.skipped += 1
            return False
        self._retries[self._second % self._slots] += 1
        return True

    def _advance(self) -> None:
        now = math.floor(self._clock())
        if now <= self._second:
            return
        for s in range(self._second + 1, min(now, self._second + self._slots) + 1):
            self._attempts[s % self._slots] = 0
            self._retries[s % self._slots] = 0
        self._second = now
