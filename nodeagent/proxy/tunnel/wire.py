"""The tunnel's wire format (version 2), sans-I/O: a preface, then multiplexed frames.

Nothing here touches a socket (STYLE.md §1): encoders return bytes, `FrameDecoder` is
fed bytes as they arrive and returns events, and never raises on input. That keeps the
format fuzzable and lets :mod:`nodeagent.proxy.tunnel.session` be a thin adapter.

A tunnel connection is one TLS 1.3 connection between two node agents (port 15008,
see :mod:`nodeagent.proxy.tls`), made for one (source identity, destination identity,
destination node) and carrying many proxied TCP connections, one **stream** each.

After the handshake each side sends a **preface** (the client first; the server
answers with its own once it has read the client's), then frames::

    preface   "WEFT" | version u8 = 2 | kind u8 = 0x03 SETTINGS | length u16 | TLV fields
    frame     type u8 | length u24 | stream u32 | payload (length bytes)

Preface fields (TLV: type u8, length u8, value; all integers big-endian):

=========  ============  ====  =================================================
type       name          size  meaning
=========  ============  ====  =================================================
0x04       MAX_STREAMS   4     streams the sender accepts open at once (server)
0x05       WINDOW        4     bytes of DATA the sender buffers per stream
0x06       MAX_FRAME     4     largest frame payload the sender accepts
0x80-0xff  (optional)    any   skipped by receivers that do not know them
=========  ============  ====  =================================================

Frames:

======  ==========  ======  =====================================================
type    name        stream  payload
======  ==========  ======  =====================================================
0x00    DATA        > 0     bytes of the stream; counted against its window
0x01    OPEN        > 0     client only: TLV fields, exactly one TARGET (0x01 IPv4
                            or 0x02 IPv6: address + port); optional fields allowed
0x02    ANSWER      > 0     server only: TLV fields, one STATUS (0x03, a `Status`)
0x03    END         > 0     empty: this direction is finished (a TCP half-close)
0x04    RESET       > 0     1 byte, a `Reset` reason: the stream is aborted both ways
0x05    WINDOW      > 0     u32 increment: the receiver consumed that many bytes
0x06    GOAWAY      0       u32 last stream the sender will serve + a `Reset`
                            reason: no new streams on this connection
0x80-   (optional)  any     skipped by receivers that do not know them
======  ==========  ======  =====================================================

Streams are opened by the client, numbered 1, 2, 3, … (a
stream ID is never reused on a connection). The server answers each OPEN with one
ANSWER: OK, after which DATA flows both ways, or a refusal status, after which the
stream is over. A server at its MAX_STREAMS limit, or draining, RESETs the OPEN with
``REFUSED``, which guarantees that nothing reached a pod (the client retries on
another connection).

Flow control is per stream, as in HTTP/2 but simpler: a sender may have at most the
receiver's WINDOW bytes of DATA outstanding on a stream; the receiver returns credit
with WINDOW frames as its consumer takes the bytes (a paused consumer stops returning
it, which stops that stream only). There is no connection-level window: memory per
connection is bounded by MAX_STREAMS x WINDOW on each side, and the TCP connection
itself is never paused for one stream's sake, so a slow stream cannot stall its
siblings (no head-of-line blocking above TCP's own).

Any violation (a frame larger than MAX_FRAME, DATA beyond the window, a frame for a
stream that was never opened, an OPEN from the server, an unknown critical frame type)
is a connection error: the receiver sends GOAWAY(PROTOCOL) and closes the connection.
Both ends are authenticated node agents, so this only ever harms the misbehaving peer's
own streams.

Design choices and the alternatives (measured in docs/architecture.md):

* **Not HBONE** (HTTP/2 CONNECT over mTLS, Istio ambient's tunnel). HTTP/2 would buy
  interoperability with ztunnel, which Weft cannot use anyway (its own CA, trust-domain
  conventions and discovery: an Istio peer would not trust us). In Python, the `h2`
  state machine costs ~50 µs of CPU per request/response round trip over an open
  stream (in memory, both ends, 1 KiB each way), against a few µs for these frames;
  on a node proxy that is one core, that is the difference between a tunnel that is
  cheaper than a sidecar pair and one that is not.
* **No HPACK, no priorities, no connection window, no PING, no SETTINGS changes after
  the preface**: each is an attack surface (HPACK bombs, SETTINGS floods) for nothing
  a node-to-node tunnel of opaque byte streams needs. The TLV preface and optional
  frame types leave room for what comes (trace context in OPEN, a PING for pool
  health).
* **The OPEN and ANSWER payloads are version 1's header bodies** (the same TLV fields
  and `Status` codes), so the target encoding and the refusal codes did not change.
* **A version 1 peer** (a node agent of the previous release) starts with a version 1
  CONNECT header, and reads this server's version 2 preface where it expects its
  ANSWER: it logs "header version 2; ... (upgrade the older agent)"; the server logs and
  counts the version 1 client. Either way the message names the fix.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"WEFT"
VERSION = 2
FIXED_SIZE = 8
"""Magic, version, kind and body length of the preface."""
MAX_HEADER_SIZE = 512
"""Largest preface, and largest OPEN/ANSWER payload, a receiver accepts."""
OPTIONAL_FIELD_MIN = 0x80
"""TLV types, and frame types, from here on may be skipped by receivers that do not
know them."""

FRAME_HEADER_SIZE = 8
MAX_FRAME_PAYLOAD = (1 << 24) - 1
MAX_STREAM_ID = (1 << 32) - 1

_FIXED = struct.Struct("!4sBBH")
_FRAME = struct.Struct("!II")  # type << 24 | length, stream
_U32 = struct.Struct("!I")
_GOAWAY = struct.Struct("!IB")

Address = tuple[str, int]
"""An (ip, port) pair, the IP in Python's canonical text form; an IPv4-mapped IPv6
address is its IPv4 form (as in :mod:`nodeagent.proxy.outbound`), on the wire too, so
that one destination has one encoding and one name."""


class Kind(IntEnum):
    """What a TLV body is: version 1's headers, and version 2's preface."""

    CONNECT = 0x01
    ANSWER = 0x02
    SETTINGS = 0x03


class Field(IntEnum):
    TARGET_V4 = 0x01
    TARGET_V6 = 0x02
    STATUS = 0x03
    MAX_STREAMS = 0x04
    WINDOW = 0x05
    MAX_FRAME = 0x06


_FIELD_SIZES = {
    Field.TARGET_V4: 6,
    Field.TARGET_V6: 18,
    Field.STATUS: 1,
    Field.MAX_STREAMS: 4,
    Field.WINDOW: 4,
    Field.MAX_FRAME: 4,
}
_FIELDS_OF = {
    Kind.CONNECT: frozenset({Field.TARGET_V4, Field.TARGET_V6}),
    Kind.ANSWER: frozenset({Field.STATUS}),
    Kind.SETTINGS: frozenset({Field.MAX_STREAMS, Field.WINDOW, Field.MAX_FRAME}),
}


class FrameType(IntEnum):
    DATA = 0x00
    OPEN = 0x01
    ANSWER = 0x02
    END = 0x03
    RESET = 0x04
    WINDOW = 0x05
    GOAWAY = 0x06


class Reset(IntEnum):
    """Why a stream was reset, or a connection is going away."""

    NO_ERROR = 0x00
    """Finished: the sender will read nothing more (after its END), or is draining."""
    CANCEL = 0x01
    """Aborted: the application's connection was reset on the sender's side."""
    REFUSED = 0x02
    """Not processed at all (stream limit, draining): safe to retry elsewhere."""
    PROTOCOL = 0x03
    """The peer broke the protocol."""
    FLOW_CONTROL = 0x04
    """The peer sent more than the window allowed."""
    INTERNAL = 0x05
    """A bug on the sender's side."""
    RAPID_RESET = 0x06
    """The client opened and cancelled streams faster than the server allows."""
    EXPIRED = 0x07
    """A certificate this connection was made with has expired."""


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

