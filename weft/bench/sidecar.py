"""Weft's node mode against Weft's own sidecar mode, beside HAProxy sidecars
(``weft bench sidecar``; issue #16 item 5).

The question sidecar mode raises is what it costs to run the node proxy's stages once
per pod instead of once per node. One two-node lab, one pod pair per setup (client on
node-1, echo server on node-2), measured in the same run, rotated round by round
(`weft.bench.mesh.rotation`):

* ``weft-node`` — both pods captured by their nodes' agents (eBPF redirect, the node
  agents' pooled mTLS tunnel);
* ``weft-sidecar`` — both pods in sidecar mode (``weft lab up --sidecar POD``: nftables
  capture in the pod, ``weft sidecar run`` as uid 1337 in each pod, the tunnel to the
  server pod's own address);
* ``haproxy-sidecars`` / ``haproxy-http`` — the HAProxy pairs of ``weft bench``
  (`weft.bench.mesh.start_sidecar`: TLS 1.3 with client certificates, ``mode tcp`` and
  ``mode http``).

Scenarios (the full bench's loads): latency at a fixed rate (open loop), saturation
(closed loop), new connections (connect + request + close); the proxies' CPU per
request (both agents, both Weft sidecars, both HAProxy sidecars) during their own runs.

Memory per 100 pods: node mode is one agent per node, measured with 100 captured pods
(the full bench's memory step, `weft.bench.mesh._memory`, which also measures one
HAProxy sidecar per pod, all 100 of them). Sidecar mode is one ``weft sidecar`` per pod:
a Python process of tens of MiB each, so rather than start 100 on two vCPUs the lab
runs a few idle ones (each with its own identity and certificate) beside the measured
pairs and scales: 100 x the median PSS (the basis of the HAProxy figure), and, as the
lower bound, 100 x the private memory (USS) plus one process's shared pages once —
with 100 of them the interpreter's shared pages would be split 100 ways.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weft.bench.mesh import (
    CAPTURED,
    FULL,
    IdentitySetup,
    Setup,
    SidecarPki,
    _charge_cpu,
    _cpu_seconds,
    _fmt,
    _json_in_pod,
    _median,
    _memory,
    _memory_target,
    _pair,
    _pods,
    _rss,
    _wait_reachable,
    bpf_map_memlock,
    machine_info,
    per_round_ratios,
    rotation,
    start_sidecar,
)
from weft.lab import procs
from weft.lab.lab import Lab
from weft.lab.plan import ECHO_PORT, LabPlan, node_plan
from weft.lab.sidecar import process_name, with_sidecars

LAB = "wside"
IDLE_SIDECARS = 4
"""Idle sidecar-mode pods (own identities) whose memory is scaled to 100 pods, half on
each node: in the lab a sidecar bootstraps with its node's token, so it holds one of the
control plane's discovery streams *of that node* (at most 4 per node: the agent, the
measured pair's sidecar and two idle ones)."""
PODS = 100


def _sidecar(pod: str) -> str:
    return f"{pod}/weft-sidecar"


SETUPS = (
    Setup("weft-node", "sb-c-node", "sb-s-node", ("agent-node-1", "agent-node-2")),
    Setup("weft-sidecar", "sb-c-side", "sb-s-side", (_sidecar("sb-c-side"), _sidecar("sb-s-side"))),
    Setup("haproxy-sidecars", "sb-c-ha", "sb-s-ha", _pair("sb-c-ha", "sb-s-ha")),
    Setup("haproxy-http", "sb-c-hh", "sb-s-hh", _pair("sb-c-hh", "sb-s-hh")),
)
HAPROXY_PAIRS = (("sb-s-ha", "sb-c-ha", "tcp"), ("sb-s-hh", "sb-c-hh", "http"))
"""(server pod, client pod, mode) of each HAProxy sidecar pair."""
RATIO_PAIRS = (
    ("weft-sidecar", "weft-node"),
    ("weft-sidecar", "haproxy-http"),
    ("weft-sidecar", "haproxy-sidecars"),
    ("weft-node", "haproxy-http"),
    ("weft-node", "haproxy-sidecars"),
)


