"""daemonset/weft.yaml (the template weft install renders; tests/unit/test_install.py checks
the rendered variants): valid against the newest Kubernetes API schemas kubernetes-validate
ships, and consistent with what the agent and control plane code read (environment,
arguments, mount paths); the AuthorizationPolicy CRD's schema structural, and accepting
what weft/policy/parse.py accepts (the documented examples) and rejecting what it rejects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # comes with kubernetes-validate
import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from weft.cli.controlplane import controlplane
from weft.identity import DEFAULT_TRUST_DOMAIN
from weft.policy import API_VERSION, GROUP, KIND, VERSION, parse_policy
from weft.policy.parse import MAX_ENTRIES, MAX_RULES, MAX_VALUES

ROOT = Path(__file__).parents[2]
MANIFEST = ROOT / "daemonset" / "weft.yaml"
EXAMPLES = ROOT / "docs" / "examples"
K8S_VERSION = kubernetes_validate.utils.latest_version()
"""The newest Kubernetes whose schemas the installed kubernetes-validate ships (not a pinned
old one: a field removed or tightened upstream shows up when kubernetes-validate moves)."""


def test_schemas_are_the_newest_shipped() -> None:
    newest = max(
        kubernetes_validate.utils.all_versions(), key=lambda v: tuple(map(int, v.split(".")))
    )
    assert newest == K8S_VERSION
    assert tuple(map(int, K8S_VERSION.split(".")[:2])) >= (1, 37)


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
    # The template names its own namespace's agents and the code's default trust domain.
    assert ctx.params["agent_identity"] == "weft-system/weft-agent"
    assert ctx.params["trust_domain"] == DEFAULT_TRUST_DOMAIN
    rules = _one("ClusterRole", "weft-controlplane")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}  # fmt: skip
    for resource in ("pods", "services", "namespaces"):
        assert {("", resource, "list"), ("", resource, "watch")} <= granted
    assert ("discovery.k8s.io", "endpointslices", "watch") in granted
    assert ("authentication.k8s.io", "tokenreviews", "create") in granted
    # Sidecar pod tokens: the bound pod is read back; the trust bundle per namespace.
    assert ("", "pods", "get") in granted
    assert {("", "configmaps", v) for v in ("get", "list", "create", "update")} <= granted
    for routes in ("httproutes", "grpcroutes"):
        assert {("gateway.networking.k8s.io", routes, v) for v in ("list", "watch")} <= granted
        # Route status goes through the status subresource (a merge patch), nothing else.
        status = {(g, r, v) for g, r, v in granted if r == f"{routes}/status"}
        assert status == {("gateway.networking.k8s.io", f"{routes}/status", v)
                          for v in ("get", "patch", "update")}  # fmt: skip
    # The agents may not read the CA Secret: they get no role at all.
    assert not [d for d in _docs() if d["kind"] in ("Role", "RoleBinding")
                and "weft-agent" in str(d)]  # fmt: skip
    # Policies: read and watched; their status written through the subresource only.
    assert {("weft.io", "authorizationpolicies", v) for v in ("get", "list", "watch")} <= granted
    status = {(g, r, v) for g, r, v in granted if r == "authorizationpolicies/status"}
    assert status == {("weft.io", "authorizationpolicies/status", v)
                      for v in ("get", "patch", "update")}  # fmt: skip


# -- the AuthorizationPolicy CRD ----------------------------------------------------------


def _crd() -> dict[str, Any]:
    return _one("CustomResourceDefinition", f"authorizationpolicies.{GROUP}")


def _schema() -> dict[str, Any]:
    (version,) = _crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _structural_problems(node: dict[str, Any], where: str = "") -> list[str]:
    """What makes a schema non-structural (apiextensions' rules, the parts used here):
    every node has a type (or is int-or-string), objects say what they hold."""
    problems = []
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{where or '.'}: no type")
    if node.get("type") == "object" and not ({"properties", "additionalProperties"} & set(node)
                                             or where == ".metadata"):  # fmt: skip
        problems.append(f"{where}: an object without properties (would be pruned empty)")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{where}: an array without items")
    for name, child in (node.get("properties") or {}).items():
        problems += _structural_problems(child, f"{where}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{where}.*")
    if "items" in node:
        problems += _structural_problems(node["items"], f"{where}[]")
    return problems


def _as_json_schema(node: Any) -> Any:
    """The CRD schema for `jsonschema`: int-or-string spelled out, and objects closed
    (the API server would prune an unknown field silently; here it fails the check, so
    a field parse.py reads but the schema lacks cannot go unnoticed)."""
    if isinstance(node, list):
        return [_as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _validator() -> Any:
    schema = _as_json_schema(_schema())
    schema["properties"]["metadata"]["additionalProperties"] = True
    return jsonschema.Draft7Validator(schema)


def _example_policies() -> list[dict[str, Any]]:
    return [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if d and d.get("kind") == KIND]  # fmt: skip


def test_policy_crd_is_structural_and_names_what_the_code_reads() -> None:
    crd = _crd()["spec"]
    assert (crd["group"], crd["scope"], crd["names"]["kind"]) == (GROUP, "Namespaced", KIND)
    assert crd["names"]["plural"] == "authorizationpolicies"
    assert {"authz", "wap"} <= set(crd["names"]["shortNames"])
    (version,) = crd["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}  # status written through it only
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Action"] == ".spec.action"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert _structural_problems(_schema()) == []
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["action"]["enum"] == ["ALLOW", "DENY", "AUDIT"]
    assert spec["action"]["default"] == "ALLOW"
    # The limits are parse.py's: the API server refuses what the control plane would.
    rule = spec["rules"]["items"]["properties"]
    assert spec["rules"]["maxItems"] == MAX_RULES
    assert rule["from"]["maxItems"] == rule["to"]["maxItems"] == MAX_ENTRIES
    source = rule["from"]["items"]["properties"]["source"]["properties"]
    operation = rule["to"]["items"]["properties"]["operation"]["properties"]
    for field in (*source.values(), *operation.values()):
        assert field["maxItems"] == MAX_VALUES
    assert set(source) == {"principals", "notPrincipals", "namespaces", "notNamespaces",
                           "serviceAccounts", "ipBlocks", "notIpBlocks"}  # fmt: skip
    assert set(operation) == {"ports", "notPorts", "methods", "notMethods", "paths",
                              "notPaths", "headers"}  # fmt: skip


def test_policy_crd_schema_accepts_the_examples_and_what_parse_accepts() -> None:
    examples = _example_policies()
    assert examples, f"no {KIND} in {EXAMPLES}"
    full = {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": "all-fields", "namespace": "shop", "labels": {"a": "b"}},
        "spec": {
            "selector": {"matchLabels": {"app": "payments"}},
            "action": "AUDIT",
            "rules": [{}, {
                "from": [{"source": {
                    "principals": ["spiffe://cluster.local/ns/shop/sa/web"],
                    "notPrincipals": ["*/ns/shop/sa/batch"], "namespaces": ["shop"],
                    "notNamespaces": ["dev"], "serviceAccounts": ["web", "ops/admin"],
                    "ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.1.0.0/16"]}}],
                "to": [{"operation": {
                    "ports": [8080, "8443"], "notPorts": [9090], "methods": ["GET"],
                    "notMethods": ["DELETE"], "paths": ["/api/*"], "notPaths": ["/admin"],
                    "headers": [{"name": "x-tenant", "values": ["a", "b*"]}]}}],
            }],
        },
    }  # fmt: skip
    routed = {"apiVersion": API_VERSION, "kind": KIND,
              "metadata": {"name": "per-route", "namespace": "shop"},
              "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io",
                                       "kind": "HTTPRoute", "name": "payments"}]}}  # fmt: skip
    validator = _validator()
    for doc in [*examples, full, routed]:
        parse_policy(doc)  # the control plane takes it ...
        errors = [e.message for e in validator.iter_errors(doc)]
        assert errors == [], (doc["metadata"]["name"], errors)  # ... and so does the API


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda s: s.update(action="allow"), "action"),  # case matters, as in parse.py
        (lambda s: s.update(rules=[{}] * (MAX_RULES + 1)), "rules"),
        (lambda s: s.update(rules=[{"from": [{"source": {}}]}]), "source"),
        (lambda s: s.update(rules=[{"to": [{"operation": {"ports": [True]}}]}]), "ports"),
        (
            lambda s: s.update(rules=[{"to": [{"operation": {"headers": [{"name": "x"}]}}]}]),
            "headers",
        ),
        (lambda s: s.update(rules=[{"to": [{"operation": {"hosts": ["a"]}}]}]), "hosts"),
        (lambda s: s["selector"].update(matchLabels={"app": 1}), "matchLabels"),
    ],
    ids=[
        "lowercase-action",
        "too-many-rules",
        "empty-source",
        "bool-port",
        "header-values",
        "unknown-field",
        "label-not-string",
    ],
)
def test_policy_crd_schema_rejects_bad_policies(change: Any, path: str) -> None:
    doc = copy.deepcopy(next(d for d in _example_policies() if d["spec"].get("selector")))
    change(doc["spec"])
    assert list(_validator().iter_errors(doc)), f"schema accepted a bad {path}"
    with pytest.raises(ValueError):
        parse_policy(doc)  # PolicyError: the control plane refuses it too


def test_what_a_real_cluster_needs_of_the_manifests() -> None:
    """Issue #16's hardening: Pod Security admits the privileged agent, both run on Linux
    nodes only, the agent mounts no API token it never uses, its liveness waits for the
    eBPF compile, and the control plane survives a node drain (2 replicas, spread, PDB)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in _docs():
        by_kind.setdefault(doc["kind"], []).append(doc)
    (ns,) = by_kind["Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    (ds,) = by_kind["DaemonSet"]
    (cp,) = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "weft-controlplane"]
    for workload in (ds, cp):
        assert workload["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    agent_pod = ds["spec"]["template"]["spec"]
    assert agent_pod["automountServiceAccountToken"] is False
    startup = agent_pod["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert cp["spec"]["replicas"] >= 2
    anti = cp["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"][
        "topologyKey"] == "kubernetes.io/hostname"  # fmt: skip
    (pdb,) = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == cp["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 1


def test_the_agent_rolls_out_make_before_break_and_mounts_bpffs() -> None:
    """A hostNetwork pod's containerPort is a hostPort: none is declared, so the rollout's
    surge pod schedules beside the old one. Readiness is a file in the new container's
    own memory volume (the old agent shares port 15020 and could answer an HTTP probe).
    An init container mounts bpffs when the node has none, propagated to the host."""
    ds = _one("DaemonSet", "weft-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    (agent,) = pod["containers"]
    assert "ports" not in agent and not any("hostPort" in str(c) for c in pod["containers"])
    env = {e["name"]: e.get("value") for e in agent["env"]}
    marker = env["WEFT_READY_FILE"]
    assert agent["readinessProbe"]["exec"]["command"] == ["test", "-e", marker]
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    holder = max((p for p in mounts if marker.startswith(p + "/")), key=len)
    assert "emptyDir" in volumes[mounts[holder]]  # the pod's own, not shared with the old one
    (init,) = pod["initContainers"]
    assert init["securityContext"]["privileged"] is True
    (bpf,) = init["volumeMounts"]
    assert (bpf["mountPath"], bpf["mountPropagation"]) == ("/sys/fs/bpf", "Bidirectional")
    assert volumes[bpf["name"]]["hostPath"] == {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}
    assert "mount -t bpf bpf /sys/fs/bpf" in init["command"][-1]
    agent_bpf = next(m for m in agent["volumeMounts"] if m["name"] == bpf["name"])
    assert agent_bpf["mountPropagation"] == "HostToContainer"
