"""The summaries of ``weft bench tracing`` and ``weft bench sidecar``: ratios within each
round, errors summed, span counters read from the agents' metrics, sidecar memory
scaled from a few processes, and the lab layouts the benches rely on."""

from __future__ import annotations

from typing import Any

from weft.bench import openloop
from weft.bench.mesh import per_round_ratios
from weft.bench.sidecar import IDLE_SIDECARS, SETUPS, bench_plan, memory_summary, scale_sidecars
from weft.bench.tracing import (
    DOWN,
    GROUPS,
    OFF,
    RATE_100,
    counters_delta,
    order,
    summarize,
    trace_counters,
    within_round,
)
from weft.lab.sidecar import is_sidecar
from weft.mesh import SIDECAR_TUNNEL_PORT

METRICS = """\
# HELP weft_trace_spans_exported_total Spans the trace collector accepted.
# TYPE weft_trace_spans_exported_total counter
weft_trace_spans_exported_total 6862.0
# TYPE weft_trace_spans_dropped_total counter
weft_trace_spans_dropped_total{reason="queue-full"} 3826.0
weft_trace_spans_dropped_total{reason="export-failed"} 0.0
weft_trace_export_failures_total 10.0
weft_trace_queue_spans 2048.0
weft_outbound_http_requests_total{src_workload="client"} 5.0
"""


def test_trace_counters_are_read_from_the_metrics_text() -> None:
    got = trace_counters(METRICS)
    assert got == {
        "exported": 6862,
        "dropped": {"queue-full": 3826, "export-failed": 0},
        "export_failures": 10,
    }
    # An agent without a collector has no trace series at all: zeros, not an error.
    assert trace_counters("weft_outbound_accepted_total 3.0\n") == {
        "exported": 0, "dropped": {}, "export_failures": 0,
    }  # fmt: skip


def test_counter_deltas_keep_only_reasons_that_moved() -> None:
    before = {"exported": 100, "dropped": {"queue-full": 5}, "export_failures": 1}
    after = {"exported": 150, "dropped": {"queue-full": 5, "export-failed": 7},
             "export_failures": 3}  # fmt: skip
    assert counters_delta(before, after) == {
        "exported": 50, "dropped": {"export-failed": 7}, "export_failures": 2,
    }  # fmt: skip


def test_groups_rotate_and_collector_down_always_follows_100_percent() -> None:
    rounds = [order(r) for r in range(len(GROUPS))]
    assert {rnd[0] for rnd in rounds} == set(GROUPS)  # each group runs first once
    for rnd in rounds:
        flat = [s for g in rnd for s in g]
        assert flat.index(DOWN) == flat.index(RATE_100) + 1
        assert sorted(s.name for s in flat) == sorted(s.name for g in GROUPS for s in g)
    # Setups sharing a group share the agents' flags (no restart between them).
    for group in GROUPS:
        assert len({s.agent_args for s in group}) == 1


def _round(sat: float, p99: float, *, errors: int = 0, exported: int = 0,
           dropped: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "saturation": {"per_second": sat, "errors": errors, "count": 1000,
                       "cpu_us_per_request": 100.0, "collector_cpu_seconds": 0.0},
        "latency": {"p50_us": 500.0, "p99_us": p99, "errors": 0, "count": 1000},
        "spans": {"exported": exported, "dropped": dropped or {}, "export_failures": 0,
                  "requests": 2000},
    }  # fmt: skip


def test_tracing_ratios_are_within_round_medians_and_errors_are_summed() -> None:
    runs = {
        OFF.name: [_round(1000, 2000), _round(2000, 4000), _round(1500, 3000)],
        RATE_100.name: [
            _round(900, 3000, exported=4000),
            _round(1000, 2000, exported=3000, dropped={"queue-full": 1000}),  # a slow round
            _round(1200, 3000, exported=4000, errors=2),  # errors: no ratio this round
        ],
    }
    out = summarize(runs, rate=500.0)
    row = out["setups"][RATE_100.name]
    # 900/1000 and 1000/2000 (not the medians' ratio, 1000/1500 = 0.667)
    assert row["saturation_ratio"]["per_round"] == [0.9, 0.5]
    assert row["saturation_ratio"]["median"] == 0.7
    assert row["saturation_ratio"]["min"] == 0.5 and row["saturation_ratio"]["max"] == 0.9
    assert row["p99_ratio"]["per_round"] == [1.5, 0.5, 1.0]  # latency had no errors
    assert row["errors"] == 2
    assert row["spans_exported"] == 11000
    assert row["spans_dropped"] == {"queue-full": 1000}
    assert row["spans_per_request"] == 2.0  # (11,000 + 1,000) / 6,000
    assert row["saturation_per_second"]["median"] == 1000.0
    assert "saturation_ratio" not in out["setups"][OFF.name]  # the base has none


