"""The noisy neighbour, measured (``weft bench noisy``; issue #18 item 3).

One node proxy serves every pod of its node, so the question is what one pod's flood
does to another pod's requests. A two-node lab; on node-1 two workloads:

* **B** (``nz-b``, the victim) sends a fixed 500 req/s, open loop
  (`weft.bench.openloop`, HTTP/1.1 keep-alive), cross-node to its server ``nz-b-srv`` on
  node-2: its p50/p99 and errors are the figures;
* **A** (``nz-a``, the noisy one) floods node-1's proxy (`weft.bench.flood`), closed
  loop, as fast as it goes, at servers of its own on node-1 (so the flood's both proxy
  hops — outbound and the tunnel's inbound side — load node-1's agent, the one B
  shares, and not node-2's): an HTTP/1.1 flood on many keep-alive connections
  (``nz-a-srv``), a TCP connection flood to an opaque port (``nz-a-tcp``,
  ``weft.io/opaque-ports: 8080``) and an HTTP/2 rapid-reset flood (``nz-a-srv``).

Phases: B alone; B with each flood running (the flood starts a second before B's
sample and ends after it); B alone again, so that drift shows. Per phase: B's figures,
A's achieved rate and what A was refused, the refusals node-1's agent counted per
source workload (``weft_outbound_http_refused_busy_total``,
``weft_outbound_refused_busy_total``: A's must rise, B's must stay 0), the agent's CPU
share and its peak RSS.

The contrast: the same phases against HAProxy sidecars (`weft.bench.mesh.start_sidecar`
in ``mode http``, TLS 1.3 with client certificates), where A's flood goes through A's
own sidecars (``nz-a-ha`` -> ``nz-a-srv-ha``) and B's requests through B's
(``nz-b-ha`` -> ``nz-b-srv-ha`` on node-2).

Sharing the two vCPUs: A's tenant — its flood generator, its servers and, in the
HAProxy run, its sidecars — is pinned to CPU 1 (``taskset``), as a one-core CPU limit on
A's pods would do; the agents, B's load generator, B's server and B's sidecars are not
pinned. The flood has no rate cap: one core's worth is "as fast as possible" here.

The agents run with per-pod shares low enough for a one-core flood to cross them
(``--max-requests-per-pod``, ``--max-connections-per-pod``: defaults here 64 and 256,
against 2,048 and 8,192 in production; options of the command), so that the refusal
path is part of what is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weft.bench.mesh import (
    CAPTURED,
    IdentitySetup,
    SidecarPki,
    _cpu_seconds,
    _in_pod,
    _json_in_pod,
    _pods,
    _Sampler,
    machine_info,
    start_sidecar,
)
from weft.lab import procs
from weft.lab.lab import Lab, LabError, admin_get
from weft.lab.plan import ECHO_PORT, LabPlan, node_plan

LAB = "wnoisy"
OPAQUE = {"weft.io/opaque-ports": str(ECHO_PORT)}
A_CPU = "1"
"""The CPU A's tenant is pinned to (``taskset -c``)."""
FLOODS = ("http", "tcp", "h2reset")
REFUSAL_METRICS = ("weft_outbound_http_refused_busy_total", "weft_outbound_refused_busy_total")
TARGET_RATIO = 2.0


@dataclass(frozen=True)
class Setup:
    name: str
    b_client: str
    b_server: str
    a_client: str
    a_http: str
    """A's server for the HTTP/1.1 and HTTP/2 floods."""
    a_tcp: str
    """A's server for the TCP flood (opaque in the Weft setup)."""
    proxies: tuple[str, ...]
    """Process records whose CPU and RSS are reported (B's path, then A's)."""


SETUPS = (
    Setup("weft", "nz-b", "nz-b-srv", "nz-a", "nz-a-srv", "nz-a-tcp", ("agent-node-1",)),
    Setup("haproxy-sidecars", "nz-b-ha", "nz-b-srv-ha", "nz-a-ha", "nz-a-srv-ha", "nz-a-srv-ha",
          ("sidecar-nz-b-ha", "sidecar-nz-b-srv-ha", "sidecar-nz-a-ha", "sidecar-nz-a-srv-ha")),
)  # fmt: skip
A_TENANT = {
    "weft": ("nz-a-srv", "nz-a-tcp"),
    "haproxy-sidecars": ("nz-a-srv-ha", "sidecar-nz-a-ha", "sidecar-nz-a-srv-ha"),
}
"""Long-running processes of A's pods (besides the flood itself), pinned to `A_CPU`."""
HAPROXY_PAIRS = (("nz-b-srv-ha", "nz-b-ha"), ("nz-a-srv-ha", "nz-a-ha"))


@dataclass(frozen=True)
class Profile:
    seconds: float = 15.0
    rate: int = 500
    connections: int = 16
    """B's keep-alive connections."""
    http_connections: int = 128
    tcp_concurrency: int = 512
    h2_connections: int = 8
    max_requests_per_pod: int = 64
    max_connections_per_pod: int = 256
    setups: tuple[str, ...] = ("weft", "haproxy-sidecars")
    floods: tuple[str, ...] = FLOODS
    request_timeout: float = 2.0
    """Seconds one of B's requests may take before it counts as an error."""


