"""Hold accepted connections until the node proxy can judge them: fail closed at start.

Why: right after an agent starts (or restarts after a crash) it has no trust bundle in
use yet, no workload certificates and no discovery snapshot.  A connection judged then
is judged against empty discovery: a captured pod looks like an address outside the
mesh and would be dialled in *plaintext*, a service VIP would be dialled raw.  So until
the agent says it is ready, accepted connections are parked here, untouched: the
client's bytes stay in the kernel, nothing is read, nothing is dialled.  Once the agent
is ready, the parked connections are handed on in arrival order; one that waited
``deadline`` seconds is reset (the application sees a failed connection, never an
unencrypted one), and beyond ``max_held`` new arrivals are reset at once, so memory stays
bounded whatever the burst.

Connections that arrive before the listener accepts at all (while eBPF compiles) wait in
the kernel's listen backlog and are parked as soon as accepting starts; their deadline
counts from then.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.proxy.listener import endpoint, format_address, reset_socket

log = logging.getLogger("weft.proxy")

Admit = Callable[[socket.socket, Any], None]


@dataclass
class HoldStats:
    """Counters for /debug/state and metrics (``weft_proxy_held_*``)."""

    held: int = 0
    """Connections parked right now."""
    held_peak: int = 0
    served: int = 0
    """Parked connections handed on once the agent was ready."""
    wait_seconds: float = 0.0
    """Total time the served ones were parked."""
    refused_deadline: int = 0
    """Reset after waiting ``deadline`` seconds for readiness."""
    refused_full: int = 0
    """Reset at once: ``max_held`` connections were already parked."""
    refused_shutdown: int = 0
    """Reset because the agent stopped before it was ready."""


class ReadyHold:
    """Parks sockets while closed; `open` admits them, in order, and lets later ones
    through directly."""

    def __init__(self, kind: str, *, deadline: float, max_held: int = 4096) -> None:
        if deadline <= 0 or max_held < 0:
            raise ValueError(f"need deadline > 0 and max_held >= 0, got {deadline}, {max_held}")
        self.kind = kind
        self.deadline = deadline
        self.max_held = max_held
        self.stats = HoldStats()
        self.is_open = False
        self._parked: collections.deque[tuple[float, socket.socket, Any, Admit]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None

    def take(self, conn: socket.socket, peer: Any, admit: Admit) -> None:
        """Admit ``conn`` now if open, else park it (or reset it if the hold is full)."""
        if self.is_open:
            admit(conn, peer)
            return
        stats = self.stats
        if len(self._parked) >= self.max_held:
            stats.refused_full += 1
            log.warning(
                "%s: %s arrived before the agent is ready and %d connections already wait; "
                "resetting it",
                self.kind, _who(peer), len(self._parked),
            )  # fmt: skip
            reset_socket(conn)
            return
        self._parked.append((time.monotonic(), conn, peer, admit))
        stats.held = len(self._parked)
        stats.held_peak = max(stats.held_peak, stats.held)
        if stats.held == 1:
            log.info(
                "%s: holding connections until the agent is ready (up to %gs each)",
                self.kind, self.deadline,
            )  # fmt: skip
        if self._timer is None:
            self._arm()

    def open(self) -> None:
        """The agent is ready: hand on every parked connection, oldest first."""
        if self.is_open:
            return
        self.is_open = True
        self._cancel_timer()
        parked, self._parked = self._parked, collections.deque()
        now = time.monotonic()
        for since, conn, peer, admit in parked:
            self.stats.served += 1
            self.stats.wait_seconds += now - since
            try:
                admit(conn, peer)
            except Exception:
                log.exception("%s: handing on a held connection from %s failed", self.kind,
                              _who(peer))  # fmt: skip
                reset_socket(conn)
        self.stats.held = 0
        if parked:
            log.info(
                "%s: ready; %d held connections handed on (longest wait %.2fs)",
                self.kind, len(parked), now - parked[0][0],
            )  # fmt: skip

    def close(self) -> None:
        """Shutdown before readiness: reset whatever is still parked."""
        self._cancel_timer()
        while self._parked:
            conn = self._parked.popleft()[1]
            self.stats.refused_shutdown += 1
            reset_socket(conn)
        self.stats.held = 0

    # -- deadlines: one timer, for the oldest parked connection -----------------------

    def _arm(self) -> None:
        since = self._parked[0][0]
        delay = max(0.0, since + self.deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        expired = 0
        while self._parked and self._parked[0][0] + self.deadline <= now:
            conn = self._parked.popleft()[1]
            expired += 1
            reset_socket(conn)
        self.stats.refused_deadline += expired
        self.stats.held = len(self._parked)
        if expired:
            log.warning(
                "%s: the agent was not ready within %gs: %d held connections reset "
                "(fail closed: never served without certificates and discovery)",
                self.kind, self.deadline, expired,
            )  # fmt: skip
        if self._parked:
            self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _who(peer: Any) -> str:
    try:
        return format_address(endpoint(peer))
    except (TypeError, ValueError, IndexError):
        return repr(peer)