def test_within_round_needs_a_round_without_errors() -> None:
    mine = [_round(100, 1, errors=1)]
    base = [_round(100, 1)]
    assert within_round(mine, base, "saturation", "per_second") is None


def test_the_sampled_traceparent_load_gives_each_request_a_trace_of_its_own(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(openloop, "TRACEPARENT", True)
    monkeypatch.setattr(openloop, "UNIQUE_PATHS", False)
    a, b = openloop._request_bytes(), openloop._request_bytes()
    assert a != b
    for req in (a, b):
        head = req.decode()
        assert head.endswith("\r\n\r\n") and head.startswith("GET /bench HTTP/1.1\r\n")
        tp = next(h for h in head.split("\r\n") if h.startswith("traceparent: "))
        version, trace, parent, flags = tp.removeprefix("traceparent: ").split("-")
        assert (version, len(trace), len(parent), flags) == ("00", 32, 16, "01")
        assert int(trace, 16) != 0  # the all-zero trace id is invalid


def test_sidecar_memory_is_scaled_from_the_median_and_shared_pages_count_once() -> None:
    mib = 2**20
    each = [
        {"rss": 40 * mib, "pss": 30 * mib, "uss": 25 * mib},
        {"rss": 42 * mib, "pss": 31 * mib, "uss": 26 * mib},
        {"rss": 60 * mib, "pss": 50 * mib, "uss": 45 * mib},  # an outlier: the median holds
    ]
    got = scale_sidecars(each, pods=100)
    assert got["pss"] == 100 * 31 * mib
    assert got["uss_plus_shared"] == 100 * 26 * mib + 15 * mib  # RSS - USS medians 15 MiB
    assert got["measured"] == 3
    node_mode = {
        "weft_agent": {"100": {"pss": 36 * mib}},
        "bpf_map_memlock": {"100": 6 * mib},
        "haproxy": {"100": {"pss": 420 * mib}},
    }
    m = memory_summary(got, node_mode, pods=100)
    assert m["weft_agent"] == 42 * mib  # PSS + its eBPF maps
    assert m["weft_sidecars_over_agent"] == round(3100 / 42, 2)
    assert m["haproxy_over_agent"] == 10.0
    assert m["agent_over_haproxy"]["measured"] == 0.1
    assert "weft_agent" not in memory_summary(got, None)  # without the memory lab


def test_sidecar_bench_ratio_pairs_use_their_own_setups() -> None:
    def sat(v: float, errors: int = 0) -> dict[str, Any]:
        return {"per_second": v, "errors": errors}

    samples = {
        "weft-sidecar": {"saturate": [sat(900), sat(1000)], "conn": [sat(300), sat(1, 1)]},
        "weft-node": {"saturate": [sat(1000), sat(1000)], "conn": [sat(200), sat(200)]},
    }
    got = per_round_ratios(samples, (("weft-sidecar", "weft-node"),))
    assert list(got) == ["weft_sidecar_over_weft_node"]
    r = got["weft_sidecar_over_weft_node"]
    assert r["saturate"]["per_round"] == [0.9, 1.0]
    assert r["conn"]["per_round"] == [1.5]  # the errored round gives none


def test_sidecar_bench_plan_fits_the_lab() -> None:
    plan = bench_plan("wside")
    pods = {p.name: p for p in plan.pods}
    for s in SETUPS:
        assert pods[s.client].node == "node-1" and pods[s.server].node == "node-2", s
    sidecars = [p for p in plan.pods if is_sidecar(p)]
    assert {p.name for p in sidecars} >= {"sb-c-side", "sb-s-side"}
    assert len(sidecars) == 2 + IDLE_SIDECARS
    # A sidecar bootstraps with its node's token: at most 4 discovery streams per node,
    # the agent's among them.
    for node in plan.nodes:
        assert sum(1 for p in sidecars if p.node == node.name) <= 3
    # The idle ones each have an identity of their own (a certificate each, as pods do).
    idle = [p for p in sidecars if p.name.startswith("sb-idle-")]
    assert len({p.service_account for p in idle}) == len(idle)
    assert all(SIDECAR_TUNNEL_PORT in p.ports for p in sidecars)
    assert not any(is_sidecar(pods[s.client]) for s in SETUPS if s.name != "weft-sidecar")
