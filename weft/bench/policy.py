"""What authorization costs at the destination node (``weft bench policy``; issue #15).

A two-node demo lab; client-1 (node-1) sends HTTP/1.1 to echo-2 (node-2) through both
node proxies, so every request is judged by node-2's agent. Two setups alternate in the
same run, round by round, so machine noise hits both alike:

* **none** — no AuthorizationPolicy: streams judged by the default only, requests not
  judged at all (the policy set is empty);
* **100 policies** — 99 DENY policies on paths the load never uses (``/deny-<i>/*``: each
  request is checked against all of them) and one ALLOW for the client's identity on
  GET ``*``, all selecting ``app=echo``, applied with ``weft lab apply -f`` as a user
  would.

Each round measures saturation (closed loop, `weft.bench.openloop` ``saturate``),
latency at a fixed rate (open loop, ``rate``: p50/p99 without coordinated omission), and
saturation again with every request to a path of its own (``/bench/<n>``): the agent
remembers decisions per (caller, port, method, path), so the first figures show a
client repeating its requests and the last one the full evaluation on every request.
Reported: the medians per setup, and the ratios as the **median of the within-round
ratios** with their range — each round's two setups run back to back (in alternating
order, so neither always goes first), which is what makes a ratio survive this shared
machine's drift between rounds (target: ≤ 5 % saturation cost).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from weft.bench.drills import until
from weft.bench.mesh import IdentitySetup
from weft.lab.lab import Lab
from weft.lab.plan import ECHO_PORT

LAB = "wpol"
POLICIES = 100
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def policy_docs(n: int = POLICIES) -> list[dict[str, Any]]:
    """``n - 1`` DENY policies the load never matches and one ALLOW for the client."""
    meta = {"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy"}
    selector = {"matchLabels": {"app": "echo"}}
    docs: list[dict[str, Any]] = [
        {**meta, "metadata": {"name": f"deny-{i:03d}", "namespace": "default"},
         "spec": {"selector": selector, "action": "DENY",
                  "rules": [{"to": [{"operation": {"paths": [f"/deny-{i}/*"]}}]}]}}
        for i in range(n - 1)
    ]  # fmt: skip
    docs.append({**meta, "metadata": {"name": "allow-client", "namespace": "default"},
                 "spec": {"selector": selector, "rules": [
                     {"from": [{"source": {"principals": [CLIENT]}}],
                      "to": [{"operation": {"methods": ["GET"], "paths": ["*"]}}]}]}})  # fmt: skip
    return docs


def _in_pod(
    lab: Lab, pod: str, *argv: str, timeout: float = 300, env: dict[str, str] | None = None
) -> str:
    cmd = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout,
                         env={**os.environ, **(env or {})})  # fmt: skip
    return out.stdout


def _status(lab: Lab, url: str) -> int:
    got = _in_pod(lab, "client-1", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                  "-m", "5", url)  # fmt: skip
    return int(got or 0)


def _load(lab: Lab, ip: str, seconds: float, rate: float, conns: int) -> dict[str, Any]:
    def openloop(*args: str, unique: bool = False) -> dict[str, Any]:
        env = {"WEFT_BENCH_UNIQUE_PATHS": "1"} if unique else None
        argv = (sys.executable, "-m", "weft.bench.openloop", *args)
        got: dict[str, Any] = json.loads(_in_pod(lab, "client-1", *argv, env=env))
        return got

    sat = openloop("saturate", ip, str(ECHO_PORT), str(seconds), str(conns))
    lat = openloop("rate", ip, str(ECHO_PORT), str(rate), str(seconds), str(conns))
    fresh = openloop("saturate", ip, str(ECHO_PORT), str(seconds), str(conns), unique=True)
    return {"saturation": sat, "latency": lat, "saturation_unique_paths": fresh}


def run(
    identity_setup: IdentitySetup,
    rounds: int = 3,
    seconds: float = 8.0,
    rate: float = 500.0,
    connections: int = 16,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"bringing up a two-node lab {LAB!r} with the echo demo")
    lab.up(nodes=2, demo=True, replace=True)
    docs = policy_docs()
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "with_policies": []}
    try:
        echo2 = next(p for p in lab.load().plan.pods if p.name == "echo-2")
        url = f"http://{echo2.ip}:{ECHO_PORT}"
        for r in range(rounds):
            order = ("none", "with_policies") if r % 2 == 0 else ("with_policies", "none")
            for setup in order:
                if setup == "with_policies":
                    lab.apply_objects(docs)
                    until(lambda: _status(lab, f"{url}/deny-7/x") == 403, "the policies")
                else:
                    lab.apply_objects(docs, delete=True)
                    until(lambda: _status(lab, f"{url}/deny-7/x") == 200, "no policies")
                got = _load(lab, echo2.ip, seconds, rate, connections)
                runs[setup].append(got)
                s, lt = got["saturation"], got["latency"]
                report(f"round {r + 1} {setup}: {s['per_second']:.0f} req/s saturated "
                       f"({s['errors']} errors); at {rate:.0f}/s p50 {lt['p50_us']:.0f} us, "
                       f"p99 {lt['p99_us']:.0f} us ({lt['errors']} errors)")  # fmt: skip
    finally:
        report(f"removing lab {LAB!r}")
        lab.down()
    return summarize(runs, rate)


def summarize(runs: dict[str, list[dict[str, Any]]], rate: float) -> dict[str, Any]:
    def med(setup: str, part: str, key: str) -> float:
        return float(statistics.median(x[part][key] for x in runs[setup]))

    out: dict[str, Any] = {"policy_count": POLICIES, "rate": rate, "rounds": runs}
    for setup in runs:
        out[setup] = {
            "saturation_per_second": round(med(setup, "saturation", "per_second"), 1),
            "saturation_unique_paths_per_second": round(
                med(setup, "saturation_unique_paths", "per_second"), 1
            ),
            "p50_us": round(med(setup, "latency", "p50_us"), 1),
            "p99_us": round(med(setup, "latency", "p99_us"), 1),
            "errors": sum(x["saturation_unique_paths"]["errors"] for x in runs[setup])
            + sum(x["saturation"]["errors"] + x["latency"]["errors"] for x in runs[setup]),
        }
    none, pol = out["none"], out["with_policies"]
    out["medians_ratio"] = {
        "saturation": round(pol["saturation_per_second"] / none["saturation_per_second"], 3),
        "saturation_unique_paths": round(
            pol["saturation_unique_paths_per_second"] / none["saturation_unique_paths_per_second"],
            3,
        ),
        "p99": round(pol["p99_us"] / none["p99_us"], 3),
    }  # fmt: skip
    for name, part, key in (("saturation_ratio", "saturation", "per_second"),
                            ("saturation_unique_paths_ratio", "saturation_unique_paths",
                             "per_second"),
                            ("p99_ratio", "latency", "p99_us")):  # fmt: skip
        per_round = [w[part][key] / n[part][key]
                     for n, w in zip(runs["none"], runs["with_policies"], strict=True)
                     if n[part][key]]  # fmt: skip
        out[name] = round(statistics.median(per_round), 3) if per_round else 0.0
        out[name + "_range"] = [round(min(per_round), 3), round(max(per_round), 3)] if (
            per_round) else []  # fmt: skip
    return out
