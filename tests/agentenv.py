"""The DaemonSet environment of a node agent (`AgentConfig.for_kubernetes`), over a
temporary cgroup2 and bpffs, for tests that build an `Agent` without a node."""

from __future__ import annotations

from pathlib import Path


def kube_env(
    tmp_path: Path, node: str = "worker-1", node_ip: str = "192.0.2.1", **extra: str
) -> dict[str, str]:
    (tmp_path / "cgroup").mkdir(exist_ok=True)
    (tmp_path / "bpf").mkdir(exist_ok=True)
    return {
        "NODE_NAME": node,
        "NODE_IP": node_ip,
        "POD_UID": "agent-uid",
        "WEFT_CONTROLPLANE": "weft-controlplane.weft-system.svc",
        "WEFT_CGROUP2": str(tmp_path / "cgroup"),
        "WEFT_BPFFS": str(tmp_path / "bpf"),
        **extra,
    }
