"""The benchmark's summary (weft.bench.mesh): errors are results, not noise to be
averaged away; the HAProxy sidecar configuration says what the docs say it does."""

from __future__ import annotations

from pathlib import Path

from weft.bench.mesh import (
    SETUPS as BENCH_SETUPS,
)
from weft.bench.mesh import (
    SIDECAR_IN,
    SIDECAR_OUT,
    Profile,
    _charge_cpu,
    _median,
    _ratios,
    per_round_ratios,
    rotation,
    sidecar_config,
)

SETUPS = ("direct", "weft", "weft-same-node", "haproxy-sidecars")


def _rate(p50: float, p99: float, errors: int = 0, count: int = 10_000) -> dict:
    return {"count": count, "errors": errors, "per_second": 1000.0, "p50_us": p50,
            "p90_us": p50, "p99_us": p99, "p999_us": p99, "max_us": p99}  # fmt: skip


def test_errors_are_summed_across_rounds_not_medianed():
    rounds = [_rate(400, 600), _rate(400, 600, errors=500), _rate(410, 610)]
    m = _median(rounds)
    assert m["errors"] == 500  # a median would have said 0
    assert m["requests"] == 30_000
    assert m["valid"] is False  # 1.7 % > 0.1 %
    assert m["p50_us"] == 400  # the figures themselves are medians


def test_a_few_errors_keep_a_scenario_valid():
    m = _median([_rate(400, 600, errors=5), _rate(400, 600), _rate(400, 600)])
    assert m["valid"] is True and m["errors"] == 5


def test_closed_loop_samples_without_error_counts_stay_as_they_were():
    m = _median([{"per_second": 300.0, "p50_us": 3000.0}, {"per_second": 310.0, "p50_us": 2900.0}])
    assert m == {
        "per_second": 305.0, "per_second_min": 300.0, "per_second_max": 310.0,
        "p50_us": 2950.0, "p50_us_min": 2900.0, "p50_us_max": 3000.0,
    }  # fmt: skip


def test_p999_only_from_rounds_with_enough_samples():
    assert _median([_rate(400, 600, count=9_999)])["p999_us"] is None
    m = _median([_rate(400, 600, count=5_000), {**_rate(400, 600, count=20_000), "p999_us": 900}])
    assert m["p999_us"] == 900  # the small round does not count


def test_every_setup_runs_first_once_per_scenario_over_as_many_rounds():
    full = [s for s in BENCH_SETUPS if not s.only]
    firsts = [rotation(BENCH_SETUPS, "saturate", r)[0].name for r in range(len(full))]
    assert sorted(firsts) == sorted(s.name for s in full)
    # A setup limited to some scenarios only runs there.
    assert all(s.name != "haproxy-resumption" for s in rotation(BENCH_SETUPS, "bulk", 0))
    assert "haproxy-resumption" in {s.name for s in rotation(BENCH_SETUPS, "conn", 0)}


def test_ratios_are_computed_within_rounds_and_errored_rounds_give_none():
    weft = [{"per_second": 100.0, "errors": 0}, {"per_second": 90.0, "errors": 0},
            {"per_second": 80.0, "errors": 3}]  # fmt: skip
    haproxy = [{"per_second": 100.0, "errors": 0}, {"per_second": 60.0, "errors": 0},
               {"per_second": 80.0, "errors": 0}]  # fmt: skip
    r = per_round_ratios({"weft": {"saturate": weft}, "haproxy-sidecars": {"saturate": haproxy}})
    got = r["weft_over_haproxy_sidecars"]["saturate"]
    assert got["per_round"] == [1.0, 1.5]  # round 3 had errors
    assert (got["median"], got["min"], got["max"]) == (1.25, 1.0, 1.5)


def test_cpu_is_charged_per_request_and_per_mb():
    res = {"mode": "rate", "count": 4000}
    _charge_cpu(res, 0.2, True)
    assert res["cpu_us_per_request"] == 50.0
    bulk = {"mode": "bulk", "mb_per_second": 500.0, "seconds": 2.0}
    _charge_cpu(bulk, 1.0, True)
    assert bulk["cpu_ms_per_mb"] == 1.0
    direct = {"mode": "rate", "count": 10}
    _charge_cpu(direct, 0.0, False)
    assert "cpu_us_per_request" not in direct


