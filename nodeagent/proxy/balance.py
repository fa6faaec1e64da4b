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

Latency-aware choice (requests, `PeakEwma`): the load of an endpoint is its *peak EWMA*
round-trip estimate times (outstanding + 1) / weight — Linkerd's and tower's cost —
and of the two sampled endpoints each is taken with probability proportional to the
*other's* cost (tower takes the cheaper one; see `_p2c` for why). The
estimate jumps to any observation above it (a slowdown shows at once) and otherwise
moves towards observations with time constant ``decay``; an endpoint not chosen decays
towards zero, so it is tried again before long (a recovered replica is not starved). A
new endpoint starts at ``default_rtt``. Connection balancing uses outstanding counts
only (a connection's lifetime says nothing about the endpoint's speed).

Nothing here awaits or reads clocks directly: the clock and randomness are injected.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from weft.traffic import AccrualPolicy

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


@dataclass(frozen=True)
class PeakEwma:
    default_rtt: float = 0.001
    """Seconds assumed for an endpoint not yet observed. Lower than Linkerd's 30 ms: the
    first response replaces it anyway (a peak), and a high default would make every new
    endpoint look slow until the estimate had decayed down to its real latency."""
    decay: float = 2.0
    """Seconds: the time constant of the moving average, and of how fast an endpoint's
    estimate is forgotten while it gets no requests. Linkerd's default is 10 s; with it
    a replica that had been 20 ms slow (and so was avoided) stayed at 0.4 % of a
    sequential client's requests for the next 1,000 requests after it recovered, since
    it only recovers by being picked (`weft bench balance`). 2 s: it is back in ~6 s."""
    base: float = 0.001
    """Seconds added to every estimate before costs are compared: differences well under
    a millisecond (loopback noise, one slow first response) must not steer traffic,
    which the squared pick would otherwise amplify (0.2 against 3 ms is 225:1 squared;
    with the base, 11:1). A 20 ms slower replica is still nearly avoided."""
    min_weight: float = 0.125
    """The least weight a lower observation gets. With time-based weights alone (what
    Linkerd does), a spike on an endpoint that answers every millisecond is believed for
    ~10 s whatever its next thousand responses say; that skewed a two-replica split to
    78/22 in `weft bench`. With this floor, ~16 fast responses undo a spike."""

    def __post_init__(self) -> None:
        if self.default_rtt <= 0 or self.decay <= 0:
            raise ValueError("default_rtt and decay must be positive")
        if not 0.0 <= self.min_weight < 1.0:
            raise ValueError("min_weight must be in [0, 1)")


