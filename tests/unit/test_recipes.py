"""The vagrant/ and kind/ recipes, checked as far as this machine can: it has no
hypervisor and no kube-apiserver, so neither recipe can run here (docs/kubernetes.md,
"Trying it on VMs (vagrant/) and kind", says what has been run).

What is checked instead: every shell script passes shellcheck; the Vagrantfile is valid
Ruby, and evaluated against a stand-in for Vagrant's API it defines the cluster it
claims (three VMs on a private network, each provisioned, kubelet on the private
address); the kind config is a ``kind.x-k8s.io/v1alpha4`` Cluster whose every node
mounts the host paths the agent's DaemonSet reads; the demo is schema-valid Kubernetes
and names what the smoke test expects; and the smoke test's own logic (scripts/smoke.sh)
runs against stand-in exec commands.  The smoke test itself runs against a real lab in
tests/lab/test_smoke_script.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from tests.unit.test_manifests import K8S_VERSION

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scripts" / "smoke.sh"
RECIPE_SCRIPTS = sorted(
    [
        *ROOT.glob("vagrant/*.sh"),
        *ROOT.glob("vagrant/provision/*.sh"),
        *ROOT.glob("kind/*.sh"),
        SMOKE,
        ROOT / "scripts" / "install-and-smoke.sh",
        # make image and the image as a lab agent (tests/lab/test_image.py runs them).
        *ROOT.glob("scripts/image*.sh"),
    ]
)
OTHER_SCRIPTS = sorted(set(ROOT.glob("scripts/*.sh")) - set(RECIPE_SCRIPTS))
AGENT_HOST_PATHS = ("/sys/fs/bpf", "/lib/modules", "/usr/src")
"""What the agent needs from a node beyond what every node has: bpffs, and the kernel
headers bcc compiles against (``/lib/modules/$(uname -r)/build`` → ``/usr/src/...``)."""


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install {package} (make host installs it)")
    return path


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_the_recipes_are_all_there() -> None:
    for p in ("vagrant/Vagrantfile", "vagrant/provision/common.sh",
              "vagrant/provision/control-plane.sh", "vagrant/join.sh", "vagrant/weft.sh",
              "vagrant/run.sh", "kind/cluster.yaml", "kind/run.sh", "scripts/smoke.sh",
              "scripts/install-and-smoke.sh", "scripts/demo.yaml"):  # fmt: skip
        assert (ROOT / p).is_file(), p


# -- shell -------------------------------------------------------------------------------


@pytest.mark.parametrize("script", RECIPE_SCRIPTS, ids=rel)
def test_recipe_script_passes_shellcheck(script: Path) -> None:
    proc = subprocess.run(
        [tool("shellcheck", "shellcheck"), "--shell=bash", "--external-sources", str(script)],
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), "run with bash, as shellcheck checked"
    assert "set -euo pipefail" in text, "a failing step must stop the recipe"
    assert script.stat().st_mode & stat.S_IXUSR, f"chmod +x {rel(script)}"


@pytest.mark.parametrize("script", OTHER_SCRIPTS, ids=rel)
def test_other_scripts_have_no_shellcheck_warnings(script: Path) -> None:
    proc = subprocess.run(
        [tool("shellcheck", "shellcheck"), "--severity=warning", str(script)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_recipes_install_with_weft_install_and_share_the_smoke_test() -> None:
    shared = (ROOT / "scripts" / "install-and-smoke.sh").read_text()
    assert '"$weft" install "${install_args[@]}" | "${kubectl[@]}" apply -f -' in shared
    assert "label namespace weft-demo weft.io/capture=enabled" in shared
    assert "SMOKE_TARGET=kube" in shared and "scripts/smoke.sh" in shared
    for recipe in ("vagrant/weft.sh", "kind/run.sh"):
        text = (ROOT / recipe).read_text()
        assert "scripts/install-and-smoke.sh" in text, recipe
        assert 'make -C "$root" image' in text, recipe
    # Both clean up whatever happened (a trap on EXIT), unless asked to keep.
    for recipe in ("vagrant/run.sh", "kind/run.sh"):
        text = (ROOT / recipe).read_text()
        assert "trap cleanup EXIT" in text and "WEFT_KEEP" in text, recipe


# -- vagrant -------------------------------------------------------------------------------


def test_vagrantfile_is_valid_ruby() -> None:
    proc = subprocess.run(
        [tool("ruby", "ruby"), "-c", str(ROOT / "vagrant" / "Vagrantfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stdout + proc.stderr


# Evaluates the Vagrantfile against a recorder standing in for Vagrant's configuration
# API: every call (with its receiver's path) is logged, a block gets a recorder nested
# under the call, and the log is printed as JSON.
VAGRANT_STANDIN = r"""
require "json"
$log = []
class Recorder
  def initialize(path) @path = path end
  def method_missing(name, *args, **kw, &block)
    $log << { "path" => @path, "name" => name.to_s, "args" => args, "kw" => kw }
    child = Recorder.new(@path + [name.to_s] + args.first(1).map(&:to_s))
    block.call(child) if block
    child
  end
  def respond_to_missing?(*) true end