EXT_PROTOCOL = 0x80
"""OPEN optional field: the application protocol the client node detected (an ASCII
token: ``http/1.1``, ``h2``), so the server node serves the stream with its HTTP server
instead of sniffing again. Optional on purpose: a server that does not know it relays
the stream as opaque bytes, which is still correct."""


EXT_JUDGED = 0x81
"""OPEN optional field: the client node has judged, and will judge, each HTTP/2 request
of this stream against the destination's authorization policies (the server node judges
HTTP/1.1 requests itself but only relays HTTP/2 frames). Without it — an older client
node — a server judges an HTTP/2 stream as opaque TCP, which fails closed."""


EXT_ROUTE = 0x82
"""OPEN optional field (value ``weft-route``): each HTTP/1.1 request of this stream that
a Gateway API route matched carries the route's ``ns/name`` in a ``weft-route`` header
the client node set, and the client node removed any such header the app sent. Only
then does the server node judge per-route policies by that header (`nodeagent.authz`);
without it — an older client node — the header is not believed and the requests are
judged as matching no route."""

ROUTE_MARK = b"weft-route"
"""`EXT_ROUTE`'s value: the header's name."""


def protocol_extension(protocol: str) -> Extensions:
    if protocol == "h2":
        return ((EXT_PROTOCOL, b"h2"), (EXT_JUDGED, b"requests"))
    if protocol == "http/1.1":
        return ((EXT_PROTOCOL, b"http/1.1"), (EXT_ROUTE, ROUTE_MARK))
    return ((EXT_PROTOCOL, protocol.encode("ascii")),)


