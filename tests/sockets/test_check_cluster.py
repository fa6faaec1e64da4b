"""``weft check --pre`` and ``weft check --kubeconfig`` against the fake API server (the real
wire format, read with a kubeconfig as kubectl would): a healthy cluster passes, and each
failure is named with its object and a non-zero exit.

The agents and control plane replicas behind the pod proxy answer with their real admin
responders (``nodeagent.admin.AdminServer.route``, ``controlplane.identity.server.
AdminServer.respond``) and the real metric families where they can be built alone (the
discovery gauges on both sides); the capture families, which need a running agent, are
made here under the names the agent's collector uses (checked against its source below).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controlplane.discovery.model import DiscoveryStore
from controlplane.discovery.stream import DiscoveryStream
from controlplane.identity.ca import init_ca
from controlplane.identity.server import AdminServer as ControlPlaneAdmin
from controlplane.identity.server import Readiness as ControlPlaneReadiness
from nodeagent.admin import AdminServer as AgentAdmin
from nodeagent.admin import Readiness as AgentReadiness
from nodeagent.discovery import DiscoveryClient
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI
from weft.cli.check import check
from weft.cli.install import InstallOptions, load_template, render
from weft.http import RequestHead

pytestmark = pytest.mark.sockets

TOKEN = "admin-token"
NS = "weft-system"
NODES = ("node-1", "node-2")
KIND_RESOURCE = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Service": "services",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "DaemonSet": "daemonsets",
}


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN) as api:
        yield api


def kubeconfig(tmp_path: Path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "admin"}}],
    }))  # fmt: skip
    return str(path)


def node(name: str, kernel: str = "6.1.0-18-amd64", os: str = "linux") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/os": os}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kernelVersion": kernel, "osImage": "Debian GNU/Linux 12 (bookworm)",
                         "operatingSystem": os, "architecture": "amd64",
                         "containerRuntimeVersion": "containerd://1.7.24",
                         "kubeletVersion": "v1.31.4"},
        },
    }  # fmt: skip


class Agent:
    """One node's agent behind the pod proxy: its real admin responder."""

    def __init__(self, blockers: tuple[str, ...] = (), ebpf: bool = True) -> None:
        self.readiness = AgentReadiness(*blockers)
        self.registry = CollectorRegistry()
        self.discovery = DiscoveryClient(None, None, registry=self.registry)  # type: ignore[arg-type]
        self.discovery.m_connected.set(1)
        self.discovery.m_revision.set(42)
        self.ebpf = ebpf
        self.registry.register(self)
        self.admin = AgentAdmin(self.readiness, dict, self.registry)

    def collect(self) -> Any:
        # Named as nodeagent.agent._StatsCollector names them.
        if self.ebpf:
            c = CounterMetricFamily("weft_capture_events", "eBPF capture events", labels=["event"])
            c.add_metric(["connect4_redirect"], 17)
            yield c
        g = GaugeMetricFamily("weft_captured_pods", "Local pods captured by this agent")
        g.add_metric([], 3)
        yield g

    def __call__(self, target: str) -> fakeapi.ProxyAnswer:
        # The API server dials the node's address (hostNetwork), not loopback.
        return self.admin.route(RequestHead("GET", target, {}), peer="10.240.0.11")


class Replica:
    """A control plane replica's admin port: /ready with its blockers, real metrics."""

    def __init__(self, synced: bool = True) -> None:
        self.readiness = ControlPlaneReadiness()
        registry = CollectorRegistry()
        self.stream = DiscoveryStream(DiscoveryStore(), None, registry)
        self.stream.m_revision.set(42)
        self.stream.m_subscribers.set(1)
        if not synced:
            self.readiness.add_check("discovery", lambda: "discovery has no complete view yet")
        self.admin = ControlPlaneAdmin(registry, self.readiness, "127.0.0.1", 0)

    def __call__(self, target: str) -> fakeapi.ProxyAnswer:
        return self.admin.respond(RequestHead("GET", target, {}))


