"""Issue #13's drills, measured in a three-node lab (``weft bench drills``).

Three echo replicas (one per node); client-1 sends requests to the echo service on one
keep-alive connection (HTTP/1.1) or one grpcio channel; the policy is set the way a user
sets it, as Service annotations (`Lab.annotate_service`), and reaches the agents through
the control plane. Each drill reports what the client saw and what node-1's agent
counted (`nodeagent.retrymetrics`):

* **flaky** — echo-2 answers 503 to half of its requests: success without a policy, then
  with ``weft.io/retry-http: 5xx`` (the issue's target: ≥ 99.9 %);
* **grpc** — the same over one gRPC channel, UNAVAILABLE, ``weft.io/retry-grpc``;
* **all-failing** — every replica answers 503, ``retry-limit: 3``: retries sent per
  request against what the budget allows (20 % + 10/s over the run): no amplification;
* **hung** — echo-3 never answers in time; ``timeout-request: 500ms`` and failure
  accrual: the slowest request (target ≤ timeout + 50 ms), and how many requests went
  to echo-3 after the first second (target < 1 %);
* **split** — docs/examples/canary.yaml applied (`Lab.apply_objects`): an HTTPRoute on
  echo sending 90/10 to echo-stable (echo-1, echo-2) and echo-canary (echo-3): the
  canary's share (target 10 % ± 2 %).

Figures go to docs/results/drills.json and docs/resilience.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weft.bench.mesh import IdentitySetup
from weft.lab.lab import Lab, admin_get

LAB = "wdrl"
SERVICE = "default/echo"

REQUESTS = r"""
import collections, http.client, json, sys, time
n, path = int(sys.argv[1]), sys.argv[2]
conn = http.client.HTTPConnection("echo", 80, timeout=30)
statuses, retries, errors = collections.Counter(), collections.Counter(), collections.Counter()
pods = collections.Counter()
took, late_errors, start = [], 0, time.monotonic()
for _ in range(n):
    t = time.monotonic()
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    if r.status == 200:
        pods[json.loads(body).get("pod", "")] += 1
    took.append(time.monotonic() - t)
    statuses[r.status] += 1
    retries[r.getheader("weft-retry-attempts", "0")] += 1
    error = r.getheader("weft-proxy-error", "")
    errors[error] += 1
    if error and t - start > 1.0:
        late_errors += 1
    if r.getheader("connection", "") == "close":
        conn.close()
