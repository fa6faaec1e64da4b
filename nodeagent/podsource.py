"""Where the agent learns which pods live on its node.

Now: the lab's state file (``weft lab`` writes it; ``weft lab label`` changes it), polled
for changes.  Later: a Kubernetes pod watch, and the control plane's discovery stream.
Each source yields full snapshots of this node's pods, which is what the capture manager
reconciles against.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from nodeagent.capture import LocalPod
from weft.identity import SpiffeId
from weft.lab.state import StateError, load_state

log = logging.getLogger("weft.pods")


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
                captured=p.captured,
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


@dataclass(frozen=True)
class PodEntry:
    """Where a pod lives and who it is, as the data path needs it."""

    name: str
    namespace: str
    node: str
    node_ip: str
    identity: SpiffeId
    captured: bool


class LabDirectory:
    """Every pod of the lab by address (all nodes), from the lab's state file.

    Stands in for the control plane's discovery stream (mesh issue) so the tunnel can
    already be wired: which node hosts an address, and which identity it must prove.
    """

    def __init__(self, state_file: Path, trust_domain: str) -> None:
        self.state_file = state_file
        self.trust_domain = trust_domain
        self.by_ip: dict[str, PodEntry] = {}

    def reload(self) -> None:
        try:
            state = load_state(self.state_file)
        except StateError as e:
            log.warning("lab state unreadable, keeping the last directory: %s", e)
            return
        nodes = {n.name: n.ip for n in state.plan.nodes}
        self.by_ip = {
            p.ip: PodEntry(
                name=p.name,
                namespace=p.namespace,
                node=p.node,
                node_ip=nodes[p.node],
                identity=SpiffeId.workload(p.namespace, p.service_account, self.trust_domain),
                captured=p.captured,
            )
            for p in state.plan.pods
        }

    def get(self, ip: str) -> PodEntry | None:
        return self.by_ip.get(ip)