def pod(name: str, node_name: str, app: str, ready: bool = True) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": app}
    obj = fakeapi.pod(name, NS, node=node_name, ip="10.240.0.11", ready=ready, labels=labels,
                      host_network=app == "weft-agent")  # fmt: skip
    if not ready:
        obj["status"]["containerStatuses"] = [{"name": "agent", "ready": False, "restartCount": 0,
                                               "state": {"running": {}}}]  # fmt: skip
    return obj


class Cluster:
    """A cluster with Weft installed and healthy; tests break one thing each."""

    def __init__(self, fake: FakeKubeAPI) -> None:
        self.fake = fake
        self.agents: dict[str, Agent] = {}
        self.replicas: dict[str, Replica] = {}
        for name in NODES:
            fake.create("nodes", node(name))

    def install(self, *, ca_now: dt.datetime | None = None, ca_days: int = 365) -> None:
        docs = render(load_template(), InstallOptions())
        for d in docs:
            d = json.loads(json.dumps(d))
            if d["kind"] == "CustomResourceDefinition":
                continue  # the fake serves its CRDs as `weft_crds` says
            if d["kind"] == "Deployment":
                d["status"] = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
                               "availableReplicas": 2, "observedGeneration": 1}  # fmt: skip
            if d["kind"] == "DaemonSet":
                d["metadata"]["generation"] = 1
                d["status"] = {"desiredNumberScheduled": 2, "currentNumberScheduled": 2,
                               "numberReady": 2, "updatedNumberScheduled": 2,
                               "numberAvailable": 2, "numberMisscheduled": 0,
                               "observedGeneration": 1}  # fmt: skip
            self.fake.create(KIND_RESOURCE[d["kind"]], d)
        bundle = init_ca("cluster.local", anchor_days=ca_days, issuer_days=ca_days, now=ca_now)
        secret, config_map = list(yaml.safe_load_all(bundle.secret_manifest(NS)))
        self.fake.create("secrets", secret)
        self.fake.create("configmaps", config_map)
        for i, name in enumerate(NODES):
            self.add_agent(f"weft-agent-{i}", name, Agent())
            replica = f"weft-controlplane-{i}"
            self.fake.create("pods", pod(replica, name, "weft-controlplane"))
            self.replicas[replica] = Replica()
            self.fake.proxies[(NS, replica, 15014)] = self.replicas[replica]

    def add_agent(self, pod_name: str, node_name: str, agent: Agent, ready: bool = True) -> None:
        self.fake.apply("pods", pod(pod_name, node_name, "weft-agent", ready=ready))
        self.agents[pod_name] = agent
        self.fake.proxies[(NS, pod_name, 15020)] = agent

    def set_status(self, resource: str, name: str, **status: Any) -> None:
        obj = self.fake.get(resource, name, NS)
        assert obj is not None
        obj["status"].update(status)
        self.fake.update(resource, obj)


@pytest.fixture
def cluster(fake: FakeKubeAPI) -> Cluster:
    return Cluster(fake)


def run(cfg: str, *args: str) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]]:
    got = CliRunner().invoke(check, ["--kubeconfig", cfg, *args, "-o", "json"])
    assert got.exception is None or isinstance(got.exception, SystemExit), got.output
    report = json.loads(got.stdout)
    return got.exit_code, report, {c["name"]: c for c in report["checks"]}


