"""One multiplexed tunnel connection: `Session` (the TLS connection's protocol) and
`Stream` (one proxied TCP connection on it, an ``asyncio.Transport``).

A `Stream` is a transport like any other, so the existing `Relay` serves a tunnelled
connection exactly as it serves a socket: ``write``/``write_eof``/``close``/``abort``,
write-buffer watermarks with ``pause_writing``/``resume_writing`` towards its
protocol, ``pause_reading``/``resume_reading`` from it. The wire format is
:mod:`nodeagent.proxy.tunnel.wire`.

Flow control, both ways, per stream:

* **Sending.** ``write`` puts a DATA frame on the TLS transport at once when the
  stream has window and the TLS transport is not above its high-water mark (the common
  case: one frame, no copy beyond the frame header). Otherwise the bytes wait in the
  stream's own buffer; above the stream's high-water mark its protocol is paused, so
  the relay stops reading the application. Waiting streams are served round-robin, at
  most one frame each per turn, as credit (WINDOW) arrives or the TLS transport drains:
  one busy stream cannot take the connection from its siblings.
* **Receiving.** DATA is handed to the stream's protocol as it arrives, and credit is
  returned once half the window has been consumed. A paused stream (its consumer's
  buffer is full) keeps what arrives in its inbox and returns no credit, so the peer
  stops after one window; the TLS connection itself is never paused for one stream.

Memory per connection is therefore bounded by streams x (window + high-water mark)
whatever the peer does; control frames the peer provokes (RESETs of refused streams)
are bounded by `Session.max_backlog`, past which the connection is dropped.

Endings, mapped onto TCP's:

=====================  ===========================  ====================================
stream call            frames                       the peer's protocol sees
=====================  ===========================  ====================================
``write_eof()``        END (after buffered DATA)    ``eof_received()`` (a half-close)
``close()``            END, then RESET(NO_ERROR)    EOF, then ``connection_lost(None)``
                       unless the peer already ended
``abort()``            RESET(CANCEL)                ``connection_lost(ConnectionResetError)``
connection lost        —                            ``connection_lost(ConnectionResetError)``
=====================  ===========================  ====================================

So a reset on one end is a reset on the other, a FIN is a FIN, and a stream's reset
never touches its siblings.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from nodeagent.proxy import tls
from nodeagent.proxy.tunnel.wire import (
    Answer,
    Answered,
    ConnectRequest,
    Data,
    End,
    FrameDecoder,
    FrameType,
    GoAway,
    Invalid,
    Open,
    Preface,
    PrefaceDecoder,
    Reset,
    Settings,
    StreamReset,
    WindowUpdate,
    data_frames,
    encode_preface,
    end_frame,
    frame,
    goaway_frame,
    reset_frame,
    window_frame,
)

log = logging.getLogger("weft.proxy.tunnel")

_DEFAULT_HIGH = 64 * 1024
OUT_BATCH = 64 * 1024
"""Bytes of queued frames that are written at once rather than at the iteration's end."""
_MAX_HELD = 256 * 1024
_RESET_REFILL_SECONDS = 10.0


class StreamLost(ConnectionResetError):
    """A stream ended by a reset (the peer's or the connection's); ``reason`` is the
    `Reset` code, None when the whole connection was lost."""

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


AnswerResult = Answer | Invalid | StreamLost
"""What a client stream's OPEN got: the server's answer, a malformed one, or a reset."""


