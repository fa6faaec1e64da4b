"""`weft bench workers`' summary: medians per setup, within-round ratios, per-core rate."""

from __future__ import annotations

from weft.bench.workers import summarize


def _run(rate: float, us: float) -> dict:
    return {"per_second": rate, "errors": 0, "proxy_cpu_cores": rate * us / 1e6,
            "proxy_cpu_us_per_request": us}  # fmt: skip


def test_ratios_are_within_rounds_and_per_core_follows_cpu_per_request():
    runs = {1: [_run(4000, 100), _run(2000, 100), _run(3000, 110)],
            2: [_run(6000, 105), _run(2600, 100), _run(4500, 100)]}  # fmt: skip
    out = summarize(runs, {}, {1: 5.0, 2: 7.5}, rounds=3)
    assert out["saturation_ratio"] == 1.5  # 1.5, 1.3, 1.5: the median of the rounds' ratios
    assert out["saturation_ratio_range"] == [1.3, 1.5]
    assert out["setups"]["1"]["per_second"] == 3000
    assert out["per_core_requests_per_second"] == {"1": 10000, "2": 10000}  # medians: 100 us
    assert out["setups"]["2"]["metrics_scrape_ms"] == 7.5
