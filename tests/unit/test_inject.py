"""``weft inject`` (sidecar mode, issue #16): schema-valid against the newest Kubernetes
schemas, idempotent, and giving the sidecar what it reads."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from click.testing import CliRunner

from nodeagent.sidecar import SidecarConfig, SidecarError, capture_rules
from weft.cli import cli
from weft.inject import (
    INIT_NAME,
    SIDECAR_NAME,
    SIDECAR_UID,
    InjectError,
    InjectOptions,
    inject,
)
from weft.mesh import MODE_KEY, SIDECAR_TUNNEL_PORT, Workload, WorkloadPort

K8S_VERSION = kubernetes_validate.utils.latest_version()

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "serviceAccountName": "web",
                "containers": [
                    {"name": "app", "image": "web:1", "ports": [{"containerPort": 8080}]}
                ],
            },
        },
    },
}
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "one", "namespace": "default"},
    "spec": {"containers": [{"name": "app", "image": "app:1"}]},
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web"},
    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
}


@pytest.mark.parametrize("doc", [DEPLOYMENT, POD], ids=["deployment", "pod"])
def test_injected_manifest_is_valid_for_kubernetes(doc: dict[str, Any]) -> None:
    out = inject(doc, InjectOptions())
    kubernetes_validate.validate(out, K8S_VERSION, strict=True)


def _spec(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if doc["kind"] == "Pod":
        return doc["metadata"], doc["spec"]
    return doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]


def test_inject_adds_the_annotation_init_and_sidecar_and_keeps_the_app() -> None:
    out = inject(DEPLOYMENT, InjectOptions(image="reg/weft:1"))
    meta, spec = _spec(out)
    assert meta["annotations"][MODE_KEY] == "sidecar"
    assert [c["name"] for c in spec["initContainers"]] == [INIT_NAME]
    assert [c["name"] for c in spec["containers"]] == ["app", SIDECAR_NAME]
    init = spec["initContainers"][0]
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN"], "drop": ["ALL"]}
    assert init["command"][-1] == str(SIDECAR_UID)
    side = spec["containers"][1]
    assert side["image"] == "reg/weft:1"
    assert side["securityContext"]["runAsUser"] == SIDECAR_UID
    assert "add" not in side["securityContext"]["capabilities"]
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert ports == {"weft-tunnel": SIDECAR_TUNNEL_PORT, "weft-admin": 15020}
    assert DEPLOYMENT["spec"]["template"]["metadata"] == {"labels": {"app": "web"}}  # a copy


def test_inject_is_idempotent_and_passes_other_objects_through() -> None:
    once = inject(DEPLOYMENT, InjectOptions())
    assert inject(once, InjectOptions()) == once
    again = inject(once, InjectOptions(image="weft:2"))
    _, spec = _spec(again)
    assert len(spec["containers"]) == 2 and len(spec["volumes"]) == 3
    assert spec["containers"][1]["image"] == "weft:2"
    assert inject(SERVICE, InjectOptions()) == SERVICE


def test_inject_refuses_host_network_pods() -> None:
    doc = copy.deepcopy(POD)
    doc["spec"]["hostNetwork"] = True
    with pytest.raises(InjectError, match="Pod one: a hostNetwork pod"):
        inject(doc, InjectOptions())


def test_the_sidecar_reads_what_inject_gives_it() -> None:
    """The env the injected container gets (downward API resolved) configures the sidecar."""
    _, spec = _spec(inject(POD, InjectOptions()))
    side = next(c for c in spec["containers"] if c["name"] == SIDECAR_NAME)
    facts = {"metadata.name": "one", "metadata.namespace": "default", "status.podIP":
             "10.244.1.9", "spec.nodeName": "n1", "spec.serviceAccountName": "app"}  # fmt: skip
    env = {
        e["name"]: e["value"] if "value" in e else facts[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in side["env"]
    }
    cfg = SidecarConfig.from_env(env)
    assert str(cfg.identity) == "spiffe://cluster.local/ns/default/sa/app"
    assert (cfg.pod_ip, cfg.node, cfg.controlplane) == (
        "10.244.1.9", "n1", "weft-controlplane.weft-system.svc",
    )  # fmt: skip
    mounts = {m["mountPath"] for m in side["volumeMounts"]}
    for path in (cfg.token_file, cfg.trust_bundle, cfg.cert_dir):
        assert any(str(path).startswith(m + "/") for m in mounts), path


def test_a_pod_declaring_the_tunnel_port_is_in_sidecar_mode() -> None:
    """What the node agent's capture decision and the dialer read (`Workload.sidecar`)."""
    from weft.identity import SpiffeId
    from weft.mesh import InboundMode

    base = dict(uid="u", name="p", namespace="default", node="n1", ips=("10.244.1.9",),
                service_account="app", identity=SpiffeId.workload("default", "app"),
                captured=True, inbound_mode=InboundMode.PERMISSIVE)  # fmt: skip
    assert not Workload(**base, ports=(WorkloadPort(8080),)).sidecar  # type: ignore[arg-type]
    injected = (WorkloadPort(8080), WorkloadPort(SIDECAR_TUNNEL_PORT, name="weft-tunnel"))
    assert Workload(**base, ports=injected).sidecar  # type: ignore[arg-type]


