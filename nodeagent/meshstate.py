"""The agent's copy of discovery: workloads and services, indexed for the data path.

Fed by :mod:`nodeagent.discovery` (a snapshot, then deltas); read by the outbound proxy
(who is at this address, which service is this VIP), the tunnel server (is this target
a local pod, and as whom) and the capture manager (which pods live on this node).

Sans-I/O and single-threaded: :meth:`MeshState.apply` takes a decoded message and
updates the indexes; the data path reads plain dicts.  When the control plane is away
nothing here changes: the agent keeps serving the last state it had.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from weft.mesh import Delta, Kind, Service, ServicePort, Workload
from weft.meshwire import DeltasMsg, HeartbeatMsg, Message, SnapshotMsg

log = logging.getLogger("weft.agent.mesh")


class StreamGap(Exception):
    """A message does not follow the state held (epoch changed, revision skipped): the
    agent must subscribe again from scratch (it keeps serving the old state meanwhile)."""


@dataclass(frozen=True, slots=True)
class VipTarget:
    service: Service
    port: ServicePort


class MeshState:
    def __init__(self) -> None:
        self.epoch: str | None = None
        self.revision: int | None = None
        self.workloads: dict[str, Workload] = {}
        self.services: dict[str, Service] = {}
        self._by_ip: dict[str, Workload] = {}
        self._claims: dict[str, dict[str, None]] = {}
        """IP -> the uids of every workload claiming it, oldest claim first (a pod that
        left and the pod that got its address can both be known for a while)."""
        self._by_vip: dict[tuple[str, int], VipTarget] = {}
        self._vip_ips: dict[str, int] = {}
        """VIP address -> number of (vip, port) entries: "is this a service address"."""
        self.version = 0
        """Bumped on every applied change; watchers compare it."""
        self._changed = asyncio.Event()

    # -- reading ---------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self.revision is not None

    def workload_at(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)

    def vip(self, ip: str, port: int) -> VipTarget | None:
        return self._by_vip.get((ip, port))

    def is_vip(self, ip: str) -> bool:
        return self._vip_ips.get(ip, 0) > 0

    def on_node(self, node: str) -> list[Workload]:
        return [w for w in self.workloads.values() if w.node == node]

    def resume_point(self) -> tuple[str | None, int | None]:
        return self.epoch, self.revision

    async def wait_change(self, seen: int) -> int:
        """Wait until :attr:`version` is past ``seen``; return it."""
        while self.version <= seen:
            await self._changed.wait()
        return self.version

    # -- writing ---------------------------------------------------------------------

    def forget_position(self) -> None:
        """Ask for a snapshot on the next subscribe (after a gap); keep serving the data."""
        self.epoch = None
        self.revision = None

    def apply(self, msg: Message) -> int:
        """Apply one message; returns how many items changed.  Raises :class:`StreamGap`."""
        if isinstance(msg, SnapshotMsg):
            return self._snapshot(msg)
        if self.revision is None or msg.epoch != self.epoch:
            raise StreamGap(
                f"{type(msg).__name__} of epoch {msg.epoch} while holding "
                f"{self.epoch}/{self.revision}: need a snapshot"
            )
        if isinstance(msg, HeartbeatMsg):
            if msg.revision != self.revision:
                raise StreamGap(f"heartbeat at revision {msg.revision}, we are at {self.revision}")
            return 0
        assert isinstance(msg, DeltasMsg)
        first = msg.deltas[0].revision
        if first != self.revision + 1:
            raise StreamGap(f"deltas start at {first}, we are at revision {self.revision}")
        for d in msg.deltas:
            self._delta(d)
        self.revision = msg.revision
        self._bump()
        return len(msg.deltas)

    def _snapshot(self, msg: SnapshotMsg) -> int:
        before_w, before_s = self.workloads, self.services
        self.workloads = {w.key: w for w in msg.workloads}
        self.services = {s.key: s for s in msg.services}
        self._by_ip = {}
        self._claims = {}
        for w in self.workloads.values():
            self._index_workload(w)
        self._by_vip = {}
        self._vip_ips = {}
        for s in self.services.values():
            self._index_service(s)
        self.epoch, self.revision = msg.epoch, msg.revision
        changed = _count_changes(before_w, self.workloads) + _count_changes(before_s, self.services)
        self._bump()
        log.info(
            "discovery snapshot: %d workloads, %d services at %s/%d (%d changed)",
            len(self.workloads), len(self.services), msg.epoch, msg.revision, changed,
        )  # fmt: skip
        return changed

    def _delta(self, d: Delta) -> None:
        if d.kind is Kind.WORKLOAD:
            old_w = self.workloads.pop(d.key, None)
            if old_w is not None:
                self._unindex_workload(old_w)
            if isinstance(d.value, Workload):
                self.workloads[d.key] = d.value
                self._index_workload(d.value)
        else:
            old_s = self.services.pop(d.key, None)
            if old_s is not None:
                self._unindex_service(old_s)
            if isinstance(d.value, Service):
                self.services[d.key] = d.value
                self._index_service(d.value)

    def _index_workload(self, w: Workload) -> None:
        for ip in w.ips:
            self._by_ip[ip] = w
            self._claims.setdefault(ip, {})[w.uid] = None

    def _unindex_workload(self, w: Workload) -> None:
        """O(addresses of ``w``): another claimant of an address (a replacement pod that
        got it) takes it over, the most recent claim first."""
        for ip in w.ips:
            claims = self._claims.get(ip)
            if claims is not None:
                claims.pop(w.uid, None)
                if not claims:
                    del self._claims[ip]
            current = self._by_ip.get(ip)
            if current is not None and current.uid != w.uid:
                continue
            self._by_ip.pop(ip, None)
            if claims:
                other = self.workloads.get(next(reversed(claims)))
                if other is not None:
                    self._by_ip[ip] = other

    def _index_service(self, s: Service) -> None:
        for vip in s.vips:
            for p in s.ports:
                if (vip, p.port) not in self._by_vip:
                    self._vip_ips[vip] = self._vip_ips.get(vip, 0) + 1
                self._by_vip[(vip, p.port)] = VipTarget(s, p)

    def _unindex_service(self, s: Service) -> None:
        for vip in s.vips:
            for p in s.ports:
                t = self._by_vip.get((vip, p.port))
                if t is not None and t.service.key == s.key:
                    del self._by_vip[(vip, p.port)]
                    left = self._vip_ips.get(vip, 1) - 1
                    if left > 0:
                        self._vip_ips[vip] = left
                    else:
                        self._vip_ips.pop(vip, None)

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _count_changes(before: Mapping[str, object], after: Mapping[str, object]) -> int:
    keys: Iterable[str] = before.keys() | after.keys()
    return sum(1 for k in keys if before.get(k) != after.get(k))
