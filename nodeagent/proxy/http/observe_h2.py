"""The inbound HTTP/2 observer: the destination node watches, and does not re-encode, the
h2c connection its client node opened to a pod.

The client node's `H2Client` balanced each stream to this pod and opened one h2c
connection to it per tunnel stream (OPEN ``h2``); this node relays that stream byte for
byte to one connection to the pod (`nodeagent.proxy.relay.Relay`), as it does for
HTTP/1.1, and this `Tap` walks the frames of both directions as they pass. Before, a
second HTTP/2 server and client ran here — the `h2` state machine twice more per
request, half of an HTTP/2 request's CPU in the mesh. What this node must still do:

* **count each stream** in the golden metrics with the client's verified identity:
  ``:status`` from the response head, ``grpc-status`` from the trailers (or a
  trailers-only head), latency from the request head to the response head; a stream the
  client resets is ``cancelled``, one the pod resets or leaves unfinished is
  ``upstream-reset``; streams a GOAWAY says the pod never processed are not counted
  (the client node sends them elsewhere);
* **trace** (only when the node traces: one check per request head otherwise): keep
  each request head's ``traceparent``/``tracestate``/B3 headers and hand the sink the
  span the client node reserved for this hop (`weft.tracing.peer`);
* **tap** (only while someone taps: the same one check per request head): keep each
  request's ``:method`` and ``:path`` for the sink (`nodeagent.tap`);
* **keep HPACK in step**: every header block of both directions is decoded (the dynamic
  tables change with each), with the table sizes each side's SETTINGS allow;
* **bound what a peer can make it do** — the peer is an authenticated workload, not
  necessarily a Weft agent: rapid resets, control-frame and empty-DATA floods (the same
  budgets as `H2Config`'s), header blocks over ``max_header_list_size`` (compressed or
  decoded: HPACK bombs), CONTINUATION without end, more streams than ``MAX_STREAMS``, a
  wrong preface or an undecodable block reset the relay; nothing of the offending read
  reaches the pod.

DATA payloads are skipped by length, never copied or looked at: a frame costs a header
parse, a header block one HPACK decode. Flow control, SETTINGS, PING and GOAWAY are the
two ends' own, end to end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hpack import Decoder
from hpack.exceptions import HPACKError

from nodeagent.proxy.http.h2conn import Budget, H2Config
from nodeagent.proxy.http.message import ProxyError
from nodeagent.proxy.http.observe import CANCELLED, ExchangeSink, Reserved, Traced
from nodeagent.proxy.relay import Relay
from nodeagent.tap import OFF, TapHub
from weft.tracing.peer import INBOUND_HEADERS, peer_span

log = logging.getLogger("weft.proxy.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
INSPECTED = frozenset({HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, GOAWAY, CONTINUATION})
"""Frames whose payload the observer reads; the others pass by length."""
NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY", RST_STREAM: "RST_STREAM",
         SETTINGS: "SETTINGS", PUSH_PROMISE: "PUSH_PROMISE", PING: "PING", GOAWAY: "GOAWAY",
         WINDOW_UPDATE: "WINDOW_UPDATE", CONTINUATION: "CONTINUATION"}  # fmt: skip

END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1
REFUSED = (0x7).to_bytes(4, "big")
"""RST_STREAM's error code REFUSED_STREAM, as it appears in the frame."""

MAX_INSPECTED_FRAME = 256 * 1024
"""Largest frame of an inspected type held whole (SETTINGS, GOAWAY with debug data, a
header block fragment); bigger is refused."""
MAX_STREAMS = 1024
"""Streams tracked at once on one connection (its SETTINGS allow far fewer)."""


class H2ObserveError(Exception):
    """What the observer refuses, in words for the log."""


