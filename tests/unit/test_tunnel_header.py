"""The tunnel's wire format (nodeagent.proxy.tunnel_header), in memory.

Round trips, every refusal the decoder can produce, byte-by-byte feeding, the size
limit, and property tests: arbitrary bytes never make a decoder raise, and decoding an
encoding gives back what was encoded, however the bytes are split. The SNI that names
the destination workload in the ClientHello (nodeagent.proxy.tls) is on the wire too
and is tested at the end.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.tls import SniError, identity_from_sni, sni_for
from nodeagent.proxy.tunnel_header import (
    FIXED_SIZE,
    MAGIC,
    MAX_FRAME_PAYLOAD,
    MAX_HEADER_SIZE,
    VERSION,
    Answer,
    ConnectRequest,
    FrameDecoder,
    HeaderDecoder,
    HeaderError,
    HeaderEvent,
    Invalid,
    Kind,
    NeedMore,
    Status,
    StreamData,
    StreamEnd,
    StreamEvent,
    StreamInvalid,
    decode_answer,
    decode_connect,
    encode_answer,
    encode_connect,
    encode_data,
    encode_end,
)
from weft.identity import SpiffeId


def fixed(kind: int = Kind.CONNECT, length: int = 0, version: int = VERSION) -> bytes:
    return MAGIC + bytes((version, kind)) + length.to_bytes(2, "big")


def field(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value


def header(body: bytes, kind: int = Kind.CONNECT) -> bytes:
    return fixed(kind, len(body)) + body


V4_TARGET = field(0x01, bytes([10, 0, 0, 7]) + (8080).to_bytes(2, "big"))


def feed_all(decoder: HeaderDecoder, chunks: list[bytes]) -> HeaderEvent:
    event: HeaderEvent = NeedMore()
    for chunk in chunks:
        event = decoder.feed(chunk)
    return event


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def canonical(target: tuple[str, int]) -> tuple[str, int]:
    ip = ipaddress.ip_address(target[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), target[1]


def padded(total: int) -> bytes:
    """A valid CONNECT header of exactly ``total`` bytes (optional fields as padding)."""
    body = V4_TARGET
    remaining = total - FIXED_SIZE - len(body)
    while remaining >= 2:
        size = min(remaining, 257)
        if remaining - size == 1:
            size -= 1
        body += field(0x80, b"p" * (size - 2))
        remaining -= size
    assert remaining == 0
    return header(body)


# --- round trips -------------------------------------------------------------------------


def test_connect_layout_is_as_documented() -> None:
    data = encode_connect(("10.0.0.7", 8080))
    assert data == b"WEFT\x01\x01\x00\x08" + V4_TARGET
    assert len(data) == 16


@pytest.mark.parametrize(
    "target",
    [("10.0.0.7", 8080), ("255.255.255.255", 65535), ("fd00::1", 80), ("2001:db8::7", 1)],
)
def test_connect_round_trip(target: tuple[str, int]) -> None:
    extensions = ((0x80, b""), (0xFF, b"x" * 255))
    for ext in ((), extensions):
        assert decode_connect(encode_connect(target, ext)) == ConnectRequest(target, ext)


def test_ipv4_mapped_targets_are_ipv4_on_the_wire_and_after() -> None:
    data = encode_connect(("::ffff:10.0.0.7", 8080))
    assert data == header(V4_TARGET)
    mapped = field(0x02, ipaddress.IPv6Address("::ffff:10.0.0.7").packed + b"\x1f\x90")
    assert decode_connect(header(mapped)).target == ("10.0.0.7", 8080)


@pytest.mark.parametrize("status", list(Status))
def test_answer_round_trip(status: Status) -> None:
    answer = decode_answer(encode_answer(status))
    assert answer == Answer(status)
    assert answer.status is status
    assert answer.ok is (status is Status.OK)


def test_an_answer_code_from_a_newer_agent_is_a_refusal_not_garbage() -> None:
    answer = decode_answer(encode_answer(0x77))
    assert (answer.code, answer.status, answer.ok) == (0x77, None, False)


def test_unknown_optional_fields_are_kept_and_skipped() -> None:
    body = field(0x90, b"trace-id") + V4_TARGET + field(0x80, b"")
    request = decode_connect(header(body))
    assert request == ConnectRequest(("10.0.0.7", 8080), ((0x90, b"trace-id"), (0x80, b"")))


def test_retryable_statuses() -> None:
    retryable = {s for s in Status if s.retryable}
    assert retryable == {
        Status.UNKNOWN_TARGET,
        Status.TARGET_NOT_ON_NODE,
        Status.TARGET_UNREACHABLE,
        Status.TARGET_IDENTITY_MISMATCH,
    }


# --- encoding errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (("10.0.0.1", 0), "port must be 1..65535"),
        (("10.0.0.1", 65536), "port must be 1..65535"),
        (("backend.shop", 80), "must be an IP address"),
        (("fe80::1%eth0", 80), "has a zone"),
    ],
)
def test_unencodable_targets(target: tuple[str, int], message: str) -> None:
    with pytest.raises(HeaderError, match=message) as caught:
        encode_connect(target)
    assert caught.value.status is Status.BAD_HEADER


def test_unencodable_extensions_and_codes() -> None:
    with pytest.raises(HeaderError, match=r"0x80\.\.0xff"):
        encode_connect(("10.0.0.1", 1), ((0x05, b""),))
    with pytest.raises(HeaderError, match="at most 255"):
        encode_connect(("10.0.0.1", 1), ((0x80, b"x" * 256),))
    with pytest.raises(HeaderError, match="fit a byte"):
        encode_answer(256)
    with pytest.raises(HeaderError, match="at most 512") as caught:
        encode_connect(("10.0.0.1", 1), tuple((0x80, b"x" * 255) for _ in range(2)))
    assert caught.value.status is Status.HEADER_TOO_LARGE


# --- every decoding error ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        (b"X", Status.BAD_HEADER, "not a Weft tunnel header: starts with b'X'"),
        (b"WEFX", Status.BAD_HEADER, "starts with b'WEFX'"),
        (b"\x16\x03\x01\x02\x00", Status.BAD_HEADER, "expected b'WEFT'"),
        (b"GET / HTTP/1.1\r\n", Status.BAD_HEADER, "not a Weft tunnel header"),
        (fixed(version=2), Status.UNSUPPORTED_VERSION, "header version 2; this node agent"),
        (fixed(version=0), Status.UNSUPPORTED_VERSION, "header version 0"),
        (fixed(kind=Kind.ANSWER), Status.BAD_HEADER, "expected a CONNECT header, got kind 0x02"),
        (fixed(kind=0x07), Status.BAD_HEADER, "got kind 0x07"),
        (fixed(length=MAX_HEADER_SIZE), Status.HEADER_TOO_LARGE, "declares 520 bytes"),
        (fixed(length=0xFFFF), Status.HEADER_TOO_LARGE, "at most 512 accepted"),
        (header(b""), Status.BAD_HEADER, "needs exactly one target field, got 0"),
        (header(b"\x01"), Status.BAD_HEADER, "truncated field at body offset 0"),
        (header(V4_TARGET + b"\x80"), Status.BAD_HEADER, "truncated field at body offset 8"),
        (header(b"\x01\x06\x0a"), Status.BAD_HEADER, "declares 6 bytes, only 1 present"),
        (header(field(0x01, b"\x0a\x00\x00\x07")), Status.BAD_HEADER, "TARGET_V4 must be 6"),
        (header(field(0x02, bytes(6))), Status.BAD_HEADER, "TARGET_V6 must be 18"),
        (header(V4_TARGET + V4_TARGET), Status.BAD_HEADER, "TARGET_V4 appears twice"),
        (
            header(V4_TARGET + field(0x02, bytes(15) + b"\x01\x00\x50")),
            Status.BAD_HEADER,
            "exactly one target field, got 2",
        ),
        (header(field(0x01, bytes([10, 0, 0, 1, 0, 0]))), Status.BAD_HEADER, "has port 0"),
        (header(V4_TARGET + field(0x03, b"\x00")), Status.BAD_HEADER, "cannot carry a STATUS"),
        (header(V4_TARGET + field(0x7F, b"")), Status.BAD_HEADER, "unknown critical field 0x7f"),
    ],
)
def test_connect_decoding_errors(data: bytes, status: Status, detail: str) -> None:
    event = HeaderDecoder(Kind.CONNECT).feed(data)
    assert isinstance(event, Invalid)
    assert event.status is status
    assert detail in event.detail


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (header(b"", Kind.ANSWER), "needs a STATUS field"),
        (header(field(0x03, b"\x00") + V4_TARGET, Kind.ANSWER), "cannot carry a target"),
        (header(field(0x03, b"\x00\x00"), Kind.ANSWER), "STATUS must be 1 bytes, got 2"),
        (fixed(Kind.CONNECT), "expected a ANSWER header"),
    ],
)
def test_answer_decoding_errors(data: bytes, detail: str) -> None:
    event = HeaderDecoder(Kind.ANSWER).feed(data)
    assert isinstance(event, Invalid)
    assert detail in event.detail


def test_the_magic_is_refused_at_the_first_wrong_byte() -> None:
    decoder = HeaderDecoder(Kind.CONNECT)
    assert decoder.feed(b"W") == NeedMore()
    event = decoder.feed(b"x")
    assert isinstance(event, Invalid) and event.status is Status.BAD_HEADER
    assert decoder.feed(b"more") is event  # final; further input is dropped
    assert decoder.trailing == b""


def test_oversize_is_refused_once_the_length_is_read_without_waiting_for_the_body() -> None:
    decoder = HeaderDecoder(Kind.CONNECT)
    event = decoder.feed(fixed(length=1000))
    assert isinstance(event, Invalid) and event.status is Status.HEADER_TOO_LARGE


@pytest.mark.parametrize("max_size", [FIXED_SIZE + len(V4_TARGET), 100, MAX_HEADER_SIZE])
def test_max_size_is_inclusive_and_configurable(max_size: int) -> None:
    exactly = padded(max_size)
    assert isinstance(HeaderDecoder(Kind.CONNECT, max_size=max_size).feed(exactly), ConnectRequest)
    event = HeaderDecoder(Kind.CONNECT, max_size=max_size).feed(padded(max_size + 2))
    assert isinstance(event, Invalid) and event.status is Status.HEADER_TOO_LARGE
    with pytest.raises(ValueError, match="at least 8"):
        HeaderDecoder(Kind.CONNECT, max_size=7)


def test_one_shot_decoders_raise_header_error() -> None:
    data = encode_connect(("10.0.0.7", 8080))
    with pytest.raises(HeaderError, match="incomplete header") as caught:
        decode_connect(data[:-1])
    assert caught.value.status is Status.BAD_HEADER
    with pytest.raises(HeaderError, match="1 bytes after the header"):
        decode_connect(data + b"x")
    with pytest.raises(HeaderError) as caught:
        decode_answer(fixed(Kind.ANSWER, version=3))
    assert caught.value.status is Status.UNSUPPORTED_VERSION


# --- incremental feeding -------------------------------------------------------------------


def test_byte_by_byte_feeding_and_trailing_bytes() -> None:
    data = encode_connect(("fd00::7", 443), ((0x81, b"abc"),))
    decoder = HeaderDecoder(Kind.CONNECT)
    for byte in data[:-1]:
        assert decoder.feed(bytes([byte])) == NeedMore()
        assert not decoder.done
    event = decoder.feed(data[-1:] + b"frames")
    assert event == ConnectRequest(("fd00::7", 443), ((0x81, b"abc"),))
    assert decoder.done and decoder.trailing == b"frames"
    assert decoder.feed(b" and more") == event  # kept for whoever takes over
    assert decoder.trailing == b"frames and more"
    assert decoder.received == len(data) + len(b"frames and more")


def test_each_error_is_found_byte_by_byte_too() -> None:
    for data in (fixed(version=2), fixed(length=4000), header(V4_TARGET + V4_TARGET)):
        whole = HeaderDecoder(Kind.CONNECT).feed(data)
        assert isinstance(whole, Invalid)
        decoder = HeaderDecoder(Kind.CONNECT)
        events = [decoder.feed(bytes([b])) for b in data]
        first = next(i for i, e in enumerate(events) if e != NeedMore())
        assert all(e == whole for e in events[first:])  # found once, then final


# --- property tests ------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
targets = st.tuples(st.one_of(ipv4, ipv6), st.integers(1, 65535))
extensions = st.lists(st.tuples(st.integers(0x80, 0xFF), st.binary(max_size=40)), max_size=5).map(
    tuple
)
cuts = st.lists(st.integers(0, 10_000), max_size=8)


@settings(max_examples=300)
@given(target=targets, ext=extensions, cuts=cuts, trailing=st.binary(max_size=20))
def test_connect_decodes_to_what_was_encoded_however_split(
    target: tuple[str, int], ext: tuple[tuple[int, bytes], ...], cuts: list[int], trailing: bytes
) -> None:
    data = encode_connect(target, ext)
    decoder = HeaderDecoder(Kind.CONNECT)
    event = feed_all(decoder, split(data + trailing, cuts))
    assert event == ConnectRequest(canonical(target), ext)
    assert decoder.trailing == trailing


@settings(max_examples=300)
@given(code=st.integers(0, 255), ext=extensions, cuts=cuts)
def test_answer_decodes_to_what_was_encoded_however_split(
    code: int, ext: tuple[tuple[int, bytes], ...], cuts: list[int]
) -> None:
    data = encode_answer(code, ext)
    assert feed_all(HeaderDecoder(Kind.ANSWER), split(data, cuts)) == Answer(code, ext)


@settings(max_examples=500)
@given(data=st.binary(max_size=600), kind=st.sampled_from(Kind), cuts=cuts)
def test_arbitrary_bytes_never_raise_and_split_points_do_not_matter(
    data: bytes, kind: Kind, cuts: list[int]
) -> None:
    whole = HeaderDecoder(kind).feed(data)
    assert isinstance(whole, NeedMore | ConnectRequest | Answer | Invalid)
    pieces = HeaderDecoder(kind)
    assert feed_all(pieces, split(data, cuts) or [b""]) == whole
    if isinstance(whole, Invalid):
        assert whole.status is not Status.OK and whole.detail


@settings(max_examples=300)
@given(
    body=st.lists(
        st.one_of(
            st.tuples(st.integers(0, 255), st.binary(max_size=30)),
            st.just((0x01, bytes([10, 0, 0, 7, 0, 80]))),
        ),
        max_size=6,
    )
)
def test_arbitrary_fields_decode_or_are_refused_never_raise(body: list[tuple[int, bytes]]) -> None:
    data = header(b"".join(field(k, v) for k, v in body))
    event = HeaderDecoder(Kind.CONNECT).feed(data)
    assert isinstance(event, ConnectRequest | Invalid)
    if isinstance(event, ConnectRequest):  # then re-encoding gives the same request
        assert decode_connect(encode_connect(event.target, event.extensions)) == event


@given(data=st.binary(max_size=600))
def test_one_shot_decoders_raise_only_header_error(data: bytes) -> None:
    for decode in (decode_connect, decode_answer):
        try:
            decode(data)
        except HeaderError:
            pass


# --- frames ----------------------------------------------------------------------------------


def test_frame_layout() -> None:
    assert encode_data(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_end() == b"\x01\x00\x00\x00"
    assert encode_data(b"") == b""


def test_frames_decode_to_data_then_end() -> None:
    decoder = FrameDecoder()
    stream = encode_data(b"hello ") + encode_data(b"world") + encode_end()
    assert decoder.feed(stream) == [StreamData(b"hello world"), StreamEnd()]
    assert decoder.ended


def test_frames_byte_by_byte() -> None:
    decoder = FrameDecoder()
    stream = encode_data(b"ab") + b"\x00\x00\x00\x00" + encode_data(b"c") + encode_end()
    events = [e for b in stream for e in decoder.feed(bytes([b]))]
    assert events == [StreamData(b"a"), StreamData(b"b"), StreamData(b"c"), StreamEnd()]


def test_large_data_is_split_into_several_frames() -> None:
    payload = bytes(range(256)) * (MAX_FRAME_PAYLOAD // 256 + 2)
    encoded = encode_data(payload)
    assert len(encoded) == len(payload) + 2 * 4
    assert FrameDecoder().feed(encoded) == [StreamData(payload)]


@pytest.mark.parametrize(
    ("stream", "detail"),
    [
        (b"\x02\x00\x00\x00", "unknown frame type 0x02"),
        (b"\x01\x00\x00\x01x", "END frame with a 1-byte payload"),
        (encode_end() + b"\x00", "1 bytes after the END frame"),
        (encode_end() + encode_data(b"late"), "bytes after the END frame"),
    ],
)
def test_frame_errors(stream: bytes, detail: str) -> None:
    decoder = FrameDecoder()
    events = decoder.feed(encode_data(b"ok") + stream)
    assert events[0] == StreamData(b"ok")  # what came before the error is delivered
    assert isinstance(events[-1], StreamInvalid) and detail in events[-1].detail
    assert decoder.feed(b"anything") == []  # and nothing after


@settings(max_examples=300)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=100), max_size=10),
    end=st.booleans(),
    cuts=cuts,
)
def test_frames_round_trip_however_split(chunks: list[bytes], end: bool, cuts: list[int]) -> None:
    stream = b"".join(encode_data(c) for c in chunks) + (encode_end() if end else b"")
    decoder = FrameDecoder()
    events = [e for piece in split(stream, cuts) for e in decoder.feed(piece)]
    data = b"".join(e.data for e in events if isinstance(e, StreamData))
    assert data == b"".join(chunks)
    assert [e for e in events if not isinstance(e, StreamData)] == ([StreamEnd()] if end else [])


@settings(max_examples=500)
@given(data=st.binary(max_size=300), cuts=cuts)
def test_arbitrary_bytes_never_make_the_frame_decoder_raise(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    events: list[StreamEvent] = []
    for piece in split(data, cuts):
        events += decoder.feed(piece)
    terminal = [e for e in events if not isinstance(e, StreamData)]
    assert len(terminal) <= 2  # at most END, then at most one error
    assert all(isinstance(e, StreamData) and e.data for e in events[: len(events) - len(terminal)])


# --- SNI: the other name on the wire (nodeagent.proxy.tls) -----------------------------------

names = st.from_regex(r"\A[a-z0-9]([a-z0-9\-]{0,20}[a-z0-9])?\Z")
dotted = st.lists(names, min_size=1, max_size=3).map(".".join)


def test_sni_encoding_is_as_documented() -> None:
    identity = SpiffeId.workload("default", "web")
    assert sni_for(identity) == "mnwhk43umvzc43dpmnqwyl3oomxwizlgmf2wy5bponqs653fmi.weft"
    assert identity_from_sni(sni_for(identity)) == identity


@settings(max_examples=300)
@given(namespace=names, service_account=dotted, trust_domain=dotted)
def test_sni_round_trips_and_is_dns_safe(
    namespace: str, service_account: str, trust_domain: str
) -> None:
    identity = SpiffeId.workload(namespace, service_account, trust_domain)
    name = sni_for(identity)
    assert identity_from_sni(name) == identity
    assert len(name) <= 253 and name.endswith(".weft")
    labels = name.split(".")
    assert all(0 < len(label) <= 63 for label in labels)
    assert all(set(label) <= set("abcdefghijklmnopqrstuvwxyz234567") for label in labels[:-1])


def test_identities_too_long_for_sni_say_so() -> None:
    identity = SpiffeId.workload("n" * 63, "s" * 100)
    with pytest.raises(SniError, match="too long to name in SNI"):
        sni_for(identity)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("example.com", "no .weft suffix"),
        (".weft", "empty or over-long label"),
        ("a" * 64 + ".weft", "empty or over-long label"),
        ("mnwhk43umvzc4.3dpmn.weft", "not in canonical form"),
        ("mnwhk43u!.weft", "does not decode to a SPIFFE ID"),
        ("mzxw6.weft", "does not decode to a SPIFFE ID"),  # "foo": no spiffe path
        (sni_for(SpiffeId.workload("default", "web")).upper(), "no .weft suffix"),
    ],
)
def test_names_that_are_not_weft_workloads(name: str, message: str) -> None:
    with pytest.raises(SniError, match=message):
        identity_from_sni(name)


def test_a_node_identity_is_not_a_tunnel_destination() -> None:
    node = SpiffeId.node("node-1")
    with pytest.raises(SniError, match="names a node"):
        identity_from_sni(sni_for(node))


@given(st.text(max_size=300))
def test_arbitrary_server_names_raise_only_sni_error(name: str) -> None:
    try:
        identity_from_sni(name)
    except SniError:
        pass