end
module Vagrant
  def self.configure(version)
    raise "config version #{version}" unless version == "2"
    yield Recorder.new([])
  end
end
Dir.chdir(File.dirname(ARGV[0]))
load ARGV[0]
puts JSON.generate($log)
"""


def vagrant_calls(env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [tool("ruby", "ruby"), "-e", VAGRANT_STANDIN, str(ROOT / "vagrant" / "Vagrantfile")],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    calls: list[dict[str, Any]] = json.loads(proc.stdout)
    return calls


def test_vagrantfile_defines_a_control_plane_and_two_workers_on_a_private_network() -> None:
    calls = vagrant_calls()
    defined = [c["args"][0] for c in calls if c["name"] == "define"]
    assert defined == ["cp", "worker-1", "worker-2"]
    primary = [c["args"][0] for c in calls if c["name"] == "define" and c["kw"].get("primary")]
    assert primary == ["cp"]
    # A call inside `config.vm.define NAME do |vm|` has the path vm, define, NAME, ...
    networks = {
        c["path"][2]: c for c in calls if c["name"] == "network" and c["path"][1:2] == ["define"]
    }
    assert set(networks) == set(defined)
    ips = {name: c["kw"]["ip"] for name, c in networks.items()}
    assert all(c["args"] == ["private_network"] for c in networks.values())
    assert len(set(ips.values())) == 3 and all(ip.startswith("192.168.56.") for ip in ips.values())

    provisions = [c for c in calls if c["name"] == "provision"]
    by_node: dict[str, list[str]] = {}
    for c in provisions:
        assert c["kw"]["type"] == "shell"
        assert (ROOT / "vagrant" / c["kw"]["path"]).is_file(), c["kw"]["path"]
        by_node.setdefault(c["path"][2], []).append(c["kw"]["path"])
        # Each VM's provisioning is told its own private address (kubelet --node-ip).
        assert c["kw"]["env"]["NODE_IP"] == ips[c["path"][2]]
    assert by_node == {
        "cp": ["provision/common.sh", "provision/control-plane.sh"],
        "worker-1": ["provision/common.sh"],
        "worker-2": ["provision/common.sh"],
    }
    box = next(c for c in calls if c["name"] == "box=")
    assert box["args"] == ["debian/bookworm64"]


def test_vagrantfile_pins_kubernetes_and_takes_overrides() -> None:
    def versions(calls: list[dict[str, Any]]) -> set[str]:
        return {c["kw"]["env"]["KUBERNETES_VERSION"] for c in calls if c["name"] == "provision"}

    assert versions(vagrant_calls()) == {"1.31.4"}
    assert versions(vagrant_calls({"WEFT_KUBERNETES_VERSION": "1.32.0"})) == {"1.32.0"}


def test_vagrant_provisioning_sets_up_what_the_agent_needs() -> None:
    common = (ROOT / "vagrant" / "provision" / "common.sh").read_text()
    assert "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" in common
    assert "SystemdCgroup = true" in common  # kubelet's cgroup driver on a systemd host
    assert "cgroup2fs" in common  # cgroup v2 checked
    assert "mount -t bpf bpffs /sys/fs/bpf" in common
    assert "linux-headers-$(uname -r)" in common
    assert "apt-mark hold kubelet kubeadm kubectl" in common  # pinned, and held
    control = (ROOT / "vagrant" / "provision" / "control-plane.sh").read_text()
    assert '--apiserver-advertise-address "$NODE_IP"' in control


# -- kind ------------------------------------------------------------------------------------


def kind_config() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "kind" / "cluster.yaml").read_text()))
    assert len(docs) == 1
    doc: dict[str, Any] = docs[0]
    return doc


def agent_host_paths() -> set[str]:
    """The hostPath volumes of the agent DaemonSet, wherever the manifests live now."""
    paths: set[str] = set()
    for f in [*ROOT.glob("daemonset/*.yaml"), *ROOT.glob("deploy/kubernetes/*.yaml")]:
        for doc in yaml.safe_load_all(f.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "DaemonSet":
                continue
            for vol in doc["spec"]["template"]["spec"].get("volumes") or ():
                if "hostPath" in vol:
                    paths.add(vol["hostPath"]["path"])
    return paths


def test_kind_config_is_a_kind_cluster_with_three_nodes() -> None:
    doc = kind_config()
    assert doc["kind"] == "Cluster"
    assert doc["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [n["role"] for n in doc["nodes"]] == ["control-plane", "worker", "worker"]
    known = {"role", "extraMounts", "image", "labels", "kubeadmConfigPatches",
             "extraPortMappings"}  # fmt: skip
    for node in doc["nodes"]:
        assert set(node) <= known, set(node) - known


def test_every_kind_node_mounts_what_the_agent_needs() -> None:
    for node in kind_config()["nodes"]:
        mounts = {m["containerPath"]: m for m in node["extraMounts"]}
        for path in AGENT_HOST_PATHS:
            assert path in mounts, f"{node['role']} does not mount {path}"
            assert mounts[path]["hostPath"] == path
        # Pins must be visible both ways; headers are only read.
        assert mounts["/sys/fs/bpf"]["propagation"] == "Bidirectional"
        assert mounts["/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
        for m in node["extraMounts"]:
            assert set(m) <= {"hostPath", "containerPath", "readOnly", "propagation",
                              "selinuxRelabel"}  # fmt: skip
            assert m.get("propagation", "None") in ("None", "HostToContainer", "Bidirectional")


def test_kind_mounts_cover_the_agent_daemonsets_host_paths() -> None:
    """Checked against what the agent reads: each hostPath of its DaemonSet under the
    paths a kind node lacks is mounted into every node."""
    wanted = {p for p in agent_host_paths() if p.startswith(AGENT_HOST_PATHS)}
    assert wanted, "no agent DaemonSet with those hostPaths found in daemonset/ or deploy/"
    for node in kind_config()["nodes"]:
        mounted = [m["containerPath"] for m in node["extraMounts"]]
        for path in wanted:
            assert any(path == m or path.startswith(m + "/") for m in mounted), path


def test_kind_recipe_refuses_a_host_the_agent_cannot_work_on() -> None:
    text = (ROOT / "kind" / "run.sh").read_text()
    assert (
        "cgroup2fs" in text and "/sys/fs/bpf" in text and "/lib/modules/$(uname -r)/build" in text
    )
    assert 'kind create cluster --name "$cluster" --config "$here/cluster.yaml"' in text
    assert 'kind delete cluster --name "$cluster"' in text
    assert 'kind load image-archive "$tar"' in text


# -- the demo and the smoke test's own logic ----------------------------------------------


def test_demo_is_schema_valid_and_names_what_the_smoke_test_expects() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "scripts" / "demo.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("ServiceAccount", "echo"), ("ServiceAccount", "client"), ("Service", "echo"),
            ("Deployment", "echo"), ("Deployment", "client")} <= names  # fmt: skip
    assert {d["metadata"]["namespace"] for d in docs} == {"weft-demo"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name, sa in (("echo", "echo"), ("client", "client")):
        assert deployments[name]["spec"]["template"]["spec"]["serviceAccountName"] == sa
    assert deployments["echo"]["spec"]["replicas"] == 2


FAKE_EXEC = r"""#!/usr/bin/env bash
# A stand-in for `weft lab exec` / `kubectl exec`: TARGET -- CMD...
target=$1; shift; [ "$1" = -- ] && shift
case $target in
    client) printf '200 echo-1\n200 echo-2\n' ;;
    agent-*) cat "$METRICS_DIR/$target" 2>/dev/null || exit 1 ;;
    *) exit 1 ;;