def carries_routes(extensions: Extensions) -> bool:
    """Whether this stream's HTTP/1.1 requests carry the route the client node matched
    in ``weft-route`` (`EXT_ROUTE`)."""
    return any(kind == EXT_ROUTE and value == ROUTE_MARK for kind, value in extensions)


def judges_requests(extensions: Extensions) -> bool:
    """Whether the client node judges this stream's HTTP/2 requests (`EXT_JUDGED`)."""
    return any(kind == EXT_JUDGED and value == b"requests" for kind, value in extensions)


def requested_protocol(extensions: Extensions) -> str | None:
    """The protocol an OPEN asked for, or None (opaque)."""
    for kind, value in extensions:
        if kind == EXT_PROTOCOL:
            return value.decode("ascii", "replace")
    return None


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
    """The preface is not complete yet; feed more bytes."""


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


def _check_code(code: int) -> None:
    if not 0 <= code <= 0xFF:
        raise HeaderError(Status.BAD_HEADER, f"code must fit a byte, got {code}")


def encode_open_payload(target: Address, extensions: Extensions = ()) -> bytes:
    """The payload of an OPEN frame for ``target`` (an IP address and a port)."""
    body = _target_field(target) + _extension_fields(extensions)
    if len(body) > MAX_HEADER_SIZE:
        raise HeaderError(
            Status.HEADER_TOO_LARGE, f"OPEN would be {len(body)} bytes; at most {MAX_HEADER_SIZE}"
        )
    return body


def encode_answer_payload(code: Status | int, extensions: Extensions = ()) -> bytes:
    """The payload of an ANSWER frame with ``code``."""
    _check_code(code)
    return bytes((Field.STATUS, 1, code)) + _extension_fields(extensions)


# --- the preface ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What one side announces in its preface; fixed for the connection's lifetime."""

    max_streams: int = 100
    """Streams this side accepts open at once (only the server's value limits anything:
    clients do not accept streams)."""
    window: int = 1024 * 1024
    """Bytes of DATA this side buffers per stream before the peer must wait for credit."""
    max_frame: int = 64 * 1024
    """Largest frame payload this side accepts."""

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.max_streams <= 65_536:
            problems.append(f"max_streams must be 1..65536, got {self.max_streams}")
        if not 16 * 1024 <= self.window <= 16 * 1024 * 1024:
            problems.append(f"window must be 16 KiB..16 MiB, got {self.window}")
        if not 16 * 1024 <= self.max_frame <= MAX_FRAME_PAYLOAD:
            problems.append(f"max_frame must be 16 KiB..{MAX_FRAME_PAYLOAD}, got {self.max_frame}")
        if problems:
            raise ValueError("; ".join(problems))