took.sort()
print(json.dumps({"statuses": statuses, "retries": retries, "errors": errors, "pods": pods,
                  "slowest": took[-1], "p99": took[int(len(took) * 0.99)],
                  "p50": took[len(took) // 2], "late_errors": late_errors,
                  "seconds": time.monotonic() - start}))
"""
"""Run in a pod (``python -c REQUESTS N PATH``): N requests on one kept connection to
http://echo/PATH; prints statuses, retry counts, proxy error tokens and latencies."""


def _in_pod(lab: Lab, pod: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--", *argv]


def http_requests(lab: Lab, n: int, path: str) -> dict[str, Any]:
    out = subprocess.run(_in_pod(lab, "client-1", sys.executable, "-c", REQUESTS, str(n), path),
                         capture_output=True, text=True, check=True, timeout=900)  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def grpc_calls(lab: Lab, n: int, metadata: str) -> dict[str, Any]:
    # The client exits 1 when a call failed; its JSON says which.
    out = subprocess.run(
        _in_pod(lab, "client-1", sys.executable, "-m", "weft.lab.echoclient", "grpc",
                "echo:9090", "-n", str(n), f"--metadata={metadata}"),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def counter(lab: Lab, name: str, **labels: str) -> float:
    """A counter's value on node-1's agent (summed over matching label sets)."""
    state = lab.load()
    node = state.plan.node("node-1")
    answer = admin_get(state.plan.netns("node-1"), node.ip, 15020, "/metrics")
    if answer is None or answer[0] != 200:
        raise RuntimeError("node-1's agent did not answer /metrics")
    total = 0.0
    for line in answer[1].splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rpartition(" ")[2])
    return total


def until(probe: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not in force after {timeout:.0f} s")
        time.sleep(0.5)


def _ok(result: dict[str, Any], n: int) -> float:
    ok: int = result["statuses"].get("200", 0)
    return round(ok / n, 5)


def flaky(lab: Lab, n: int) -> dict[str, Any]:
    path = "/?fail=echo-2:0.5"
    before = http_requests(lab, n, path)
    lab.annotate_service("echo", {"weft.io/retry-http": "5xx"})
    try:
        until(lambda: http_requests(lab, 30, path)["retries"].get("1", 0) > 0, "retry-http")
        after = http_requests(lab, n, path)
    finally:
        lab.annotate_service("echo", {"weft.io/retry-http": None})
    return {
        "requests": n,
        "success_without_retries": _ok(before, n),
        "success_with_retries": _ok(after, n),
        "retried_share": round(after["retries"].get("1", 0) / n, 4),
        "p99_ms_without": round(before["p99"] * 1000, 2),
        "p99_ms_with": round(after["p99"] * 1000, 2),
    }


def grpc(lab: Lab, n: int) -> dict[str, Any]:
    meta = "fail=echo-2:0.5"
    before = grpc_calls(lab, n, meta)
    lab.annotate_service("echo", {"weft.io/retry-grpc": "unavailable"})
    try:
        until(lambda: not grpc_calls(lab, 60, meta)["errors"], "retry-grpc")
        after = grpc_calls(lab, n, meta)
    finally:
        lab.annotate_service("echo", {"weft.io/retry-grpc": None})
    return {
        "calls": n,
        "success_without_retries": round(sum(before["pods"].values()) / n, 5),
        "success_with_retries": round(sum(after["pods"].values()) / n, 5),
    }


def all_failing(lab: Lab, n: int) -> dict[str, Any]:
    path = "/?status=503"
    lab.annotate_service("echo", {"weft.io/retry-http": "5xx", "weft.io/retry-limit": "3"})
    try:
        until(lambda: http_requests(lab, 5, path)["retries"].get("0", 0) < 5, "retry-http")
        # The budget is a 10 s window: let the probes' retries age out of it.
        time.sleep(11)
        sent = counter(lab, "outbound_http_retry_total", service=SERVICE)
        skipped = counter(lab, "outbound_http_retry_skipped_total", service=SERVICE,
                          reason="budget")  # fmt: skip
        got = http_requests(lab, n, path)
        retries = counter(lab, "outbound_http_retry_total", service=SERVICE) - sent
        refused = counter(lab, "outbound_http_retry_skipped_total", service=SERVICE,
                          reason="budget") - skipped  # fmt: skip
    finally:
        lab.annotate_service("echo", {"weft.io/retry-http": None, "weft.io/retry-limit": None})
    seconds = got["seconds"]
    return {
        "requests": n,
        "seconds": round(seconds, 2),
        "retries": int(retries),
        "retries_per_request": round(retries / n, 4),
        # RetryBudget's defaults: 20 % of the attempts in the window plus
        # min_per_second x ttl (10/s x 10 s), spendable at once.
        "budget_per_request": round(0.2 + 100.0 / n, 4),
        "without_budget_per_request": 3.0,
        "refused_by_budget": int(refused),
    }


def hung(lab: Lab, n: int) -> dict[str, Any]:
    path = "/?delay_ms=echo-3:5000"
    lab.annotate_service("echo", {"weft.io/timeout-request": "500ms",
                                  "weft.io/failure-accrual": "consecutive"})  # fmt: skip
    try:
        until(lambda: http_requests(lab, 10, path)["errors"].get("timeout", 0) > 0, "timeout")
        got = http_requests(lab, n, path)
    finally:
        lab.annotate_service("echo", {"weft.io/timeout-request": None,
                                      "weft.io/failure-accrual": None})  # fmt: skip
    timeouts = got["errors"].get("timeout", 0)
    return {
        "requests": n,
        "timeout_ms": 500,
        "timeouts": timeouts,
        "late_share": round(got["late_errors"] / n, 5),
        "slowest_ms": round(got["slowest"] * 1000, 1),
        "p99_ms": round(got["p99"] * 1000, 2),
        "other_failures": n - timeouts - got["statuses"].get("200", 0),
    }


CANARY = Path(__file__).resolve().parents[2] / "docs" / "examples" / "canary.yaml"


def split(lab: Lab, n: int) -> dict[str, Any]:
    """docs/examples/canary.yaml: echo-1/2 stable, echo-3 the canary, 90/10."""
    import yaml  # type: ignore[import-untyped]

    for pod, track in (("echo-1", "stable"), ("echo-2", "stable"), ("echo-3", "canary")):
        lab.set_labels(pod, {"track": track})
    docs = [d for d in yaml.safe_load_all(CANARY.read_text()) if d]
    lab.apply_objects(docs)
    try:
        until(lambda: http_requests(lab, 5, "/")["statuses"].get("200", 0) == 5, "services")
        time.sleep(1.0)  # the route reaches the agents with the services, or just after
        got = http_requests(lab, n, "/?weft-drill=split")
    finally:
        lab.apply_objects(docs, delete=True)
    canary = got["pods"].get("echo-3", 0)
    return {"requests": n, "canary_share": round(canary / n, 4), "target_share": 0.10,
            "statuses": got["statuses"]}  # fmt: skip


def run(
    identity_setup: IdentitySetup,
    requests: int = 10_000,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"bringing up a three-node lab {LAB!r} with the echo demo")
    lab.up(nodes=3, demo=True, replace=True)
    out: dict[str, Any] = {"requests": requests}
    try:
        for name, drill, n in (
            ("flaky", flaky, requests),
            ("grpc", grpc, max(1000, requests // 3)),
            ("all_failing", all_failing, max(500, requests // 10)),
            ("hung", hung, max(500, requests // 10)),
            ("split", split, requests),
        ):
            report(f"drill {name}: {n} requests")
            out[name] = drill(lab, n)
            report(f"  {out[name]}")
    finally:
        report(f"removing lab {LAB!r}")
        lab.down()
    return out