def test_capture_rules_exempt_the_sidecar_and_admit_only_its_ports() -> None:
    rules = capture_rules(4242, skip_ports=(5432,))
    assert "meta skuid 4242 return" in rules
    assert "tcp dport { 5432 } return" in rules
    assert "redirect to :15001" in rules
    assert "tcp dport { 15008, 15020 } accept" in rules
    assert rules.index('iif "lo" accept') < rules.index("meta l4proto tcp drop")


def test_weft_inject_cli_reads_a_file_and_writes_stdout(tmp_path: Any) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump_all([DEPLOYMENT, SERVICE]))
    out = CliRunner().invoke(cli, ["inject", "-f", str(path)])
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.output))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    path.write_text(out.output)
    assert CliRunner().invoke(cli, ["inject", "-f", str(path)]).output == out.output


def test_the_sidecar_gets_its_pods_own_token_for_the_control_planes_audience() -> None:
    """The projected token the sidecar presents for its own certificate (pod bootstrap)."""
    _, spec = _spec(inject(POD, InjectOptions(audience="weft-cp.example")))
    (token,) = [v for v in spec["volumes"] if v["name"] == "weft-token"]
    (source,) = token["projected"]["sources"]
    sat = source["serviceAccountToken"]
    assert sat["audience"] == "weft-cp.example" and sat["path"] == "token"
    assert sat["expirationSeconds"] <= 3600  # bound and short; the kubelet rotates it
    side = next(c for c in spec["containers"] if c["name"] == SIDECAR_NAME)
    env = {e["name"]: e.get("value") for e in side["env"]}
    assert env["WEFT_TOKEN_FILE"] == "/var/run/secrets/weft/token"
    assert "WEFT_BOOTSTRAP" not in env  # the sidecar's default: its pod's token
    base = {"POD_NAME": "p", "POD_NAMESPACE": "d", "POD_IP": "10.0.0.1", "NODE_NAME": "n",
            "WEFT_CONTROLPLANE": "cp"}  # fmt: skip
    assert SidecarConfig.from_env(base).bootstrap == "pod"
    assert SidecarConfig.from_env({**base, "WEFT_BOOTSTRAP": "node"}).bootstrap == "node"
    with pytest.raises(SidecarError, match="WEFT_BOOTSTRAP"):
        SidecarConfig.from_env({**base, "WEFT_BOOTSTRAP": "secret"})
    out = CliRunner().invoke(cli, ["inject", "-f", "-", "--audience", "x.example"],
                             input=yaml.safe_dump(POD))  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "audience: x.example" in out.output
