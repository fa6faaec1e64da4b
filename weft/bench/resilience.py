"""The restart window and connection bursts, measured in a two-node lab.

Two questions a platform team asks before trusting a node proxy with every pod's
traffic, answered with numbers rather than promises:

* **Restart window.**  A captured pod connects in a tight loop (`weft.bench.connloop`)
  to an echo pod on the other node while its node agent is restarted, ``rounds`` times
  each way: make-before-break (`weft lab restart-agent`) and a crash (``kill -9``, then a
  new agent).  Reported: answers, failed connects and how long they lasted, answers that
  crossed in plaintext (seen by the echo pod as coming from the source node's address
  instead of its own node's tunnel server), connections the new agent held until ready,
  and the slowest answer.
* **Bursts.**  ``connections`` connections opened at once from one captured pod to the
  echo service (`weft.bench.burst`), ``rounds`` times: how many completed, the slowest,
  the agent's peak RSS during the burst (sampled every 20 ms), how many handshakes had to
  wait for a slot, and whether any endpoint was ejected.

Figures go to docs/results/resilience.json and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weft.bench.mesh import IdentitySetup
from weft.lab.lab import Lab, LabError, agent_state

LAB = "wres"


def _agent_pid(lab: Lab, node: str) -> int:
    return next(r.pid for r in lab.load().processes if r.name == f"agent-{node}")


def _in_pod(lab: Lab, pod: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--", *argv]


def wait_accepted(lab: str, node: str, at_least: int, timeout: float = 30.0) -> None:
    """Until the agent of ``node`` has accepted ``at_least`` connections (the agent
    process counts from its start, so after a restart this is the new one's count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if agent_state(lab, node)["proxy"]["stats"]["accepted"] >= at_least:
                return
        except LabError:
            pass  # between two agents, or still starting
        time.sleep(0.1)
    raise RuntimeError(f"the client loop made no {at_least} connections in {timeout:g}s")


def restart_round(lab: Lab, how: str) -> dict[str, Any]:
    """One restart of node-1's agent under a tight client loop; ``how`` is ``mbb`` or
    ``kill``."""
    state = lab.load()
    target = state.pod("echo-2").ip
    tunnel_side = state.plan.node("node-2").gateway
    marker = f"wres-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        stop_file = Path(tmp) / "stop"
        loop = subprocess.Popen(
            _in_pod(lab, "client-1", sys.executable, "-m", "weft.bench.connloop",
                    target, "8080", marker, str(stop_file)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_accepted(lab.name, "node-1", 20)
            started = time.monotonic()
            if how == "mbb":
                lab.restart_agent("node-1")
            else:
                os.kill(_agent_pid(lab, "node-1"), signal.SIGKILL)
                time.sleep(0.2)
                lab.start_process("agent-node-1")
            took = time.monotonic() - started
            wait_accepted(lab.name, "node-1", 20)
            held = agent_state(lab.name, "node-1")["held_until_ready"]["outbound"]
        finally:
            stop_file.touch()
            out, err = loop.communicate(timeout=90)
    if loop.returncode != 0:
        raise RuntimeError(f"the client loop failed: {err}")
    result: dict[str, Any] = json.loads(out)
    plaintext = sum(n for peer, n in result["peers"].items() if peer != tunnel_side)
    return {
        "how": how,
        "ok": result["ok"],
        "failed": result["failed"],
        "failure_window_s": result["failure_window_s"],
        "plaintext": plaintext,
        "held_served": held["served"],
        "held_reset": held["refused_deadline"] + held["refused_full"],
        "slowest_ok_s": result["slowest_ok_s"],
        "restart_took_s": round(took, 2),
        "errors": result["errors"][:3],
    }


class _RssSampler:
    """Peak VmRSS of one process, sampled every 20 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, _rss_kib(self.pid))
            except OSError:
                return
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kib / 1024, 1)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def burst_round(lab: Lab, connections: int) -> dict[str, Any]:
    before = agent_state(lab.name, "node-1")
    pid = _agent_pid(lab, "node-1")
    idle_mib = round(_rss_kib(pid) / 1024, 1)
    sampler = _RssSampler(pid)
    try:
        out = subprocess.run(
            _in_pod(lab, "client-1", sys.executable, "-m", "weft.bench.burst", "echo", "80",
                    str(connections)),
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout  # fmt: skip
    finally:
        peak_mib = sampler.stop()
    result: dict[str, Any] = json.loads(out)
    after = agent_state(lab.name, "node-1")
    hs_before, hs_after = before["tunnel"]["handshakes"], after["tunnel"]["handshakes"]
    ejections = sum(e["ejections"] for e in after["endpoints"].values()) - sum(
        e["ejections"] for e in before["endpoints"].values()
    )
    return {
        **result,
        "agent_rss_idle_mib": idle_mib,
        "agent_rss_peak_mib": peak_mib,
        "handshakes_waited": hs_after["waited"] - hs_before["waited"],
        "handshake_queue_peak": hs_after["queued_peak"],
        "handshakes_refused": hs_after["refused_full"]
        + hs_after["refused_timeout"]
        - hs_before["refused_full"]
        - hs_before["refused_timeout"],
        "ejections": ejections,
    }


def run(
    identity_setup: IdentitySetup,
    rounds: int = 3,
    connections: int = 2000,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``identity_setup`` makes the lab's CA and bootstrap tokens (the CLI passes
    `weft.cli.lab.lab_identity_setup`): the agents run with mTLS, as in production."""
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"bringing up a two-node lab {LAB!r} with the echo demo")
    lab.up(nodes=2, demo=True, replace=True)
    restarts: list[dict[str, Any]] = []
    bursts: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            for how in ("mbb", "kill"):
                res = restart_round(lab, how)
                restarts.append(res)
                report(
                    f"restart {r + 1}/{rounds} {how:4}: {res['ok']} answered, {res['failed']} "
                    f"failed over {res['failure_window_s']}s, {res['plaintext']} plaintext, "
                    f"{res['held_served']} held until ready, slowest {res['slowest_ok_s']}s"
                )
        for r in range(rounds):
            res = burst_round(lab, connections)
            bursts.append(res)
            report(
                f"burst {r + 1}/{rounds}: {res['ok']}/{connections} completed (slowest "
                f"{res['slowest_s']}s), agent RSS {res['agent_rss_idle_mib']} -> "
                f"{res['agent_rss_peak_mib']} MiB, {res['handshakes_waited']} handshakes "
                f"waited, {res['ejections']} ejections"
            )
    finally:
        report(f"removing lab {LAB!r}")
        lab.down()
    return {
        "rounds": rounds,
        "connections": connections,
        "restarts": restarts,
        "bursts": bursts,
        "summary": summarize(restarts, bursts),
    }


def summarize(restarts: list[dict[str, Any]], bursts: list[dict[str, Any]]) -> dict[str, Any]:
    def span(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {}
    for how in ("mbb", "kill"):
        rs = [r for r in restarts if r["how"] == how]
        if rs:
            out[how] = {
                "plaintext_total": sum(r["plaintext"] for r in rs),
                "failed": span([r["failed"] for r in rs]),
                "failure_window_s": span([r["failure_window_s"] for r in rs]),
                "held_served": span([r["held_served"] for r in rs]),
                "slowest_ok_s": span([r["slowest_ok_s"] for r in rs]),
            }
    if bursts:
        out["burst"] = {
            "completed": span([b["ok"] for b in bursts]),
            "slowest_s": span([b["slowest_s"] or 0.0 for b in bursts]),
            "agent_rss_peak_mib": span([b["agent_rss_peak_mib"] for b in bursts]),
            "ejections_total": sum(b["ejections"] for b in bursts),
        }
    return out
