"""The agent discovery stream: one store, many subscribed agents, none waiting on another.

Each agent holds one long response on ``POST /v1/discovery`` (wire format:
:mod:`weft.meshwire`).  On subscribe it gets the deltas after its revision when the store
still has them and the epoch matches, else a snapshot; then every committed batch, in
order; a heartbeat when nothing changed for ``heartbeat`` seconds.

Fan-out without head-of-line blocking:

* The store calls :meth:`DiscoveryStream._on_batch` synchronously when a batch commits.
  It encodes the batch **once** and appends the same ``bytes`` to each subscriber's
  queue: no I/O, no awaiting, no per-agent encoding.  1,000 agents cost 1,000 appends.
* Each subscriber has its own writer coroutine and a queue bounded by bytes.  A queue
  that would overflow is dropped whole and the subscriber is marked *stale*: its writer
  sends one fresh snapshot instead of the backlog.  A slow agent therefore costs the
  control plane at most one snapshot reference and ``queue_bytes`` of deltas, never an
  unbounded backlog, and never delays anyone else.
* A writer whose agent stops reading altogether (the drain does not complete within
  ``write_timeout``) is disconnected; the agent reconnects and resumes.
* Snapshots are encoded once per revision and shared, so a thousand agents reconnecting
  after a control plane restart share one encoding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.discovery.model import Delta, DiscoveryStore
from weft.meshwire import Subscribe, deltas_frame, heartbeat_frame, snapshot_frame

log = logging.getLogger("weft.discovery.stream")

DEFAULT_QUEUE_BYTES = 4 * 1024 * 1024
DEFAULT_HEARTBEAT = 10.0
DEFAULT_WRITE_TIMEOUT = 15.0
CHUNK = 64 * 1024
"""Bytes handed to an agent's transport at a time (see ``DiscoveryStream._send``)."""


@dataclass(frozen=True)
class StreamConfig:
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    """Pending delta bytes per agent before it is switched to a fresh snapshot."""
    heartbeat: float = DEFAULT_HEARTBEAT
    """Seconds of silence after which a heartbeat frame is sent."""
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    """An agent that does not take a frame within this is disconnected."""
    max_per_node: int = 4
    """Streams one node may hold at once (an agent needs one; a reconnect overlaps the
    old stream until the server sees it close; more is a bug or abuse)."""

    def __post_init__(self) -> None:
        if self.queue_bytes < 1 or self.heartbeat <= 0 or self.write_timeout <= 0:
            raise ValueError("queue_bytes, heartbeat and write_timeout must be positive")


