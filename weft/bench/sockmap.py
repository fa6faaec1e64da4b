"""What the sk_msg/sockhash shortcut buys: pod -> node proxy -> local echo, with and without.

One lab, one node, one run: the agent is restarted with and without ``--no-sockmap`` in
alternating rounds (A/B/A/B...) so that drift on a shared machine hits both sides alike,
and the result is reported as ratios of medians.  An uncaptured pod talking straight to
the echo gives the no-mesh reference in the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from weft.lab.lab import Lab, agent_state

SCENARIOS = ("rr", "conn", "bulk")
CONFIGS = ("sockmap", "no-sockmap")


def _loadgen(lab: Lab, pod: str, mode: str, target: str, seconds: float) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--",
        sys.executable, "-m", "weft.bench.loadgen", mode, target, "8080", str(seconds),
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _ebpf_stats(lab: Lab) -> dict[str, int]:
    stats: dict[str, int] = agent_state(lab.name, "node-1")["ebpf"]["stats"]
    return stats


def run(
    seconds: float = 3.0, rounds: int = 3, report: Callable[[str], None] = print
) -> dict[str, Any]:
    lab = Lab("wbench", report=lambda m: None)
    report("bringing up a one-node lab 'wbench' (echo-1, client-1 captured, plain-1 not)")
    lab.up(nodes=1, demo=True, replace=True)
    try:
        state = lab.load()
        echo = state.pod("echo-1").ip
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            c: {s: [] for s in SCENARIOS} for c in (*CONFIGS, "direct")
        }
        shortcut_msgs: dict[str, int] = dict.fromkeys(CONFIGS, 0)
        for r in range(rounds):
            for config in CONFIGS:
                lab.restart_agent("node-1", ["--no-sockmap"] if config == "no-sockmap" else [])
                before = _ebpf_stats(lab)["msg_redirected"]
                for scenario in SCENARIOS:
                    res = _loadgen(lab, "client-1", scenario, echo, seconds)
                    samples[config][scenario].append(res)
                    report(f"round {r + 1}/{rounds} {config:10} {scenario:4} {_fmt(res)}")
                shortcut_msgs[config] += _ebpf_stats(lab)["msg_redirected"] - before
            for scenario in SCENARIOS:
                res = _loadgen(lab, "plain-1", scenario, echo, seconds)
                samples["direct"][scenario].append(res)
                report(f"round {r + 1}/{rounds} {'direct':10} {scenario:4} {_fmt(res)}")
    finally:
        report("removing lab 'wbench'")
        lab.down()
    summary = {c: {s: _median(samples[c][s]) for s in SCENARIOS} for c in samples}
    ratios = {
        s: {
            "rr_p50_latency": _ratio(summary["sockmap"][s], summary["no-sockmap"][s], "p50_us"),
            "per_second": _ratio(summary["sockmap"][s], summary["no-sockmap"][s], "per_second"),
        }
        for s in SCENARIOS
    }
    return {
        "seconds_per_sample": seconds,
        "rounds": rounds,
        "summary": summary,
        "sockmap_over_no_sockmap": ratios,
        "sk_msg_redirects": shortcut_msgs,
        "samples": samples,
    }


def _median(results: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("per_second", "mb_per_second", "p50_us", "p90_us", "p99_us")
    return {k: round(statistics.median(r[k] for r in results), 1) for k in keys}


def _ratio(a: dict[str, float], b: dict[str, float], key: str) -> float | None:
    return round(a[key] / b[key], 3) if b[key] else None


def _fmt(res: dict[str, Any]) -> str:
    return (
        f"{res['per_second']:>8.0f}/s  {res['mb_per_second']:>7.1f} MB/s  "
        f"p50 {res['p50_us']:>7.0f}us  p99 {res['p99_us']:>7.0f}us"
    )
