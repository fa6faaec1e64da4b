"""The agent's Kubernetes configuration (from the DaemonSet's environment) and its pod
cgroup lookup, on a fake cgroup tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.agent import Agent, AgentConfig, AgentError
from tests.agentenv import kube_env
from weft.identity import SpiffeId
from weft.mesh import InboundMode, Workload

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return kube_env(tmp_path, "worker-3", "192.0.2.13", **extra)


def test_kubernetes_config_from_the_environment(tmp_path: Path):
    cfg = AgentConfig.for_kubernetes(_env(tmp_path, WEFT_NODE_ADDRS="198.51.100.7, "))
    assert cfg.node == "worker-3"
    assert cfg.proxy_ip == "192.0.2.13"  # pods reach the hostNetwork agent at the node IP
    assert cfg.node_addrs == ("192.0.2.13", "198.51.100.7")
    assert cfg.pin_dir == tmp_path / "bpf" / "weft" / "worker-3"
    assert cfg.controlplane == "weft-controlplane.weft-system.svc"
    assert cfg.token_file == Path("/var/run/secrets/weft/token")
    assert cfg.state_file is None and cfg.cgroup_root is None and cfg.pod_uid == "agent-uid"


@pytest.mark.parametrize("missing", ["NODE_NAME", "NODE_IP", "POD_UID", "WEFT_CONTROLPLANE"])
def test_kubernetes_config_names_what_is_missing(tmp_path: Path, missing: str):
    env = _env(tmp_path)
    del env[missing]
    with pytest.raises(AgentError, match=rf"\${missing} is not set"):
        AgentConfig.for_kubernetes(env)


def test_kubernetes_config_needs_the_host_mounts(tmp_path: Path):
    env = _env(tmp_path, WEFT_CGROUP2=str(tmp_path / "nope"))
    with pytest.raises(AgentError, match="cgroup v2 \\(host\\) is not mounted"):
        AgentConfig.for_kubernetes(env)


def _workload(uid: str) -> Workload:
    return Workload(
        uid=uid, name="web-1", namespace="shop", node="worker-3", ips=("10.244.3.7",),
        service_account="web", identity=SpiffeId.workload("shop", "web"), captured=True,
        inbound_mode=InboundMode.PERMISSIVE,
    )  # fmt: skip


def test_pod_cgroups_are_found_by_uid_once_kubelet_makes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    clock = [1000.0]
    monkeypatch.setattr("nodeagent.agent.time.monotonic", lambda: clock[0])
    agent = Agent(AgentConfig.for_kubernetes(_env(tmp_path)))
    w = _workload(UID)
    assert agent.pod_cgroup(w) is None  # not created yet: looked for again later
    slice_dir = (
        tmp_path / "cgroup" / "kubepods.slice" / "kubepods-burstable.slice"
        / f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    )  # fmt: skip
    slice_dir.mkdir(parents=True)
    # Backed off: no walk of the cgroup tree within the second after a miss ...
    assert agent.pod_cgroup(w) is None
    clock[0] += 1.5
    # ... then found, and cached.
    assert agent.pod_cgroup(w) == slice_dir
    assert agent.local_pod(w).cgroup == slice_dir
    # An unsafe UID is refused (and logged), never turned into a path.
    assert agent.pod_cgroup(_workload("../../etc")) is None


def test_cgroup_lookups_back_off_up_to_30_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    clock = [0.0]
    monkeypatch.setattr("nodeagent.agent.time.monotonic", lambda: clock[0])
    agent = Agent(AgentConfig.for_kubernetes(_env(tmp_path)))
    w = _workload(UID)
    waits = []
    for _ in range(8):
        assert agent.pod_cgroup(w) is None
        waits.append(agent._cgroup_misses[UID][1] - clock[0])
        clock[0] = agent._cgroup_misses[UID][1]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_agent_config_refuses_nonsense(tmp_path: Path):
    with pytest.raises(AgentError, match="connect attempts"):
        AgentConfig.for_kubernetes(_env(tmp_path), connect_attempts=0)
    with pytest.raises(AgentError, match="idle timeout must be positive"):
        AgentConfig.for_kubernetes(_env(tmp_path), idle_timeout=0)