class Stream(asyncio.Transport):
    """One proxied connection on a `Session`. Made by the session; see the module
    docstring for its semantics."""

    def __init__(self, session: Session, stream_id: int) -> None:
        super().__init__()
        self.session = session
        self.id = stream_id
        self._protocol: asyncio.BaseProtocol | None = None
        # Sending.
        self.send_window = session.peer.window if session.peer else 0
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._high = _DEFAULT_HIGH
        self._low = _DEFAULT_HIGH // 4
        self._write_paused = False
        self._eof_requested = False  # write_eof()/close() asked; END goes after _pending
        self.local_ended = False  # END sent
        self._closing = False  # close() called
        # Receiving.
        self._recv_window = session.local.window
        self._unacked = 0
        self._reading = True
        self._inbox: deque[bytes] = deque()
        self._inbox_eof = False
        self.remote_ended = False  # END received
        self._peer_gone = False  # RESET(NO_ERROR) received: deliver the inbox, then finish
        self.finished = False
        self.answer: asyncio.Future[AnswerResult] | None = None
        """Client streams: resolved by the server's ANSWER, or by a reset."""
        self.answered = False
        """Server streams: an ANSWER has been sent."""

    def __repr__(self) -> str:
        return f"<Stream {self.id} of {self.session.label}>"

    # --- asyncio.Transport -------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            # Never the shared TLS connection's socket: `reset_transport` would set
            # SO_LINGER on it and reset every stream at once.
            return default
        if name == "tunnel_stream":
            return self.id
        return self.session.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def attach(self, protocol: asyncio.Protocol) -> None:
        """Set the protocol and call its ``connection_made``; deliver what arrived."""
        self._protocol = protocol
        protocol.connection_made(self)
        self._deliver_inbox()

    def is_closing(self) -> bool:
        return self._closing or self.finished

    def close(self) -> None:
        if self._closing or self.finished:
            return
        self._closing = True
        self._eof_requested = True
        self._flush()

    def abort(self) -> None:
        if self.finished:
            return
        self._pending.clear()
        self._pending_size = 0
        if not self._peer_gone:
            self.session._send_control(reset_frame(self.id, Reset.CANCEL))
        self._finish(None)

    def discard(self) -> None:
        """End the stream without a frame (it was refused by its ANSWER)."""
        self._finish(None)

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        self._deliver_inbox()
        if self._reading and self._unacked and not self.finished:
            self._credit()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _DEFAULT_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_requested or self.finished or self._peer_gone:
            return  # as asyncio does after close(): dropped (the peer is gone or done)
        size = len(data)
        if not size:
            return
        session = self.session
        if not self._pending and not session.write_blocked and size <= self.send_window:
            self.send_window -= size
            session.sent_bytes += size
            session.transport_write(data_frames(self.id, data, session.peer_max_frame))
            return
        self._pending.append(bytes(data))
        self._pending_size += size
        session._want_flush(self)
        self._check_high()

    def write_eof(self) -> None:
        if self._eof_requested or self.finished:
            return
        self._eof_requested = True
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    # --- sending ----------------------------------------------------------------------

    def _check_high(self) -> None:
        protocol = self._protocol
        if not self._write_paused and self._pending_size > self._high:
            self._write_paused = True
            if isinstance(protocol, asyncio.Protocol):
                protocol.pause_writing()
        elif self._write_paused and self._pending_size <= self._low:
            self._write_paused = False
            if isinstance(protocol, asyncio.Protocol):
                protocol.resume_writing()

    def _send_some(self, budget: int) -> bool:
        """Send up to ``budget`` bytes of what waits (one turn of the round-robin);
        True if bytes are still waiting and could go with more window."""
        session = self.session
        while self._pending and budget > 0 and self.send_window > 0:
            chunk = self._pending[0]
            take = min(len(chunk), budget, self.send_window, session.peer_max_frame)
            if take == len(chunk):
                self._pending.popleft()
            else:
                self._pending[0] = chunk[take:]
                chunk = chunk[:take]
            self._pending_size -= take
            self.send_window -= take
            budget -= take
            session.sent_bytes += take
            session.transport_write(data_frames(self.id, chunk, session.peer_max_frame))
        self._check_high()
        if not self._pending:
            self._flush_done()
            return False
        return self.send_window > 0

    def _flush(self) -> None:
        if self._pending:
            self.session._want_flush(self)
        else:
            self._flush_done()

    def _flush_done(self) -> None:
        """Nothing waits any more: send END if it was asked for, finish a close."""
        if self.finished or not self._eof_requested or self.local_ended:
            return
        self.local_ended = True
        if self._peer_gone:
            self._finish(None)
            return
        self.session._send_control(end_frame(self.id))
        if self.remote_ended and not self._inbox:
            self._finish(None)
        elif self._closing:
            # Like a closed socket: the peer's further bytes have nowhere to go.
            self.session._send_control(reset_frame(self.id, Reset.NO_ERROR))
            self._finish(None)

    # --- receiving (called by the session) ----------------------------------------------

    def _on_data(self, data: bytes) -> None:
        size = len(data)
        self._recv_window -= size
        if self._recv_window < 0:
            self.session._violation(
                f"stream {self.id}: {-self._recv_window} bytes beyond its window",
                Reset.FLOW_CONTROL,
            )
            return
        if self.remote_ended:
            self.session._violation(f"stream {self.id}: DATA after END")
            return
        if self._closing:
            return  # closed on this side: dropped, as a closed socket would
        protocol = self._protocol
        if not self._reading or self._inbox or not isinstance(protocol, asyncio.Protocol):
            self._inbox.append(data)
            return
        protocol.data_received(data)
        self._unacked += size
        if self._reading and self._unacked >= self.session.credit_threshold:
            self._credit()

    def _credit(self) -> None:
        increment, self._unacked = self._unacked, 0
        self._recv_window += increment
        self.session._send_control(window_frame(self.id, increment))

    def _on_end(self) -> None:
        if self.remote_ended:
            self.session._violation(f"stream {self.id}: END twice")
            return
        self.remote_ended = True
        if self._inbox or not self._reading or self._protocol is None:
            self._inbox_eof = True
            return
        self._deliver_eof()

    def _deliver_eof(self) -> None:
        protocol = self._protocol
        keep_open = protocol.eof_received() if isinstance(protocol, asyncio.Protocol) else False
        if self.local_ended and not self.finished:
            self._finish(None)
        elif not keep_open:
            self.close()

    def _deliver_inbox(self) -> None:
        protocol = self._protocol
        if not isinstance(protocol, asyncio.Protocol):
            return
        while self._inbox and self._reading and not self.finished:
            data = self._inbox.popleft()
            protocol.data_received(data)
            self._unacked += len(data)
        if self._reading and self._unacked >= self.session.credit_threshold:
            self._credit()
        if self._inbox:
            return
        if self._inbox_eof and self._reading:
            self._inbox_eof = False
            self._deliver_eof()
        if self._peer_gone and not self.finished and not self._inbox_eof:
            self._finish(None)

    def _on_window(self, increment: int) -> None:
        self.send_window += increment
        if self.send_window > 1 << 31:
            self.session._violation(f"stream {self.id}: window grew past 2**31")
            return
        if self._pending:
            self.session._want_flush(self)

    def _on_reset(self, reason: int) -> None:
        if reason == Reset.NO_ERROR:
            # The peer closed: it reads nothing more; what it sent before is still ours.
            self._peer_gone = True
            self._pending.clear()
            self._pending_size = 0
            if not self._inbox and not self._inbox_eof:
                self._finish(None)
            return
        try:
            name = Reset(reason).name
        except ValueError:
            name = f"code {reason:#04x}"
        if self.session.is_server and not self.answered:
            self.session._early_reset()
        self._finish(StreamLost(f"stream {self.id} reset by the peer ({name})", reason))

    def _finish(self, exc: Exception | None) -> None:
        """The stream is over: drop it from the session, tell the protocol (soon)."""
        if self.finished:
            return
        self.finished = True
        self._pending.clear()
        self._pending_size = 0
        self._inbox.clear()
        self.session._removed(self)
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(
                exc if isinstance(exc, StreamLost) else StreamLost("stream closed unanswered")
            )
        protocol = self._protocol
        if protocol is not None:
            asyncio.get_running_loop().call_soon(protocol.connection_lost, exc)