def bench_plan(name: str) -> LabPlan:
    pods = _pods(
        1,
        [
            ("nz-a", "noisy", dict(CAPTURED), None),
            ("nz-b", "victim", dict(CAPTURED), None),
            ("nz-a-srv", "noisy-server", dict(CAPTURED), "echo"),
            ("nz-a-tcp", "noisy-server", {**CAPTURED, **OPAQUE}, "echo"),
            ("nz-a-ha", "noisy-ha", {}, None),
            ("nz-b-ha", "victim-ha", {}, None),
            ("nz-a-srv-ha", "noisy-server-ha", {}, "echo"),
        ],
    ) + _pods(
        2,
        [
            ("nz-b-srv", "victim-server", dict(CAPTURED), "echo"),
            ("nz-b-srv-ha", "victim-server-ha", {}, "echo"),
        ],
    )
    return LabPlan(name, (node_plan(1), node_plan(2)), tuple(pods), (), {"default": {}})


def refusals(lab: Lab) -> dict[str, dict[str, float]]:
    """node-1's agent's per-pod refusals: metric -> source workload -> count."""
    state = lab.load()
    node = state.plan.node("node-1")
    answer = admin_get(state.plan.netns("node-1"), node.ip, 15020, "/metrics")
    if answer is None or answer[0] != 200:
        raise LabError("node-1's agent did not answer /metrics")
    out: dict[str, dict[str, float]] = {m: {} for m in REFUSAL_METRICS}
    for line in answer[1].splitlines():
        name, _, rest = line.partition("{")
        if name in out and 'src_workload="' in rest:
            workload = rest.split('src_workload="', 1)[1].split('"', 1)[0]
            out[name][workload] = out[name].get(workload, 0.0) + float(line.rpartition(" ")[2])
    return out