def encode_preface(settings: Settings, extensions: Extensions = ()) -> bytes:
    body = b"".join(
        bytes((f, 4)) + _U32.pack(v)
        for f, v in (
            (Field.MAX_STREAMS, settings.max_streams),
            (Field.WINDOW, settings.window),
            (Field.MAX_FRAME, settings.max_frame),
        )
    ) + _extension_fields(extensions)
    return _FIXED.pack(MAGIC, VERSION, Kind.SETTINGS, len(body)) + body


@dataclass(frozen=True)
class Preface:
    settings: Settings
    extensions: Extensions = ()


PrefaceEvent = NeedMore | Preface | Invalid


class PrefaceDecoder:
    """Decodes the peer's preface from bytes fed as they arrive.

    `feed` returns `NeedMore` until the preface is complete, then `Preface` or
    `Invalid`; it never raises on input. Bytes after the preface are kept in
    `trailing` (they are the first frames). Checks each byte of the magic and the
    version as it arrives, so a peer speaking something else is refused at once.
    Memory is bounded by `MAX_HEADER_SIZE`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._needed = FIXED_SIZE
        self._result: Preface | Invalid | None = None
        self.trailing = b""
        self.received = 0
        """Bytes fed so far, for log lines about truncated prefaces."""
        self.version: int | None = None
        """The version byte the peer sent, once it has arrived."""

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, data: bytes) -> PrefaceEvent:
        self.received += len(data)
        if self._result is not None:
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
                if FIXED_SIZE + length > MAX_HEADER_SIZE:
                    self._result = Invalid(
                        Status.HEADER_TOO_LARGE,
                        f"preface declares {FIXED_SIZE + length} bytes; at most "
                        f"{MAX_HEADER_SIZE} accepted",
                    )
                    return self._result
                self._needed = FIXED_SIZE + length
                if length:
                    continue
            self._result = self._settings(bytes(self._buf[FIXED_SIZE:]))
            self.trailing = data
            self._buf = bytearray()
            return self._result
        return NeedMore()

    def _check_fixed(self, start: int) -> Invalid | None:
        buf = self._buf
        for i in range(start, min(len(buf), 6)):
            if i < 4 and buf[i] != MAGIC[i]:
                return Invalid(
                    Status.BAD_HEADER,
                    f"not a Weft tunnel: starts with {bytes(buf[: i + 1])!r}, expected "
                    f"{MAGIC!r} (is the peer a Weft node agent?)",
                )
            if i == 4:
                self.version = buf[4]
                if buf[4] != VERSION:
                    return Invalid(
                        Status.UNSUPPORTED_VERSION,
                        f"tunnel version {buf[4]}; this node agent speaks version {VERSION} "
                        "(upgrade the older agent)",
                    )
            if i == 5 and buf[5] != Kind.SETTINGS:
                return Invalid(
                    Status.BAD_HEADER, f"expected a SETTINGS preface, got kind {buf[5]:#04x}"
                )
        return None

    @staticmethod
    def _settings(body: bytes) -> Preface | Invalid:
        parsed = parse_fields(Kind.SETTINGS, body)
        if isinstance(parsed, Invalid):
            return parsed
        known, extensions = parsed
        missing = [f.name for f in _FIELDS_OF[Kind.SETTINGS] if f not in known]
        if missing:
            return Invalid(Status.BAD_HEADER, f"preface lacks {', '.join(sorted(missing))}")
        try:
            settings = Settings(
                max_streams=_U32.unpack(known[Field.MAX_STREAMS])[0],
                window=_U32.unpack(known[Field.WINDOW])[0],
                max_frame=_U32.unpack(known[Field.MAX_FRAME])[0],
            )
        except ValueError as exc:
            return Invalid(Status.BAD_HEADER, f"preface settings out of range: {exc}")
        return Preface(settings, extensions)


# --- TLV bodies ----------------------------------------------------------------------


def parse_fields(kind: Kind, body: bytes) -> tuple[dict[int, bytes], Extensions] | Invalid:
    """Split a TLV body into its known fields (each at most once, of the right size and
    allowed in ``kind``) and its optional extensions; `Invalid` otherwise."""
    known: dict[int, bytes] = {}
    extensions: list[tuple[int, bytes]] = []
    pos = 0
    allowed = _FIELDS_OF[kind]
    while pos < len(body):
        if pos + 2 > len(body):
            return Invalid(Status.BAD_HEADER, f"truncated field at body offset {pos}")
        field, size = body[pos], body[pos + 1]
        value = body[pos + 2 : pos + 2 + size]
        if len(value) != size:
            return Invalid(
                Status.BAD_HEADER,
                f"field {field:#04x} declares {size} bytes, only {len(value)} present",
            )
        pos += 2 + size
        if field >= OPTIONAL_FIELD_MIN:
            extensions.append((field, value))
            continue
        if field not in _FIELD_SIZES:
            return Invalid(
                Status.BAD_HEADER,
                f"unknown critical field {field:#04x} (sent by a newer node agent?)",
            )
        name = Field(field).name
        if field not in allowed:
            return Invalid(Status.BAD_HEADER, f"a {kind.name} cannot carry {name}")
        if field in known:
            return Invalid(Status.BAD_HEADER, f"field {name} appears twice")
        if size != _FIELD_SIZES[Field(field)]:
            return Invalid(
                Status.BAD_HEADER,
                f"field {name} must be {_FIELD_SIZES[Field(field)]} bytes, got {size}",
            )
        known[field] = value
    return known, tuple(extensions)


def decode_open_payload(body: bytes) -> ConnectRequest | Invalid:
    """The target of an OPEN frame's payload, or why it is not acceptable."""
    if len(body) > MAX_HEADER_SIZE:
        return Invalid(
            Status.HEADER_TOO_LARGE, f"OPEN of {len(body)} bytes; at most {MAX_HEADER_SIZE}"
        )
    parsed = parse_fields(Kind.CONNECT, body)
    if isinstance(parsed, Invalid):
        return parsed
    known, extensions = parsed
    targets = [known[f] for f in (Field.TARGET_V4, Field.TARGET_V6) if f in known]
    if len(targets) != 1:
        return Invalid(
            Status.BAD_HEADER, f"an OPEN needs exactly one target field, got {len(targets)}"
        )
    (value,) = targets
    ip = ipaddress.ip_address(value[:-2])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # tolerated from other encoders; named as IPv4
    port = int.from_bytes(value[-2:], "big")
    if port == 0:
        return Invalid(Status.BAD_HEADER, f"target {ip} has port 0")
    return ConnectRequest((str(ip), port), extensions)


