"""The node agent's adapter to ``weft lab``: the one module of the agent that reads the
lab's files (import-linter holds every other module of the agent to never import
`weft.lab`).

* `lab_settings`: an agent's configuration for a lab node (addresses, pins, cgroups,
  the control plane and the bootstrap token if the lab has a CA).
* `LabPodSource`: which pods live on this node, without a control plane (capture-only
  mode): the lab's state file (``weft lab`` writes it; ``weft lab label`` changes it),
  polled for changes.  Each snapshot holds this node's pods, which is what the capture
  manager reconciles against.  With a control plane, the pods come from the discovery
  stream instead (see ``Agent._mesh_loop``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from nodeagent.capture import LocalPod
from weft.lab.plan import CONTROLPLANE_IP
from weft.lab.state import StateError, lab_paths, load_state

log = logging.getLogger("weft.pods")


class LabUnavailable(Exception):
    """The lab's state cannot be read, or does not have that node."""


def lab_settings(lab: str, node: str, cgroup2: Path) -> dict[str, Any]:
    """`AgentConfig` fields of ``node`` in lab ``lab`` (the caller adds the rest)."""
    paths = lab_paths(lab, str(cgroup2))
    try:
        state = load_state(paths.state_file)
    except StateError as e:
        raise LabUnavailable(str(e)) from None
    try:
        n = state.plan.node(node)
    except KeyError:
        known = ", ".join(x.name for x in state.plan.nodes)
        raise LabUnavailable(f"no node {node!r} in lab {lab!r} (nodes: {known})") from None
    agent_dir = paths.state_dir / "agents" / node
    anchor = paths.state_dir / "ca" / "anchor.pem"
    token = agent_dir / "bootstrap.token"
    settings: dict[str, Any] = {}
    if anchor.exists() and token.exists():
        settings |= {
            "controlplane": CONTROLPLANE_IP,
            "token_file": token,
            "trust_bundle": anchor,
            "cert_dir": agent_dir / "certs",
        }
    return settings | {
        "node": node,
        "state_file": paths.state_file,
        "proxy_ip": n.gateway,
        "node_addrs": (n.ip, n.gateway),
        "pin_dir": paths.bpffs_dir / node,
        "state_dir": agent_dir,
        "cgroup2": cgroup2,
        "cgroup_root": paths.cgroup_root,
    }


def lab_pod_cgroups(state_file: Path, node: str) -> set[Path]:
    """The cgroups of the lab's pods on ``node`` (for uninstall); `LabUnavailable`."""
    try:
        pods = LabPodSource(state_file, node).read()
    except StateError as e:
        raise LabUnavailable(str(e)) from None
    return {p.cgroup for p in pods if p.cgroup}


class LabPodSource:
    def __init__(self, state_file: Path, node: str, interval: float = 0.25) -> None:
        self.state_file = state_file
        self.node = node
        self.interval = interval

    def read(self) -> list[LocalPod]:
        state = load_state(self.state_file)
        if self.node not in {n.name for n in state.plan.nodes}:
            raise StateError(f"node {self.node!r} is not in lab {state.plan.name!r}")
        return [
            LocalPod(
                name=p.name,
                namespace=p.namespace,
                ip=p.ip,
                service_account=p.service_account,
                cgroup=state.pod_cgroup(p),
                captured=state.plan.captured(p),
                strict=p.strict,
            )
            for p in state.plan.pods
            if p.node == self.node
        ]

    async def snapshots(self) -> AsyncIterator[list[LocalPod]]:
        """A snapshot at start, then one whenever the state file changes."""
        last: tuple[int, int] | None = None
        while True:
            try:
                st = self.state_file.stat()
                stamp = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp != last:
                try:
                    pods = self.read()
                except StateError as e:
                    log.warning("lab state unreadable, keeping the last pods: %s", e)
                else:
                    last = stamp
                    yield pods
            await asyncio.sleep(self.interval)
