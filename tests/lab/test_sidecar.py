"""Sidecar mode in the lab (issue #16): sidecar-mode and node-mode pods in one mesh.

One lab, two nodes, four echo replicas: echo-2 and echo-3 run their own sidecar (one per
node), echo-1 and echo-4 are captured by their node's agent; client-2 is a sidecar
client, client-1 a node-mode one, plain-1 outside the mesh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner, sample, unique_name
from weft.lab.lab import admin_get

SIDECARS = ("echo-2", "echo-3", "client-2")
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"

POLICY = """\
apiVersion: weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-admin, namespace: default}
spec:
  selector:
    matchLabels: {app: echo}
  action: DENY
  rules:
    - to:
        - operation: {paths: [/admin/*]}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    runner = LabRunner(unique_name("wsc"))
    try:
        args = [a for pod in SIDECARS for a in ("--sidecar", pod)]
        runner.weft("lab", "up", "--demo", "--pods-per-node", "2", *args, timeout=600)
        yield runner
    finally:
        runner.weft("lab", "down", check=False)


def _sidecar(lab: LabRunner, pod: str, path: str) -> str:
    answer = admin_get(f"{lab.name}-{pod}", "127.0.0.1", 15020, path)
    assert answer is not None and answer[0] == 200, (pod, path, answer)
    return answer[1]


def _get(lab: LabRunner, pod: str, url: str, n: int = 1) -> list[dict]:
    """``n`` requests on one connection (curl reuses it); each echo's JSON answer."""
    out = lab.exec(pod, "curl", "-sS", "-m", "20", *([url] * n))
    return [json.loads(line) for line in out.stdout.replace("}{", "}\n{").splitlines() if line]


def test_sidecar_pods_are_left_to_their_sidecar(lab: LabRunner) -> None:
    for node in ("node-1", "node-2"):
        state = json.loads(admin_get(f"{lab.name}-{node}", "127.0.0.1", 15020,
                                     "/debug/state")[1])  # type: ignore[index]  # fmt: skip
        captured = state["capture"]["captured"]
        assert not any(f"default/{p}" in captured for p in SIDECARS), captured
    for pod in SIDECARS:
        state = json.loads(_sidecar(lab, pod, "/debug/state"))
        assert state["ready"] and state["mode"] == "sidecar" and state["declares_tunnel"], state


def test_sidecar_and_node_pods_call_each_other_with_both_identities(lab: LabRunner) -> None:
    # sidecar client -> node-mode pod on the other node, node-mode client -> sidecar pod.
    assert _get(lab, "client-2", "http://echo-1:8080/")[0]["pod"] == "echo-1"
    assert _get(lab, "client-1", "http://echo-3:8080/")[0]["pod"] == "echo-3"
    assert _get(lab, "client-1", "http://echo-2:8080/")[0]["pod"] == "echo-2"
    # Inbound at the sidecar: the caller's identity verified, its own presented.
    m = _sidecar(lab, "echo-3", "/metrics")
    assert sample(m, "response_total", direction="inbound", client_id=CLIENT_ID,
                  server_id=ECHO_ID, tls="true") >= 1  # fmt: skip
    # Outbound from the sidecar client, and inbound at node-1's agent.
    m = _sidecar(lab, "client-2", "/metrics")
    assert sample(m, "response_total", direction="outbound", client_id=CLIENT_ID,
                  server_id=ECHO_ID, dst_workload="echo-1") >= 1  # fmt: skip
    assert sample(lab.metrics("node-1"), "response_total", direction="inbound",
                  client_id=CLIENT_ID, dst_workload="echo-1") >= 1  # fmt: skip


@pytest.mark.parametrize("client", ["client-1", "client-2"])
def test_requests_are_balanced_over_both_kinds_of_replicas(lab: LabRunner, client: str) -> None:
    pods = [r["pod"] for r in _get(lab, client, "http://echo/", n=60)]
    assert len(pods) == 60
    # Per request on one connection, over sidecar and node-mode replicas alike.
    assert set(pods) == {"echo-1", "echo-2", "echo-3", "echo-4"}, pods


def test_strict_inbound_refuses_a_plaintext_caller(lab: LabRunner) -> None:
    refused = lab.exec("plain-1", "curl", "-sS", "-m", "3", "http://echo-3:8080/", check=False)
    assert refused.returncode != 0, refused.stdout
    # The node-mode replica on the same node is permissive (the lab's default): so the
    # refusal is the sidecar pod's own nftables, not the network.
    assert lab.exec("plain-1", "curl", "-sS", "-m", "5", "http://echo-1:8080/").returncode == 0


def test_kubelet_probes_reach_the_app_under_strict_inbound(lab: LabRunner) -> None:
    """The lab plays kubelet from the pod's node (its address, as a kubelet's probes come):
    the app port itself is closed to it (strict inbound), the probes `weft inject`
    rewrites to the sidecar's admin port run inside the pod and reach the app."""
    echo3 = next(p for p in lab.status()["pods"] if p["name"] == "echo-3")
    node, ip = f"{lab.name}-{echo3['node']}", echo3["ip"]
    assert admin_get(node, ip, 8080, "/") is None  # dropped: not loopback, not 15008/15020
    assert admin_get(node, ip, 15020, "/app-health/app/readyz") == (
        200, "http probe of port 8080: HTTP 200\n",
    )  # fmt: skip
    assert admin_get(node, ip, 15020, "/app-health/app/livez") == (
        200, "tcp probe of port 8080: connected\n",
    )  # fmt: skip
    assert admin_get(node, ip, 15020, "/app-health/app/nope")[0] == 404  # type: ignore[index]
    # ... while a pod outside the mesh still cannot reach the app port.
    refused = lab.exec("plain-1", "curl", "-sS", "-m", "3", "http://echo-3:8080/", check=False)
    assert refused.returncode != 0, refused.stdout
    state = json.loads(_sidecar(lab, "echo-3", "/debug/state"))
    assert state["app_probes"]["/app-health/app/readyz"]["ok"] >= 1, state["app_probes"]


def test_a_policy_is_enforced_on_a_sidecar_pod(lab: LabRunner, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    lab.weft("lab", "apply", "-f", str(policy))
    try:

        def code(pod: str, url: str) -> int:
            out = lab.exec(pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m",
                           "10", url, check=False)  # fmt: skip
            return int(out.stdout or 0)

        deadline = time.monotonic() + 20
        while code("client-1", "http://echo-2:8080/admin/x") != 403:
            assert time.monotonic() < deadline, "policy not in force at the sidecar"
            time.sleep(0.2)
        assert code("client-2", "http://echo-3:8080/admin/x") == 403
        assert code("client-2", "http://echo-3:8080/public") == 200
        m = _sidecar(lab, "echo-2", "/metrics")
        assert sample(m, "inbound_http_authz_deny_total") >= 1, m
    finally:
        lab.weft("lab", "delete", "-f", str(policy), check=False)
