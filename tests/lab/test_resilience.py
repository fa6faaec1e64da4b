"""Retries and timeouts end to end in the lab: three echo replicas (one per node), one
of them answering 503 to half its requests, the policy set the way a user sets it
(``weft lab annotate svc/echo ...``, the Service annotations) and carried by the
control plane to every agent; client-1 talks to the echo service on one keep-alive
connection. Issue #13's drills, at test size."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner, running_lab, sample
from weft.bench.drills import REQUESTS
from weft.lab.lab import agent_state

FLAKY = "/?fail=echo-2:0.5"
"""echo-2 answers 503 to half of these (the echo server's failure injection)."""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    with running_lab("wr", "--demo", "--nodes", "3") as runner:
        yield runner


def _run(lab: LabRunner, n: int, path: str) -> dict:
    return json.loads(lab.exec("client-1", sys.executable, "-c", REQUESTS, str(n), path).stdout)


def _annotate(lab: LabRunner, *changes: str) -> None:
    lab.weft("lab", "annotate", "svc/echo", *changes)


def _until(lab: LabRunner, path: str, done, what: str, timeout: float = 30) -> None:
    """Wait until a probe of 30 requests satisfies ``done``: the policy has reached
    client-1's agent (discovery is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        got = _run(lab, 30, path)
        if done(got):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not in force after {timeout} s: {got}")
        time.sleep(0.5)


def test_retries_make_a_failing_replica_invisible(lab: LabRunner):
    # Without a policy, echo-2's failures reach the client.
    before = _run(lab, 1500, FLAKY)
    ok = before["statuses"].get("200", 0) / 1500
    assert 0.5 < ok < 0.97, before
    _annotate(lab, "weft.io/retry-http=5xx")
    try:
        _until(lab, FLAKY, lambda g: g["retries"].get("1", 0) > 0, "weft.io/retry-http")
        policies = agent_state(lab.name, "node-1")["http"]["policies"]
        assert policies["default/echo"]["retry_http"] == "500-599", policies
        after = _run(lab, 10_000, FLAKY)
        print("without retries:", before, "\nwith retries:", after)  # the figures, with -rP
        assert after["statuses"].get("200", 0) / 10_000 >= 0.999, after
        assert after["retries"].get("1", 0) > 0, after
        text = lab.metrics("node-1")
        assert sample(text, "outbound_http_retry_total", service="default/echo",
                      reason="status") >= after["retries"]["1"]  # fmt: skip
    finally:
        _annotate(lab, "weft.io/retry-http-")


def test_an_invalid_annotation_keeps_the_last_valid_policy(lab: LabRunner):
    _annotate(lab, "weft.io/retry-http=5xx")
    try:
        _until(lab, FLAKY, lambda g: g["retries"].get("1", 0) > 0, "weft.io/retry-http")
        out = lab.weft("lab", "annotate", "svc/echo", "weft.io/retry-limit=many")
        assert "rejected" in out.stderr and "retry-limit" in out.stderr
        time.sleep(1.0)  # past a discovery round trip
        still = _run(lab, 1000, FLAKY)
        assert still["statuses"].get("200", 0) / 1000 >= 0.99, still
    finally:
        _annotate(lab, "weft.io/retry-http-", "weft.io/retry-limit-")


def test_a_hung_replica_costs_at_most_the_request_timeout(lab: LabRunner):
    hang = "/?delay_ms=echo-3:5000"
    _annotate(lab, "weft.io/timeout-request=500ms", "weft.io/failure-accrual=consecutive")
    try:
        _until(lab, hang, lambda g: g["errors"].get("timeout", 0) > 0, "weft.io/timeout-request")
        got = _run(lab, 400, hang)
        print("hung replica, 500ms request timeout:", got)
        timeouts = got["errors"].get("timeout", 0)
        assert got["statuses"].get("504", 0) == timeouts, got
        assert got["statuses"].get("200", 0) + timeouts == 400, got
        # After the first timeouts the hung replica gets (almost) nothing: what it made
        # requests wait counts as its latency, and failed responses eject it.
        assert timeouts <= 4, got
        assert got["slowest"] < 0.5 + 0.5, got  # the timeout plus a loaded machine's slack
        text = lab.metrics("node-1")
        assert sample(text, "outbound_http_timeout_total", service="default/echo",
                      kind="request") >= timeouts + 1  # fmt: skip
    finally:
        _annotate(lab, "weft.io/timeout-request-", "weft.io/failure-accrual-")


def _grpc(lab: LabRunner, n: int, *metadata: str) -> dict:
    args = [f"--metadata={m}" for m in metadata]
    # check=False: the client exits 1 when any call failed; its JSON says which.
    out = lab.exec("client-1", sys.executable, "-m", "weft.lab.echoclient", "grpc", "echo:9090",
                   "-n", str(n), *args, check=False).stdout  # fmt: skip
    return json.loads(out)


def test_grpc_unavailable_is_retried_on_one_channel(lab: LabRunner):
    before = _grpc(lab, 600, "fail=echo-2:0.5")
    assert before["errors"].get("UNAVAILABLE", 0) > 0, before
    _annotate(lab, "weft.io/retry-grpc=unavailable")
    try:
        deadline = time.monotonic() + 30
        while _grpc(lab, 60, "fail=echo-2:0.5")["errors"]:
            assert time.monotonic() < deadline, "weft.io/retry-grpc not in force after 30 s"
            time.sleep(0.5)
        after = _grpc(lab, 3000, "fail=echo-2:0.5")
        print("gRPC without retries:", before, "\nwith retries:", after)
        assert sum(after["pods"].values()) >= 0.999 * 3000, after
        text = lab.metrics("node-1")
        assert sample(text, "outbound_http_retry_total", service="default/echo",
                      reason="status") > 0  # fmt: skip
    finally:
        _annotate(lab, "weft.io/retry-grpc-")


CANARY = Path(__file__).resolve().parents[2] / "docs" / "examples" / "canary.yaml"
DEPLOYMENT = CANARY.with_name("deployment.yaml")

# In client-1: N requests to http://echo/ on one connection; prints the pods that
# answered and the x-route header the echo saw (it echoes request headers back).
SPLIT = r"""
import collections, http.client, json, sys
n = int(sys.argv[1])
extra = dict([sys.argv[2].split(":", 1)]) if len(sys.argv) > 2 else {}
conn = http.client.HTTPConnection("echo", 80, timeout=30)
pods, statuses, marks = collections.Counter(), collections.Counter(), collections.Counter()
for _ in range(n):
    conn.request("GET", "/", headers=extra)
    r = conn.getresponse()
    body = r.read()
    statuses[r.status] += 1
    if r.status == 200:
        answer = json.loads(body)
        pods[answer["pod"]] += 1
        marks[answer["headers"].get("x-route", "")] += 1
print(json.dumps({"pods": pods, "statuses": statuses, "x-route": marks}))
"""


def test_a_canary_split_from_the_example_yaml(lab: LabRunner):
    for pod, track in (("echo-1", "stable"), ("echo-2", "stable"), ("echo-3", "canary")):
        lab.weft("lab", "label", pod, f"track={track}")
    out = lab.weft("lab", "apply", "-f", str(CANARY))
    assert "httproute.gateway.networking.k8s.io/echo-split created" in out.stderr, out.stderr
    assert "ResolvedRefs: True" in out.stderr, out.stderr
    try:

        def split(n: int, *extra: str) -> dict:
            got = lab.exec("client-1", sys.executable, "-c", SPLIT, str(n), *extra).stdout
            return json.loads(got)

        deadline = time.monotonic() + 30
        while split(50, "x-canary:always")["pods"].get("echo-3", 0) < 50:
            assert time.monotonic() < deadline, "the route is not in force after 30 s"
            time.sleep(0.5)
        got = split(10_000)
        print("90/10 split over 10,000 requests:", got)
        assert got["statuses"] == {"200": 10_000}, got
        assert abs(got["pods"].get("echo-3", 0) / 10_000 - 0.10) <= 0.02, got
        assert got["x-route"] == {"canary-split": 10_000}, got  # the rule's header modifier
        text = lab.metrics("node-1")
        assert sample(text, "outbound_http_route_requests_total", service="default/echo",
                      route="default/echo-split", backend="default/echo-canary") > 0  # fmt: skip
    finally:
        lab.weft("lab", "delete", "-f", str(CANARY))


def test_the_deployment_example_runs_in_the_lab(lab: LabRunner, tmp_path: Path):
    """docs/examples/deployment.yaml as a user applies it: the Deployments' replicas become
    captured pods running their commands, the HTTPRoute is in force on one keep-alive
    connection over all replicas, strict inbound refuses an uncaptured caller, scaling
    down removes pods, and delete -f leaves nothing of them."""
    out = lab.weft("lab", "apply", "-f", str(DEPLOYMENT))
    try:
        assert "deployment.apps/hello created (3 replicas" in out.stderr, out.stderr
        assert out.stderr.count(", captured)") >= 4, out.stderr  # 3 hello + curl, running
        pods = {p["name"]: p for p in lab.status()["pods"]}
        assert pods["hello-2"]["owner"] == "Deployment default/hello"
        assert pods["hello-2"]["service_account"] == "hello" and pods["hello-2"]["strict"]
        urls = ["http://hello/"] * 30
        deadline = time.monotonic() + 30
        while True:
            got = lab.exec("curl-1", "curl", "-s", "-m", "10", *urls, check=False).stdout
            answers = [json.loads(line) for line in got.splitlines() if line.startswith("{")]
            seen = {a["pod"] for a in answers}
            if len(answers) == 30 and seen == {"hello-1", "hello-2", "hello-3"}:
                break
            assert time.monotonic() < deadline, f"not balanced over the replicas: {got!r}"
            time.sleep(0.5)
        assert {a["x-route"] for a in answers} == {"hello"}  # the HTTPRoute's filter
        refused = lab.exec("plain-1", "curl", "-s", "-m", "5", "http://hello-2:8000/",
                           check=False)  # fmt: skip
        assert refused.returncode != 0, refused  # strict inbound: uncaptured caller refused
        one = tmp_path / "one.yaml"
        one.write_text(DEPLOYMENT.read_text().replace("replicas: 3", "replicas: 1"))
        out = lab.weft("lab", "apply", "-f", str(one))
        assert "hello-3: removed" in out.stderr, out.stderr
        assert not {f"{lab.name}-hello-2", f"{lab.name}-hello-3"} & set(lab.netns())
        got = lab.exec("curl-1", "curl", "-s", "-m", "10", "http://hello/").stdout
        assert json.loads(got)["pod"] == "hello-1"
    finally:
        lab.weft("lab", "delete", "-f", str(DEPLOYMENT))
    status = lab.status()
    assert not [p for p in status["pods"] if p.get("owner")]
    assert not [r for r in status["processes"] if r["where"] in {"hello-1", "curl-1"}]
    assert not {f"{lab.name}-hello-1", f"{lab.name}-curl-1"} & set(lab.netns())
