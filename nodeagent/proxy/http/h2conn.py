"""What both ends of the proxy's HTTP/2 connections share: the `h2` state machine (sans
I/O) driven by an asyncio protocol, per-stream send queues under flow control, and the
limits that keep one peer from costing the node more than its share.

`H2Endpoint` is subclassed by the downstream `H2Server` (an app's h2c connection, or a
tunnel stream the client node sent as ``h2``) and the upstream `H2Client` (to the other
node, or to a pod). Bytes a stream has to send wait in its `Outbox` until the peer's
flow-control window has room; when they leave, the `Outbox` tells the connection they
came from (``ack``), which only then opens *its* peer's window. So a stream holds at
most the window it advertised, end to end, whatever either side does, and a connection
whose transport is full sends no DATA (nothing is acknowledged upstream of it either)
until it drains.

Floods are answered with GOAWAY ``ENHANCE_YOUR_CALM`` (RFC 9113 §5.4.1 and the 2023
"rapid reset" and 2024 "CONTINUATION" advisories): resets of streams by the peer
(rapid reset), PING/SETTINGS/PRIORITY/unknown frames, and empty DATA frames each spend
a token bucket; CONTINUATION backlogs and HPACK bombs are bounded by `h2` itself
(``max_header_list_size``, 64 continuation frames), which ends the connection the same
way. One connection's flood never touches another's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from nodeagent.proxy.relay import reset_transport

log = logging.getLogger("weft.proxy.http")

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class H2Config:
    max_concurrent_streams: int = 100
    """Streams a peer may have open on one connection (what we advertise)."""
    stream_window: int = 256 * 1024
    """The flow-control window of each stream we receive on: the most one stream's
    bytes can occupy in the proxy."""
    connection_window: int = 1024 * 1024
    max_header_list_size: int = 64 * 1024
    """Decoded size of one header block (HPACK bombs end the connection)."""
    idle_timeout: float = 600.0
    """Seconds a connection may have no stream open before it is closed (GOAWAY)."""
    resets: tuple[int, float] = (200, 100.0)
    """Token bucket (burst, per second) for streams the peer resets: rapid reset."""
    control_frames: tuple[int, float] = (100, 20.0)
    """Token bucket for PING, SETTINGS, PRIORITY and unknown frames."""
    empty_frames: tuple[int, float] = (200, 100.0)
    """Token bucket for DATA frames without data and without END_STREAM."""


class Budget:
    """A token bucket: `spend` says whether one more event fits."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, limit: tuple[int, float], now: float) -> None:
        self.burst, self.rate = limit
        self.tokens = float(self.burst)
        self.at = now

    def spend(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Outbox:
    """What one stream has to send on a connection: DATA waiting for window, then the
    end (with trailers, or an empty END_STREAM). ``ack(n)`` runs as n bytes leave: it
    opens the window of the connection they were received on."""

    __slots__ = ("ack", "chunks", "done", "end", "trailers")

    def __init__(self, ack: Callable[[int], None] | None = None) -> None:
        self.chunks: deque[bytes] = deque()
        self.end = False
        self.trailers: Headers | None = None
        self.done = False
        self.ack = ack

    @property
    def pending(self) -> int:
        return sum(map(len, self.chunks))


class H2Endpoint(asyncio.Protocol):
    """One HTTP/2 connection: subclasses handle the events (`_event`)."""

    client_side = False

    def __init__(self, *, label: str, config: H2Config | None = None) -> None:
        self.label = label
        self.config = cfg = config or H2Config()
        # Inbound header blocks are validated (they come from a peer); outbound ones are
        # what an inbound block of the other connection held, validated there already,
        # so not again (a measurable part of h2's per-request cost).
        self.h2 = H2Connection(
            H2Configuration(
                client_side=self.client_side,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        # In force from the preface on (``local_settings.update`` would stage them until
        # the peer's ACK, while the preface still announced the defaults).
        self.h2.local_settings = Settings(
            client=self.client_side,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: cfg.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: cfg.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._resets = Budget(cfg.resets, now)
        self._control = Budget(cfg.control_frames, now)
        self._empty = Budget(cfg.empty_frames, now)
        self.transport: asyncio.Transport | None = None
        self.outboxes: dict[int, Outbox] = {}
        self.write_paused = False
        self.closing = False
        self.close_reason: str | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._last_active = now
        self._timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)
        self.h2.initiate_connection()
        grow = self.config.connection_window - 65535
        if grow > 0:
            self.h2.increment_flow_control_window(grow)
        self._flush()
        self._timer = self._loop.call_later(self.config.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY naming the error; send it, then close.
            self._fail_connection(f"protocol error from the peer: {exc or type(exc).__name__}")
            return
        now = self._loop.time()
        self._last_active = now
        for event in events:
            if self._event(event, now):
                return  # the event closed the connection (a flood)
        self._flush()

    def eof_received(self) -> bool:
        self._close("the peer closed the connection", goaway=False)
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream_id in list(self.outboxes):
            self.pump(stream_id)
        self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.close_reason is None:
            self.close_reason = f"connection lost ({exc})" if exc else "connection closed"
        if self._timer is not None:
            self._timer.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._lost()
        if not self.closed.done():
            self.closed.set_result(None)

    # --- for subclasses ----------------------------------------------------------------

    def _event(self, event: object, now: float) -> bool:
        """Handle one event; True when it closed the connection."""
        raise NotImplementedError

    def _lost(self) -> None:
        """The connection is gone: fail what is still in flight."""

    @property
    def streams_open(self) -> int:
        return len(self.outboxes)

    def _flood(self, budget: Budget, what: str, now: float) -> bool:
        """Spend from ``budget``; over it: GOAWAY ENHANCE_YOUR_CALM and close."""
        if budget.spend(now):
            return False
        log.warning("%s: %s flood; closing the connection with ENHANCE_YOUR_CALM",
                    self.label, what)  # fmt: skip
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=what.encode())
        self._fail_connection(f"{what} flood")
        return True

    def control_frame(self, what: str, now: float) -> bool:
        return self._flood(self._control, what, now)

    def peer_reset(self, now: float) -> bool:
        return self._flood(self._resets, "stream reset", now)

    def empty_data(self, now: float) -> bool:
        return self._flood(self._empty, "empty DATA frame", now)

    # --- sending -----------------------------------------------------------------------

    def window_opened(self, stream_id: int) -> None:
        """WINDOW_UPDATE (stream 0: the connection's) or new SETTINGS: send what waits."""
        if stream_id:
            self.pump(stream_id)
        else:
            for waiting in list(self.outboxes):
                self.pump(waiting)

    def send_data(self, stream_id: int, data: bytes) -> None:
        box = self.outboxes.get(stream_id)
        if box is None or box.end:
            return
        box.chunks.append(data)
        self.pump(stream_id)

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        box = self.outboxes.get(stream_id)
        if box is None or box.end:
            return
        box.end = True
        box.trailers = trailers or None
        self.pump(stream_id)

    def pump(self, stream_id: int) -> None:
        """Send what ``stream_id`` has queued, as far as the peer's window allows."""
        box = self.outboxes.get(stream_id)
        if box is None or self.closing:
            return
        h2 = self.h2
        sent = 0
        try:
            if not self.write_paused:
                chunks = box.chunks
                while chunks:
                    room = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
                    if room <= 0:
                        break
                    chunk = chunks[0]
                    if len(chunk) <= room:
                        chunks.popleft()
                    else:
                        chunks[0] = chunk[room:]
                        chunk = chunk[:room]
                    h2.send_data(stream_id, chunk)
                    sent += len(chunk)
            if box.end and not box.chunks and not box.done:
                box.done = True
                if box.trailers:
                    h2.send_headers(stream_id, box.trailers, end_stream=True)
                else:
                    h2.end_stream(stream_id)
        except (StreamClosedError, ProtocolError) as exc:
            # The peer reset it meanwhile (its RST_STREAM event follows or came first).
            log.debug("%s: stream %d: not sent (%s)", self.label, stream_id, exc)
            box.chunks.clear()
            box.done = True
        if sent and box.ack is not None:
            box.ack(sent)
        if box.done and self.outboxes.get(stream_id) is box:
            del self.outboxes[stream_id]
        self._schedule_flush()

    def ack(self, stream_id: int, n: int) -> None:
        """``n`` bytes received on ``stream_id`` have left the proxy: open the peer's
        window by as much."""
        if self.closing:
            return
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except (StreamClosedError, ProtocolError):
            return  # gone; the connection window was credited when it closed
        self._schedule_flush()

    def reset_stream(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self.outboxes.pop(stream_id, None)
        if self.closing:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except (StreamClosedError, ProtocolError):
            pass
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # One write per loop iteration for everything the streams queued (the peer's
        # events often touch many streams of this connection at once).
        if self._flush_handle is None and not self.closing:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- closing -----------------------------------------------------------------------

    def _check_idle(self) -> None:
        self._timer = None
        if self.closing:
            return
        idle = self._loop.time() - self._last_active
        busy = self.streams_open > 0
        if not busy and idle >= self.config.idle_timeout:
            self._close("idle")
            return
        wait = self.config.idle_timeout if busy else self.config.idle_timeout - idle
        self._timer = self._loop.call_later(max(wait, 0.05), self._check_idle)

    def _close(self, reason: str, *, goaway: bool = True) -> None:
        """Close cleanly: GOAWAY (no error) and close the transport."""
        if self.closing:
            return
        if goaway:
            try:
                self.h2.close_connection()
            except ProtocolError:
                pass
            self._flush()
        self.closing = True
        self.close_reason = reason
        if self.transport is not None:
            self.transport.close()

    def _fail_connection(self, reason: str) -> None:
        """Send what h2 queued (its GOAWAY) and close; streams are failed by `_lost`."""
        if self.closing:
            return
        log.info("%s: %s; closing", self.label, reason)
        self._flush()
        self.closing = True
        self.close_reason = reason
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            reset_transport(self.transport)