def _delta(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> Any:
    return {
        m: {w: int(n - before[m].get(w, 0.0)) for w, n in by.items() if n - before[m].get(w, 0.0)}
        for m, by in after.items()
    }


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _pin(lab: Lab, names: tuple[str, ...]) -> None:
    for rec in lab.load().processes:
        if rec.name in names and procs.is_alive(rec):
            subprocess.run(["taskset", "-a", "-p", "-c", A_CPU, str(rec.pid)],
                           capture_output=True, check=True)  # fmt: skip


def _flood_argv(mode: str, ip: dict[str, str], s: Setup, p: Profile) -> list[str]:
    target = s.a_tcp if mode == "tcp" else s.a_http
    n = {"http": p.http_connections, "tcp": p.tcp_concurrency, "h2reset": p.h2_connections}[mode]
    return ["taskset", "-c", A_CPU, sys.executable, "-m", "weft.bench.flood", mode, ip[target],
            str(ECHO_PORT), str(p.seconds + 2.0), str(n)]  # fmt: skip


def phase(lab: Lab, s: Setup, ip: dict[str, str], p: Profile, flood: str | None) -> dict[str, Any]:
    """B's sample, with A's ``flood`` running (None: alone)."""
    cmd = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", s.a_client, "--"]
    flooder = None
    if flood is not None:
        argv = cmd + _flood_argv(flood, ip, s, p)
        flooder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
    pids = [r.pid for r in lab.load().processes if r.name in s.proxies and procs.is_alive(r)]
    before = refusals(lab) if s.name == "weft" else None
    cpu_before = {n: _cpu_seconds(lab, (n,)) for n in s.proxies}
    sampler = _Sampler(pids[:1])
    machine_before = _cpu_times()
    started = time.monotonic()
    try:
        argv = ["env", f"WEFT_BENCH_REQUEST_TIMEOUT={p.request_timeout}",
                sys.executable, "-m", "weft.bench.openloop", "rate", ip[s.b_server],
                str(ECHO_PORT), str(p.rate), str(p.seconds), str(p.connections)]  # fmt: skip
        b = _json_in_pod(lab, s.b_client, argv, timeout=p.seconds * 4 + p.request_timeout + 60)
    finally:
        wall = time.monotonic() - started
        peak = sampler.stop()
    busy, total = (a - b for a, b in zip(_cpu_times(), machine_before, strict=True))
    cpu = {n: round((_cpu_seconds(lab, (n,)) - c) / wall, 3) for n, c in cpu_before.items()}
    out: dict[str, Any] = {
        "flood": flood or "none",
        "b": b,
        "proxy_cpu_share": cpu,
        "proxy_rss_peak": peak["rss"],
        "machine_busy": round(busy / total, 3) if total else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if before is not None:
        out["refusals"] = _delta(refusals(lab), before)
    if flooder is not None:
        stdout, stderr = flooder.communicate(timeout=p.seconds + 120)
        if flooder.returncode != 0 or not stdout.strip():
            raise LabError(f"the {flood} flood failed: {stderr.strip()[-800:]}")
        out["a"] = json.loads(stdout)
    return out


def run(
    identity_setup: IdentitySetup,
    profile: Profile,
    report: Callable[[str], None] = print,
    name: str = LAB,
) -> dict[str, Any]:
    """Every phase of every setup in one lab named ``name`` (replaced if it exists, removed
    at the end); the result is JSON-ready."""
    started = time.monotonic()
    lab = Lab(name, report=lambda m: None, identity_setup=identity_setup)
    agent_args = [f"--max-requests-per-pod={profile.max_requests_per_pod}",
                  f"--max-connections-per-pod={profile.max_connections_per_pod}"]  # fmt: skip
    report(f"lab {name!r}: 2 nodes; A and B on node-1 (Weft, and with HAProxy sidecars); "
           f"agents {' '.join(agent_args)}")  # fmt: skip
    lab.up(plan=bench_plan(name), replace=True, agent_args=agent_args)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "profile": {k: getattr(profile, k) for k in profile.__dataclass_fields__},
        "sharing": f"A's flood generator, servers and sidecars pinned to CPU {A_CPU} "
        "(taskset); agents and B's pods unpinned; no rate cap on the floods",
        "setups": {},
    }
    try:
        state = lab.load()
        ip = {pod.name: pod.ip for pod in state.plan.pods}
        if "haproxy-sidecars" in profile.setups:
            pki = SidecarPki()
            for server, client in HAPROXY_PAIRS:
                start_sidecar(lab, state, state.pod(server), pki, None, mode="http")
                start_sidecar(lab, state, state.pod(client), pki, ip[server], mode="http")
        for s in SETUPS:
            if s.name not in profile.setups:
                continue
            _pin(lab, A_TENANT[s.name])
            for client, server in ((s.b_client, s.b_server), (s.a_client, s.a_http),
                                   (s.a_client, s.a_tcp)):  # fmt: skip
                _wait_answers(lab, client, ip[server])
            phases = []
            for flood in (None, *profile.floods, None):
                res = phase(lab, s, ip, profile, flood)
                phases.append(res)
                report(f"{s.name:16} {_fmt(res)}")
            result["setups"][s.name] = summarize(phases)
    finally:
        report(f"removing lab {name!r}")
        lab.down()
    result["targets"] = targets(result["setups"])
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def _wait_answers(lab: Lab, pod: str, ip: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            _in_pod(lab, pod, ["curl", "-sS", "-m", "3", f"http://{ip}:{ECHO_PORT}/"], 10)
            return
        except LabError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    alone = phases[0]["b"]["p99_us"]
    out: dict[str, Any] = {"phases": phases, "b_p99_alone_us": alone}
    for res in phases[1:-1]:
        out[res["flood"]] = {
            "b_p50_us": res["b"]["p50_us"],
            "b_p99_us": res["b"]["p99_us"],
            "b_errors": res["b"]["errors"] + res["b"].get("warmup_errors", 0),
            "b_p99_ratio": round(res["b"]["p99_us"] / alone, 2) if alone else None,
            "a_per_second": res["a"]["per_second"],
            "a_refused_seen": res["a"]["refused"],
            "refusals": res.get("refusals"),
            "proxy_cpu_share": res["proxy_cpu_share"],
            "proxy_rss_peak": res["proxy_rss_peak"],
        }
    out["b_p99_alone_after_us"] = phases[-1]["b"]["p99_us"]
    return out


def targets(setups: dict[str, Any]) -> dict[str, Any]:
    weft = setups.get("weft")
    if weft is None:
        return {}
    floods = [f for f in FLOODS if f in weft]
    ratios = {f: weft[f]["b_p99_ratio"] for f in floods}
    errors = {f: weft[f]["b_errors"] for f in floods}
    return {
        "b_p99_with_flood_over_alone": {
            "target": f"<= {TARGET_RATIO}",
            "measured": ratios,
            "met": all(r is not None and r <= TARGET_RATIO for r in ratios.values()),
        },
        "b_errors": {"target": 0, "measured": errors, "met": not any(errors.values())},
    }


def _fmt(res: dict[str, Any]) -> str:
    b = res["b"]
    errors = b["errors"] + b.get("warmup_errors", 0)
    text = (f"flood {res['flood']:7}: B p50 {b['p50_us'] / 1000:.2f} ms p99 "
            f"{b['p99_us'] / 1000:.2f} ms, {errors} errors, {b['per_second']:.0f}/s; CPU "
            f"{' '.join(f'{v:.0%}' for v in res['proxy_cpu_share'].values())}, RSS "
            f"{res['proxy_rss_peak'] / 2**20:.0f} MiB; machine {res['machine_busy']:.0%} busy, "
            f"load {res['loadavg_1m']}")  # fmt: skip
    if "a" in res:
        text += f"; A {res['a']['per_second']:.0f}/s, {res['a']['refused']} refused"
    by_metric = res.get("refusals", {}).items()
    refused = {m.removeprefix("weft_outbound_"): by for m, by in by_metric if by}
    if refused:
        text += f"; agent refused {refused}"
    return text
