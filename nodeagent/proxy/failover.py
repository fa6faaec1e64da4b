"""The retry/failover stage: try a connection's endpoints in turn, within limits.

Given the candidates (a service's ready endpoints, from `nodeagent.proxy.resolve`), the
balancer picks one (`Balancer.lease`), the dial stage connects to it, and on a failure
that another endpoint may not repeat (`retryable`) the next pick is tried — never the
same endpoint twice, at most ``attempts`` in all, and only while the `RetryBudget`
allows (retries add at most 20 % of first attempts, plus 10 per second). Each failure
is reported to the balancer (consecutive failures eject the endpoint) and to the
observer (the agent's metrics and log line). A direct address, with no alternative,
gets one attempt and no health tracking.

This is linkerd2-proxy's "endpoint" layer under its "concrete" one, for connections;
per-request retries (the HTTP issue) reuse it with requests in place of connects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from nodeagent.proxy.balance import Balancer, Lease
from nodeagent.proxy.listener import Address
from nodeagent.proxy.retry import RetryBudget, retryable

T = TypeVar("T")


class FailoverObserver(Protocol):
    def failed(
        self, endpoint: Address, error: BaseException, *, retrying: bool, ejected: bool
    ) -> None:
        """An attempt on ``endpoint`` failed with a retryable ``error``."""


@dataclass
class Connected(Generic[T]):
    """What the dial stage returned, and the balancer lease it holds (None for a direct
    address): release it when the connection ends."""

    value: T
    endpoint: Address
    lease: Lease[Address] | None


class Failover:
    def __init__(self, *, attempts: int, budget: RetryBudget, balancer: Balancer[Address]) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.attempts = attempts
        self.budget = budget
        self.balancer = balancer

    async def connect(
        self,
        candidates: Sequence[Address],
        dial: Callable[[Address], Awaitable[T]],
        *,
        balanced: bool,
        observer: FailoverObserver,
        avoid: Sequence[Address] = (),
    ) -> Connected[T]:
        """Dial ``candidates`` as described above; raise the last failure when no attempt
        is left. ``balanced`` is false for a direct address (one candidate, no health
        tracking: tracking every address an app dials would grow without bound).
        ``avoid``: endpoints not to pick while another candidate is left (a request
        sent again after an endpoint refused it)."""
        if not balanced:
            return Connected(await dial(candidates[0]), candidates[0], None)
        self.budget.attempt()
        tried: list[Address] = []
        error: BaseException | None = None
        limit = min(len(candidates), self.attempts)
        while len(tried) < limit:
            lease = self.balancer.lease(candidates, exclude=[*avoid, *tried])
            if lease is None and avoid:
                lease = self.balancer.lease(candidates, exclude=tried)
            if lease is None:
                break
            tried.append(lease.key)
            try:
                value = await dial(lease.key)
            except BaseException as e:
                if not isinstance(e, Exception) or not retryable(e):
                    # Cancelled, or refused for a reason another endpoint would repeat
                    # (policy, identity, this node's own overload): no verdict on this
                    # endpoint's health.
                    lease.abandon()
                    raise
                error = e
                retrying = len(tried) < limit and self.budget.try_retry()
                ejected = lease.fail()
                observer.failed(lease.key, e, retrying=retrying, ejected=ejected)
                if not retrying:
                    break
                continue
            lease.succeed()
            return Connected(value, lease.key, lease)
        assert error is not None
        raise error
