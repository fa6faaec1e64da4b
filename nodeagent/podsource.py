"""Where the agent learns which pods live on its node.

With a control plane, the pods come from the discovery stream (see
``Agent._mesh_loop``).  Without one (capture-only mode, ``weft agent`` with no CA in the
lab), they come from here: the lab's state file (``weft lab`` writes it; ``weft lab
label`` changes it), polled for changes.  Each snapshot holds this node's pods, which is
what the capture manager reconciles against.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from nodeagent.capture import LocalPod
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