def _summary(weft_errors: int = 0) -> dict:
    by = {
        "rate-1000": _rate(400, 600),
        "saturate": {**_rate(900, 2000), "per_second": 10_000.0},
        "conn": {"per_second": 300.0, "p50_us": 3000.0},
        "bulk": {"mb_per_second": 500.0},
    }
    summary = {s: {k: _median([v]) for k, v in by.items()} for s in SETUPS}
    summary["direct"]["rate-1000"] = _median([_rate(200, 300)])
    summary["weft"]["rate-1000"] = _median([_rate(450, 900, errors=weft_errors)])
    return summary


def _result(summary: dict) -> dict:
    memory = {"weft_agent": {"100": {"pss": 45.0}}, "haproxy": {"100": {"pss": 850.0}}}
    return {"summary": summary, "memory": memory}


PROFILE = Profile(rates=(1000,), seconds=1.0, rounds=1, memory_pods=(100,))


def test_ratios_and_targets_from_valid_figures():
    ratios, targets = _ratios(_result(_summary()), PROFILE)
    assert ratios["weft_added_latency_us"]["rate-1000"]["p99"] == 600.0
    assert targets["added_p99_ms_at_1000rps_cross_node"]["measured"] == 0.6
    assert ratios["weft_over_haproxy_sidecars"]["saturate"]["throughput"] == 1.0
    assert targets["agent_memory_vs_sidecars"]["measured"] == round(45 / 850, 3)


def test_an_invalid_scenario_gets_no_ratio_and_no_target():
    ratios, targets = _ratios(_result(_summary(weft_errors=200)), PROFILE)
    assert ratios["weft_over_direct"]["rate-1000"] == {"invalid": True}
    assert ratios["weft_added_latency_us"]["rate-1000"]["p99"] is None
    assert targets["added_p99_ms_at_1000rps_cross_node"]["measured"] is None
    # Other scenarios still get theirs.
    assert ratios["weft_over_direct"]["saturate"]["throughput"] == 1.0


def test_the_sidecar_config_is_tuned_and_resumption_is_off_unless_asked(tmp_path: Path):
    off = sidecar_config(tmp_path, "10.244.2.5")
    on = sidecar_config(tmp_path, "10.244.2.5", resumption=True)
    for cfg in (off, on):
        assert "    tune.bufsize 262144" in cfg.splitlines()
        assert "    tune.ssl.cachesize 1000" in cfg.splitlines()
    assert "no-tls-tickets" in off and "no-ssl-reuse" in off
    assert "no-tls-tickets" not in on and "no-ssl-reuse" not in on


def test_the_sidecar_config_is_one_thread_tls13_with_verified_peers(tmp_path: Path):
    client = sidecar_config(tmp_path, "10.244.2.5")
    server = sidecar_config(tmp_path, None)
    for cfg in (client, server):
        assert "    nbthread 1" in cfg.splitlines()
        assert "ssl-min-ver TLSv1.3" in cfg
        assert f"bind :{SIDECAR_IN} ssl crt {tmp_path}/sidecar.pem" in cfg
        assert cfg.count("verify required") == (2 if cfg is client else 1)
    assert f"bind 127.0.0.1:{SIDECAR_OUT}" in client and "frontend outbound" not in server
    assert "server peer 10.244.2.5:8080 ssl" in client


def test_the_policy_bench_reports_the_median_of_within_round_ratios() -> None:
    """A round's two setups run back to back; across rounds the machine drifts, so the
    ratio is taken within each round, then the median (with the range)."""
    from weft.bench.policy import summarize

    def run(sat: float, fresh: float, p99: float) -> dict:
        return {"saturation": {"per_second": sat, "errors": 0},
                "saturation_unique_paths": {"per_second": fresh, "errors": 0},
                "latency": {"p50_us": 1000.0, "p99_us": p99, "errors": 0}}  # fmt: skip

    # The machine got twice as fast in round 2: per setup medians would mislead.
    runs = {"none": [run(1000, 1000, 2000), run(2000, 2000, 1000), run(1000, 1000, 2000)],
            "with_policies": [run(950, 900, 2000), run(1900, 1800, 1100),
                              run(960, 920, 2100)]}  # fmt: skip
    out = summarize(runs, 500.0)
    assert out["saturation_ratio"] == 0.95 and out["saturation_ratio_range"] == [0.95, 0.96]
    assert out["saturation_unique_paths_ratio"] == 0.9
    assert out["p99_ratio"] == 1.05 and out["p99_ratio_range"] == [1.0, 1.1]
    assert out["with_policies"]["errors"] == 0
