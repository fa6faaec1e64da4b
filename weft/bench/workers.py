"""One proxy process per node against two (``weft bench workers``; issue #18).

A two-node demo lab.  client-1 saturates echo-1 **on its own node** with HTTP/1.1
keep-alive (h2load ``--h1``, 16 connections): both halves of every request — the
outbound side and the tunnel's inbound side — are node-1's agent, so that one agent
is the proxy under test and node-2's stays idle.  Setups alternate round by round,
each the same lab with node-1's agent restarted (make-before-break) with
``--workers 1`` (the agent serves in its own process) or ``--workers 2``.

**Sharing the two cores fairly.**  The load generator and the echo server are pinned
to CPU 0 (``taskset``) in both setups; node-1's agent and its workers are not pinned.
One proxy process can use one core at most (an event loop is one thread); two workers
can use CPU 1 and whatever CPU 0 leaves.  So on this machine the ceiling for two
workers is not 2x: it is where the whole machine is busy — the report gives each
setup's CPU per request (agent plus workers, from /proc) so that the scaling on a
machine with spare cores can be read off: requests/s per core = 1e6 / (CPU us/req).

Also reported: each process's PSS and RSS after the runs (the agent and every worker,
against the single-process agent), and the time ``/metrics`` takes to answer with the
workers' texts merged against the single process's own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weft.bench.h2load import parse as parse_h2load
from weft.bench.mesh import IdentitySetup, _rss
from weft.lab.lab import ADMIN_PORT, Lab, admin_get, agent_state
from weft.lab.plan import ECHO_PORT

LAB = "wwk"
SETUPS = (1, 2)


def _in_pod(lab: Lab, pod: str, *argv: str, timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout  # fmt: skip


def _pid(lab: Lab, name: str) -> int:
    return next(r.pid for r in lab.load().processes if r.name == name)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _proxy_pids(lab: Lab) -> list[int]:
    """node-1's agent and, with workers, its worker processes (not the eBPF compiler)."""
    agent = _pid(lab, "agent-node-1")
    workers = [w["pid"] for w in agent_state(lab.name, "node-1").get("workers", [])]
    return [agent, *workers]


def _set_workers(lab: Lab, n: int) -> None:
    lab.restart_agent("node-1", ["--workers", str(n)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = agent_state(lab.name, "node-1")
        listening = [w for w in state.get("workers", []) if w.get("listening")]
        if state.get("ready") and (n == 1 or len(listening) == n):
            return
        time.sleep(0.2)
    raise RuntimeError(f"node-1's agent with --workers {n} did not become ready")


def _saturate(lab: Lab, ip: str, seconds: float, connections: int) -> dict[str, Any]:
    pids = _proxy_pids(lab)
    cpu0 = _cpu_seconds(pids)
    out = _in_pod(lab, "client-1", "taskset", "-c", "0", "h2load", "--h1", "-D",
                  str(round(seconds)), "-c", str(connections), "-t", "1",
                  "--warm-up-time=1s", f"http://{ip}:{ECHO_PORT}/",
                  timeout=seconds + 120)  # fmt: skip
    cpu = _cpu_seconds(pids) - cpu0
    got: dict[str, Any] = dict(parse_h2load(out))
    # CPU includes the warm-up second; charge it over the requests of that second too.
    requests = got["per_second"] * (seconds + 1.0)
    got["proxy_cpu_us_per_request"] = round(cpu * 1e6 / requests, 1) if requests else None
    got["proxy_cpu_cores"] = round(cpu / (seconds + 1.0), 2)
    return got


def _metrics_ms(lab: Lab, scrapes: int = 20) -> float:
    netns = lab.load().plan.netns("node-1")
    took = []
    for _ in range(scrapes):
        t0 = time.perf_counter()
        answer = admin_get(netns, "127.0.0.1", ADMIN_PORT, "/metrics")
        took.append((time.perf_counter() - t0) * 1000)
        if answer is None or answer[0] != 200:
            raise RuntimeError(f"/metrics of node-1 answered {answer}")
    return round(statistics.median(took), 2)


def _memory(lab: Lab) -> dict[str, Any]:
    agent = _pid(lab, "agent-node-1")
    workers = [w["pid"] for w in agent_state(lab.name, "node-1").get("workers", [])]
    return {
        "agent": _rss(agent),
        "workers": [_rss(p) for p in workers],
        "total_pss": _rss(agent)["pss"] + sum(_rss(p)["pss"] for p in workers),
    }


def run(
    identity_setup: IdentitySetup,
    rounds: int = 3,
    seconds: float = 8.0,
    connections: int = 16,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"bringing up a two-node lab {LAB!r} with the echo demo")
    lab.up(nodes=2, demo=True, replace=True)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in SETUPS}
    memory: dict[int, dict[str, Any]] = {}
    scrape: dict[int, float] = {}
    try:
        state = lab.load()
        echo1 = next(p for p in state.plan.pods if p.name == "echo-1")
        subprocess.run(["taskset", "-pc", "0", str(_pid(lab, "echo-1"))], check=True,
                       capture_output=True)  # fmt: skip
        for r in range(rounds):
            order = SETUPS if r % 2 == 0 else tuple(reversed(SETUPS))
            for n in order:
                _set_workers(lab, n)
                got = _saturate(lab, echo1.ip, seconds, connections)
                runs[n].append(got)
                report(f"round {r + 1}, {n} worker{'s' if n > 1 else ''}: "
                       f"{got['per_second']:.0f} req/s ({got['errors']} errors), proxy "
                       f"{got['proxy_cpu_cores']:.2f} cores, "
                       f"{got['proxy_cpu_us_per_request']} us CPU/request")  # fmt: skip
                if r == rounds - 1:
                    memory[n] = _memory(lab)
                    scrape[n] = _metrics_ms(lab)
    finally:
        report(f"tearing down lab {LAB!r}")
        lab.down()
    return summarize(runs, memory, scrape, rounds=rounds, seconds=seconds,
                     connections=connections)  # fmt: skip


def summarize(
    runs: dict[int, list[dict[str, Any]]],
    memory: dict[int, dict[str, Any]],
    scrape: dict[int, float],
    **params: Any,
) -> dict[str, Any]:
    """Medians per setup and the median of the within-round ratios (2 workers / 1)."""
    out: dict[str, Any] = {"params": params, "setups": {}}
    for n, rs in runs.items():
        out["setups"][str(n)] = {
            "per_second": statistics.median(r["per_second"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "proxy_cpu_cores": statistics.median(r["proxy_cpu_cores"] for r in rs),
            "proxy_cpu_us_per_request": statistics.median(
                r["proxy_cpu_us_per_request"] or 0.0 for r in rs
            ),
            "memory": memory.get(n),
            "metrics_scrape_ms": scrape.get(n),
            "rounds": rs,
        }
    ratios = [b["per_second"] / a["per_second"] for a, b in zip(runs[1], runs[2], strict=True)
              if a["per_second"]]  # fmt: skip
    out["saturation_ratio"] = round(statistics.median(ratios), 3) if ratios else None
    out["saturation_ratio_range"] = (
        [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None
    )
    one = out["setups"]["1"]["proxy_cpu_us_per_request"]
    two = out["setups"]["2"]["proxy_cpu_us_per_request"]
    out["per_core_requests_per_second"] = {
        "1": round(1e6 / one) if one else None,
        "2": round(1e6 / two) if two else None,
    }
    return out


def main() -> None:  # pragma: no cover - the CLI is `weft bench workers`
    from weft.cli.lab import lab_identity_setup

    print(json.dumps(run(lab_identity_setup), indent=2))
