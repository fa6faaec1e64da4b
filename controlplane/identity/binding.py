"""Node binding from discovery: which identities have a pod scheduled on each node.

The signer asks :meth:`StoreNodeBinding.identities_on` from its worker threads while the
store changes on the event loop, so the index is never shared mutably: the listener
updates its private per-node tables on the loop and then publishes a new top-level
mapping (node -> frozenset) by one reference assignment.  Readers see either the old or
the new mapping, each complete.

Every pod counts, captured or not and ready or not: binding answers "does this node run
a pod with that service account", and capture can be switched on for a running pod at
any time.  Pods that are not scheduled yet (no node) bind to nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from controlplane.discovery.model import Delta, DiscoveryStore, Kind, Workload
from weft.identity import SpiffeId


class StoreNodeBinding:
    def __init__(self, store: DiscoveryStore) -> None:
        self._uids: dict[str, dict[str, SpiffeId]] = {}
        """node -> {workload uid: identity}; loop thread only."""
        self._where: dict[str, str] = {}
        """workload uid -> node; loop thread only."""
        self._published: Mapping[str, frozenset[SpiffeId]] = MappingProxyType({})
        for w in store.snapshot().workloads.values():
            self._put(w)
        self._publish(set(self._uids))
        store.add_listener(self._on_batch)

    def _put(self, w: Workload) -> str | None:
        old = self._drop(w.uid)
        if w.node:
            self._uids.setdefault(w.node, {})[w.uid] = w.identity
            self._where[w.uid] = w.node
        return old

    def _drop(self, uid: str) -> str | None:
        node = self._where.pop(uid, None)
        if node is not None:
            table = self._uids[node]
            table.pop(uid, None)
            if not table:
                del self._uids[node]
        return node

    def _on_batch(self, batch: Sequence[Delta]) -> None:
        touched: set[str] = set()
        for d in batch:
            if d.kind is not Kind.WORKLOAD:
                continue
            if isinstance(d.value, Workload):
                old = self._put(d.value)
                touched.add(d.value.node)
            else:
                old = self._drop(d.key)
            if old:
                touched.add(old)
        if touched:
            self._publish(touched)

    def _publish(self, nodes: set[str]) -> None:
        new = dict(self._published)
        for node in nodes:
            table = self._uids.get(node)
            if table:
                new[node] = frozenset(table.values())
            else:
                new.pop(node, None)
        self._published = MappingProxyType(new)

    def identities_on(self, node: str) -> set[SpiffeId]:
        return set(self._published.get(node, ()))