def decode_answer_payload(body: bytes) -> Answer | Invalid:
    """The status of an ANSWER frame's payload, or why it is not acceptable."""
    parsed = parse_fields(Kind.ANSWER, body)
    if isinstance(parsed, Invalid):
        return parsed
    known, extensions = parsed
    if Field.STATUS not in known:
        return Invalid(Status.BAD_HEADER, "an ANSWER needs a STATUS field")
    return Answer(known[Field.STATUS][0], extensions)


# --- frames --------------------------------------------------------------------------


def frame(kind: FrameType | int, stream: int, payload: bytes = b"") -> bytes:
    """One frame. ``payload`` must fit the receiver's MAX_FRAME (callers split DATA)."""
    return _FRAME.pack(kind << 24 | len(payload), stream) + payload


def data_frames(stream: int, data: bytes | bytearray | memoryview, max_frame: int) -> bytes:
    """``data`` as DATA frames of at most ``max_frame`` bytes each."""
    size = len(data)
    if size <= max_frame:
        return _FRAME.pack(size, stream) + data
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, size, max_frame):
        piece = view[start : start + max_frame]
        parts.append(_FRAME.pack(len(piece), stream))
        parts.append(piece)
    return b"".join(parts)


def end_frame(stream: int) -> bytes:
    return _FRAME.pack(FrameType.END << 24, stream)


def reset_frame(stream: int, reason: Reset) -> bytes:
    return _FRAME.pack(FrameType.RESET << 24 | 1, stream) + bytes((reason,))


def window_frame(stream: int, increment: int) -> bytes:
    return _FRAME.pack(FrameType.WINDOW << 24 | 4, stream) + _U32.pack(increment)