def _head(b: bytes, at: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the frame header at ``b[at:at + 9]``."""
    return (
        (b[at] << 16) | (b[at + 1] << 8) | b[at + 2],
        b[at + 3],
        b[at + 4],
        int.from_bytes(b[at + 5 : at + 9], "big") & 0x7FFFFFFF,
    )


FrameHandler = Callable[[int, int, int, bytes], None]
"""(type, flags, stream id, payload) of an inspected frame."""
OtherHandler = Callable[[int, int, int, int], None]
"""(type, flags, stream id, length) of a frame passed by length."""


class FrameScanner:
    """The frames of one direction, from reads cut anywhere. Holds at most one
    unfinished inspected frame (``MAX_INSPECTED_FRAME``) and a count of payload bytes
    still to pass."""

    __slots__ = ("_buf", "_on_frame", "_on_other", "_preface", "_skip")

    def __init__(self, on_frame: FrameHandler, on_other: OtherHandler, preface: bool) -> None:
        self._on_frame = on_frame
        self._on_other = on_other
        self._buf = b""
        self._skip = 0
        self._preface = len(PREFACE) if preface else 0

    def feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self._preface:
            k = min(self._preface, n)
            at = len(PREFACE) - self._preface
            if data[:k] != PREFACE[at : at + k]:
                raise H2ObserveError("not the HTTP/2 client preface")
            self._preface -= k
            pos = k
        if self._skip:
            k = min(self._skip, n - pos)
            self._skip -= k
            pos += k
        if self._buf and pos < n:
            pos = self._finish(data, pos)
        while n - pos >= 9:
            length, ftype, flags, sid = _head(data, pos)
            if ftype in INSPECTED:
                if length > MAX_INSPECTED_FRAME:
                    raise H2ObserveError(f"{NAMES[ftype]} frame of {length} bytes")
                end = pos + 9 + length
                if end > n:
                    break
                self._on_frame(ftype, flags, sid, data[pos + 9 : end])
                pos = end
            else:
                self._on_other(ftype, flags, sid, length)
                pos += 9 + length
                if pos > n:
                    self._skip = pos - n
                    return
        if pos < n:
            self._buf = data[pos:]

    def _finish(self, data: bytes, pos: int) -> int:
        """Complete the frame the last read cut; returns where the next one starts."""
        buf = self._buf
        n = len(data)
        if len(buf) < 9:
            k = min(9 - len(buf), n - pos)
            buf += data[pos : pos + k]
            pos += k
            if len(buf) < 9:
                self._buf = buf
                return n
            length, ftype, flags, sid = _head(buf, 0)
            if ftype not in INSPECTED:
                self._buf = b""
                self._on_other(ftype, flags, sid, length)
                k = min(length, n - pos)
                self._skip = length - k
                return pos + k
            if length > MAX_INSPECTED_FRAME:
                raise H2ObserveError(f"{NAMES[ftype]} frame of {length} bytes")
        length, ftype, flags, sid = _head(buf, 0)
        k = min(9 + length - len(buf), n - pos)
        buf += data[pos : pos + k]
        pos += k
        if len(buf) < 9 + length:
            self._buf = buf
            return n
        self._buf = b""
        self._on_frame(ftype, flags, sid, buf[9:])
        return pos


class _Stream:
    __slots__ = (
        "asked", "authority", "grpc_status", "responded", "responded_ns", "span", "started",
        "status",
    )  # fmt: skip

    def __init__(
        self,
        started: float,
        authority: bytes | None,
        span: Reserved | None,
        asked: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.started = started
        self.asked = asked
        """(``:method``, ``:path``), kept only while someone taps."""
        self.authority = authority
        self.status: int | None = None
        self.responded = 0.0
        self.grpc_status = ""
        self.span = span
        """The span the client node reserved for this hop (`weft.tracing.peer`)."""
        self.responded_ns = 0


class _Block:
    """A header block waiting for its CONTINUATION frames."""

    __slots__ = ("end_stream", "fragments", "sid", "size", "use")

    def __init__(self, sid: int, fragment: bytes, end_stream: bool, use: bool) -> None:
        self.sid = sid
        self.fragments = [fragment]
        self.size = len(fragment)
        self.end_stream = end_stream
        self.use = use
        """False for a PUSH_PROMISE's block: decoded to keep HPACK in step, then dropped."""


def _fragment(flags: int, payload: bytes, skip: int = 0) -> bytes:
    """The header block fragment of a HEADERS (or, with ``skip`` 4, PUSH_PROMISE)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise H2ObserveError("padded frame without a pad length")
        start = 1
        end -= payload[0]
    if flags & PRIORITY_FLAG and not skip:
        start += 5
    start += skip
    if end < start:
        raise H2ObserveError("padding longer than the frame")
    return payload[start:end]


def _settings_table_size(payload: bytes) -> int | None:
    size = None
    for at in range(0, len(payload) - 5, 6):
        if int.from_bytes(payload[at : at + 2], "big") == SETTINGS_HEADER_TABLE_SIZE:
            size = int.from_bytes(payload[at + 2 : at + 6], "big")
    return size


class H2Observer:
    """The `Tap` of one inbound HTTP/2 relay (see the module docstring). Make it, make
    the `Relay` with ``tap=observer``, then set `relay`."""

    def __init__(
        self,
        sink: ExchangeSink,
        *,
        label: str,
        clock: Callable[[], float],
        config: H2Config | None = None,
        tracing: bool = False,
        span_clock: Callable[[], int] = time.time_ns,
        tap: TapHub | None = None,
    ) -> None:
        self.sink = sink
        self.tap = tap if tap is not None else OFF
        self.tracing = tracing
        self._span_clock = span_clock
        """Wall-clock ns for spans, read only for traced streams (``clock`` is the loop's,
        which uvloop caches per iteration at millisecond resolution)."""
        """Read each request head's trace headers for a span the client node reserved."""
        self.label = label
        self.config = cfg = config or H2Config()
        self._clock = clock
        self.relay: Relay | None = None
        self.streams: dict[int, _Stream] = {}
        self._last_client_sid = 0
        self._client = FrameScanner(self._client_frame, self._client_other, preface=True)
        self._pod = FrameScanner(self._pod_frame, self._pod_other, preface=False)
        self._client_hpack = Decoder(max_header_list_size=cfg.max_header_list_size)
        self._pod_hpack = Decoder(max_header_list_size=cfg.max_header_list_size)
        self._client_block: _Block | None = None
        self._pod_block: _Block | None = None
        now = clock()
        self._resets = Budget(cfg.resets, now)
        self._control = Budget(cfg.control_frames, now)
        self._empty = Budget(cfg.empty_frames, now)
        self._done = False

    # --- Tap -----------------------------------------------------------------------------

    def client_data(self, data: bytes) -> bytes:
        return self._feed(self._client, data, "from the client", ProxyError.BAD_REQUEST)

    def upstream_data(self, data: bytes) -> bytes:
        return self._feed(self._pod, data, "from the pod", ProxyError.BAD_RESPONSE)

    def _feed(self, scanner: FrameScanner, data: bytes, side: str, error: ProxyError) -> bytes:
        """Walk one read; pass it on whole, or nothing of it when it is refused."""
        if self._done:
            return b""
        try:
            scanner.feed(data)
        except (H2ObserveError, HPACKError, ValueError) as exc:
            self._refuse(f"{side}: {_describe(exc)}", error)
            return b""
        return data

    def upstream_eof(self) -> None:
        self._lose_all(ProxyError.UPSTREAM_RESET.status, ProxyError.UPSTREAM_RESET.token)

    def client_eof(self) -> None:
        # An HTTP/2 client that ends its side has ended the connection: what it had
        # open is abandoned, whatever the pod does next.
        self._lose_all(None, CANCELLED)

    def ended(self, reason: str, upstream_failed: bool) -> None:
        if upstream_failed:
            self._lose_all(ProxyError.UPSTREAM_RESET.status, ProxyError.UPSTREAM_RESET.token)
        else:
            self._lose_all(None, CANCELLED)

    # --- the client's frames -------------------------------------------------------------

    def _client_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        block = self._client_block
        if block is not None:
            if ftype != CONTINUATION or sid != block.sid:
                raise H2ObserveError(f"{NAMES[ftype]} inside a header block of stream {sid}")
            self._continue(block, payload)
            if flags & END_HEADERS:
                self._client_block = None
                self._request_block(block.sid, b"".join(block.fragments), block.end_stream)
            return
        if ftype == HEADERS:
            fragment = _fragment(flags, payload)
            if flags & END_HEADERS:
                self._request_block(sid, fragment, bool(flags & END_STREAM))
            else:
                self._client_block = self._block(sid, fragment, flags, use=True)
        elif ftype == RST_STREAM:
            if not self._resets.spend(self._clock()):
                raise H2ObserveError("too many stream resets (rapid reset)")
            stream = self.streams.pop(sid, None)
            if stream is not None:
                self._lost(stream, None, CANCELLED)
        elif ftype == SETTINGS:
            self._spend_control()
            if not flags & ACK:
                size = _settings_table_size(payload)
                if size is not None:
                    self._pod_hpack.max_allowed_table_size = size
        elif ftype == PUSH_PROMISE:
            raise H2ObserveError("PUSH_PROMISE from a client")
        elif ftype == CONTINUATION:
            raise H2ObserveError("CONTINUATION without a header block")

    def _client_other(self, ftype: int, flags: int, sid: int, length: int) -> None:
        if ftype == DATA:
            if length == 0 and not flags & END_STREAM and not self._empty.spend(self._clock()):
                raise H2ObserveError("too many empty DATA frames")
        elif ftype != WINDOW_UPDATE:
            self._spend_control()

    def _request_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        headers = self._client_hpack.decode(block, raw=True)
        if sid in self.streams or sid <= self._last_client_sid:
            return  # trailers (or a late block of a stream already ended)
        if sid % 2 == 0:
            raise H2ObserveError(f"a client stream with an even id ({sid})")
        if len(self.streams) >= MAX_STREAMS:
            raise H2ObserveError(f"more than {MAX_STREAMS} streams open")
        self._last_client_sid = sid
        authority = None
        span: Reserved | None = None
        asked: tuple[bytes, bytes] | None = None
        tapping = self.tap.active
        if self.tracing or tapping:
            found = []
            method = path = b""
            for name, value in headers:
                if name in INBOUND_HEADERS:
                    found.append((name, value))
                elif name == b":authority" or (name == b"host" and authority is None):
                    authority = value
                elif name == b":method":
                    method = value
                elif name == b":path":
                    path = value
            if found and self.tracing:
                peer = peer_span(found)
                if peer is not None:
                    span = (peer, method, path, self._span_clock())
            if tapping:
                asked = (method, path)
        else:
            for name, value in headers:
                if name == b":authority":
                    authority = value
                    break
                if name == b"host":
                    authority = value
        self.streams[sid] = _Stream(self._clock(), authority, span, asked)

    # --- the pod's frames ----------------------------------------------------------------

    def _pod_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        block = self._pod_block
        if block is not None:
            if ftype != CONTINUATION or sid != block.sid:
                raise H2ObserveError(f"{NAMES[ftype]} inside a header block of stream {sid}")
            self._continue(block, payload)
            if flags & END_HEADERS:
                self._pod_block = None
                self._response_block(block, b"".join(block.fragments))
            return
        if ftype in (HEADERS, PUSH_PROMISE):
            push = ftype == PUSH_PROMISE
            fragment = _fragment(flags, payload, skip=4 if push else 0)
            pending = self._block(sid, fragment, flags, use=not push)
            if flags & END_HEADERS:
                self._response_block(pending, fragment)
            else:
                self._pod_block = pending
        elif ftype == RST_STREAM:
            stream = self.streams.pop(sid, None)
            # REFUSED_STREAM: the pod did not process it; the client node sends it
            # elsewhere and counts it there.
            if stream is not None and payload[:4] != REFUSED:
                error = ProxyError.UPSTREAM_RESET
                self._lost(stream, error.status, error.token)
        elif ftype == GOAWAY:
            if len(payload) >= 4:
                last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                # Streams above ``last`` were never processed: the client node sends
                # them again elsewhere, and counts them there.
                for gone in [s for s in self.streams if s > last]:
                    del self.streams[gone]
        elif ftype == SETTINGS:
            if not flags & ACK:
                size = _settings_table_size(payload)
                if size is not None:
                    self._client_hpack.max_allowed_table_size = size
        elif ftype == CONTINUATION:
            raise H2ObserveError("CONTINUATION without a header block")

    def _pod_other(self, ftype: int, flags: int, sid: int, length: int) -> None:
        if ftype == DATA and flags & END_STREAM:
            stream = self.streams.get(sid)
            if stream is not None and stream.status is not None:
                self._finish(sid, stream)

    def _response_block(self, block: _Block, data: bytes) -> None:
        headers = self._pod_hpack.decode(data, raw=True)
        if not block.use:
            return
        sid = block.sid
        stream = self.streams.get(sid)
        if stream is None:
            return
        for name, value in headers:
            if name == b":status":
                status = int(value)
                if status < 200:
                    return  # 100 Continue, 103: the real head follows
                stream.status = status
                stream.responded = self._clock()
                if stream.span is not None:
                    stream.responded_ns = self._span_clock()
            elif name == b"grpc-status":
                stream.grpc_status = value.decode("latin-1")
        if block.end_stream and stream.status is not None:
            self._finish(sid, stream)

    def _finish(self, sid: int, stream: _Stream) -> None:
        del self.streams[sid]
        span = stream.span
        self.sink.exchange(
            stream.authority,
            stream.status,
            stream.responded - stream.started,
            "",
            grpc_status=stream.grpc_status,
            trace=Traced(*span, stream.responded_ns) if span is not None else None,
            asked=stream.asked,
        )

    def _lost(self, stream: _Stream, status: int | None, error: str) -> None:
        """A stream that ended without a complete response."""
        span, asked = stream.span, stream.asked
        if span is None and asked is None:
            self.sink.exchange(stream.authority, status, None, error)
        else:
            traced = Traced(*span, self._span_clock()) if span is not None else None
            self.sink.exchange(stream.authority, status, None, error, trace=traced, asked=asked)

    # --- shared --------------------------------------------------------------------------

    def _block(self, sid: int, fragment: bytes, flags: int, use: bool) -> _Block:
        if len(fragment) > self.config.max_header_list_size:
            raise H2ObserveError(f"a header block over {self.config.max_header_list_size} bytes")
        return _Block(sid, fragment, bool(flags & END_STREAM), use)

    def _continue(self, block: _Block, payload: bytes) -> None:
        block.fragments.append(payload)
        block.size += len(payload)
        if block.size > self.config.max_header_list_size:
            raise H2ObserveError(f"a header block over {self.config.max_header_list_size} bytes")

    def _spend_control(self) -> None:
        if not self._control.spend(self._clock()):
            raise H2ObserveError("too many control frames (PING, SETTINGS, PRIORITY)")

    def _lose_all(self, status: int | None, error: str) -> None:
        streams, self.streams = self.streams, {}
        if streams and error != CANCELLED:
            log.info("%s: %d stream(s) lost: %s", self.label, len(streams), error)
        for stream in streams.values():
            self._lost(stream, status, error)

    def _refuse(self, why: str, error: ProxyError) -> None:
        self._done = True
        log.info("%s: HTTP/2 %s; resetting the connection", self.label, why)
        self._lose_all(error.status, error.token)
        relay = self.relay
        assert relay is not None
        relay.abort(f"HTTP/2 {why}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, H2ObserveError):
        return str(exc)
    if isinstance(exc, ValueError) and not isinstance(exc, HPACKError):
        return f"a malformed :status ({exc})"
    return f"undecodable header block ({type(exc).__name__}: {exc})"