esac
"""
CLIENT = "spiffe://cluster.local/ns/weft-demo/sa/client"
SERVER = "spiffe://cluster.local/ns/weft-demo/sa/echo"


def series(direction: str, value: int, client: str = CLIENT, tls: str = "true") -> str:
    return (
        f'request_total{{direction="{direction}",src_workload="client-1",tls="{tls}",'
        f'client_id="{client}",server_id="{SERVER}",authority="echo"}} {value}\n'
    )


def run_smoke(tmp_path: Path, metrics: dict[str, str]) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake-exec"
    fake.write_text(FAKE_EXEC)
    fake.chmod(0o755)
    mdir = tmp_path / "metrics"
    mdir.mkdir(exist_ok=True)
    for agent, text in metrics.items():
        (mdir / agent).write_text("# HELP request_total ...\n" + text)
    env = {
        **os.environ,
        "SMOKE_TARGET": "kube",
        "SMOKE_EXEC": str(fake),
        "SMOKE_AGENT_EXEC": str(fake),
        "SMOKE_AGENTS": "agent-1 agent-2",
        "SMOKE_CLIENT": "client",
        "SMOKE_TIMEOUT": "0",
        "METRICS_DIR": str(mdir),
    }
    return subprocess.run(["bash", str(SMOKE)], env=env, capture_output=True, text=True)


def test_smoke_passes_with_both_identities_on_both_sides(tmp_path: Path) -> None:
    proc = run_smoke(tmp_path, {"agent-1": series("outbound", 2), "agent-2": series("inbound", 1)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answered by: echo-1 echo-2" in proc.stdout
    assert "outbound 2, inbound 1" in proc.stdout and "PASSED" in proc.stdout


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({"agent-1": series("outbound", 2), "agent-2": ""}, "outbound 2, inbound 0"),
        ({"agent-1": series("outbound", 2, tls="false"), "agent-2": series("inbound", 1)},
         "outbound 0, inbound 1"),
        ({"agent-1": series("outbound", 2, client="spiffe://x/ns/a/sa/b"),
          "agent-2": series("inbound", 1)}, "outbound 0, inbound 1"),
        ({"agent-1": series("outbound", 2)}, "no metrics from agent(s) agent-2"),
    ],
    ids=["no-inbound", "plaintext", "other-client", "agent-unreachable"],
)  # fmt: skip
def test_smoke_fails_when_the_mesh_did_not_measure_it(
    tmp_path: Path, metrics: dict[str, str], why: str
) -> None:
    proc = run_smoke(tmp_path, metrics)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert why in proc.stderr, proc.stderr
    assert "PASSED" not in proc.stdout


def test_smoke_rejects_an_unknown_target() -> None:
    proc = subprocess.run(
        ["bash", str(SMOKE)],
        env={**os.environ, "SMOKE_TARGET": "moon"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "SMOKE_TARGET must be lab or kube" in proc.stderr
