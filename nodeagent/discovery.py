"""The agent side of the discovery stream: subscribe, apply, reconnect.

One long mTLS connection to the control plane (``POST /v1/discovery``, see
:mod:`weft.meshwire`).  The first subscribe asks for a snapshot; later ones send the
epoch and revision held, so a control plane that still has the deltas sends only those.

Failure handling:

* Any failure — connect refused, TLS, a refusal, a malformed frame, a gap in revisions,
  ``inactivity`` seconds without a frame (the server heartbeats every 10 s) — closes the
  connection and reconnects after an exponential backoff with full jitter (so a thousand
  agents that lost the same control plane do not come back in lockstep).
* While disconnected the agent keeps the last state and serves with it: existing
  connections and new ones to known endpoints keep working.
* A malformed frame or a gap is not retried at the same position: the next subscribe
  asks for a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.cpclient import ControlPlaneClient, ControlPlaneError, Stream
from nodeagent.meshstate import MeshState, StreamGap
from weft.meshwire import (
    DISCOVERY_PATH,
    FrameDecoder,
    MeshWireError,
    Subscribe,
    decode_message,
)

log = logging.getLogger("weft.agent.discovery")

_OFFLOAD_BYTES = 256 * 1024
"""Frames larger than this are decoded on a worker thread (a 10,000-workload snapshot
takes ~100 ms of JSON work that would otherwise stall every relayed connection)."""


@dataclass(frozen=True)
class DiscoveryConfig:
    inactivity: float = 35.0
    """Seconds without any frame (heartbeats included) before the stream is presumed
    dead: 3.5 server heartbeat intervals."""
    backoff_initial: float = 0.25
    backoff_max: float = 15.0
    read_size: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.inactivity <= 0 or not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("inactivity > 0 and 0 < backoff_initial <= backoff_max are needed")


class DiscoveryClient:
    def __init__(
        self,
        client: ControlPlaneClient,
        state: MeshState,
        *,
        config: DiscoveryConfig | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.client = client
        self.state = state
        self.config = config or DiscoveryConfig()
        reg = registry if registry is not None else CollectorRegistry()
        self.m_connected = Gauge(
            "weft_agent_discovery_connected",
            "1 while the discovery stream from the control plane is up.",
            registry=reg,
        )
        self.m_reconnects = Counter(
            "weft_agent_discovery_reconnects",
            "Discovery stream (re)connection attempts that failed or ended, by reason.",
            ["reason"],
            registry=reg,
        )
        self.m_revision = Gauge(
            "weft_agent_discovery_revision", "Discovery revision applied.", registry=reg
        )
        self.m_last_update = Gauge(
            "weft_agent_discovery_last_message_timestamp_seconds",
            "When the last discovery message (heartbeats included) arrived.",
            registry=reg,
        )
        self.connected = False
        self._applied = False
        """Whether the current connection delivered a message we applied: only that resets
        the backoff (a stream that is accepted and then fails every time must not turn
        into a reconnect loop across every agent)."""
        self.last_error: str | None = None
        self.on_applied: Callable[[bytes], None] | None = None
        """Called with each message's payload once applied (the agent forwards them to
        its proxy workers, in order)."""

    async def run(self) -> None:
        """Forever: subscribe, apply, reconnect with jittered backoff."""
        cfg = self.config
        attempt = 0
        while True:
            stream: Stream | None = None
            reason = "closed"
            try:
                epoch, revision = self.state.resume_point()
                stream = await self.client.open_stream(
                    DISCOVERY_PATH,
                    Subscribe(epoch, revision).encode(),
                    what="discovery stream",
                )
                self._up(True)
                self._applied = False
                log.info(
                    "discovery stream open to %s (%s)",
                    stream.where,
                    f"resuming {epoch}/{revision}" if epoch else "asking for a snapshot",
                )
                await self._consume(stream)
                self.last_error = "the control plane closed the stream"
            except (MeshWireError, StreamGap) as e:
                reason = "invalid" if isinstance(e, MeshWireError) else "gap"
                self.state.forget_position()
                self.last_error = str(e)
            except TimeoutError:
                reason = "inactive"
                self.last_error = f"no message for {cfg.inactivity:g} s"
            except ControlPlaneError as e:
                reason = "unavailable"
                self.last_error = str(e)
            except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
                reason = "broken"
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                if stream is not None:
                    await stream.close()
            if self._applied:
                attempt = 0  # the stream delivered state: start the backoff over
            self._up(False)
            self.m_reconnects.labels(reason).inc()
            delay = random.uniform(0, min(cfg.backoff_max, cfg.backoff_initial * 2**attempt))
            attempt = min(attempt + 1, 16)
            log.warning(
                "discovery stream %s: %s; keeping the last state (revision %s), "
                "reconnecting in %.2f s",
                reason, self.last_error, self.state.revision, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)

    def _up(self, up: bool) -> None:
        self.connected = up
        self.m_connected.set(1 if up else 0)

    async def _consume(self, stream: Stream) -> None:
        decoder = FrameDecoder()
        reader = stream.reader
        while True:
            async with asyncio.timeout(self.config.inactivity):
                data = await reader.read(self.config.read_size)
            if not data:
                return
            for payload in decoder.feed(data):
                if len(payload) > _OFFLOAD_BYTES:
                    msg = await asyncio.to_thread(decode_message, payload)
                else:
                    msg = decode_message(payload)
                self.state.apply(msg)
                if self.on_applied is not None:
                    self.on_applied(payload)
                self._applied = True
                self.m_last_update.set(time.time())
                if self.state.revision is not None:
                    self.m_revision.set(self.state.revision)

    def snapshot(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "epoch": self.state.epoch,
            "revision": self.state.revision,
            "workloads": len(self.state.workloads),
            "services": len(self.state.services),
            "last_error": self.last_error,
        }