def goaway_frame(last_stream: int, reason: Reset) -> bytes:
    return _FRAME.pack(FrameType.GOAWAY << 24 | 5, 0) + _GOAWAY.pack(last_stream, reason)


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Open:
    stream: int
    request: ConnectRequest | Invalid


@dataclass(frozen=True, slots=True)
class Answered:
    stream: int
    answer: Answer | Invalid


@dataclass(frozen=True, slots=True)
class End:
    stream: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream: int
    reason: int


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream: int
    reason: int


@dataclass(frozen=True, slots=True)
class Violation:
    """The peer broke the framing; the connection must end (GOAWAY ``reason``)."""

    detail: str
    reason: Reset = Reset.PROTOCOL


FrameEvent = Data | Open | Answered | End | StreamReset | WindowUpdate | GoAway | Violation

_STREAM_FRAMES = frozenset(
    {FrameType.DATA, FrameType.OPEN, FrameType.ANSWER, FrameType.END, FrameType.RESET,
     FrameType.WINDOW}
)  # fmt: skip
_FIXED_PAYLOAD = {FrameType.END: 0, FrameType.RESET: 1, FrameType.WINDOW: 4, FrameType.GOAWAY: 5}


class FrameDecoder:
    """Decodes frames from bytes fed as they arrive.

    `feed` returns the events in the bytes fed, in order. A frame is delivered once
    complete, so at most one frame (``max_frame`` + 8 bytes) is held between calls.
    Never raises on input: after a `Violation`, input is dropped.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = b""
        self._failed = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[FrameEvent]:
        if self._failed:
            return []
        if self._buf:
            data = self._buf + data
        events: list[FrameEvent] = []
        view = memoryview(data)
        pos, size = 0, len(data)
        unpack = _FRAME.unpack_from
        while size - pos >= FRAME_HEADER_SIZE:
            word, stream = unpack(view, pos)
            kind, length = word >> 24, word & MAX_FRAME_PAYLOAD
            if length > self.max_frame:
                return self._fail(events, f"a {length}-byte frame; at most {self.max_frame}")
            end = pos + FRAME_HEADER_SIZE + length
            if end > size:
                break
            start = pos + FRAME_HEADER_SIZE
            pos = end
            if kind == FrameType.DATA:
                if stream == 0:
                    return self._fail(events, "DATA on stream 0")
                events.append(Data(stream, view[start:end].tobytes()))
                continue
            if kind >= OPTIONAL_FIELD_MIN:
                continue  # an optional frame type this agent does not know
            try:
                ftype = FrameType(kind)
            except ValueError:
                return self._fail(events, f"unknown frame type {kind:#04x} (a newer agent?)")
            if (stream == 0) == (ftype in _STREAM_FRAMES):
                where = "stream 0" if stream == 0 else f"stream {stream}"
                return self._fail(events, f"{ftype.name} on {where}")
            expected = _FIXED_PAYLOAD.get(ftype)
            if expected is not None and length != expected:
                return self._fail(events, f"{ftype.name} with a {length}-byte payload")
            payload = view[start:end].tobytes()
            if ftype is FrameType.OPEN:
                events.append(Open(stream, decode_open_payload(payload)))
            elif ftype is FrameType.ANSWER:
                events.append(Answered(stream, decode_answer_payload(payload)))
            elif ftype is FrameType.END:
                events.append(End(stream))
            elif ftype is FrameType.RESET:
                events.append(StreamReset(stream, payload[0]))
            elif ftype is FrameType.WINDOW:
                (increment,) = _U32.unpack(payload)
                if increment == 0:
                    return self._fail(events, f"WINDOW of 0 on stream {stream}")
                events.append(WindowUpdate(stream, increment))
            else:
                last, reason = _GOAWAY.unpack(payload)
                events.append(GoAway(last, reason))
        self._buf = view[pos:].tobytes() if pos < size else b""
        return events

    def _fail(self, events: list[FrameEvent], detail: str) -> list[FrameEvent]:
        self._failed = True
        self._buf = b""
        events.append(Violation(detail))
        return events
