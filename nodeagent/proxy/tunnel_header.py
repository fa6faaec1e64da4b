"""The tunnel's wire format, sans-I/O: the header after the TLS handshake, then frames.

Nothing here touches a socket (STYLE.md §1): encoders return bytes, decoders are fed
bytes as they arrive and return events. That keeps the format fuzzable and lets
:mod:`nodeagent.proxy.tunnel` be a thin adapter.

A tunnel is one TLS 1.3 connection to a node's port 15008 carrying one proxied TCP
connection (see :mod:`nodeagent.proxy.tls` for the handshake). After the handshake:

1. the client sends a CONNECT header naming the target (pod IP and port);
2. the server sends an ANSWER header with a status: OK, or why it refuses;
3. after OK, each direction is a sequence of frames until the TLS connection closes.

Header (both kinds, all integers big-endian)::

    offset  size  field
    0       4     magic    b"WEFT"
    4       1     version  1
    5       1     kind     0x01 CONNECT (client -> server), 0x02 ANSWER (server -> client)
    6       2     length   N, the size of the body; 8 + N <= MAX_HEADER_SIZE (512)
    8       N     body     TLV fields: type u8, length u8, value

Fields (TLV types):

=========  ==========  =====  =============================================
type       name        size   meaning
=========  ==========  =====  =============================================
0x01       TARGET_V4   6      IPv4 address (4) + port (2); CONNECT only
0x02       TARGET_V6   18     IPv6 address (16) + port (2); CONNECT only
0x03       STATUS      1      a `Status` code; ANSWER only
0x80-0xff  (optional)  any    skipped by receivers that do not know them
=========  ==========  =====  =============================================

A CONNECT carries exactly one target, an ANSWER exactly one status. Types below 0x80
that a receiver does not know are *critical*: it must refuse the header (BAD_HEADER)
rather than guess, so a future field that changes the meaning of a connection can
never be silently ignored by an old node agent. Types from 0x80 are optional: a newer
client can add, say, a trace ID without a version bump. The version byte is for
changes an old receiver could not even parse; a server that gets a version it does
not speak answers UNSUPPORTED_VERSION in version 1 framing, which every client reads.

Frames, after an OK answer, in each direction::

    type u8 | length u24 | payload
    0x00 DATA   1 .. 2**24-1 bytes of the stream (0 is tolerated and means nothing)
    0x01 END    length 0: this direction is finished (a TCP half-close)

Frames exist for one reason: TLS transports in asyncio and uvloop cannot half-close
(``write_eof`` is unsupported), and TLS's own close ends both directions. An app that
sends a request, shuts down its writing and then reads the reply (``nc -N``, some RPC
and HTTP/1.0 clients) would otherwise lose the reply. END carries the half-close
across the tunnel; closing TLS still means both directions are done. The cost is four
bytes per write and one slice per read. A future multiplexing version (many streams
over one TLS connection, like HTTP/2) would add a stream ID to this frame header.

Design choices and the alternatives:

* **Not HBONE** (HTTP/2 CONNECT, Istio ambient's tunnel). HBONE buys interoperability
  with ztunnel and multiplexing. Interop is not a goal: Weft has its own CA, trust
  domain conventions and discovery, so an Istio peer would not trust us anyway. In
  Python it would put an HTTP/2 state machine (HPACK, per-stream and per-connection
  flow-control windows on top of TCP's) in the per-connection path, for a request
  that is one address. Multiplexing is the real benefit, and whether it pays is what
  ``bench_handshakes`` in :mod:`nodeagent.proxy.tunnel` measures; if it does, stream
  IDs in these frames are the smaller step.
* **TLV, not a fixed layout**: the target is the only field today, but the header is
  where tracing context, the original client address or an IPv6 target go next, and
  the critical/optional split says up front how old agents treat new fields.
* **A small maximum** (512 bytes): the server reads the header from an authenticated
  peer before any authorization, so its memory per connection is bounded by this,
  and a header needs ~30 bytes. Too large is refused as soon as the length is read.
* **Fail on the first wrong byte**: the magic is checked as it arrives, so a peer
  speaking something else is refused after one byte, not after a timeout.
* **Decoders return errors as events** (`Invalid`, `StreamInvalid`) and never raise on
  input: the server must turn every malformed header into an ANSWER with a status, so
  an error is data for it, not control flow. Encoders raise `HeaderError` on values
  that cannot be encoded.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"WEFT"
VERSION = 1
FIXED_SIZE = 8
"""Magic, version, kind and body length."""
MAX_HEADER_SIZE = 512
"""Largest header, fixed part included, a decoder accepts by default."""
OPTIONAL_FIELD_MIN = 0x80
"""TLV types from here on may be skipped by receivers that do not know them."""

FRAME_HEADER_SIZE = 4
MAX_FRAME_PAYLOAD = (1 << 24) - 1

_FIXED = struct.Struct("!4sBBH")
_FRAME = struct.Struct("!I")  # type in the top byte, length in the low three

Address = tuple[str, int]
"""An (ip, port) pair, the IP in Python's canonical text form; an IPv4-mapped IPv6
address is its IPv4 form (as in :mod:`nodeagent.proxy.outbound`), on the wire too, so
that one destination has one encoding and one name."""


class Kind(IntEnum):
    CONNECT = 0x01
    ANSWER = 0x02


class Field(IntEnum):
    TARGET_V4 = 0x01
    TARGET_V6 = 0x02
    STATUS = 0x03


_FIELD_SIZES = {Field.TARGET_V4: 6, Field.TARGET_V6: 18, Field.STATUS: 1}


class Status(IntEnum):
    """The server's answer. Codes are grouped: 0x1_ the header, 0x2_ the target and
    policy, 0x3_ the server itself."""

    OK = 0x00
    BAD_HEADER = 0x10
    """The header is malformed: wrong magic, kind, field or missing target."""
    UNSUPPORTED_VERSION = 0x11
    """The header's version is newer than this server speaks."""
    HEADER_TOO_LARGE = 0x12
    """The header declares more than the server's maximum size."""
    HEADER_TIMEOUT = 0x13
    """The header did not arrive in time after the handshake."""
    UNKNOWN_TARGET = 0x20
    """No pod is known at the target address."""
    TARGET_NOT_ON_NODE = 0x21
    """The target pod runs on another node (the client's discovery is stale)."""
    POLICY_DENIED = 0x22
    """Authorization refused this client identity for this target."""
    TARGET_UNREACHABLE = 0x23
    """The target pod refused the connection or did not answer in time."""
    TARGET_IDENTITY_MISMATCH = 0x24
    """The target pod runs as another identity than the one the server presented."""
    INTERNAL_ERROR = 0x30
    """A bug or failed hook in the server; its log has the traceback."""

    @property
    def retryable(self) -> bool:
        """Nothing reached the target, and another endpoint (or the same one after a
        discovery update) may well succeed."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        Status.TARGET_NOT_ON_NODE,
        Status.TARGET_UNREACHABLE,
        Status.TARGET_IDENTITY_MISMATCH,
        Status.UNKNOWN_TARGET,
    }
)


class HeaderError(ValueError):
    """A value cannot be encoded, or (from the one-shot decoders) bytes cannot be
    decoded. ``status`` is what a server would answer."""

    def __init__(self, status: Status, detail: str) -> None:
        super().__init__(detail)
        self.status = status


Extensions = tuple[tuple[int, bytes], ...]
"""Optional fields (type >= 0x80, value <= 255 bytes), in order of appearance."""


@dataclass(frozen=True)
class ConnectRequest:
    """CONNECT: the client asks for a connection to ``target``."""

    target: Address
    extensions: Extensions = ()


@dataclass(frozen=True)
class Answer:
    """ANSWER: the server's verdict. ``code`` is kept as a number so that a code from
    a newer server is still a (refused) answer rather than a malformed one."""

    code: int
    extensions: Extensions = ()

    @property
    def status(self) -> Status | None:
        """The code as a `Status`, None if this agent does not know it."""
        try:
            return Status(self.code)
        except ValueError:
            return None

    @property
    def ok(self) -> bool:
        return self.code == Status.OK


@dataclass(frozen=True)
class NeedMore:
    """The header is not complete yet; feed more bytes."""


@dataclass(frozen=True)
class Invalid:
    """The bytes are not an acceptable header; ``status`` is the answer to give."""

    status: Status
    detail: str


HeaderEvent = NeedMore | ConnectRequest | Answer | Invalid

# --- encoding ------------------------------------------------------------------------


def _target_field(target: Address) -> bytes:
    host, port = target
    if not isinstance(port, int) or not 0 < port < 65536:
        raise HeaderError(Status.BAD_HEADER, f"target port must be 1..65535, got {port!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise HeaderError(
            Status.BAD_HEADER, f"target must be an IP address, got {host!r}"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise HeaderError(
            Status.BAD_HEADER, f"target {host!r} has a zone; it means nothing on another node"
        )
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    field = Field.TARGET_V4 if ip.version == 4 else Field.TARGET_V6
    value = ip.packed + port.to_bytes(2, "big")
    return bytes((field, len(value))) + value


def _extension_fields(extensions: Extensions) -> bytes:
    out = bytearray()
    for kind, value in extensions:
        if not OPTIONAL_FIELD_MIN <= kind <= 0xFF:
            raise HeaderError(
                Status.BAD_HEADER, f"extension type must be 0x80..0xff, got {kind:#x}"
            )
        if len(value) > 0xFF:
            raise HeaderError(
                Status.BAD_HEADER, f"extension {kind:#x} is {len(value)} bytes; at most 255"
            )
        out += bytes((kind, len(value))) + value
    return bytes(out)


def _frame_header(kind: Kind, body: bytes) -> bytes:
    if FIXED_SIZE + len(body) > MAX_HEADER_SIZE:
        raise HeaderError(
            Status.HEADER_TOO_LARGE,
            f"header would be {FIXED_SIZE + len(body)} bytes; at most {MAX_HEADER_SIZE}",
        )
    return _FIXED.pack(MAGIC, VERSION, kind, len(body)) + body


def encode_connect(target: Address, extensions: Extensions = ()) -> bytes:
    """The CONNECT header for ``target`` (an IPv4 or IPv6 address and a port)."""
    return _frame_header(Kind.CONNECT, _target_field(target) + _extension_fields(extensions))


def encode_answer(code: Status | int, extensions: Extensions = ()) -> bytes:
    """The ANSWER header with ``code``."""
    if not 0 <= code <= 0xFF:
        raise HeaderError(Status.BAD_HEADER, f"status code must fit a byte, got {code}")
    body = bytes((Field.STATUS, 1, code)) + _extension_fields(extensions)
    return _frame_header(Kind.ANSWER, body)


# --- decoding ------------------------------------------------------------------------


class HeaderDecoder:
    """Decodes one header of the expected ``kind`` from bytes fed as they arrive.

    `feed` returns `NeedMore` until the header is complete, then the message
    (`ConnectRequest` or `Answer`) or `Invalid`; it never raises on input. Once it has
    returned a message, further bytes are kept in `trailing` (they belong to the
    frames that follow) and the same message is returned again; after `Invalid` the
    same `Invalid` is returned and input is dropped. Memory is bounded by
    ``max_size`` plus what the caller feeds after completion.
    """

    def __init__(self, kind: Kind, *, max_size: int = MAX_HEADER_SIZE) -> None:
        if max_size < FIXED_SIZE:
            raise ValueError(f"max_size must be at least {FIXED_SIZE}, got {max_size}")
        self.kind = kind
        self.max_size = max_size
        self._buf = bytearray()
        self._needed = FIXED_SIZE  # total header size once the length is known
        self._result: ConnectRequest | Answer | Invalid | None = None
        self._trailing = bytearray()
        self.received = 0
        """Bytes fed so far, for log lines about truncated headers."""

    @property
    def trailing(self) -> bytes:
        """Bytes fed after the end of a valid header."""
        return bytes(self._trailing)

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, data: bytes) -> HeaderEvent:
        self.received += len(data)
        if self._result is not None:
            if not isinstance(self._result, Invalid):
                self._trailing += data
            return self._result
        while data:
            take = self._needed - len(self._buf)
            chunk, data = data[:take], data[take:]
            start = len(self._buf)
            self._buf += chunk
            invalid = self._check_fixed(start)
            if invalid is not None:
                self._result = invalid
                return invalid
            if len(self._buf) < self._needed:
                return NeedMore()
            if self._needed == FIXED_SIZE:
                (length,) = struct.unpack_from("!H", self._buf, 6)
                if FIXED_SIZE + length > self.max_size:
                    self._result = Invalid(
                        Status.HEADER_TOO_LARGE,
                        f"header declares {FIXED_SIZE + length} bytes; at most "
                        f"{self.max_size} accepted",
                    )
                    return self._result
                self._needed = FIXED_SIZE + length
                if length:
                    continue
            self._result = self._parse_body(bytes(self._buf[FIXED_SIZE:]))
            if not isinstance(self._result, Invalid):
                self._trailing += data
            self._buf = bytearray()
            return self._result
        return NeedMore()

    def _check_fixed(self, start: int) -> Invalid | None:
        """Check the fixed-part bytes from ``start`` as soon as they are here."""
        buf = self._buf
        end = min(len(buf), 6)
        for i in range(start, end):
            if i < 4 and buf[i] != MAGIC[i]:
                return Invalid(
                    Status.BAD_HEADER,
                    f"not a Weft tunnel header: starts with {bytes(buf[: i + 1])!r}, "
                    f"expected {MAGIC!r} (is the peer a Weft node agent of the same release "
                    "line?)",
                )
            if i == 4 and buf[4] != VERSION:
                return Invalid(
                    Status.UNSUPPORTED_VERSION,
                    f"header version {buf[4]}; this node agent speaks version {VERSION} "
                    "(upgrade the older agent)",
                )
            if i == 5 and buf[5] != self.kind:
                return Invalid(
                    Status.BAD_HEADER,
                    f"expected a {self.kind.name} header, got kind {buf[5]:#04x}",
                )
        return None

    def _parse_body(self, body: bytes) -> ConnectRequest | Answer | Invalid:
        known: dict[int, bytes] = {}
        extensions: list[tuple[int, bytes]] = []
        pos = 0
        while pos < len(body):
            if pos + 2 > len(body):
                return Invalid(Status.BAD_HEADER, f"truncated field at body offset {pos}")
            kind, size = body[pos], body[pos + 1]
            value = body[pos + 2 : pos + 2 + size]
            if len(value) != size:
                return Invalid(
                    Status.BAD_HEADER,
                    f"field {kind:#04x} declares {size} bytes, only {len(value)} present",
                )
            pos += 2 + size
            if kind >= OPTIONAL_FIELD_MIN:
                extensions.append((kind, value))
                continue
            if kind not in _FIELD_SIZES:
                return Invalid(
                    Status.BAD_HEADER,
                    f"unknown critical field {kind:#04x} (sent by a newer node agent?)",
                )
            if kind in known:
                return Invalid(Status.BAD_HEADER, f"field {Field(kind).name} appears twice")
            if size != _FIELD_SIZES[Field(kind)]:
                return Invalid(
                    Status.BAD_HEADER,
                    f"field {Field(kind).name} must be {_FIELD_SIZES[Field(kind)]} bytes, "
                    f"got {size}",
                )
            known[kind] = value
        if self.kind is Kind.ANSWER:
            return self._answer(known, tuple(extensions))
        return self._connect(known, tuple(extensions))

    @staticmethod
    def _connect(known: dict[int, bytes], extensions: Extensions) -> ConnectRequest | Invalid:
        if Field.STATUS in known:
            return Invalid(Status.BAD_HEADER, "a CONNECT header cannot carry a STATUS")
        targets = [known[f] for f in (Field.TARGET_V4, Field.TARGET_V6) if f in known]
        if len(targets) != 1:
            return Invalid(
                Status.BAD_HEADER,
                f"a CONNECT header needs exactly one target field, got {len(targets)}",
            )
        (value,) = targets
        ip = ipaddress.ip_address(value[:-2])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # tolerated from other encoders; named as IPv4
        port = int.from_bytes(value[-2:], "big")
        if port == 0:
            return Invalid(Status.BAD_HEADER, f"target {ip} has port 0")
        return ConnectRequest((str(ip), port), extensions)

    @staticmethod
    def _answer(known: dict[int, bytes], extensions: Extensions) -> Answer | Invalid:
        if Field.TARGET_V4 in known or Field.TARGET_V6 in known:
            return Invalid(Status.BAD_HEADER, "an ANSWER header cannot carry a target")
        if Field.STATUS not in known:
            return Invalid(Status.BAD_HEADER, "an ANSWER header needs a STATUS field")
        return Answer(known[Field.STATUS][0], extensions)


def _decode(kind: Kind, data: bytes) -> ConnectRequest | Answer:
    decoder = HeaderDecoder(kind)
    event = decoder.feed(data)
    if isinstance(event, Invalid):
        raise HeaderError(event.status, event.detail)
    if isinstance(event, NeedMore):
        raise HeaderError(Status.BAD_HEADER, f"incomplete header ({len(data)} bytes)")
    if decoder.trailing:
        raise HeaderError(Status.BAD_HEADER, f"{len(decoder.trailing)} bytes after the header")
    return event


def decode_connect(data: bytes) -> ConnectRequest:
    """Decode exactly one CONNECT header; raise `HeaderError` otherwise."""
    event = _decode(Kind.CONNECT, data)
    assert isinstance(event, ConnectRequest)
    return event


def decode_answer(data: bytes) -> Answer:
    """Decode exactly one ANSWER header; raise `HeaderError` otherwise."""
    event = _decode(Kind.ANSWER, data)
    assert isinstance(event, Answer)
    return event


# --- frames --------------------------------------------------------------------------


class FrameType(IntEnum):
    DATA = 0x00
    END = 0x01


@dataclass(frozen=True)
class StreamData:
    data: bytes


@dataclass(frozen=True)
class StreamEnd:
    """The peer will send no more data in this direction (a half-close)."""


@dataclass(frozen=True)
class StreamInvalid:
    detail: str


StreamEvent = StreamData | StreamEnd | StreamInvalid


def encode_data(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as DATA frames (one unless it exceeds `MAX_FRAME_PAYLOAD`)."""
    size = len(data)
    if size <= MAX_FRAME_PAYLOAD:
        return _FRAME.pack(size) + data if size else b""
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, size, MAX_FRAME_PAYLOAD):
        piece = view[start : start + MAX_FRAME_PAYLOAD]
        parts.append(_FRAME.pack(len(piece)))
        parts.append(piece)
    return b"".join(parts)


