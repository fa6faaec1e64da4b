"""What discovery knows: immutable workloads and services, and a versioned store of them.

Sources (the lab registry, Kubernetes) translate their objects into :class:`Workload` and
:class:`Service` values and hand them to one :class:`DiscoveryStore`.  The store is the
only mutable thing here; it keeps the current state, numbers every change with a
revision, and keeps a bounded history of :class:`Delta` records so that the agent stream
can send "a snapshot at revision N, then every delta after N" and let a reconnecting
agent resume from its last revision instead of downloading everything again.

Design choices, and what was rejected:

* **Values, not records to patch.**  Every model object is a frozen dataclass compared by
  value.  A source recomputes a whole workload or service and the store drops it when it
  equals what it already holds, so re-sending unchanged state (a relist, a periodic lab
  re-read, a MODIFIED event that only touched fields Weft ignores) costs no revision and
  reaches no agent.  Field-level patches would make both sides track partial state.
* **One revision per delta, consecutive.**  A batch of changes (a namespace label flip that
  recaptures 200 pods) gets consecutive revisions and is handed to listeners together;
  "everything after N" is then a slice of the history, with no gaps to reason about.
* **An epoch per store.**  Revisions restart at 0 when the control plane restarts, and each
  replica counts on its own, so a revision alone does not identify a state.  An agent
  resumes only when its epoch matches; otherwise it gets a snapshot.
* **Synced is explicit.**  An empty store before the first full list must not be served
  as "there are no workloads": agents would tear everything down.  Sources call
  :meth:`DiscoveryStore.mark_synced` once their first complete view is in.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import MappingProxyType

from weft.mesh import (
    CAPTURE_DISABLED,
    CAPTURE_ENABLED,
    CAPTURE_LABEL,
    INBOUND_MODE_KEY,
    Delta,
    Endpoint,
    InboundMode,
    Item,
    Kind,
    Service,
    ServicePort,
    Snapshot,
    Workload,
    WorkloadPort,
    inbound_mode,
    is_captured,
    kind_of,
    opaque_ports,
    service_key,
)

__all__ = [  # the value types are re-exported: sources build them from here
    "CAPTURE_DISABLED",
    "CAPTURE_ENABLED",
    "CAPTURE_LABEL",
    "DEFAULT_HISTORY",
    "INBOUND_MODE_KEY",
    "Delta",
    "DiscoveryStore",
    "Endpoint",
    "InboundMode",
    "Item",
    "Kind",
    "Listener",
    "Service",
    "ServicePort",
    "Snapshot",
    "Workload",
    "WorkloadPort",
    "inbound_mode",
    "is_captured",
    "kind_of",
    "opaque_ports",
    "service_key",
]

log = logging.getLogger("weft.discovery")

DEFAULT_HISTORY = 10_000
"""Deltas kept for resuming agents: one full relist of a large cluster, roughly."""

Listener = Callable[[Sequence[Delta]], None]


class DiscoveryStore:
    """The current workloads and services, a revision counter and a bounded delta history.

    Single-threaded by design: sources and the agent stream all run on the control
    plane's event loop, so no locks.  Listeners are called synchronously after each batch
    commits; they must only enqueue (the stream fans out to bounded per-agent queues), never
    block.
    """

    def __init__(self, history: int = DEFAULT_HISTORY, epoch: str | None = None) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.epoch = epoch or secrets.token_hex(8)
        self._revision = 0
        self._workloads: dict[str, Workload] = {}
        self._services: dict[str, Service] = {}
        self._history: deque[Delta] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._snapshot: Snapshot | None = None

    # -- reading -------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def synced(self) -> bool:
        """Whether a source has delivered its first complete view (serve nothing before)."""
        return self._synced.is_set()

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def service(self, key: str) -> Service | None:
        return self._services.get(key)

    def _table(self, kind: Kind) -> dict[str, Workload] | dict[str, Service]:
        return self._workloads if kind is Kind.WORKLOAD else self._services

    def snapshot(self) -> Snapshot:
        """The current state; cached per revision, so a thousand agents reconnecting at
        once share one copy."""
        if self._snapshot is None or self._snapshot.revision != self._revision:
            self._snapshot = Snapshot(
                epoch=self.epoch,
                revision=self._revision,
                workloads=MappingProxyType(dict(self._workloads)),
                services=MappingProxyType(dict(self._services)),
            )
        return self._snapshot

    def deltas_since(self, revision: int, epoch: str | None = None) -> list[Delta] | None:
        """Every delta after ``revision``, oldest first; None if they are not all here.

        None means the caller must start over from :meth:`snapshot`: the revision is from
        another epoch (a restarted or different replica), from the future, or older than
        the history kept.
        """
        if epoch is not None and epoch != self.epoch:
            return None
        if revision > self._revision or revision < 0:
            return None
        if revision == self._revision:
            return []
        oldest = self._history[0].revision if self._history else self._revision + 1
        if revision < oldest - 1:
            return None
        return list(itertools.islice(self._history, revision - oldest + 1, None))

    async def wait_for(self, revision: int) -> int:
        """Wait until the store is past ``revision``; return the current revision."""
        while self._revision <= revision:
            await self._changed.wait()
        return self._revision

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each committed batch; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    # -- writing (sources) --------------------------------------------------------------

    def mark_synced(self) -> None:
        if not self._synced.is_set():
            log.info(
                "discovery synced at revision %d: %d workloads, %d services",
                self._revision,
                len(self._workloads),
                len(self._services),
            )
        self._synced.set()

    def update(
        self, upserts: Iterable[Item] = (), deletes: Iterable[tuple[Kind, str]] = ()
    ) -> list[Delta]:
        """Apply upserts, then deletes, as one batch; return the deltas it produced.

        An upsert equal to the stored value and a delete of an absent key are no-ops: they
        take no revision and produce no delta.
        """
        batch: list[Delta] = []
        for item in upserts:
            if isinstance(item, Workload):
                if self._workloads.get(item.key) == item:
                    continue
                self._workloads[item.key] = item
            else:
                if self._services.get(item.key) == item:
                    continue
                self._services[item.key] = item
            batch.append(Delta(self._revision + len(batch) + 1, kind_of(item), item.key, item))
        for kind, key in deletes:
            if self._table(kind).pop(key, None) is None:
                continue
            batch.append(Delta(self._revision + len(batch) + 1, kind, key, None))
        if batch:
            self._commit(batch)
        return batch

    def replace(self, workloads: Iterable[Workload], services: Iterable[Service]) -> list[Delta]:
        """Make the store hold exactly these objects (a source's full view), as one batch."""
        wanted: dict[Kind, dict[str, Item]] = {
            Kind.WORKLOAD: {w.key: w for w in workloads},
            Kind.SERVICE: {s.key: s for s in services},
        }
        deletes = [
            (kind, key)
            for kind in (Kind.SERVICE, Kind.WORKLOAD)
            for key in sorted(self._table(kind).keys() - wanted[kind].keys())
        ]
        upserts = [
            wanted[kind][key]
            for kind in (Kind.WORKLOAD, Kind.SERVICE)
            for key in sorted(wanted[kind])
        ]
        return self.update(upserts, deletes)

    def _commit(self, batch: list[Delta]) -> None:
        self._revision = batch[-1].revision
        self._history.extend(batch)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        # A listener that raises is a bug in the stream; every listener still sees the
        # batch, then the error propagates to the source task, whose guard stops the
        # process rather than serve agents a state they silently stopped following.
        error: BaseException | None = None
        for listener in list(self._listeners):
            try:
                listener(batch)
            except Exception as e:
                log.exception("discovery listener %r failed", listener)
                error = error or e
        if error is not None:
            raise error
