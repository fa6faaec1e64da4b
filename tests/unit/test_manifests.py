"""deploy/kubernetes: valid against the Kubernetes API schemas, and consistent with what
the agent and control plane code read (environment, arguments, mount paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from weft.cli.controlplane import controlplane

MANIFEST = Path(__file__).parents[2] / "deploy" / "kubernetes" / "weft.yaml"
K8S_VERSION = "1.30.0"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _one(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_for_kubernetes(doc: dict[str, Any]):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_agent_daemonset_gives_the_agent_what_it_reads(tmp_path: Path):
    spec = _one("DaemonSet", "weft-agent")["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    assert agent["args"] == ["agent", "--kubernetes"]
    env = {e["name"] for e in agent["env"]}
    # AgentConfig.for_kubernetes refuses to start without these.
    assert {"NODE_NAME", "NODE_IP", "POD_UID", "WEFT_CONTROLPLANE"} <= env
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    # Its defaults for the paths it reads: the projected token, the trust bundle
    # ConfigMap (key ca.crt, as `weft identity init --secret-manifest` writes it), the
    # memory-backed certificate directory, host cgroup2 and bpffs.
    for path in ("/var/run/secrets/weft", "/etc/weft/trust", "/run/weft", "/host/cgroup",
                 "/sys/fs/bpf", "/var/run/weft/agent"):  # fmt: skip
        assert path in mounts, path
    volumes = {v["name"]: v for v in spec["volumes"]}
    token = volumes["token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == token | {"audience": "weft-controlplane", "path": "token"}
    assert volumes["certs"]["emptyDir"]["medium"] == "Memory"
    assert volumes["trust-bundle"]["configMap"]["name"] == "weft-trust-bundle"
    assert spec["hostNetwork"] and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["serviceAccountName"] == "weft-agent"


def test_controlplane_deployment_and_rbac_match_the_code(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WEFT_LAB", raising=False)
    spec = _one("Deployment", "weft-controlplane")["spec"]["template"]["spec"]
    (cp,) = spec["containers"]
    assert cp["args"][:1] == ["controlplane"] and "--lab" not in cp["args"]
    # `weft controlplane` parses these arguments (an unknown option would raise).
    ctx = controlplane.make_context("controlplane", list(cp["args"][1:]))
    assert ctx.params["ca_dir"] == Path("/etc/weft/ca") and ctx.params["lab_name"] is None
    rules = _one("ClusterRole", "weft-controlplane")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}  # fmt: skip
    for resource in ("pods", "services", "namespaces"):
        assert {("", resource, "list"), ("", resource, "watch")} <= granted
    assert ("discovery.k8s.io", "endpointslices", "watch") in granted
    assert ("authentication.k8s.io", "tokenreviews", "create") in granted
    for routes in ("httproutes", "grpcroutes"):
        assert {("gateway.networking.k8s.io", routes, v) for v in ("list", "watch")} <= granted
        # Route status goes through the status subresource (a merge patch), nothing else.
        status = {(g, r, v) for g, r, v in granted if r == f"{routes}/status"}
        assert status == {("gateway.networking.k8s.io", f"{routes}/status", v)
                          for v in ("get", "patch", "update")}  # fmt: skip
    # The agents may not read the CA Secret: they get no role at all.
    assert not [d for d in _docs() if d["kind"] in ("Role", "RoleBinding")
                and "weft-agent" in str(d)]  # fmt: skip