OpenHandler = Callable[["Stream", "ConnectRequest | Invalid"], None]
"""Server side: called for each OPEN the session accepts (synchronously, on the loop).
It must answer the stream (`Session.answer`) and attach a protocol, or reset it."""


class Session(asyncio.Protocol):
    """The protocol of one tunnel TLS connection, client or server side.

    The owner makes it, passes it to the loop as the TLS transport's protocol, and
    awaits `ready` (the peer's preface) and `closed`. ``on_open`` makes it a server.
    """

    def __init__(
        self,
        *,
        label: str,
        local: Settings,
        on_open: OpenHandler | None = None,
        max_backlog: int = 4 * 1024 * 1024,
        on_idle: Callable[[Session], None] | None = None,
        held: bool = False,
        rapid_resets: int = 200,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.label = label
        """Names the connection in log lines: peer address and identity."""
        self.local = local
        self.peer: Settings | None = None
        self.peer_max_frame = 16 * 1024
        self.credit_threshold = local.window // 2
        self.is_server = on_open is not None
        self._on_open = on_open
        self._on_idle = on_idle
        self._on_refused = on_refused
        self.max_backlog = max_backlog
        """Bytes the TLS transport may hold unsent beyond its high-water mark (control
        frames a peer that does not read provokes) before the connection is dropped."""
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._last_stream = 0  # highest stream ID opened (either side's numbering)
        self._preface: PrefaceDecoder | None = PrefaceDecoder()
        self._decoder = FrameDecoder(local.max_frame)
        self._flushing: dict[Stream, None] = {}  # streams with bytes waiting, in turn order
        self._flush_scheduled = False
        self._out: list[bytes] = []  # frames written this loop iteration, sent as one
        self._out_size = 0
        self._out_scheduled = False
        self.write_blocked = False
        self.draining = False
        self.current_until = 0.0
        """Loop time until which the client side need not re-check that this connection
        was made with its identity's current certificate (`TunnelClient.current`)."""
        """No new streams: a GOAWAY was sent or received."""
        self.close_reason: str | None = None
        self.violation: str | None = None
        """Why the peer's framing was refused, if it was."""
        self.streams_opened = 0
        self.streams_refused = 0
        self.sent_bytes = 0
        self.received_bytes = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.ready: asyncio.Future[Preface] = loop.create_future()
        """Resolved with the peer's preface; an exception if the connection failed first."""
        self.closed: asyncio.Future[None] = loop.create_future()
        self.idle_since: float | None = loop.time()
        """Loop time since which no stream has been open (None while one is)."""
        self._expiry: asyncio.TimerHandle | None = None
        self.context: Any = None
        """The SSL context its owner made it with (client side: the source certificate,
        to tell when it was rotated)."""
        self._held: bytearray | None = bytearray() if held else None
        self._reset_budget = float(rapid_resets)
        self._reset_capacity = float(rapid_resets)
        self._reset_at = loop.time()
        self.early_resets = 0
        """Streams the client cancelled before their answer (server side)."""

    def start(self) -> None:
        """Send the preface and process what a ``held`` session has received: the owner
        calls it once it has checked the peer's identity, so nothing is sent to, or acted
        on from, a peer it would refuse."""
        if self._held is None:
            return
        held, self._held = self._held, None
        self.transport_write(encode_preface(self.local))
        if held:
            self.data_received(bytes(held))

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but implement it.
        self.transport = transport  # type: ignore[assignment]
        if self._held is None:
            self.transport_write(encode_preface(self.local))

    def data_received(self, data: bytes) -> None:
        if self._held is not None:
            # Nothing is acted on before the owner has checked the peer's identity.
            self._held += data
            if len(self._held) > _MAX_HELD:
                self._violation(f"{len(self._held)} bytes before the connection was checked")
            return
        self.received_bytes += len(data)
        if self._preface is not None:
            got = self._preface.feed(data)
            if isinstance(got, Invalid):
                self._fail_preface(got)
                return
            if not isinstance(got, Preface):
                return
            data = self._preface.trailing
            self._preface = None
            self.peer = got.settings
            self.peer_max_frame = got.settings.max_frame
            if not self.ready.done():
                self.ready.set_result(got)
            if not data:
                return
        for event in self._decoder.feed(data):
            if isinstance(event, Data):
                stream = self.streams.get(event.stream)
                if stream is not None:
                    stream._on_data(event.data)
                elif event.stream > self._last_stream:
                    self._violation(f"DATA for stream {event.stream}, never opened")
                # else: a stream this side already finished; its bytes are dropped
            elif isinstance(event, WindowUpdate):
                stream = self.streams.get(event.stream)
                if stream is not None:
                    stream._on_window(event.increment)
            elif isinstance(event, Open):
                self._open_received(event)
            elif isinstance(event, Answered):
                self._answered(event)
            elif isinstance(event, End):
                stream = self.streams.get(event.stream)
                if stream is not None:
                    stream._on_end()
                elif event.stream > self._last_stream:
                    self._violation(f"END for stream {event.stream}, never opened")
            elif isinstance(event, StreamReset):
                stream = self.streams.get(event.stream)
                if stream is not None:
                    stream._on_reset(event.reason)
            elif isinstance(event, GoAway):
                self._goaway_received(event)
            else:
                self._violation(event.detail, event.reason)
            if self.transport is None or self.violation is not None:
                return

    def eof_received(self) -> bool:
        return False  # TLS: the peer closed; connection_lost follows

    def pause_writing(self) -> None:
        self.write_blocked = True

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self._flushing:
            self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.close_reason is None:
            self.close_reason = f"connection lost ({exc})" if exc else "connection closed"
        if not self.ready.done():
            self.ready.set_exception(
                ConnectionResetError(f"{self.label}: {self.close_reason} before the preface")
            )
            self.ready.exception()  # retrieved: a failed dial is reported by its owner
        lost = StreamLost(f"{self.label}: tunnel {self.close_reason}")
        for stream in list(self.streams.values()):
            stream._finish(lost)
        self._flushing.clear()
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    # --- state --------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    @property
    def preface_decoder(self) -> PrefaceDecoder | None:
        """The decoder of the peer's preface while it is incomplete (or was refused)."""
        return self._preface

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    @property
    def usable(self) -> bool:
        """A client may open a stream here now."""
        return (
            self.transport is not None
            and self.peer is not None
            and not self.draining
            and len(self.streams) < min(self.peer.max_streams, self.local.max_streams)
            and self._last_stream < (1 << 31)
        )

    def expire_at(self, when: float, why: str) -> None:
        """Reset the whole connection at loop time ``when`` (a certificate expires)."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self._loop.call_at(when, self._expire, why)

    def expire_with_peer_certificate(self, whose: str) -> None:
        """Reset the connection when the certificate the peer proved expires (``whose``
        names it in the log line: "the client's", "the server's")."""
        try:
            expires = tls.peer_certificate(self.get_extra_info("ssl_object")).not_valid_after_utc
        except Exception:  # the handshake verified it; this cannot fail in practice
            return
        left = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        self.expire_at(self._loop.time() + max(left, 0.0), f"{whose} certificate expired")

    def _expire(self, why: str) -> None:
        log.info("%s: %s; closing the connection and its %d streams", self.label, why,
                 len(self.streams))  # fmt: skip
        self.goaway(Reset.EXPIRED, why)
        self.abort(why)

    # --- client side --------------------------------------------------------------------

    def open(self, payload: bytes) -> Stream:
        """Open a stream with an OPEN frame carrying ``payload``; await its `answer`."""
        if not self.usable:
            raise RuntimeError(f"{self.label}: cannot open a stream now")
        self._last_stream += 1
        stream = Stream(self, self._last_stream)
        stream.answer = self._loop.create_future()
        self._added(stream)
        self._send_control(frame(FrameType.OPEN, stream.id, payload))
        return stream

    def _answered(self, event: Answered) -> None:
        if self.is_server:
            self._violation(f"ANSWER for stream {event.stream} sent to the server")
            return
        stream = self.streams.get(event.stream)
        if stream is None:
            if event.stream > self._last_stream:
                self._violation(f"ANSWER for stream {event.stream}, never opened")
            return  # the client gave up on it already
        if stream.answer is None or stream.answer.done():
            self._violation(f"a second ANSWER for stream {event.stream}")
            return
        stream.answer.set_result(event.answer)

    # --- server side --------------------------------------------------------------------

    def _open_received(self, event: Open) -> None:
        if not self.is_server:
            self._violation(f"OPEN for stream {event.stream} sent to the client")
            return
        if event.stream <= self._last_stream:
            self._violation(
                f"OPEN for stream {event.stream}, not above the last ({self._last_stream})"
            )
            return
        self._last_stream = event.stream
        if self.draining or len(self.streams) >= self.local.max_streams:
            self.streams_refused += 1
            if self._on_refused is not None:
                self._on_refused()
            self._send_control(reset_frame(event.stream, Reset.REFUSED))
            return
        stream = Stream(self, event.stream)
        self._added(stream)
        assert self._on_open is not None
        self._on_open(stream, event.request)

    def answer(self, stream: Stream, payload: bytes) -> None:
        """Send ``stream``'s ANSWER (server side)."""
        stream.answered = True
        self._send_control(frame(FrameType.ANSWER, stream.id, payload))

    def _early_reset(self) -> None:
        """A client cancelled a stream before its answer: fine now and then (its app
        gave up), an attack when it never stops (HTTP/2's "rapid reset")."""
        self.early_resets += 1
        now = self._loop.time()
        refill = (now - self._reset_at) * self._reset_capacity / _RESET_REFILL_SECONDS
        self._reset_budget = min(self._reset_capacity, self._reset_budget + refill) - 1
        self._reset_at = now
        if self._reset_budget < 0:
            self._violation(
                f"{self.early_resets} streams cancelled before their answer (rapid reset)",
                Reset.RAPID_RESET,
            )

    # --- both ---------------------------------------------------------------------------

    def goaway(self, reason: Reset, why: str) -> None:
        """No new streams on this connection; open ones continue. Closes the connection
        once the last stream ends."""
        if self.draining or self.transport is None:
            return
        self.draining = True
        if self.close_reason is None:
            self.close_reason = why
        self._send_control(goaway_frame(self._last_stream, reason))
        if not self.streams:
            self.close(why)

    def close(self, why: str) -> None:
        """Close the TLS connection (orderly); open streams end as lost."""
        if self.close_reason is None:
            self.close_reason = why
        if self.transport is not None and not self.transport.is_closing():
            self._write_out()
            self.transport.close()

    def abort(self, why: str) -> None:
        if self.close_reason is None:
            self.close_reason = why
        if self.transport is not None:
            self.transport.abort()

    def _goaway_received(self, event: GoAway) -> None:
        if self.is_server:
            # A client's GOAWAY: it opens nothing more here; nothing else to do.
            self.draining = True
            return
        self.draining = True
        try:
            why = Reset(event.reason).name
        except ValueError:
            why = f"code {event.reason:#04x}"
        self.close_reason = self.close_reason or f"the server is going away ({why})"
        for stream in [s for sid, s in self.streams.items() if sid > event.last_stream]:
            stream._finish(StreamLost("refused: the server is going away", Reset.REFUSED))
        if not self.streams:
            self.close(self.close_reason)

    def _fail_preface(self, invalid: Invalid) -> None:
        self.violation = f"bad preface: {invalid.detail}"
        self.close_reason = self.violation
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.label}: {self.violation}"))
            self.ready.exception()
        assert self.transport is not None
        self._write_out()
        self.transport.close()

    def _violation(self, detail: str, reason: Reset = Reset.PROTOCOL) -> None:
        if self.violation is not None or self.transport is None:
            return
        self.violation = detail
        self.close_reason = f"protocol violation: {detail}"
        log.warning("%s: the peer broke the tunnel protocol (%s); closing the connection and "
                    "its %d streams", self.label, detail, len(self.streams))  # fmt: skip
        self.transport_write(goaway_frame(self._last_stream, reason))
        self._write_out()
        self.transport.close()

    def transport_write(self, data: bytes) -> None:
        """Queue frames for the TLS connection: what the streams write in one loop
        iteration leaves as one write (one TLS record and syscall for many frames under
        load, instead of one each), at the end of the iteration or at once past
        `OUT_BATCH` bytes (so the transport's high-water mark still stops the flush)."""
        if self.transport is None:
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= OUT_BATCH:
            self._write_out()
        elif not self._out_scheduled:
            self._out_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._out_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _send_control(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.transport_write(data)
        if self.write_blocked:
            high = transport.get_write_buffer_limits()[1]
            if transport.get_write_buffer_size() + self._out_size > high + self.max_backlog:
                log.warning("%s: the peer does not read what it asks for (%d bytes unsent); "
                            "dropping the connection", self.label,
                            transport.get_write_buffer_size())  # fmt: skip
                self.abort("the peer stopped reading")

    def _added(self, stream: Stream) -> None:
        self.streams[stream.id] = stream
        self.streams_opened += 1
        self.idle_since = None

    def _removed(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._flushing.pop(stream, None)
        if not self.streams:
            self.idle_since = self._loop.time()
            if self.draining:
                self.close(self.close_reason or "drained")
            elif self._on_idle is not None:
                self._on_idle(self)

    def _want_flush(self, stream: Stream) -> None:
        if stream.send_window <= 0 and stream._pending:
            return  # waits for WINDOW, which calls back here
        self._flushing[stream] = None
        if not self.write_blocked:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Round-robin over the streams with bytes waiting: one frame each per turn,
        until none can send or the TLS transport is above its high-water mark."""
        self._flush_scheduled = False
        budget = self.peer_max_frame
        while self._flushing and self.transport is not None:
            for stream in list(self._flushing):
                if self.write_blocked:
                    return  # resume_writing() schedules the next turn
                more = stream._send_some(budget)
                if not more:
                    self._flushing.pop(stream, None)