_MIN_RTT = 1e-6  # so that an idle endpoint's estimate never hides its outstanding count


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
    rtt: float | None = None
    """Peak-EWMA round-trip estimate, seconds (latency-aware balancers only)."""
    rtt_at: float = 0.0
    requests: int = 0
    failed_responses: int = 0
    """Consecutive failed responses (request-level accrual, `responded`)."""
    for_responses: bool = False
    """The ejection is for failed responses: a connect on probation does not end it,
    the probe request's response does."""


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

    def observe(self, seconds: float) -> None:
        """A request on this lease took ``seconds`` to its response (latency-aware
        balancers use it; others ignore it)."""
        self._balancer.observed(self.key, seconds)

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
    latency: PeakEwma | None = None
    """Set for request balancing: cost is peak-EWMA latency times (outstanding + 1)."""

    def _h(self, key: K) -> Health:
        h = self.health.get(key)
        if h is None:
            h = self.health[key] = Health()
            if self.latency is not None:
                # Starts at the default, decaying from first sight like any estimate: an
                # endpoint never chosen becomes the cheapest before long.
                h.rtt = self.latency.default_rtt
                h.rtt_at = self.clock()
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

        latency = self.latency
        now = self.clock() if latency is not None else 0.0

        def load(k: K) -> float:
            h = self.health.get(k) if latency is None else self._h(k)
            n: float = (h.outstanding if h else 0) + 1
            if latency is not None:
                n *= self._estimate(h, latency, now) + latency.base
            w = weights(k) if weights else 1.0
            return n / w if w > 0 else float("inf")

        la, lb = load(a), load(b)
        if latency is not None and la < float("inf") and lb < float("inf"):
            # Between the two, a pick weighted by the other's cost squared rather than
            # the cheaper always: with two endpoints P2C always compares the same pair,
            # and a deterministic choice would hand one endpoint every request until a
            # spike on it decays (seconds): equal replicas would split by noise. Squared,
            # so that a clearly slower replica is nearly avoided whatever the base
            # latency: 20 ms slower than a 2.5 ms path (gRPC across nodes) gets ~1 %
            # (linear weights would give it 10 %); 20x slower gets 1/401.
            la2, lb2 = la * la, lb * lb
            return a if self.rng.random() * (la2 + lb2) < lb2 else b
        return a if la <= lb else b

    @staticmethod
    def _estimate(h: Health | None, latency: PeakEwma, now: float) -> float:
        """The estimate decayed to ``now`` (towards zero: no observation since)."""
        if h is None or h.rtt is None:
            return latency.default_rtt  # not reached: `_h` starts every estimate
        if h.outstanding:
            return max(h.rtt, _MIN_RTT)  # in flight: no news is not good news yet
        elapsed = max(0.0, now - h.rtt_at)
        return max(h.rtt * math.exp(-elapsed / latency.decay), _MIN_RTT)

    def observed(self, key: K, seconds: float) -> None:
        latency = self.latency
        if latency is None:
            return
        h = self._h(key)
        now = self.clock()
        h.requests += 1
        if h.rtt is None or seconds >= h.rtt:
            h.rtt = seconds  # a peak: believed at once (a lower one only with time)
        else:
            w = min(math.exp(-max(0.0, now - h.rtt_at) / latency.decay), 1.0 - latency.min_weight)
            h.rtt = h.rtt * w + seconds * (1.0 - w)
        h.rtt_at = now

    def started(self, key: K) -> None:
        self._h(key).outstanding += 1

    def finished(self, key: K) -> None:
        h = self.health.get(key)
        if h is not None and h.outstanding > 0:
            h.outstanding -= 1

    def succeeded(self, key: K) -> None:
        h = self._h(key)
        if h.for_responses:
            h.consecutive_failures = 0  # connecting works; the response will tell the rest
            return
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

    def responded(self, key: K, ok: bool, policy: AccrualPolicy, *, probe: bool = False) -> bool:
        """A response from ``key``: ``ok``, or a failure (5xx, a gRPC error, a timeout,
        a reset). ``policy.max_failures`` failures in a row eject it for a jittered,
        doubling penalty; on probation the one probe's response decides. True if this
        ejected it."""
        h = self._h(key)
        if ok:
            h.failed_responses = 0
            if h.for_responses:
                log.info("endpoint %s recovered: the probe request succeeded", key)
                h.for_responses = False
                h.ejections_in_a_row = 0
                h.ejected_until = None
                h.probing = False
            return False
        h.failed_responses += 1
        probe = probe and h.ejected_until is not None
        if not probe and (h.ejected_until is not None or h.failed_responses < policy.max_failures):
            return False
        doubling = 2 ** min(h.ejections_in_a_row, 32)
        penalty = min(policy.max_penalty, policy.min_penalty * doubling)
        penalty *= 1.0 - policy.jitter * self.rng.random()
        h.ejections_in_a_row += 1
        h.ejections += 1
        h.ejected_until = self.clock() + penalty
        h.for_responses = True
        h.probing = False
        log.warning(
            "endpoint %s ejected for %.1f s after %d failed response(s) in a row%s",
            key, penalty, h.failed_responses, " (the probe failed)" if probe else "",
        )  # fmt: skip
        return True

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