def encode_end() -> bytes:
    return _FRAME.pack(FrameType.END << 24)


class FrameDecoder:
    """Decodes one direction's frames; streams payloads without buffering a frame.

    `feed` returns the events in the bytes fed: at most one `StreamData` joining all
    payload bytes of the call (one delivery per read), then `StreamEnd` or
    `StreamInvalid` if one occurred. Never raises on input; after `StreamEnd` any byte
    is invalid, after `StreamInvalid` input is dropped. Holds at most 3 bytes between
    calls.
    """

    def __init__(self) -> None:
        self._header = b""
        self._remaining = 0  # payload bytes of the current DATA frame still to come
        self._ended = False
        self._failed = False

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, data: bytes) -> list[StreamEvent]:
        if self._failed:
            return []
        events: list[StreamEvent] = []
        chunks: list[memoryview] = []
        view = memoryview(data)
        pos, size = 0, len(view)
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                chunks.append(view[pos : pos + take])
                pos += take
                self._remaining -= take
                continue
            if self._ended:
                self._fail(events, chunks, f"{size - pos} bytes after the END frame")
                return events
            need = FRAME_HEADER_SIZE - len(self._header)
            self._header += view[pos : pos + need]
            pos += need
            if len(self._header) < FRAME_HEADER_SIZE:
                break
            (word,) = _FRAME.unpack(self._header)
            self._header = b""
            kind, length = word >> 24, word & MAX_FRAME_PAYLOAD
            if kind == FrameType.DATA:
                self._remaining = length
            elif kind == FrameType.END and length == 0:
                self._ended = True
                self._flush(events, chunks)
                events.append(StreamEnd())
            elif kind == FrameType.END:
                self._fail(events, chunks, f"END frame with a {length}-byte payload")
                return events
            else:
                self._fail(events, chunks, f"unknown frame type {kind:#04x}")
                return events
        self._flush(events, chunks)
        return events

    @staticmethod
    def _flush(events: list[StreamEvent], chunks: list[memoryview]) -> None:
        if len(chunks) == 1:
            events.append(StreamData(chunks[0].tobytes()))
        elif chunks:
            events.append(StreamData(b"".join(chunks)))
        chunks.clear()

    def _fail(self, events: list[StreamEvent], chunks: list[memoryview], detail: str) -> None:
        self._failed = True
        self._flush(events, chunks)
        events.append(StreamInvalid(detail))
