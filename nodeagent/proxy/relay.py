"""A bidirectional byte relay between two asyncio transports, with flow control.

Each relayed connection has two legs, the captured client and the upstream. The relay is
a pair of ``asyncio.Protocol`` objects, one per transport, sharing one state machine
(`Relay`); every transition lives in `Relay`'s methods, the protocols only forward
callbacks.

Why protocols and not streams: a ``StreamReader``/``StreamWriter`` pair costs two copy
tasks and a second buffer per connection, and its backpressure (``drain()``) is
per-writer and implicit. With protocols a chunk read from one side is written straight to
the other transport, no task runs per direction, and flow control is the transports'
own write-buffer watermarks, made explicit (the uvicorn ``FlowControl`` pattern):

* when one side's outgoing buffer rises above ``high_water`` its protocol gets
  ``pause_writing()`` and the relay stops reading the *other* side;
* when that buffer drains below ``low_water`` (``resume_writing()``) reading resumes.

So whatever either peer does, a connection holds at most about
``2 * (high_water + one read)`` bytes in user space (a read is up to 256 KiB on both
asyncio and uvloop); past that, TCP's window pushes back on the sender.

Endings:

* EOF from one side is a half-close: it is forwarded with ``write_eof()`` and the other
  direction keeps flowing. When both directions have ended, both transports are closed
  (flushing what is buffered). A transport that cannot half-close (TLS) is closed
  instead, which ends both directions.
* An error or reset on one side aborts the other with ``SO_LINGER`` 0, so its peer sees
  a reset rather than a clean close that would look like a complete response.
* No bytes either way for ``idle_timeout`` seconds closes both sides (logged). The same
  timer bounds a graceful close whose buffered bytes the peer never reads: it then
  aborts.

A `Tap` may watch the bytes as they pass (the inbound HTTP/1.1 observer,
`nodeagent.proxy.http.observe`): it sees each read before it is written on, may forward
less of it (holding the rest), hold a leg's reading, answer the client itself or abort.
Without a tap a read costs one ``write`` and a few attribute updates.

The relay never opens or accepts connections; `nodeagent.proxy.outbound` does, and hands
``relay.client``/``relay.upstream`` to the loop as the protocols of the two transports.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Protocol, cast

from nodeagent.proxy.flow import CLOSING, HELD_BYTES, PEER_BLOCKED, PEER_CONNECTING, FlowControl

log = logging.getLogger("weft.proxy")

# l_onoff=1, l_linger=0: close() discards unsent data and sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


TAP_HOLD = "held by the tap"


class Tap(Protocol):
    """Watches a relay's bytes (see the module docstring). Its calls happen inside the
    relay's callbacks; it acts on the relay only through `Relay`'s tap methods."""

    def client_data(self, data: bytes) -> bytes:
        """Bytes read from the client: return what to write to the upstream now."""

    def upstream_data(self, data: bytes) -> bytes:
        """Bytes read from the upstream: return what to write to the client now."""

    def upstream_eof(self) -> None:
        """The upstream half-closed (a close-delimited response ends here)."""

    def client_eof(self) -> None:
        """The client half-closed."""

    def ended(self, reason: str, upstream_failed: bool) -> None:
        """The relay is closing (``upstream_failed``: the upstream leg went first, with
        an error or mid-exchange)."""


class ByteMeter(Protocol):
    """Where a relay adds its byte counts as they flow (`ProxyStats` is one)."""

    bytes_out: int
    bytes_in: int


def reset_transport(transport: asyncio.WriteTransport) -> None:
    """Abort ``transport`` so its peer sees a TCP reset, not an orderly FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already dead; abort() below still releases it
    transport.abort()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Side(asyncio.Protocol):
    """The protocol of one leg; all decisions are the relay's."""

    def __init__(self, relay: Relay, name: str) -> None:
        self._relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.peer: _Side = self  # wired by Relay.__init__
        self.received = 0
        # Bytes read before the other leg existed: at most one read, see Relay._data.
        self.pending = b""
        self.eof = False  # this leg's remote end has shut down its writing
        self.write_blocked = False  # this leg's outgoing buffer is above high water
        self.lost = False
        self.tap_hold = False  # the tap stopped reading this leg

    @property
    def closed(self) -> asyncio.Future[None]:
        """Resolves when the whole relay is closed (for a tunnel `ServedStream`)."""
        return self._relay._closed

    def abandon(self) -> None:
        """This leg will never be connected: reset the other one."""
        self._relay.abort(f"{self.name} abandoned")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but implement it.
        self._relay._connected(self, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._relay._data(self, data)

    def eof_received(self) -> bool:
        self._relay._eof(self)
        return True  # we decide when to close; the other direction may still be flowing

    def pause_writing(self) -> None:
        self._relay._write_blocked(self, True)

    def resume_writing(self) -> None:
        self._relay._write_blocked(self, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay._lost(self, exc)


class Relay:
    """Relays bytes between the transports of ``client`` and ``upstream``.

    Make one per connection inside the running loop, give ``relay.client`` and
    ``relay.upstream`` to the loop as protocols (``lambda: relay.client``), then await
    `wait_closed`. Bytes from the client are "out", bytes from the upstream "in".
    """

    def __init__(
        self,
        *,
        label: str,
        high_water: int,
        low_water: int,
        idle_timeout: float,
        meter: ByteMeter | None = None,
        tap: Tap | None = None,
    ) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError(f"need 0 <= low_water <= high_water, got {low_water}, {high_water}")
        self.label = label
        """Names the connection in log lines: ``client -> original destination``."""
        self.close_reason: str | None = None
        """Why the relay ended (or is ending); None while it runs."""
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self._high_water = high_water
        self._low_water = low_water
        self._idle_timeout = idle_timeout
        self._meters: tuple[ByteMeter, ...] = (meter,) if meter is not None else ()
        self._tap = tap
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # Re-arming a timer per chunk would churn the timer heap; instead the timer
        # checks the last activity when it fires and re-arms for the remainder.
        self._last_activity = self._loop.time()
        self._idle_timer = self._loop.call_later(idle_timeout, self._check_idle)

    @property
    def bytes_out(self) -> int:
        return self.client.received

    @property
    def bytes_in(self) -> int:
        return self.upstream.received

    @property
    def connected(self) -> bool:
        """Both legs have a transport."""
        return self.client.transport is not None and self.upstream.transport is not None

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        """Return once every transport the relay had is closed."""
        # Shielded: a cancelled waiter must not cancel the relay's own completion.
        await asyncio.shield(self._closed)

    def add_meter(self, meter: ByteMeter) -> None:
        """Also count this connection's bytes into ``meter`` (per-connection metrics),
        including those already relayed or held while the upstream connected."""
        meter.bytes_out += self.client.received
        meter.bytes_in += self.upstream.received
        self._meters += (meter,)

    def abort(self, reason: str) -> None:
        """Reset both legs now (a connect failure, or shutdown past its deadline)."""
        self._abort(reason)

    # --- what a tap may do -------------------------------------------------------------

    def hold(self, side: _Side, held: bool) -> None:
        """Stop (``held``) or resume reading ``side`` on the tap's behalf."""
        side.tap_hold = held
        self._sync_reading(side)

    def send(self, side: _Side, data: bytes) -> None:
        """Write ``data`` to ``side``'s transport (bytes the tap held back)."""
        transport = side.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def reply(self, data: bytes, reason: str) -> None:
        """Answer the client with ``data`` and close both legs gracefully."""
        self.send(self.client, data)
        self._close(reason)

    # --- transitions, driven by the two protocols -------------------------------------

    def _connected(self, side: _Side, transport: asyncio.Transport) -> None:
        side.transport = transport
        side.flow = FlowControl(transport)
        transport.set_write_buffer_limits(high=self._high_water, low=self._low_water)
        if self._closing:
            # The relay ended while this leg was still connecting (shutdown, or a connect
            # that completed as it timed out): nothing to relay to.
            reset_transport(transport)
            return
        if not self.connected:
            # Hold the first leg until the second exists. asyncio honours this pause;
            # uvloop starts reading after connection_made regardless, which _data covers.
            side.flow.hold(PEER_CONNECTING)
            return
        # Both legs up: deliver whatever the first leg sent while we were connecting.
        for s in (self.client, self.upstream):
            if s.pending:
                data, s.pending = s.pending, b""
                self._forward(s, data)
            if s.eof:
                self._forward_eof(s)
        self._sync_reading(self.client)
        self._sync_reading(self.upstream)

    def _data(self, side: _Side, data: bytes) -> None:
        if self._closing:
            return  # tearing down: nothing more is delivered
        side.received += len(data)
        for meter in self._meters:
            if side is self.client:
                meter.bytes_out += len(data)
            else:
                meter.bytes_in += len(data)
        self._last_activity = self._loop.time()
        if side.peer.transport is None:
            # Pausing here (not in connection_made) is what works on every loop, so at
            # most this one read is held.
            side.pending += data
            self._sync_reading(side)
            return
        self._forward(side, data)

    def _forward(self, side: _Side, data: bytes) -> None:
        tap = self._tap
        if tap is not None:
            data = tap.client_data(data) if side is self.client else tap.upstream_data(data)
            if not data or self._closing:
                return
        peer = side.peer.transport
        if peer is not None and not peer.is_closing():
            peer.write(data)  # may call side.peer.pause_writing() → stops reading `side`

    def _eof(self, side: _Side) -> None:
        side.eof = True
        self._last_activity = self._loop.time()
        if self._closing:
            return
        if side.peer.transport is not None:
            self._forward_eof(side)
        # else: forwarded by _connected once the other leg exists

    def _forward_eof(self, side: _Side) -> None:
        log.debug("%s: %s half-closed", self.label, side.name)
        if self._tap is not None:
            if side is self.upstream:
                self._tap.upstream_eof()
            else:
                self._tap.client_eof()
            if self._closing:
                return
        peer = side.peer.transport
        if side.peer.eof:
            # Both directions are done; close() flushes what is buffered, then FINs.
            self._close("both sides closed")
        elif peer is None or peer.is_closing():
            pass  # it is going away; its connection_lost ends the relay
        elif peer.can_write_eof():
            peer.write_eof()
        else:
            self._close(f"{side.name} half-closed and the {side.peer.name} leg cannot")

    def _write_blocked(self, side: _Side, blocked: bool) -> None:
        side.write_blocked = blocked
        if not blocked:
            # The peer is draining what we sent: progress, even if nothing new is read.
            self._last_activity = self._loop.time()
        self._sync_reading(side.peer)

    def _sync_reading(self, side: _Side) -> None:
        """Read from ``side`` only when its bytes have somewhere to go without piling up."""
        flow = side.flow
        if flow is None:
            return
        if side.lost or side.eof:
            flow.finish()
            return
        holds = []
        if self._closing:
            holds.append(CLOSING)
        if side.pending:
            holds.append(HELD_BYTES)
        if side.peer.transport is None:
            holds.append(PEER_CONNECTING)
        elif side.peer.write_blocked:
            holds.append(PEER_BLOCKED)
        if side.tap_hold:
            holds.append(TAP_HOLD)
        flow.update(holds)

    def _lost(self, side: _Side, exc: Exception | None) -> None:
        side.lost = True
        if not self._closing and side is self.upstream and self._tap is not None:
            tap, self._tap = self._tap, None
            tap.ended(f"upstream {'closed' if exc is None else _describe(exc)}", True)
        if not self._closing:
            if exc is None:
                self._close(f"{side.name} closed")
            else:
                # Pass the reset on: a FIN would tell the other app its stream was complete.
                log.debug(
                    "%s: %s failed (%s); resetting the other side",
                    self.label,
                    side.name,
                    _describe(exc),
                )
                self._abort(f"{side.name} {_describe(exc)}")
        self._maybe_finished()

    def _close(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        self._tap_ended(reason)
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                side.transport.close()
        self._maybe_finished()

    def _abort(self, reason: str) -> None:
        # Also escalates a graceful close that is stuck flushing to a peer that won't read.
        self._closing = True
        if self.close_reason is None:
            self.close_reason = reason
        self._tap_ended(reason)
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                reset_transport(side.transport)
        self._maybe_finished()

    def _tap_ended(self, reason: str) -> None:
        tap, self._tap = self._tap, None
        if tap is not None:
            tap.ended(reason, False)

    def _maybe_finished(self) -> None:
        if not self._closing or self._closed.done():
            return
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                return
        self._idle_timer.cancel()
        self._closed.set_result(None)

    def _check_idle(self) -> None:
        if self._closed.done():
            return
        remaining = self._last_activity + self._idle_timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
            return
        if self._closing:
            log.info(
                "%s: gave up flushing after %gs without progress (%s); resetting",
                self.label,
                self._idle_timeout,
                self.close_reason,
            )
            self._abort("stuck while closing")
            return
        log.info("%s: no traffic either way for %gs; closing", self.label, self._idle_timeout)
        self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)
        if any(
            s.transport is not None and s.transport.get_write_buffer_size()
            for s in (self.client, self.upstream)
        ):
            self._abort("idle timeout")  # bytes are stuck; a graceful close would wait on them
        else:
            self._close("idle timeout")
