"""``weft inject`` (sidecar mode, issue #16): schema-valid against the newest Kubernetes
schemas, idempotent, and giving the sidecar what it reads."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from click.testing import CliRunner

from nodeagent.probes import AppProbe
from nodeagent.sidecar import SidecarConfig, SidecarError, capture_rules
from weft.cli import cli
from weft.inject import (
    INIT_NAME,
    PROBES_ENV,
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


PROBED: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "probed", "namespace": "default"},
    "spec": {
        "containers": [
            {
                "name": "app",
                "image": "app:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http",
                                "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                    "periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 5,
                },
                "livenessProbe": {"tcpSocket": {"port": 8080}, "initialDelaySeconds": 4},
                "startupProbe": {"exec": {"command": ["true"]}},
            },
            {
                "name": "grpc",
                "image": "grpc:1",
                "readinessProbe": {"grpc": {"port": 9090, "service": "shop.Cart"}},
                "livenessProbe": {"httpGet": {"path": "/", "port": 9091, "scheme": "HTTPS"}},
            },
        ]
    },
}  # fmt: skip


def test_http_and_tcp_probes_are_pointed_at_the_sidecar() -> None:
    """Strict inbound drops the kubelet's own connections to app ports: the sidecar runs
    the probes from inside the pod, asked on its admin port (which the rules admit)."""
    out = inject(PROBED, InjectOptions())
    kubernetes_validate.validate(out, K8S_VERSION, strict=True)
    _, spec = _spec(out)
    app, grpc, side = spec["containers"]
    assert app["readinessProbe"] == {
        "httpGet": {"path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"},
        "periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 5,
    }  # fmt: skip
    assert app["livenessProbe"] == {
        "httpGet": {"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"},
        "initialDelaySeconds": 4,
    }
    assert app["startupProbe"] == {"exec": {"command": ["true"]}}  # runs in the container
    assert grpc["readinessProbe"] == {
        "httpGet": {"path": "/app-health/grpc/readyz", "port": 15020, "scheme": "HTTP"}
    }
    assert grpc["livenessProbe"]["httpGet"]["path"] == "/app-health/grpc/livez"
    env = {e["name"]: e.get("value") for e in side["env"]}
    table = json.loads(env[PROBES_ENV])
    assert table == {
        "/app-health/app/readyz": {
            "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP",
                        "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
            "timeoutSeconds": 2,
        },
        "/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
        "/app-health/grpc/livez": {
            "httpGet": {"path": "/", "port": 9091, "scheme": "HTTPS"}, "timeoutSeconds": 1,
        },
        "/app-health/grpc/readyz": {
            "grpc": {"port": 9090, "service": "shop.Cart"}, "timeoutSeconds": 1,
        },
    }  # fmt: skip
    # The sidecar reads exactly that table.
    base = {"POD_NAME": "p", "POD_NAMESPACE": "d", "POD_IP": "10.0.0.1", "NODE_NAME": "n",
            "WEFT_CONTROLPLANE": "cp", PROBES_ENV: env[PROBES_ENV]}  # fmt: skip
    probes = SidecarConfig.from_env(base).app_probes
    assert probes["/app-health/app/readyz"] == AppProbe(
        "http", 8080, 2.0, "/healthz", False, (("X-Probe", "1"),)
    )
    assert probes["/app-health/app/livez"] == AppProbe("tcp", 8080, 1.0)
    assert probes["/app-health/grpc/livez"].https
    assert probes["/app-health/grpc/readyz"] == AppProbe("grpc", 9090, 1.0, service="shop.Cart")
    # Idempotent: the rewritten probes keep their originals from the sidecar's table.
    assert inject(out, InjectOptions()) == out
    assert inject(out, InjectOptions(image="weft:2"))["spec"]["containers"][2]["env"] == side["env"]


def test_probe_rewriting_can_be_turned_off_and_refuses_unknown_ports() -> None:
    out = inject(PROBED, InjectOptions(rewrite_probes=False))
    _, spec = _spec(out)
    assert (
        spec["containers"][0]["readinessProbe"] == PROBED["spec"]["containers"][0]["readinessProbe"]
    )
    assert PROBES_ENV not in {e["name"] for e in spec["containers"][-1]["env"]}
    cli_out = CliRunner().invoke(cli, ["inject", "-f", "-", "--no-rewrite-probes"],
                                 input=yaml.safe_dump(PROBED))  # fmt: skip
    assert cli_out.exit_code == 0 and "/app-health/" not in cli_out.output
    bad = copy.deepcopy(PROBED)
    bad["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = "metrics"
    with pytest.raises(InjectError, match="'metrics' is not a number nor a port the container"):
        inject(bad, InjectOptions())
    with pytest.raises(SidecarError, match="WEFT_APP_PROBES"):
        SidecarConfig.from_env({"POD_NAME": "p", "POD_NAMESPACE": "d", "POD_IP": "10.0.0.1",
                                "NODE_NAME": "n", "WEFT_CONTROLPLANE": "cp",
                                PROBES_ENV: '{"/app-health/a/readyz": {"exec": {}}}'})  # fmt: skip
