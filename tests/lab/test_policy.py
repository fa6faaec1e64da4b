"""Identity-based authorization end to end in the lab (issue #15), with
docs/examples/policy.yaml as a user applies it: `payments` (two replicas, one per node)
may be called by `web` only, on GET /public/* and POST /charge, by nobody on /admin/*;
its namespace's default is cluster-authenticated. Enforcement happens on the destination
node, where the caller's identity was verified."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner, running_lab, sample
from weft.lab.lab import agent_state

POLICY = Path(__file__).resolve().parents[2] / "docs" / "examples" / "policy.yaml"
URL = "http://payments.shop"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    with running_lab("wz", "--demo", "--nodes", "2") as runner:
        out = runner.weft("lab", "apply", "-f", str(POLICY))
        assert "authorizationpolicy.weft.io/payments-from-web created" in out.stderr, out.stderr
        yield runner


def _metric(lab: LabRunner, name: str, **labels: str) -> float:
    return sum(sample(lab.metrics(node), name, **labels) for node in ("node-1", "node-2"))


def _until(what: str, done, timeout: float = 15.0) -> float:
    """Seconds until ``done()``; the change must reach the agents (discovery is async)."""
    start = time.monotonic()
    while not done():
        assert time.monotonic() - start < timeout, f"{what}: not in force after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start


def _apply_variant(lab: LabRunner, tmp_path: Path, old: str, new: str) -> None:
    changed = tmp_path / "policy.yaml"
    changed.write_text(POLICY.read_text().replace(old, new))
    lab.weft("lab", "apply", "-f", str(changed))


def test_only_web_calls_payments_and_only_on_its_paths(lab: LabRunner) -> None:
    got = lab.exec("web-1", "curl", "-s", "-m", "10", *[f"{URL}/public/prices"] * 20).stdout
    answers = [json.loads(line) for line in got.splitlines()]
    assert len(answers) == 20 and {a["pod"] for a in answers} == {"payments-1", "payments-2"}
    assert lab.http_code("web-1", "-X", "POST", "-d", "amount=1", f"{URL}/charge") == 200
    assert lab.http_code("web-1", f"{URL}/charge") == 403  # GET /charge: no rule allows it
    assert lab.http_code("web-1", f"{URL}/admin/users") == 403  # DENY wins over nothing
    for trick in ("/public/../admin/users", "/public/%2e%2e/admin/users", "//admin/users",
                  "/public/..%2fadmin/users"):  # fmt: skip
        assert lab.http_code("web-1", "--path-as-is", URL + trick) == 403, trick
    assert lab.http_code("batch-1", f"{URL}/public/prices") == 403  # another identity
    assert lab.http_code("client-1", f"{URL}/public/prices") == 403  # another namespace
    # Spoofed identity headers change nothing: identity comes from mTLS only.
    spoof = ["-H", "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/shop/sa/web"]
    assert lab.http_code("batch-1", *spoof, f"{URL}/public/prices") == 403
    assert _metric(lab, "inbound_http_authz_deny_total", policy="shop/no-admin") >= 5
    assert _metric(lab, "inbound_http_authz_allow_total", policy="shop/payments-from-web") >= 21
    assert _metric(lab, "inbound_tcp_authz_deny_total", policy="shop/payments-from-web") >= 1
    logs = "".join(lab.weft("lab", "logs", f"agent-node-{i}").stdout for i in (1, 2))
    assert "denied http GET /admin/users from spiffe://cluster.local/ns/shop/sa/web" in logs
    assert "shop/no-admin rule 0" in logs


def test_plaintext_is_refused_by_the_cluster_authenticated_default(lab: LabRunner) -> None:
    # plain-1 is not captured: without a mesh identity it is refused at the pod itself
    # (the default makes the pod strict), on either node.
    for pod in ("payments-1", "payments-2"):
        refused = lab.exec("plain-1", "curl", "-s", "-m", "3", f"http://{pod}.shop:8000/",
                           check=False)  # fmt: skip
        assert refused.returncode != 0, refused
    captured = agent_state(lab.name, "node-1")["capture"]["captured"]
    assert captured["shop/payments-1"]["strict"] is True


def test_audit_mode_lets_everything_through_and_counts_what_would_be_denied(
    lab: LabRunner, tmp_path: Path
) -> None:
    before = _metric(lab, "inbound_tcp_authz_audit_total")
    _apply_variant(lab, tmp_path, "default-inbound-policy: cluster-authenticated",
                   "default-inbound-policy: audit")  # fmt: skip
    try:
        took = _until("audit mode", lambda: lab.http_code("batch-1", f"{URL}/public/x") == 200)
        print(f"audit mode in force {took:.2f} s after apply")
        assert lab.http_code("web-1", f"{URL}/admin/users") == 200  # denied only in audit
        assert _metric(lab, "inbound_tcp_authz_audit_total") > before
        assert _metric(lab, "inbound_http_authz_audit_total", policy="shop/no-admin") >= 1
    finally:
        lab.weft("lab", "apply", "-f", str(POLICY))
    _until("enforcement again", lambda: lab.http_code("batch-1", f"{URL}/public/x") == 403)


def test_a_default_deny_namespace_lets_only_the_allowed_identity_in(
    lab: LabRunner, tmp_path: Path
) -> None:
    namespace = (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
        "  labels: {weft.io/capture: enabled}\n"
        "  annotations: {weft.io/default-inbound-policy: deny}\n"
    )
    allow_web = (
        "apiVersion: weft.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: payments-from-web, namespace: shop}\n"
        "spec:\n  selector: {matchLabels: {app: payments}}\n"
        "  rules: [{from: [{source: {serviceAccounts: [web]}}]}]\n"
    )
    both, policy_only = tmp_path / "deny-but-web.yaml", tmp_path / "allow-web.yaml"
    both.write_text(namespace + "---\n" + allow_web)
    policy_only.write_text(allow_web)
    lab.weft("lab", "apply", "-f", str(both))
    try:
        took = _until("web allowed everywhere but /admin",
                      lambda: lab.http_code("web-1", f"{URL}/anything") == 200)  # fmt: skip
        print(f"policy change in force {took:.2f} s after apply")
        assert lab.http_code("web-1", f"{URL}/admin/x") == 403  # the DENY policy still holds
        assert lab.http_code("batch-1", f"{URL}/anything") == 403
        assert lab.http_code("client-1", f"{URL}/anything") == 403
        # Without an ALLOW policy, the namespace's default denies everyone.
        lab.weft("lab", "delete", "-f", str(policy_only))
        _until("default deny", lambda: lab.http_code("web-1", f"{URL}/anything") == 403)
    finally:
        lab.weft("lab", "apply", "-f", str(POLICY))
    _until("the example again", lambda: lab.http_code("web-1", f"{URL}/public/x") == 200)


ECHO_POLICY = """
apiVersion: weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-calls, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
    - from: [{source: {serviceAccounts: [client]}}]
      to: [{operation: {paths: [/public/*, PATHS]}}]
"""


def test_http2_and_grpc_requests_are_judged_one_by_one(lab: LabRunner, tmp_path: Path) -> None:
    """HTTP/2 streams and gRPC calls on one connection, each judged for the replica
    chosen on the caller's node (the destination relays HTTP/2 frames and judges the
    stream at L4): allowed paths pass, others get 403 / PERMISSION_DENIED."""
    policy = tmp_path / "echo.yaml"
    policy.write_text(ECHO_POLICY.replace("PATHS", "/weft.lab.Echo/*"))
    lab.weft("lab", "apply", "-f", str(policy))

    def h2(path: str) -> int:
        return lab.http_code("client-1", "--http2-prior-knowledge", f"http://echo{path}")

    def grpc(n: int = 20) -> dict:
        out = lab.exec("client-1", sys.executable, "-m", "weft.lab.echoclient", "grpc",
                       "echo:9090", "-n", str(n), check=False).stdout  # fmt: skip
        return json.loads(out)

    try:
        _until("the echo policy", lambda: h2("/admin") == 403)
        assert h2("/public/x") == 200
        got = grpc()
        assert sum(got["pods"].values()) == 20 and not got["errors"], got
        assert len(got["pods"]) == 2  # one channel, both replicas, each call judged
        # Without the gRPC service's path, its calls are denied, one by one.
        policy.write_text(ECHO_POLICY.replace("PATHS", "/nothing"))
        lab.weft("lab", "apply", "-f", str(policy))
        _until("gRPC denied", lambda: "PERMISSION_DENIED" in grpc(2)["errors"])
        assert h2("/public/x") == 200  # the same policy still allows this path over h2
        counted = _metric(lab, "outbound_http_authz_deny_total", policy="default/echo-calls")
        assert counted >= 2
        assert lab.http_code("client-1", "http://echo/admin") == 403  # HTTP/1.1: the destination
    finally:
        lab.weft("lab", "delete", "-f", str(policy))
    _until("no echo policy", lambda: h2("/admin") == 200)


ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments-ops, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: payments, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /ops}}]
      backendRefs: [{name: payments, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments-rest, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: payments, port: 80}]
  rules:
    - backendRefs: [{name: payments, port: 80}]
---
apiVersion: weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ops-from-batch, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: payments-ops}]
  action: ALLOW
  rules: [{from: [{source: {serviceAccounts: [batch]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-ops, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /ops}}]
      backendRefs: [{name: echo, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-rest, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - backendRefs: [{name: echo, port: 80}]
---
apiVersion: weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: echo-ops}]
  action: DENY
  rules: [{from: [{source: {serviceAccounts: [client]}}]}]
"""


def test_a_per_route_policy_judges_the_requests_its_route_matched(
    lab: LabRunner, tmp_path: Path
) -> None:
    """Policies targeting an HTTPRoute apply to the requests that route matched, on the
    caller's node: for HTTP/1.1 the route travels to the destination in ``weft-route``
    (an app's own is dropped), for HTTP/2 the caller's node judges."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    out = lab.weft("lab", "apply", "-f", str(routes))
    assert "authorizationpolicy.weft.io/ops-from-batch created" in out.stderr, out.stderr
    try:
        took = _until("the ops route's ALLOW",
                      lambda: lab.http_code("batch-1", f"{URL}/ops/restart") == 200)  # fmt: skip
        print(f"per-route policy in force {took:.2f} s after apply")
        got = json.loads(lab.exec("batch-1", "curl", "-s", "-m", "10", f"{URL}/ops/x").stdout)
        assert got["path"] == "/ops/x"
        assert lab.http_code("web-1", f"{URL}/ops/restart") == 403  # not batch
        assert lab.http_code("web-1", f"{URL}/public/x") == 200  # the other route: as before
        assert lab.http_code("batch-1", f"{URL}/public/x") == 403  # the ops ALLOW is not for it
        # An app cannot claim a route: its own weft-route header is dropped on its node.
        spoof = ["-H", "weft-route: shop/payments-ops"]
        assert lab.http_code("batch-1", *spoof, f"{URL}/public/x") == 403
        assert _metric(lab, "inbound_http_authz_allow_total", policy="shop/ops-from-batch") >= 2
        # weft policy check finds the route as the caller's node would.
        said = lab.weft("policy", "check", "--from", "ns/shop/sa/batch", "--to", "svc/payments",
                        "-n", "shop", "--method", "GET", "--path", "/ops/x", "-o", "json",
                        "--lab", lab.name)  # fmt: skip
        rows = json.loads(said.stdout)
        assert {r["route"] for r in rows} == {"shop/payments-ops"}
        assert all(r["request"]["allowed"] for r in rows), rows

        # HTTP/2 on the echo service: the DENY of its ops route, judged per request on
        # the caller's node; the rest of the service is untouched, over h2 and HTTP/1.1.
        def h2(path: str) -> int:
            return lab.http_code("client-1", "--http2-prior-knowledge", f"http://echo{path}")

        _until("the echo ops DENY", lambda: h2("/ops/x") == 403)
        assert h2("/other") == 200
        assert lab.http_code("client-1", "http://echo/ops/x") == 403
        assert lab.http_code("client-1", "http://echo/other") == 200
        assert _metric(lab, "outbound_http_authz_deny_total", policy="default/no-ops") >= 1
    finally:
        lab.weft("lab", "delete", "-f", str(routes))
    _until("no routes", lambda: lab.http_code("batch-1", f"{URL}/ops/x") == 403)


PLAIN_ALLOW = """
apiVersion: weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-plain-net, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
    - from: [{source: {ipBlocks: [BLOCK]}}]
      to: [{operation: {ports: ["8080"]}}]
    - from: [{source: {principals: ["*"]}}]
"""

PLAIN_DENY = """
apiVersion: weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-not-from, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: [BLOCK]}}]}]
"""


def test_plaintext_callers_are_judged_by_ip_block_in_the_kernel(
    lab: LabRunner, tmp_path: Path
) -> None:
    """Plaintext never passes the proxy: a strict pod's eBPF filter judges its SYN with
    the verdicts its policies compile to. echo (permissive, made strict by its ALLOW)
    lets the uncaptured plain-1 in on 8080 only while the ALLOW names its address, on
    both nodes, mesh callers still by identity; for a DENY by address it takes the
    plaintext the DENY does not name. (payments cannot take plaintext at all: its
    no-admin DENY needs a path, so it denies every opaque connection, as Istio does.)"""
    status = lab.status()
    plain_ip = next(p["ip"] for p in status["pods"] if p["name"] == "plain-1")

    def direct(pod: str, port: int, path: str = "/") -> int:
        return lab.http_code("plain-1", "-m", "3", f"http://{pod}:{port}{path}")

    allow = tmp_path / "plain-allow.yaml"
    allow.write_text(PLAIN_ALLOW.replace("BLOCK", f"{plain_ip}/32"))
    lab.weft("lab", "apply", "-f", str(allow))
    try:
        took = _until("plain-1 allowed by address", lambda: direct("echo-1", 8080) == 200)
        print(f"plaintext verdicts in force {took:.2f} s after apply")
        assert direct("echo-2", 8080) == 200  # the other node's pod too
        assert lab.http_code("client-1", "http://echo/") == 200  # mesh callers: by identity
        said = lab.weft("policy", "check", "--from", "plaintext", "--source-ip", plain_ip,
                        "--to", "pod/echo-1", "-o", "json", "--lab", lab.name)  # fmt: skip
        assert json.loads(said.stdout)[0]["connection"]["allowed"] is True
        assert direct("payments-1.shop", 8000) == 0  # see the docstring
        # Another block: refused at the pod again, on both nodes.
        allow.write_text(PLAIN_ALLOW.replace("BLOCK", "10.99.0.0/16"))
        lab.weft("lab", "apply", "-f", str(allow))
        _until("plain-1 refused", lambda: direct("echo-1", 8080) == 0)
        assert direct("echo-2", 8080) == 0
        stats = agent_state(lab.name, "node-1")["ebpf"]["stats"]
        assert stats["plaintext_allowed"] >= 1 and stats["strict_dropped"] >= 1
    finally:
        lab.weft("lab", "delete", "-f", str(allow))
    _until("echo permissive", lambda: direct("echo-1", 8080) == 200)

    deny = tmp_path / "plain-deny.yaml"
    deny.write_text(PLAIN_DENY.replace("BLOCK", "10.99.0.0/16"))
    lab.weft("lab", "apply", "-f", str(deny))
    try:
        _until("echo strict", lambda: agent_state(lab.name, "node-1")["capture"]["captured"]
               ["default/echo-1"]["strict"] is True)  # fmt: skip
        assert direct("echo-1", 8080) == 200  # not in the denied block: passes
        deny.write_text(PLAIN_DENY.replace("BLOCK", f"{plain_ip}/32"))
        lab.weft("lab", "apply", "-f", str(deny))
        _until("plain-1 denied by address", lambda: direct("echo-1", 8080) == 0)
        assert lab.http_code("client-1", "http://echo/") == 200  # mesh callers unaffected
    finally:
        lab.weft("lab", "delete", "-f", str(deny))
    _until("echo permissive again", lambda: direct("echo-1", 8080) == 200)
