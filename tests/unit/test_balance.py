"""Endpoint choice and failure accrual (nodeagent.proxy.balance), with fake time.

The clock is a plain attribute the tests move; randomness is a seeded
:class:`random.Random`, so every statistical assertion below sees the same draws on
every run.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nodeagent.proxy.balance import AccrualConfig, Balancer, Pick
from weft.traffic import AccrualPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def balancer(
    clock: FakeClock, threshold: int = 3, base: float = 1.0, top: float = 30.0, seed: int = 7
) -> Balancer[str]:
    return Balancer(
        config=AccrualConfig(threshold=threshold, base_ejection=base, max_ejection=top),
        clock=clock,
        rng=random.Random(seed),
    )


def eject(b: Balancer[str], key: str) -> None:
    """Fail ``key`` until it is ejected."""
    for _ in range(b.config.threshold - 1):
        assert not b.failed(key)
    assert b.failed(key)


def picks(b: Balancer[str], candidates: list[str], n: int, **kw: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        pick = b.choose(candidates, **kw)  # type: ignore[arg-type]
        assert pick is not None
        assert not pick.probation and not pick.panic
        counts[pick.key] += 1
    return counts


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "base", "top"),
    [(0, 1.0, 30.0), (3, 0.0, 30.0), (3, -1.0, 30.0), (3, 31.0, 30.0)],
)
def test_an_impossible_config_is_refused(threshold: int, base: float, top: float) -> None:
    with pytest.raises(ValueError, match="threshold >= 1"):
        AccrualConfig(threshold=threshold, base_ejection=base, max_ejection=top)


def test_base_may_equal_max() -> None:
    assert AccrualConfig(base_ejection=5.0, max_ejection=5.0).max_ejection == 5.0


# -- choice ------------------------------------------------------------------------------


def test_no_candidate_means_no_pick(clock: FakeClock) -> None:
    b = balancer(clock)
    assert b.choose([]) is None
    assert b.choose(["a", "b"], exclude=["b", "a"]) is None
    assert b.health == {}  # choosing alone records nothing


def test_a_single_candidate_is_picked(clock: FakeClock) -> None:
    b = balancer(clock)
    b.started("a")
    assert b.choose(["a"]) == Pick("a")


def test_excluded_endpoints_are_never_picked(clock: FakeClock) -> None:
    b = balancer(clock)
    counts = picks(b, ["a", "b", "c", "d"], 500, exclude=("a", "c", "zz"))
    assert set(counts) == {"b", "d"}
    assert counts["b"] > 150 and counts["d"] > 150  # both used, roughly evenly


def test_p2c_prefers_the_less_loaded_endpoint(clock: FakeClock) -> None:
    b = balancer(clock)
    for key, load in {"a": 0, "b": 1, "c": 2, "d": 3}.items():
        for _ in range(load):
            b.started(key)
    n = 6000
    counts = picks(b, ["a", "b", "c", "d"], n)
    # The lesser of a random pair of four: a wins 3 of the 6 pairs, b 2, c 1, d none.
    assert counts["d"] == 0
    assert counts["a"] > counts["b"] > counts["c"] > 0
    for key, share in {"a": 3 / 6, "b": 2 / 6, "c": 1 / 6}.items():
        assert abs(counts[key] / n - share) < 0.03, (key, counts)


def test_p2c_follows_outstanding_connections(clock: FakeClock) -> None:
    b = balancer(clock)
    for _ in range(5):
        b.started("a")
    assert picks(b, ["a", "b"], 50) == Counter(b=50)
    for _ in range(5):
        b.finished("a")
    b.started("b")
    assert picks(b, ["a", "b"], 50) == Counter(a=50)


def test_finished_never_goes_below_zero_nor_records_unknown_keys(clock: FakeClock) -> None:
    b = balancer(clock)
    b.finished("ghost")
    assert "ghost" not in b.health
    b.started("a")
    b.finished("a")
    b.finished("a")
    assert b.health["a"].outstanding == 0


def test_weights_share_connections_in_proportion(clock: FakeClock) -> None:
    b = balancer(clock)
    weights = {"a": 3.0, "b": 1.0}
    counts: Counter[str] = Counter()
    for _ in range(400):
        pick = b.choose(["a", "b"], weights=weights.__getitem__)
        assert pick is not None
        b.started(pick.key)  # connections stay open: load builds up
        counts[pick.key] += 1
    assert abs(counts["a"] - 300) <= 2 and abs(counts["b"] - 100) <= 2, counts


def test_load_is_outstanding_per_weight(clock: FakeClock) -> None:
    b = balancer(clock)
    for _ in range(3):
        b.started("a")
    weights = {"a": 2.0, "b": 1.0}  # a: (3+1)/2 = 2, b: (0+1)/1 = 1
    assert picks(b, ["a", "b"], 20, weights=weights.__getitem__) == Counter(b=20)
    weights["a"] = 8.0  # a: 4/8 = 0.5
    assert picks(b, ["a", "b"], 20, weights=weights.__getitem__) == Counter(a=20)


def test_a_zero_weight_endpoint_is_not_picked_while_another_has_weight(
    clock: FakeClock,
) -> None:
    b = balancer(clock)
    for _ in range(50):
        b.started("b")
    weights = {"a": 0.0, "b": 1.0}
    assert picks(b, ["a", "b"], 50, weights=weights.__getitem__) == Counter(b=50)


# -- ejection ----------------------------------------------------------------------------


def test_threshold_consecutive_failures_eject(clock: FakeClock) -> None:
    b = balancer(clock, threshold=3)
    assert not b.failed("a")
    assert not b.failed("a")
    assert b.state("a") == "healthy"
    assert b.failed("a")
    assert b.state("a") == "ejected"
    assert b.health["a"].ejected_until == clock.now + 1.0
    assert b.health["a"].failures == 3
    assert b.health["a"].ejections == 1
    # An ejected endpoint is not chosen while another is healthy.
    assert picks(b, ["a", "b"], 50) == Counter(b=50)


def test_a_success_resets_the_failure_count(clock: FakeClock) -> None:
    b = balancer(clock, threshold=3)
    b.failed("a")
    b.failed("a")
    b.succeeded("a")
    assert not b.failed("a")
    assert not b.failed("a")
    assert b.state("a") == "healthy"
    assert b.failed("a")
    assert b.health["a"].failures == 5  # the total is kept


def test_failures_while_ejected_do_not_extend_the_ejection(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    assert b.failed("a")
    until = b.health["a"].ejected_until
    clock.now += 0.5
    # e.g. a connection picked in panic mode, or one started before the ejection.
    assert not b.failed("a")
    assert b.health["a"].ejected_until == until
    assert b.health["a"].ejections == 1


def test_ejection_expires_into_probation_exactly_at_its_deadline(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1, base=2.0)
    b.failed("a")
    clock.now += 1.999
    assert b.state("a") == "ejected"
    assert picks(b, ["a", "b"], 20) == Counter(b=20)
    clock.now += 0.001
    assert b.state("a") == "probation"
    assert b.choose(["a", "b"]) == Pick("a", probation=True)
    assert b.state("a") == "probing"


def test_ejection_doubles_in_a_row_up_to_the_maximum(clock: FakeClock) -> None:
    b = balancer(clock, threshold=2, base=1.0, top=5.0)
    eject(b, "a")
    durations = []
    for _ in range(6):
        h = b.health["a"]
        assert h.ejected_until is not None
        durations.append(h.ejected_until - clock.now)
        clock.now = h.ejected_until
        assert b.choose(["a", "b"]) == Pick("a", probation=True)
        assert b.failed("a")  # one failure on probation is enough
    assert durations == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert b.health["a"].ejections == 7
    assert b.health["a"].ejections_in_a_row == 7


def test_success_on_probation_restores_and_resets_the_backoff(clock: FakeClock) -> None:
    b = balancer(clock, threshold=2, base=1.0, top=60.0)
    eject(b, "a")
    clock.now += 1.0
    assert b.choose(["a"]) == Pick("a", probation=True)
    assert b.failed("a")  # 2 s
    clock.now += 2.0
    assert b.choose(["a"]) == Pick("a", probation=True)
    b.succeeded("a")
    assert b.state("a") == "healthy"
    h = b.health["a"]
    assert (h.ejected_until, h.probing, h.consecutive_failures, h.ejections_in_a_row) == (
        None, False, 0, 0,
    )  # fmt: skip
    # Back in rotation with the others...
    counts = picks(b, ["a", "b"], 200)
    assert counts["a"] > 50 and counts["b"] > 50
    # ...and it takes the full threshold again to eject it, for the base duration.
    assert not b.failed("a")
    assert b.failed("a")
    assert b.health["a"].ejected_until == clock.now + 1.0


def test_failure_on_probation_re_ejects_at_once(clock: FakeClock) -> None:
    b = balancer(clock, threshold=5, base=1.0)
    eject(b, "a")
    clock.now += 1.0
    assert b.choose(["a", "b"]) == Pick("a", probation=True)
    assert b.failed("a")  # one failure, not five
    assert b.state("a") == "ejected"
    assert not b.health["a"].probing
    assert b.health["a"].ejected_until == clock.now + 2.0
    assert picks(b, ["a", "b"], 20) == Counter(b=20)


def test_probation_allows_exactly_one_probe_in_flight(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    b.failed("a")
    clock.now += 1.0
    assert b.choose(["a", "b", "c"]) == Pick("a", probation=True)
    b.started("a")
    # While the probe is in flight, everyone else gets the traffic.
    counts = picks(b, ["a", "b", "c"], 300)
    assert counts["a"] == 0 and counts["b"] > 0 and counts["c"] > 0
    assert b.state("a") == "probing"
    # However long the probe takes: a probing endpoint is not "due" again.
    clock.now += 3600
    assert picks(b, ["a", "b"], 20) == Counter(b=20)


def test_a_lone_endpoint_being_probed_is_only_picked_in_panic(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    b.failed("a")
    clock.now += 1.0
    assert b.choose(["a"]) == Pick("a", probation=True)
    assert b.choose(["a"]) == Pick("a", panic=True)


def test_probation_comes_before_healthy_endpoints(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    b.failed("a")
    b.failed("b")
    clock.now += 1.0
    first = b.choose(["a", "b", "c"])
    second = b.choose(["a", "b", "c"])
    assert first is not None and second is not None
    assert {first.key, second.key} == {"a", "b"}
    assert first.probation and second.probation
    assert b.choose(["a", "b", "c"]) == Pick("c")


def test_an_excluded_endpoint_is_not_probed(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    b.failed("a")
    clock.now += 1.0
    assert b.choose(["a", "b"], exclude=["a"]) == Pick("b")
    assert b.state("a") == "probation"  # still waiting for its probe


def test_panic_mode_when_every_endpoint_is_ejected(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    for key in "abc":
        b.failed(key)
    b.started("a")
    b.started("a")
    counts: Counter[str] = Counter()
    for _ in range(300):
        pick = b.choose(["a", "b", "c"], exclude=["c"])
        assert pick is not None
        assert pick.panic and not pick.probation
        counts[pick.key] += 1
    # Ejections are ignored, load and exclusions are not.
    assert counts == Counter(b=300)
    assert b.state("a") == b.state("b") == "ejected"


def test_panic_mode_spreads_over_all_ejected_endpoints(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    for key in "ab":
        b.failed(key)
    keys: Counter[str] = Counter()
    for _ in range(200):
        pick = b.choose(["a", "b"])
        assert pick is not None and pick.panic
        keys[pick.key] += 1
    assert keys["a"] > 50 and keys["b"] > 50


def test_state_names(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    assert b.state("never-seen") == "healthy"
    b.failed("a")
    assert b.state("a") == "ejected"
    clock.now += 1.0
    assert b.state("a") == "probation"
    b.choose(["a"])
    assert b.state("a") == "probing"
    b.succeeded("a")
    assert b.state("a") == "healthy"


def test_a_long_dead_endpoint_keeps_being_ejected_for_max(clock: FakeClock) -> None:
    # With the defaults, 1024 ejections in a row is about 8.5 hours of a dead endpoint.
    b = balancer(clock, threshold=1, base=1.0, top=30.0)
    b.failed("a")
    for i in range(1, 1100):
        h = b.health["a"]
        assert h.ejected_until is not None
        clock.now = h.ejected_until
        assert b.choose(["a"]) == Pick("a", probation=True)
        assert b.failed("a")
        assert h.ejected_until == clock.now + (30.0 if i >= 5 else 2.0**i)
    assert b.health["a"].ejections == 1100


# -- retain ------------------------------------------------------------------------------


def test_retain_forgets_endpoints_gone_from_discovery(clock: FakeClock) -> None:
    b = balancer(clock, threshold=1)
    b.failed("gone")
    b.failed("kept")
    b.started("busy")
    b.failed("busy")
    b.retain(["kept", "new"])
    assert set(b.health) == {"kept", "busy"}  # busy still has a connection
    assert b.state("gone") == "healthy"  # its ejection is forgotten
    assert b.state("kept") == "ejected"
    assert "new" not in b.health  # nothing recorded for keys never used
    b.finished("busy")
    b.retain(["kept"])
    assert set(b.health) == {"kept"}


def test_retain_accepts_a_generator(clock: FakeClock) -> None:
    b = balancer(clock)
    b.failed("a")
    b.failed("b")
    b.retain(k for k in ["a"])
    assert set(b.health) == {"a"}


def test_a_spike_is_believed_at_once_and_undone_by_a_few_fast_responses(clock: FakeClock) -> None:
    from nodeagent.proxy.balance import PeakEwma

    b: Balancer[str] = Balancer(latency=PeakEwma(), clock=clock, rng=random.Random(1))
    for _ in range(10):
        clock.now += 0.001
        b.observed("a", 0.001)
    clock.now += 0.001
    b.observed("a", 0.015)  # one slow response (a GC pause, a noisy neighbour)
    assert b.health["a"].rtt == pytest.approx(0.015)
    for _ in range(16):  # responses every millisecond: time-based weights alone would
        clock.now += 0.001  # keep ~99.8 % of the spike per response
        b.observed("a", 0.001)
    assert (b.health["a"].rtt or 1.0) < 0.003


def test_between_a_pair_a_much_slower_endpoint_is_nearly_avoided(clock: FakeClock) -> None:
    from nodeagent.proxy.balance import PeakEwma

    b: Balancer[str] = Balancer(latency=PeakEwma(), clock=clock, rng=random.Random(3))
    b.observed("fast", 0.002)
    b.observed("slow", 0.022)
    picks = Counter(b.choose(["fast", "slow"]).key for _ in range(10_000))  # type: ignore[union-attr]
    assert picks["slow"] < 0.02 * 10_000  # squared weights: (2/22)^2 ~ 0.8 %
    assert picks["slow"] > 0  # but not never: its estimate must be able to recover


# --- request-level failure accrual (`Balancer.responded`) ----------------------------------

ACCRUAL = AccrualPolicy(max_failures=3, min_penalty=1.0, max_penalty=8.0, jitter=0.0)


def _fail(b: Balancer[str], key: str, n: int, *, probe: bool = False) -> list[bool]:
    return [b.responded(key, False, ACCRUAL, probe=probe) for _ in range(n)]


def test_consecutive_failed_responses_eject_and_a_success_resets_the_count(clock):
    b = balancer(clock)
    assert _fail(b, "a", 2) == [False, False]
    assert not b.responded("a", True, ACCRUAL)
    assert _fail(b, "a", 2) == [False, False]  # counting again from zero
    assert b.responded("a", False, ACCRUAL)
    assert b.state("a") == "ejected"
    assert {b.choose(["a", "b"]).key for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    # Failures of requests that were in flight when it was ejected change nothing.
    assert _fail(b, "a", 5) == [False] * 5


def test_the_probe_request_decides_not_its_connect(clock):
    b = balancer(clock)
    _fail(b, "a", 3)
    clock.now += 1.0
    pick = b.choose(["a", "b"])
    assert pick is not None and pick.key == "a" and pick.probation
    b.succeeded("a")  # the probe's connect worked: not enough to recover
    assert b.state("a") == "probing"
    assert b.choose(["a", "b"]).key == "b"  # type: ignore[union-attr]  # one probe at a time
    assert b.responded("a", False, ACCRUAL, probe=True)  # the probe failed: out again,
    assert b.health["a"].ejected_until == pytest.approx(clock.now + 2.0)  # for twice as long
    clock.now += 2.0
    assert b.choose(["a", "b"]).probation  # type: ignore[union-attr]
    assert not b.responded("a", True, ACCRUAL, probe=True)
    assert b.state("a") == "healthy"
    _fail(b, "a", 3)  # the backoff starts over after a recovery
    assert b.health["a"].ejected_until == pytest.approx(clock.now + 1.0)


def test_the_penalty_is_capped_and_jittered(clock):
    b = balancer(clock)
    jittered = AccrualPolicy(max_failures=1, min_penalty=1.0, max_penalty=8.0, jitter=0.5)
    penalties = []
    for _ in range(8):
        assert b.responded("a", False, jittered, probe=b.state("a") != "healthy")
        until = b.health["a"].ejected_until
        assert until is not None
        penalties.append(until - clock.now)
        clock.now += 10.0
        assert b.choose(["a"]).probation  # type: ignore[union-attr]
    assert all(0.5 <= p <= 8.0 for p in penalties), penalties
    assert penalties[-1] >= 4.0  # capped at 8, less at most half of it
