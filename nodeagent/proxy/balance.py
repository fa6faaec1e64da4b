"""Endpoint choice and failure accrual for the outbound proxy, sans-I/O.

Choice: **power of two choices** on outstanding connections divided by weight — pick two
eligible endpoints at random, take the less loaded.  It needs no shared ordering (round
robin's cursor), adapts to slow endpoints (their connections last longer, so they look
busier) and avoids the herd effect of "least connections" when many proxies act on the
same stale picture (Mitzenmacher; what Linkerd and Envoy use).

Failure accrual, per endpoint address (shared by every service that has it):

* ``threshold`` consecutive connect failures eject the endpoint for ``base_ejection``
  seconds, doubling with each ejection in a row up to ``max_ejection``;
* when the ejection expires the endpoint is on *probation*: exactly one connection may
  try it; success restores it (and resets the backoff), failure ejects it again at once;
* when every endpoint of a service is ejected, choice ignores ejections (a guess beats a
  certain refusal: the "panic" mode of Envoy), and says so in the returned pick.

Nothing here awaits or reads clocks directly: the clock and randomness are injected.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("weft.proxy.balance")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class AccrualConfig:
    threshold: int = 3
    """Consecutive connect failures that eject an endpoint."""
    base_ejection: float = 1.0
    max_ejection: float = 30.0

    def __post_init__(self) -> None:
        if self.threshold < 1 or not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError("threshold >= 1 and 0 < base_ejection <= max_ejection are needed")


@dataclass
class Health:
    outstanding: int = 0
    consecutive_failures: int = 0
    ejections_in_a_row: int = 0
    ejected_until: float | None = None
    """Set while ejected or on probation (probation: the time has passed)."""
    probing: bool = False
    """The single probation connection is in flight."""
    failures: int = 0
    ejections: int = 0


@dataclass(frozen=True)
class Pick(Generic[K]):
    key: K
    probation: bool = False
    panic: bool = False


class Lease(Generic[K]):
    """One connection's hold on the endpoint it was given (`Balancer.lease`): counted as
    outstanding from the pick until `release`; the outcome of its connect is reported
    once, with `succeed`, `fail` or `abandon`. Replaces the scattered started/finished/
    succeeded/failed calls, so that no path can forget one."""

    __slots__ = ("_balancer", "_released", "key", "pick")

    def __init__(self, balancer: Balancer[K], pick: Pick[K]) -> None:
        self._balancer = balancer
        self.pick = pick
        self.key = pick.key
        self._released = False
        balancer.started(self.key)

    def succeed(self) -> None:
        """The connect worked; the lease stays held until `release`."""
        self._balancer.succeeded(self.key)

    def fail(self) -> bool:
        """The connect failed: released, and counted; True if it ejected the endpoint."""
        self.release()
        return self._balancer.failed(self.key)

    def abandon(self) -> None:
        """No verdict (cancelled, or refused for a reason every endpoint would repeat):
        released, and a probation slot it held is given back."""
        self.release()
        self._balancer.abandoned(self.key)

    def release(self) -> None:
        """The connection has ended (idempotent)."""
        if not self._released:
            self._released = True
            self._balancer.finished(self.key)


@dataclass
class Balancer(Generic[K]):
    config: AccrualConfig = field(default_factory=AccrualConfig)
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    health: dict[K, Health] = field(default_factory=dict)

    def _h(self, key: K) -> Health:
        h = self.health.get(key)
        if h is None:
            h = self.health[key] = Health()
        return h

    def state(self, key: K) -> str:
        h = self.health.get(key)
        if h is None or h.ejected_until is None:
            return "healthy"
        if h.probing:
            return "probing"
        return "ejected" if self.clock() < h.ejected_until else "probation"

    def choose(
        self, candidates: Sequence[K], weights: Callable[[K], float] | None = None,
        exclude: Iterable[K] = (),
    ) -> Pick[K] | None:  # fmt: skip
        """Pick one of ``candidates`` not in ``exclude``; None if there is none left."""
        skip = set(exclude)
        left = [k for k in candidates if k not in skip]
        if not left:
            return None
        now = self.clock()
        healthy: list[K] = []
        due: list[K] = []
        for k in left:
            h = self.health.get(k)
            if h is None or h.ejected_until is None:
                healthy.append(k)
            elif not h.probing and now >= h.ejected_until:
                due.append(k)
        if due:
            # Probation first: a recovered endpoint gets its one try promptly, or the
            # healthy ones would starve it of the evidence it needs.
            k = self.rng.choice(due)
            self._h(k).probing = True
            return Pick(k, probation=True)
        if healthy:
            return Pick(self._p2c(healthy, weights))
        return Pick(self._p2c(left, weights), panic=True)

    def lease(
        self, candidates: Sequence[K], weights: Callable[[K], float] | None = None,
        exclude: Iterable[K] = (),
    ) -> Lease[K] | None:  # fmt: skip
        """`choose`, held as a `Lease`; None if no candidate is left."""
        pick = self.choose(candidates, weights, exclude)
        return Lease(self, pick) if pick is not None else None

    def _p2c(self, keys: Sequence[K], weights: Callable[[K], float] | None) -> K:
        if len(keys) == 1:
            return keys[0]
        a, b = self.rng.sample(keys, 2)

        def load(k: K) -> float:
            h = self.health.get(k)
            n = (h.outstanding if h else 0) + 1
            w = weights(k) if weights else 1.0
            return n / w if w > 0 else float("inf")

        return a if load(a) <= load(b) else b

    def started(self, key: K) -> None:
        self._h(key).outstanding += 1

    def finished(self, key: K) -> None:
        h = self.health.get(key)
        if h is not None and h.outstanding > 0:
            h.outstanding -= 1

    def succeeded(self, key: K) -> None:
        h = self._h(key)
        if h.ejected_until is not None:
            log.info("endpoint %s recovered: connect succeeded on probation", key)
        h.consecutive_failures = 0
        h.ejections_in_a_row = 0
        h.ejected_until = None
        h.probing = False

    def failed(self, key: K) -> bool:
        """Record a connect failure; True if it ejected the endpoint."""
        h = self._h(key)
        h.failures += 1
        h.consecutive_failures += 1
        if h.probing or (
            h.ejected_until is None and h.consecutive_failures >= self.config.threshold
        ):
            cfg = self.config
            # The exponent is capped: 2**1024 overflows a float, and 2**32 s is forever.
            doubling = 2 ** min(h.ejections_in_a_row, 32)
            seconds = min(cfg.max_ejection, cfg.base_ejection * doubling)
            h.ejections_in_a_row += 1
            h.ejections += 1
            h.ejected_until = self.clock() + seconds
            h.probing = False
            log.warning(
                "endpoint %s ejected for %.1f s after %d consecutive connect failure(s)",
                key, seconds, h.consecutive_failures,
            )  # fmt: skip
            return True
        return False

    def abandoned(self, key: K) -> None:
        """The connection ended with no verdict on the endpoint (cancelled, or refused by
        policy): a probation slot it held is given back, so another connection can probe."""
        h = self.health.get(key)
        if h is not None:
            h.probing = False

    def retain(self, keys: Iterable[K]) -> None:
        """Forget endpoints no longer in discovery (those with connections stay)."""
        keep = set(keys)
        for k in [k for k, h in self.health.items() if k not in keep and h.outstanding == 0]:
            del self.health[k]