def failed(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {n: c["detail"] for n, c in checks.items() if not c["ok"] and c["required"]}


def warned(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {n: c["detail"] for n, c in checks.items() if not c["ok"] and not c["required"]}


# --- before install --------------------------------------------------------------------


def test_pre_passes_on_a_healthy_cluster(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    code, report, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 0 and report["ok"] and not failed(checks) and not warned(checks), checks
    assert report["mode"] == "pre" and report["cluster"]["version"] == "v1.31.4"
    assert checks["api-server"]["detail"].endswith("Kubernetes v1.31.4 (>= 1.25)")
    assert (
        checks["rbac DaemonSet"]["detail"]
        == "may get, create, patch daemonsets.apps in weft-system"
    )
    assert checks["rbac Namespace"]["detail"].endswith("namespaces (cluster-wide)")
    assert checks["rbac Secret"]["detail"] == "may create secrets in weft-system"
    assert checks["rbac grants"]["ok"]
    assert checks["nodes"]["detail"] == "2 Linux nodes, kernel 6.1.0-18-amd64 (>= 5.10)"
    assert "weft install creates it" in checks["pod-security"]["detail"]
    assert "gateway-api" in checks and checks["gateway-api"]["ok"]
    assert any("cgroup v2" in n for n in report["notes"])
    assert checks["api-server"]["duration_ms"] > 0  # each line's share of the reads
    # One access review per kind and verb apply uses, and nothing written to the cluster.
    reviews = [r for r in fake.requests if r.path == fakeapi.ACCESS_REVIEWS]
    assert len(reviews) >= 3 * len(KIND_RESOURCE)


def test_pre_table_output(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    got = CliRunner().invoke(check, ["--pre", "--kubeconfig", kubeconfig(tmp_path, fake.url)])
    assert got.exit_code == 0, got.output
    assert f"… cluster {fake.url}: before install" in got.output
    assert "✔ api-server" in got.output and "✔ rbac Deployment" in got.output
    assert "Weft can be installed on this cluster." in got.output


def test_unreachable_api_server(tmp_path: Path, fake: FakeKubeAPI) -> None:
    for args in (("--pre",), ()):
        code, report, checks = run(kubeconfig(tmp_path, "http://127.0.0.1:9"), *args)
        assert code == 1 and not report["ok"]
        assert list(checks) == ["api-server"]  # nothing else is tried
        assert "http://127.0.0.1:9: unreachable" in checks["api-server"]["detail"]


def test_refused_credentials_and_missing_kubeconfig(tmp_path: Path, fake: FakeKubeAPI) -> None:
    cfg = kubeconfig(tmp_path, fake.url)
    Path(cfg).write_text(Path(cfg).read_text().replace(TOKEN, "wrong"))
    code, _, checks = run(cfg, "--pre")
    assert code == 1 and "HTTP 401" in checks["api-server"]["detail"]
    code, _, checks = run(str(tmp_path / "nope"), "--pre")
    assert code == 1 and str(tmp_path / "nope") in checks["kubeconfig"]["detail"]


def test_old_api_server(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    fake.version = {**fake.version, "minor": "24+", "gitVersion": "v1.24.17-eks-5e0fdde"}
    code, _, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 1
    assert failed(checks) == {"api-server": f"{fake.url}: Kubernetes v1.24.17-eks-5e0fdde < 1.25"}


def test_rbac_denied_names_the_kind_and_verb(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    fake.denied = {("create", "apps", "daemonsets"), ("patch", "apps", "daemonsets")}
    code, _, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 1
    assert failed(checks) == {
        "rbac DaemonSet": "cannot create, patch daemonsets.apps in weft-system"
    }
    assert (
        "kubectl auth can-i create daemonsets.apps -n weft-system"
        in checks["rbac DaemonSet"]["hint"]
    )


def test_rbac_escalation_rule(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    """May create ClusterRoles, but neither escalate nor hold what weft's grants."""
    fake.denied = {("escalate", "*", "*"), ("watch", "gateway.networking.k8s.io", "httproutes")}
    code, _, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 1 and list(failed(checks)) == ["rbac grants"]
    assert "watch httproutes.gateway.networking.k8s.io" in checks["rbac grants"]["detail"]


def test_without_gateway_api_is_a_warning(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    fake.gateway_api = False
    code, _, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 0 and list(warned(checks)) == ["gateway-api"]
    assert "not served" in checks["gateway-api"]["detail"]
    assert "Services are balanced" in checks["gateway-api"]["detail"]


def test_old_kernel_and_windows_nodes(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    fake.update("nodes", node("node-2", kernel="4.19.0-27-amd64"))
    fake.create("nodes", node("win-1", kernel="10.0.20348.2700", os="windows"))
    code, _, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 1
    assert failed(checks) == {
        "node node-2": "kernel 4.19.0-27-amd64 < 5.10 (Debian GNU/Linux 12 (bookworm))"
    }
    assert "no agent runs there" in warned(checks)["node win-1"]
    assert "nodes" not in checks  # the summary line only when every Linux node passes


def test_pod_security_of_an_existing_namespace(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    fake.create("namespaces", fakeapi.namespace(NS, labels))
    code, _, checks = run(kubeconfig(tmp_path, fake.url), "--pre")
    assert code == 0  # install relabels it: a warning, not a failure
    assert "enforce=restricted" in warned(checks)["pod-security"]


# --- after install ---------------------------------------------------------------------


def test_installed_passes_on_a_healthy_cluster(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    cluster.install()
    code, report, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 0 and report["ok"] and not failed(checks) and not warned(checks), checks
    assert checks["objects"]["detail"] == "all 9 objects of weft install present"
    assert checks["crd authorizationpolicies.weft.io"]["detail"] == "established, serves v1alpha1"
    assert checks["ca"]["detail"].startswith("Secret weft-system/weft-ca: issuer 'CN=weft issuer")
    assert checks["trust-bundle"]["ok"]
    assert checks["controlplane"]["detail"] == (
        "deployment weft-controlplane: 2/2 ready, 2 updated, 2 available"
    )
    assert checks["agents"]["detail"] == (
        "daemonset weft-agent: 2 desired, 2 ready, 2 updated, 2 available"
    )
    assert checks["agent node-1"]["detail"] == (
        "pod weft-agent-0 ready, kernel 6.1.0-18-amd64, eBPF capture loaded, 3 pods captured, "
        "discovery connected (revision 42)")  # fmt: skip
    assert checks["discovery"]["detail"] == (
        "2/2 control plane replicas synced (revision 42, 42), 2 agent streams"
    )
    # Through the pod proxy, as an operator's kubeconfig reaches the node's port.
    proxied = [unquote(r.path) for r in fake.requests if "/proxy/" in r.path]
    assert any(p.endswith("weft-agent-0:15020/proxy/metrics") for p in proxied), proxied


def test_installed_table_output(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install()
    got = CliRunner().invoke(check, ["--kubeconfig", kubeconfig(tmp_path, fake.url)])
    assert got.exit_code == 0, got.output
    assert "✔ agent node-2" in got.output and "✔ discovery" in got.output
    assert "Weft is running on this cluster." in got.output


def test_not_installed(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1
    bad = failed(checks)
    assert bad["pod-security"] == "namespace weft-system does not exist"
    assert "missing Deployment weft-system/weft-controlplane" in bad["objects"]
    assert bad["ca"].startswith("Secret weft-system/weft-ca not found")


def test_crd_missing(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install()
    fake.weft_crds = False
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["crd authorizationpolicies.weft.io"]
    assert (
        checks["crd authorizationpolicies.weft.io"]["hint"]
        == "weft install --crds | kubectl apply -f -"
    )


def test_ca_expired(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install(ca_now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), ca_days=2)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["ca"]
    assert checks["ca"]["detail"].startswith("Secret weft-system/weft-ca: ")
    assert "expired at" in checks["ca"]["detail"]


def test_ca_expiring_and_applied(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install(ca_days=10)
    secret = fake.get("secrets", "weft-ca", NS)
    assert secret is not None
    secret["metadata"]["annotations"][fakeapi_last_applied()] = json.dumps(secret)
    fake.update("secrets", secret)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 0 and set(warned(checks)) == {"ca-expiry", "ca-secret"}
    assert "expires in 9 day(s)" in checks["ca-expiry"]["detail"]


def fakeapi_last_applied() -> str:
    return "kubectl.kubernetes.io/last-applied-configuration"


def test_trust_bundle_of_another_ca(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install()
    other = list(yaml.safe_load_all(init_ca("cluster.local").secret_manifest(NS)))[1]
    fake.update("configmaps", other)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["trust-bundle"]
    assert "holds none of the Secret's anchors" in checks["trust-bundle"]["detail"]


def test_daemonset_not_fully_ready(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install()
    cluster.set_status("daemonsets", "weft-agent", numberReady=1, numberAvailable=1)
    cluster.add_agent("weft-agent-1", "node-2", Agent(blockers=("ebpf", "pods")), ready=False)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1
    assert failed(checks) == {
        "agents": "daemonset weft-agent: 2 desired, 1 ready, 2 updated, 1 available "
        "(not ready on node-2)",
        "agent node-2": "pod weft-agent-1 not ready: waiting for ebpf, pods",
    }


def test_rollout_in_progress_is_a_warning(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    cluster.install()
    cluster.set_status("daemonsets", "weft-agent", updatedNumberScheduled=1)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 0 and "a rollout is in progress" in warned(checks)["agents"]


def test_an_agent_not_ready(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    """The pod's Ready condition is the authority (the kubelet's exec probe of the agent's
    own marker file); /ready through the proxy only says why."""
    cluster.install()
    cluster.add_agent("weft-agent-0", "node-1", Agent(blockers=("certificates",)), ready=False)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["agent node-1"]
    assert checks["agent node-1"]["detail"] == (
        "pod weft-agent-0 not ready: waiting for certificates"
    )
    assert "kubectl -n weft-system logs weft-agent-0" in checks["agent node-1"]["hint"]


def test_an_agent_without_ebpf_and_one_without_discovery(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    cluster.install()
    cluster.add_agent("weft-agent-0", "node-1", Agent(ebpf=False))
    cut = Agent()
    cut.discovery.m_connected.set(0)
    cluster.add_agent("weft-agent-1", "node-2", cut)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["agent node-1"]
    assert "no eBPF capture programs loaded" in checks["agent node-1"]["detail"]
    assert "discovery stream down (last revision 42)" in warned(checks)["agent node-2"]


def test_old_kernel_under_an_agent(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install()
    fake.update("nodes", node("node-2", kernel="5.4.0-150-generic"))
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["agent node-2"]
    assert checks["agent node-2"]["detail"] == "pod weft-agent-1: kernel 5.4.0-150-generic < 5.10"


def test_pod_proxy_forbidden_or_refused(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    cluster.install()
    del fake.proxies[(NS, "weft-agent-1", 15020)]  # the API server cannot reach the node's port
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 0
    assert "error trying to reach service" in warned(checks)["agent node-2"]
    fake.forbidden.add("pods/proxy")
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 0 and "HTTP 403" in warned(checks)["agent node-1"]
    # The replicas' readiness probe is the same /ready: their Ready condition stands in.
    assert checks["discovery"]["detail"] == (
        "2/2 control plane replicas synced (revision ?, ?), 0 agent streams; 2 judged by the "
        "pod's Ready condition (the pod proxy gave no answer)")  # fmt: skip


def test_discovery_not_synced(tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster) -> None:
    cluster.install()
    for name in ("weft-controlplane-0", "weft-controlplane-1"):
        fake.proxies[(NS, name, 15014)] = Replica(synced=False)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    assert code == 1 and list(failed(checks)) == ["discovery"]
    assert checks["discovery"]["detail"].startswith(
        "0/2 control plane replicas synced; weft-controlplane-0: not ready: discovery: "
    )


def test_control_plane_down_and_pod_security(
    tmp_path: Path, fake: FakeKubeAPI, cluster: Cluster
) -> None:
    cluster.install()
    cluster.set_status("deployments", "weft-controlplane", readyReplicas=0, availableReplicas=0)
    namespace = fake.get("namespaces", NS)
    assert namespace is not None
    namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    fake.update("namespaces", namespace)
    code, _, checks = run(kubeconfig(tmp_path, fake.url))
    bad = failed(checks)
    assert code == 1 and set(bad) == {"controlplane", "pod-security"}
    assert bad["controlplane"].startswith("deployment weft-controlplane: 0/2 ready")
    assert "privileged agent pods are refused" in bad["pod-security"]


def test_the_metric_names_read_are_the_agents() -> None:
    """The capture families above are made by the test; the agent's collector must use
    the same names (the discovery gauges are the real ones)."""
    source = (Path(__file__).parents[2] / "nodeagent" / "agent.py").read_text()
    assert '"weft_capture_events"' in source and '"weft_captured_pods"' in source
