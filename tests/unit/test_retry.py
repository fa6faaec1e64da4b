"""Retry classification and the retry budget (nodeagent.proxy.retry), with fake time."""

from __future__ import annotations

import pytest

from nodeagent.proxy.admission import Overloaded
from nodeagent.proxy.resolve import NoRoute
from nodeagent.proxy.retry import RetryBudget, retryable
from nodeagent.proxy.tunnel import TunnelOverloaded, TunnelRefused, TunnelTimeout
from nodeagent.proxy.tunnel.wire import Status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError(), True),
        (TunnelTimeout("x", "connect"), True),
        (TunnelTimeout("x", "answer"), False),  # the server may have reached the pod
        (TunnelRefused("x", Status.POLICY_DENIED.value), False),
        (NoRoute("strict source"), False),
        (Overloaded("queue full"), False),  # this node's problem, not the endpoint's
        (TunnelOverloaded("queue full"), False),
        (ValueError("bug"), False),
    ],
)
def test_classification(exc: BaseException, expected: bool):
    assert retryable(exc) is expected


def test_a_quiet_service_gets_the_minimum_and_no_more():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, ttl=10, clock=clock)
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]
    assert budget.skipped == 1


def test_retries_are_capped_at_the_ratio_of_first_attempts():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, ttl=10, clock=clock)
    for _ in range(1000):
        budget.attempt()
    granted = sum(budget.try_retry() for _ in range(1000))
    assert granted == 200  # every connection failing still adds only +20 %


def test_the_budget_refills_as_old_attempts_age_out():
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=10, clock=clock)
    assert sum(budget.try_retry() for _ in range(20)) == 10
    clock.now += 5  # half the window later: the retries are still in it
    assert not budget.try_retry()
    clock.now += 6  # now they have aged out
    assert sum(budget.try_retry() for _ in range(20)) == 10
    clock.now += 1000  # a long idle gap clears everything at once
    assert sum(budget.try_retry() for _ in range(20)) == 10
