"""The benchmark's summary (weft.bench.mesh): errors are results, not noise to be
averaged away; the HAProxy sidecar configuration says what the docs say it does."""

from __future__ import annotations

from pathlib import Path

from weft.bench.mesh import SIDECAR_IN, SIDECAR_OUT, Profile, _median, _ratios, sidecar_config

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
    assert m == {"per_second": 305.0, "p50_us": 2950.0}


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