def idle_pods(n: int) -> list[str]:
    return [f"sb-idle-{i}" for i in range(1, n + 1)]


def bench_plan(name: str, idle: int = IDLE_SIDECARS) -> LabPlan:
    pods = _pods(
        1,
        [
            ("sb-c-node", "bench-client", dict(CAPTURED), None),
            ("sb-c-side", "bench-client", dict(CAPTURED), None),
            ("sb-c-ha", "bench-client-ha", {}, None),
            ("sb-c-hh", "bench-client-ha", {}, None),
            *((p, p, dict(CAPTURED), None) for p in idle_pods(idle)[: idle // 2]),
        ],
    ) + _pods(
        2,
        [
            ("sb-s-node", "bench-server", dict(CAPTURED), "echo"),
            ("sb-s-side", "bench-server", dict(CAPTURED), "echo"),
            ("sb-s-ha", "bench-server-ha", {}, "echo"),
            ("sb-s-hh", "bench-server-ha", {}, "echo"),
            *((p, p, dict(CAPTURED), None) for p in idle_pods(idle)[idle // 2 :]),
        ],
    )
    plan = LabPlan(name, (node_plan(1), node_plan(2)), tuple(pods), (), {"default": {}})
    return with_sidecars(plan, ["sb-c-side", "sb-s-side", *idle_pods(idle)])


def process_memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) in bytes, from /proc/PID/smaps_rollup."""
    out = dict(_rss(pid), uss=0)
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                out["uss"] += int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def scale_sidecars(each: Sequence[dict[str, int]], pods: int = PODS) -> dict[str, Any]:
    """``pods`` sidecars from a few measured ones: ``pss`` = pods x the median PSS (how
    the HAProxy figure is summed); ``uss_plus_shared`` = pods x the median USS + the
    median shared part (RSS - USS) once, since shared pages are paid once per node."""
    pss = statistics.median(m["pss"] for m in each)
    uss = statistics.median(m["uss"] for m in each)
    shared = statistics.median(m["rss"] - m["uss"] for m in each)
    return {
        "pods": pods,
        "measured": len(each),
        "per_sidecar": {
            "rss": int(statistics.median(m["rss"] for m in each)),
            "pss": int(pss),
            "uss": int(uss),
        },
        "pss": int(pods * pss),
        "uss_plus_shared": int(pods * uss + shared),
    }


def memory_summary(
    sidecars: dict[str, Any], node_mode: dict[str, Any] | None, pods: int = PODS
) -> dict[str, Any]:
    """Per ``pods`` pods, in bytes: the node agent (PSS + eBPF maps), Weft sidecars
    (scaled, `scale_sidecars`), HAProxy sidecars (summed); each against the node agent."""
    out: dict[str, Any] = {"pods": pods, "weft_sidecars": sidecars}
    if node_mode is None:
        return out
    k = str(pods)
    agent = node_mode["weft_agent"][k]["pss"] + node_mode.get("bpf_map_memlock", {}).get(k, 0)
    haproxy = node_mode["haproxy"][k]["pss"]
    out |= {
        "weft_agent": agent,
        "haproxy_sidecars": haproxy,
        "weft_sidecars_over_agent": round(sidecars["pss"] / agent, 2),
        "weft_sidecars_lower_bound_over_agent": round(sidecars["uss_plus_shared"] / agent, 2),
        "haproxy_over_agent": round(haproxy / agent, 2),
        "weft_sidecars_over_haproxy": round(sidecars["pss"] / haproxy, 2),
        "agent_over_haproxy": _memory_target(node_mode, k),
    }
    return out


def run(
    identity_setup: IdentitySetup,
    rounds: int = 4,
    seconds: float = 4.0,
    rate: int = 1000,
    connections: int = 16,
    memory_lab: bool = True,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "profile": {
            "rounds": rounds,
            "seconds": seconds,
            "rate": rate,
            "connections": connections,
            "idle_sidecars": IDLE_SIDECARS,
        },
    }
    result |= _traffic(identity_setup, rounds, seconds, rate, connections, report)
    node_mode = None
    if memory_lab:
        profile = dataclasses.replace(FULL, memory_pods=(PODS,))
        node_mode = _memory(profile, identity_setup, report, f"{LAB}m")
        result["node_mode_memory"] = node_mode
    result["memory"] = memory_summary(result.pop("sidecar_memory"), node_mode)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def _traffic(
    identity_setup: IdentitySetup,
    rounds: int,
    seconds: float,
    rate: int,
    connections: int,
    report: Callable[[str], None],
) -> dict[str, Any]:
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"lab {LAB!r}: 2 nodes, node-mode / sidecar-mode / HAProxy pod pairs, "
           f"{IDLE_SIDECARS} idle sidecar pods")  # fmt: skip
    lab.up(plan=bench_plan(LAB), replace=True)
    try:
        state = lab.load()
        ip = {p.name: p.ip for p in state.plan.pods}
        pki = SidecarPki()
        for server, client, mode in HAPROXY_PAIRS:
            start_sidecar(lab, state, state.pod(server), pki, None, mode=mode)
            start_sidecar(lab, state, state.pod(client), pki, ip[server], mode=mode)
        for s in SETUPS:
            _wait_reachable(lab, s, ip[s.server])
        names = {process_name(state.pod(p)) for p in idle_pods(IDLE_SIDECARS)}
        idle = [r for r in lab.load().processes if r.name in names]
        time.sleep(1.0)
        idle_memory = {r.name: process_memory(r.pid) for r in idle}
        report(f"all {len(SETUPS)} paths answer; measuring")
        secs, conns = str(seconds), str(connections)

        def argv(scenario: str, s: Setup) -> list[str]:
            target = [ip[s.server], str(ECHO_PORT)]
            if scenario == "conn":
                return [sys.executable, "-m", "weft.bench.loadgen", "conn", *target, secs]
            mode = ["rate", *target, str(rate), secs] if scenario != "saturate" else [
                "saturate", *target, secs]  # fmt: skip
            return [sys.executable, "-m", "weft.bench.openloop", *mode, conns]

        scenarios = (f"rate-{rate}", "saturate", "conn")
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in SETUPS}
        for rnd in range(rounds):
            for scenario in scenarios:
                for s in rotation(SETUPS, scenario, rnd):
                    cpu_before = _cpu_seconds(lab, s.proxies)
                    res = _json_in_pod(lab, s.client, argv(scenario, s), timeout=seconds * 4 + 60)
                    _charge_cpu(res, _cpu_seconds(lab, s.proxies) - cpu_before, True)
                    samples[s.name].setdefault(scenario, []).append(res)
                    report(f"round {rnd + 1}/{rounds} {scenario:9} {s.name:16} {_fmt(res)}")
        loaded = {r.name: process_memory(r.pid) for r in lab.load().processes
                  if r.name in SETUPS[1].proxies and procs.is_alive(r)}  # fmt: skip
        agents = {r.name: dict(process_memory(r.pid), bpf_maps=bpf_map_memlock(r.pid))
                  for r in lab.load().processes
                  if r.name in SETUPS[0].proxies and procs.is_alive(r)}  # fmt: skip
    finally:
        report(f"removing lab {LAB!r}")
        lab.down()
    summary = {s: {sc: _median(v) for sc, v in by.items()} for s, by in samples.items()}
    scaled = scale_sidecars(list(idle_memory.values())) if idle_memory else {}
    return {
        "summary": summary,
        "samples": samples,
        "per_round_ratios": per_round_ratios(samples, RATIO_PAIRS),
        "sidecar_memory": {**scaled, "idle": idle_memory, "after_load": loaded},
        "agents_in_traffic_lab": agents,
    }
