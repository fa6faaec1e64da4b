"""Flow control of one transport's reading: read only while nothing holds it back.

A proxy must not read faster than it can pass bytes on, or it buffers without bound.
Each reason to stop reading a transport is a named *hold* ("the other side's buffer is
full", "the other leg is still connecting", later "the HTTP request body is over its
limit"); the transport is read exactly when no hold is set. `FlowControl` turns the
holds into ``pause_reading``/``resume_reading`` calls and stops touching the transport
once it has finished (after EOF, asyncio's ``resume_reading`` would re-arm the reader
of a finished socket and deliver EOF again).

The TCP relay (`nodeagent.proxy.relay`) uses it for both of its legs; the HTTP server of
the request-aware proxy is its next user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

PEER_BLOCKED = "peer buffer full"
PEER_CONNECTING = "peer connecting"
HELD_BYTES = "bytes held for the peer"
CLOSING = "closing"


class FlowControl:
    __slots__ = ("_finished", "_holds", "_paused", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._holds: frozenset[str] = frozenset()
        self._paused = False
        self._finished = False

    @property
    def reading(self) -> bool:
        return not self._paused and not self._finished

    @property
    def holds(self) -> frozenset[str]:
        return self._holds

    def hold(self, reason: str) -> None:
        self.update(self._holds | {reason})

    def release(self, reason: str) -> None:
        if reason in self._holds:  # (most releases are of a hold that is not set)
            self.update(self._holds - {reason})

    def update(self, holds: Iterable[str]) -> None:
        """Replace the set of holds, and pause or resume accordingly."""
        self._holds = frozenset(holds)
        if self._finished:
            return
        if self.transport.is_closing():
            self._finished = True
            return
        # Called on every update, not only on a change: both calls are idempotent on the
        # transport, and uvloop ignores a pause made inside connection_made (it starts
        # reading after it), so only a pause repeated later takes effect there.
        self._paused = bool(self._holds)
        if self._paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def finish(self) -> None:
        """The transport has ended its input (EOF) or is gone: never touch it again."""
        self._finished = True
