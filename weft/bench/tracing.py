"""What tracing costs on the data path (``weft bench tracing``; issue #14).

A two-node demo lab with the lab's OTLP receiver (``weft lab up --traces``); client-1
(node-1) sends HTTP/1.1 to echo-2 (node-2) through both node proxies, so every sampled
request gives two spans: CLIENT on node-1, SERVER on node-2. Setups:

* **off** — a collector configured, sample rate 0, requests without trace context:
  nothing is traced (what a cluster with tracing set up pays for requests nobody samples);
* **1 %** and **100 %** — the agents' rate 0.01 and 1.0, requests without trace context,
  so the rate decides;
* **traceparent** — rate 0, every request carrying a *sampled* ``traceparent`` of its own
  (an app that traces everything): the caller decides, every hop records;
* **collector down** — 100 %, with the receiver stopped (``weft lab stop otlp``): every
  span is dropped and counted, requests must not notice;
* **no collector** — no ``--trace-collector`` at all: tracing entirely off (trace headers
  pass untouched), the floor under "off".

The sample rate is an agent flag, so a setup change restarts both agents
(`Lab.restart_agent`, make-before-break, the flags appended after the lab's own: the
last ``--trace-sample-rate`` wins). Setups that share agent flags run back to back
(off then traceparent; 100 % then collector down), and the groups' order rotates by one
per round, so each group runs first once every three or four rounds; every group starts
on freshly started agents (a fresh exporter, no backoff left from a dead collector).
Ratios are computed within each round against that round's "off" and summarised as
median (min-max).

Per setup and round: saturation (closed loop, `weft.bench.openloop` ``saturate``),
latency at a fixed rate (open loop, ``rate``: p50/p99 without coordinated omission), the
agents' CPU per saturated request, the receiver's CPU, and the spans both agents
exported and dropped (``weft_trace_spans_*`` on their ``/metrics``) over the two loads.

The receiver runs on this machine too: at 100 % it decodes every span on the same two
vCPUs as the proxies and the load, which a cluster's collector would not; its CPU is
reported beside the figures so the reader can see what share of the cost is its.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from weft.bench.mesh import (
    IdentitySetup,
    _charge_cpu,
    _cpu_seconds,
    _json_in_pod,
    _pids,
    _wait_reachable,
)
from weft.bench.mesh import Setup as MeshSetup
from weft.lab.lab import OTLP_PROCESS, Lab, LabError, admin_get
from weft.lab.plan import ECHO_PORT

LAB = "wtrace"
CLIENT = "client-1"
SERVER = "echo-2"
AGENTS = ("agent-node-1", "agent-node-2")
FLUSH_SECONDS = 2.5
"""Wait after the loads before reading the span counters: the exporter sends a batch at
most ``WEFT_TRACE_INTERVAL`` (1 s) after its first span, and the receiver has to answer."""


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    agent_args: tuple[str, ...]
    """``weft agent`` flags after the lab's own (the last of a repeated flag wins)."""
    traceparent: bool = False
    """Every request carries a sampled ``traceparent`` (`weft.bench.openloop`)."""
    collector_up: bool = True


OFF = Setup("off", "off (rate 0)", ("--trace-sample-rate", "0"))
TRACEPARENT = Setup(
    "traceparent", "sampled traceparent (rate 0)", ("--trace-sample-rate", "0"), traceparent=True
)
RATE_1 = Setup("rate_1pct", "1 % sampled", ("--trace-sample-rate", "0.01"))
RATE_100 = Setup("rate_100pct", "100 % sampled", ("--trace-sample-rate", "1"))
DOWN = Setup(
    "collector_down", "100 %, collector down", ("--trace-sample-rate", "1"), collector_up=False
)
NO_COLLECTOR = Setup("no_collector", "no collector", ("--trace-collector", ""))

GROUPS: tuple[tuple[Setup, ...], ...] = (
    (OFF, TRACEPARENT),
    (RATE_1,),
    (RATE_100, DOWN),
    (NO_COLLECTOR,),
)
"""Setups that share the agents' flags, run back to back on the same agents."""
SETUPS = tuple(s for group in GROUPS for s in group)


def order(rnd: int, groups: Sequence[tuple[Setup, ...]] = GROUPS) -> list[tuple[Setup, ...]]:
    """Round ``rnd``'s groups, rotated by one per round; each group's setups keep their
    order (the collector-down run needs the 100 % agents before it)."""
    k = rnd % len(groups)
    return [*groups[k:], *groups[:k]]


_SAMPLE = re.compile(r'^(weft_trace_\w+?)(?:\{reason="([^"]*)"\})?\s+([0-9.eE+-]+)$')