class _Subscriber:
    __slots__ = ("limit", "node", "queue", "queued_bytes", "stale", "wake")

    def __init__(self, node: str, limit: int) -> None:
        self.node = node
        self.limit = limit
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.stale = False
        self.wake = asyncio.Event()

    def offer(self, data: bytes) -> bool:
        """Queue a frame; False when the queue overflowed (now stale, queue dropped)."""
        if self.stale:
            return True  # a snapshot is coming anyway
        if self.queued_bytes + len(data) > self.limit:
            self.queue.clear()
            self.queued_bytes = 0
            self.stale = True
            self.wake.set()
            return False
        self.queue.append(data)
        self.queued_bytes += len(data)
        self.wake.set()
        return True

    def take(self) -> list[bytes]:
        frames = list(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        self.wake.clear()
        return frames


class DiscoveryStream:
    """Serves :class:`DiscoveryStore` changes to subscribed agents."""

    def __init__(
        self,
        store: DiscoveryStore,
        config: StreamConfig | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.config = config or StreamConfig()
        self._subs: set[_Subscriber] = set()
        self._snapshot: tuple[int, bytes] | None = None
        self._closing = asyncio.Event()
        reg = registry if registry is not None else CollectorRegistry()
        self.m_subscribers = Gauge(
            "weft_discovery_subscribers", "Agents subscribed to the discovery stream.",
            registry=reg,
        )  # fmt: skip
        self.m_snapshots = Counter(
            "weft_discovery_snapshots_sent",
            "Snapshots sent to agents, by reason (new: no usable revision; overflow: the "
            "agent fell behind its queue).",
            ["reason"],
            registry=reg,
        )
        self.m_batches = Counter(
            "weft_discovery_delta_batches_sent", "Delta frames written to agents.", registry=reg
        )
        self.m_disconnects = Counter(
            "weft_discovery_slow_disconnects",
            "Agents disconnected for not reading within the write timeout.",
            registry=reg,
        )
        self.m_revision = Gauge(
            "weft_discovery_revision", "Current discovery revision.", registry=reg
        )
        self.m_frame_bytes = Counter(
            "weft_discovery_encoded_bytes",
            "Bytes encoded for the stream (once per batch or snapshot, not per agent).",
            ["kind"],
            registry=reg,
        )
        self._remove_listener = store.add_listener(self._on_batch)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def admits(self, node: str) -> bool:
        """Whether ``node`` may open one more stream (checked before answering 200)."""
        return sum(1 for s in self._subs if s.node == node) < self.config.max_per_node

    def snapshot_bytes(self) -> tuple[int, bytes]:
        """The current snapshot frame, encoded once per revision."""
        rev = self.store.revision
        if self._snapshot is None or self._snapshot[0] != rev:
            snap = self.store.snapshot()
            data = snapshot_frame(
                snap.epoch,
                snap.revision,
                [snap.workloads[k] for k in sorted(snap.workloads)],
                [snap.services[k] for k in sorted(snap.services)],
            )
            self.m_frame_bytes.labels("snapshot").inc(len(data))
            self._snapshot = (rev, data)
        return self._snapshot

    def _on_batch(self, batch: Sequence[Delta]) -> None:
        self.m_revision.set(self.store.revision)
        if not self._subs:
            return
        data = deltas_frame(self.store.epoch, batch)
        self.m_frame_bytes.labels("deltas").inc(len(data))
        for sub in self._subs:
            if not sub.offer(data):
                log.warning(
                    "agent %s fell %d+ bytes behind the discovery stream: sending it a "
                    "fresh snapshot instead of the backlog",
                    sub.node,
                    self.config.queue_bytes,
                )

    def initial(self, request: Subscribe) -> tuple[str, bytes]:
        """(reason, first frame) for a new subscriber: deltas to resume, or a snapshot."""
        if request.revision is not None:
            deltas = self.store.deltas_since(request.revision, request.epoch)
            if deltas is not None:
                if not deltas:
                    return "resume", heartbeat_frame(self.store.epoch, self.store.revision)
                return "resume", deltas_frame(self.store.epoch, deltas)
        return "new", self.snapshot_bytes()[1]

    async def serve(
        self, node: str, request: Subscribe, writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader, until: float | None = None,
    ) -> None:  # fmt: skip
        """Stream to one agent until it disconnects, is too slow, the stream closes, or
        ``until`` (Unix time: when the node certificate that opened it expires) — the
        agent then reconnects with its renewed certificate, so a node removed from the
        mesh stops receiving state within one node-certificate lifetime."""
        cfg = self.config
        await self.store.wait_synced()
        sub = _Subscriber(node, cfg.queue_bytes)
        # Computed and registered in one step of the loop: no batch can fall between the
        # initial frame and the subscription.
        reason, first = self.initial(request)
        self._subs.add(sub)
        self.m_subscribers.set(len(self._subs))
        if reason == "new":
            self.m_snapshots.labels("new").inc()
        log.info(
            "agent %s subscribed (%s from %s at revision %d, epoch %s)",
            node,
            "snapshot" if reason == "new" else "resumes",
            f"{request.epoch}/{request.revision}" if request.epoch else "scratch",
            self.store.revision,
            self.store.epoch,
        )
        gone = asyncio.ensure_future(_wait_eof(reader))
        closing = asyncio.ensure_future(self._closing.wait())
        started = time.monotonic()
        try:
            if not await self._send(sub, [first], writer):
                return
            while True:
                wait = cfg.heartbeat
                if until is not None:
                    left = until - time.time()
                    if left <= 0:
                        log.info("agent %s: its node certificate expired; ending its stream",
                                 node)  # fmt: skip
                        break
                    wait = min(wait, left)
                woken = asyncio.ensure_future(sub.wake.wait())
                done, _ = await asyncio.wait(
                    {woken, gone, closing},
                    timeout=wait,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                woken.cancel()
                if gone in done or closing in done:
                    break
                if sub.stale:
                    sub.take()
                    sub.stale = False
                    self.m_snapshots.labels("overflow").inc()
                    frames = [self.snapshot_bytes()[1]]
                elif sub.queue:
                    frames = sub.take()
                    self.m_batches.inc(len(frames))
                else:
                    frames = [heartbeat_frame(self.store.epoch, self.store.revision)]
                if not await self._send(sub, frames, writer):
                    break
        finally:
            gone.cancel()
            closing.cancel()
            self._subs.discard(sub)
            self.m_subscribers.set(len(self._subs))
            log.info("agent %s unsubscribed after %.0f s", node, time.monotonic() - started)

    async def _send(self, sub: _Subscriber, frames: list[bytes], writer: asyncio.StreamWriter
                    ) -> bool:  # fmt: skip
        """Write ``frames`` in chunks, waiting for each to drain below the transport's
        high-water mark.  A 4 MB snapshot handed to the transport whole would be copied
        into per-connection TLS and socket buffers: with 1,000 agents syncing at once
        that is gigabytes; chunked, it is ``CHUNK`` plus the watermark per agent.  The
        agent is cut only when it makes no progress for ``write_timeout``."""
        try:
            for frame in frames:
                view = memoryview(frame)
                for start in range(0, len(view), CHUNK):
                    writer.write(view[start : start + CHUNK])
                    async with asyncio.timeout(self.config.write_timeout):
                        await writer.drain()
        except TimeoutError:
            self.m_disconnects.inc()
            log.warning(
                "agent %s took no discovery data for %.0f s: disconnecting it (it will "
                "resume when it reconnects)",
                sub.node,
                self.config.write_timeout,
            )
            writer.transport.abort()
            return False
        except (ConnectionError, OSError) as e:
            log.info("agent %s: discovery stream broke: %s", sub.node, e)
            return False
        return True

    def close(self) -> None:
        """End every stream (shutdown); agents reconnect to another replica or later."""
        self._closing.set()
        self._remove_listener()


async def _wait_eof(reader: asyncio.StreamReader) -> None:
    """Return when the agent closes its side (it sends nothing after subscribing)."""
    while True:
        try:
            data = await reader.read(4096)
        except (ConnectionError, OSError):
            return
        if not data:
            return