def trace_counters(metrics: str) -> dict[str, Any]:
    """The exporter's counters from an agent's ``/metrics`` text: spans exported,
    dropped by reason, failed export requests (zeros when tracing is off: no series)."""
    out: dict[str, Any] = {"exported": 0, "dropped": {}, "export_failures": 0}
    for line in metrics.splitlines():
        m = _SAMPLE.match(line.strip())
        if m is None:
            continue
        name, reason, value = m.group(1), m.group(2), int(float(m.group(3)))
        if name == "weft_trace_spans_exported_total":
            out["exported"] = value
        elif name == "weft_trace_spans_dropped_total" and reason is not None:
            out["dropped"][reason] = value
        elif name == "weft_trace_export_failures_total":
            out["export_failures"] = value
    return out


def counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    reasons = set(before["dropped"]) | set(after["dropped"])
    return {
        "exported": after["exported"] - before["exported"],
        "dropped": {
            r: after["dropped"].get(r, 0) - before["dropped"].get(r, 0)
            for r in sorted(reasons)
            if after["dropped"].get(r, 0) - before["dropped"].get(r, 0)
        },
        "export_failures": after["export_failures"] - before["export_failures"],
    }


def _agents_counters(lab: Lab) -> dict[str, Any]:
    """Both agents' counters, summed."""
    state = lab.load()
    total: dict[str, Any] = {"exported": 0, "dropped": {}, "export_failures": 0}
    for node in state.plan.nodes:
        answer = admin_get(state.plan.netns(node.name), "127.0.0.1", 15020, "/metrics")
        if answer is None or answer[0] != 200:
            raise LabError(f"the agent of {node.name} did not answer /metrics: {answer}")
        got = trace_counters(answer[1])
        total["exported"] += got["exported"]
        total["export_failures"] += got["export_failures"]
        for r, n in got["dropped"].items():
            total["dropped"][r] = total["dropped"].get(r, 0) + n
    return total


def _otlp_running(lab: Lab) -> bool:
    return bool(_pids(lab, (OTLP_PROCESS,)))


def _fresh_agents(lab: Lab, setup: Setup, report: Callable[[str], None]) -> None:
    """The receiver up, then both agents restarted with ``setup``'s flags: a group
    starts on new agents, with an exporter that has no backoff left from a dead
    collector."""
    if not _otlp_running(lab):
        lab.start_process(OTLP_PROCESS)
    started = time.monotonic()
    for node in ("node-1", "node-2"):
        lab.restart_agent(node, setup.agent_args)
    report(f"agents restarted with {' '.join(setup.agent_args)!r} "
           f"in {time.monotonic() - started:.1f}s")  # fmt: skip


def _measure(
    lab: Lab, ip: str, setup: Setup, seconds: float, rate: float, conns: int
) -> dict[str, Any]:
    def openloop(*args: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "weft.bench.openloop", *args]
        if setup.traceparent:
            argv = ["env", "WEFT_BENCH_TRACEPARENT=1", *argv]
        return _json_in_pod(lab, CLIENT, argv, timeout=seconds * 4 + 60)

    spans_before = _agents_counters(lab)
    cpu = _cpu_seconds(lab, AGENTS)
    otlp = _cpu_seconds(lab, (OTLP_PROCESS,))
    sat = openloop("saturate", ip, str(ECHO_PORT), str(seconds), str(conns))
    _charge_cpu(sat, _cpu_seconds(lab, AGENTS) - cpu, True)
    sat["collector_cpu_seconds"] = round(_cpu_seconds(lab, (OTLP_PROCESS,)) - otlp, 3)
    lat = openloop("rate", ip, str(ECHO_PORT), str(rate), str(seconds), str(conns))
    time.sleep(FLUSH_SECONDS)
    spans = counters_delta(spans_before, _agents_counters(lab))
    spans["requests"] = sat["count"] + lat["count"]
    return {"saturation": sat, "latency": lat, "spans": spans}


def run(
    identity_setup: IdentitySetup,
    rounds: int = 3,
    seconds: float = 6.0,
    rate: float = 500.0,
    connections: int = 16,
    profile_seconds: float = 0.0,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All setups, ``rounds`` times; with ``profile_seconds``, py-spy on both agents
    under saturation at 100 % sampled and at "off" afterwards (`weft.bench.profile`)."""
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"bringing up a two-node lab {LAB!r} with the echo demo and the OTLP receiver")
    lab.up(nodes=2, demo=True, replace=True, traces=True, trace_sample_rate=0.0)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in SETUPS}
    profiles: dict[str, Any] = {}
    started = time.monotonic()
    try:
        ip = lab.load().pod(SERVER).ip
        _wait_reachable(lab, MeshSetup("tracing", CLIENT, SERVER), ip)
        for r in range(rounds):
            for group in order(r):
                _fresh_agents(lab, group[0], report)
                for setup in group:
                    if not setup.collector_up:
                        lab.stop_process(OTLP_PROCESS)
                    got = _measure(lab, ip, setup, seconds, rate, connections)
                    runs[setup.name].append(got)
                    report(f"round {r + 1}/{rounds} {setup.name:15} {_line(got, rate)}")
        if profile_seconds:
            profiles = _profile(lab, ip, profile_seconds, connections, report)
    finally:
        report(f"removing lab {LAB!r}")
        lab.down()
    out = summarize(runs, rate)
    out["seconds"], out["connections"] = seconds, connections
    out["wall_seconds"] = round(time.monotonic() - started, 1)
    if profiles:
        out["profile"] = profiles
    return out


def _profile(
    lab: Lab,
    ip: str,
    seconds: float,
    connections: int,
    report: Callable[[str], None],
) -> dict[str, Any]:
    import json
    import subprocess

    from weft.bench.profile import spy_on

    out: dict[str, Any] = {"seconds": seconds}
    for setup in (RATE_100, OFF):
        _fresh_agents(lab, setup, report)
        pids = dict(zip(AGENTS, _pids(lab, AGENTS), strict=True))
        argv = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", CLIENT, "--",
                sys.executable, "-m", "weft.bench.openloop", "saturate", ip, str(ECHO_PORT),
                str(seconds + 4), str(connections)]  # fmt: skip
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as client:
            time.sleep(2.0)  # past the client's warm-up
            report(f"py-spy on both agents for {seconds:g}s, {setup.label}, saturated")
            frames = spy_on(pids, seconds)
            load, _ = client.communicate(timeout=seconds + 60)
        out[setup.name] = {"load_per_second": json.loads(load).get("per_second"),
                           "agents": frames}  # fmt: skip
    return out


def _line(got: dict[str, Any], rate: float) -> str:
    s, lt, sp = got["saturation"], got["latency"], got["spans"]
    dropped = sum(sp["dropped"].values())
    return (f"{s['per_second']:6.0f} req/s sat. ({s['errors']} errors, "
            f"{s.get('cpu_us_per_request') or 0:.0f} us CPU/req); at {rate:.0f}/s p50 "
            f"{lt['p50_us']:.0f} us p99 {lt['p99_us']:.0f} us ({lt['errors']} errors); spans "
            f"{sp['exported']} exported, {dropped} dropped")  # fmt: skip


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median and min-max of per-round values (all of them kept)."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "per_round": [round(v, digits) for v in values],
    }


def within_round(
    mine: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], part: str, key: str
) -> dict[str, Any] | None:
    """``mine[part][key] / base[part][key]`` round by round (rounds where either side had
    errors, or the base is zero, give none), summarised; None if no round qualifies."""
    per = [
        a[part][key] / b[part][key]
        for a, b in zip(mine, base, strict=False)
        if b[part].get(key) and not a[part].get("errors") and not b[part].get("errors")
    ]
    return spread(per) if per else None


def summarize(
    runs: dict[str, list[dict[str, Any]]], rate: float, base: str = OFF.name
) -> dict[str, Any]:
    """Per setup: medians with min-max, errors summed (never medianed), spans summed and
    per request; ratios to ``base`` computed within each round."""
    out: dict[str, Any] = {"rate": rate, "base": base, "rounds": runs, "setups": {}}
    for name, rounds in runs.items():
        if not rounds:
            continue

        def figures(part: str, key: str, rounds: list[dict[str, Any]] = rounds) -> list[float]:
            return [float(x[part][key]) for x in rounds if x[part].get(key) is not None]

        spans = [x["spans"] for x in rounds]
        exported = sum(s["exported"] for s in spans)
        dropped: dict[str, int] = {}
        for s in spans:
            for reason, n in s["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        requests = sum(s.get("requests", 0) for s in spans)
        cpu = figures("saturation", "cpu_us_per_request")
        row: dict[str, Any] = {
            "saturation_per_second": spread(figures("saturation", "per_second"), 1),
            "p50_us": spread(figures("latency", "p50_us"), 1),
            "p99_us": spread(figures("latency", "p99_us"), 1),
            "cpu_us_per_request": spread(cpu, 1) if cpu else None,
            "collector_cpu_seconds": spread(figures("saturation", "collector_cpu_seconds"), 3),
            "errors": sum(x["saturation"]["errors"] + x["latency"]["errors"] for x in rounds),
            "spans_exported": exported,
            "spans_dropped": dropped,
            "export_failures": sum(s["export_failures"] for s in spans),
            "requests": requests,
            "spans_per_request": round((exported + sum(dropped.values())) / requests, 4)
            if requests
            else None,
        }
        if name != base and runs.get(base):
            row["saturation_ratio"] = within_round(rounds, runs[base], "saturation", "per_second")
            row["p50_ratio"] = within_round(rounds, runs[base], "latency", "p50_us")
            row["p99_ratio"] = within_round(rounds, runs[base], "latency", "p99_us")
        out["setups"][name] = row
    return out
