"""The tunnel's wire format, version 2 (nodeagent.proxy.tunnel.wire), in memory.

The preface, OPEN and ANSWER payloads, frames, every refusal the decoders can produce,
byte-by-byte feeding, and property tests: arbitrary bytes never make a decoder raise,
and decoding an encoding gives back what was encoded however the bytes are split. The
SNI that names the destination workload in the ClientHello (nodeagent.proxy.tls) is on
the wire too and is tested at the end.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.tls import SniError, identity_from_sni, sni_for
from nodeagent.proxy.tunnel.wire import (
    MAGIC,
    MAX_HEADER_SIZE,
    VERSION,
    Answer,
    Answered,
    ConnectRequest,
    Data,
    End,
    FrameDecoder,
    FrameEvent,
    FrameType,
    GoAway,
    HeaderError,
    Invalid,
    Kind,
    NeedMore,
    Open,
    Preface,
    PrefaceDecoder,
    Reset,
    Settings,
    Status,
    StreamReset,
    Violation,
    WindowUpdate,
    data_frames,
    decode_answer_payload,
    decode_open_payload,
    encode_answer_payload,
    encode_open_payload,
    encode_preface,
    end_frame,
    frame,
    goaway_frame,
    reset_frame,
    window_frame,
)
from weft.identity import SpiffeId

MAX_FRAME = 64 * 1024


def field(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def canonical(target: tuple[str, int]) -> tuple[str, int]:
    ip = ipaddress.ip_address(target[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), target[1]


def decode_all(data: bytes, cuts: list[int] | None = None) -> list[FrameEvent]:
    decoder = FrameDecoder(MAX_FRAME)
    events: list[FrameEvent] = []
    for chunk in split(data, cuts or []):
        events += decoder.feed(chunk)
    assert decoder.buffered < FRAME_MAX_HELD
    return events


FRAME_MAX_HELD = MAX_FRAME + 8


# --- the preface -----------------------------------------------------------------------------


def test_preface_layout_is_as_documented() -> None:
    data = encode_preface(Settings(max_streams=100, window=256 * 1024, max_frame=64 * 1024))
    assert data[:8] == MAGIC + bytes((VERSION, Kind.SETTINGS)) + (18).to_bytes(2, "big")
    assert data[8:] == (
        field(0x04, (100).to_bytes(4, "big"))
        + field(0x05, (256 * 1024).to_bytes(4, "big"))
        + field(0x06, (64 * 1024).to_bytes(4, "big"))
    )


@given(
    streams=st.integers(1, 65536),
    window=st.integers(16 * 1024, 16 << 20),
    max_frame=st.integers(16 * 1024, (1 << 24) - 1),
    ext=st.lists(st.tuples(st.integers(0x80, 0xFF), st.binary(max_size=40)), max_size=3),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    trailing=st.binary(max_size=20),
)
def test_preface_round_trips_however_split(
    streams: int, window: int, max_frame: int, ext: list[tuple[int, bytes]],
    cuts: list[int], trailing: bytes,
) -> None:  # fmt: skip
    settings_ = Settings(streams, window, max_frame)
    data = encode_preface(settings_, tuple(ext)) + trailing
    decoder = PrefaceDecoder()
    event: object = NeedMore()
    rest = b""
    for chunk in split(data, cuts):
        finished = decoder.done
        if finished:
            rest += chunk
            continue
        event = decoder.feed(chunk)
        if event != NeedMore():
            rest += decoder.trailing
    assert event == Preface(settings_, tuple(ext))
    assert rest == trailing


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        (b"X", Status.BAD_HEADER, "not a Weft tunnel: starts with b'X'"),
        (MAGIC[:3] + b"X", Status.BAD_HEADER, "starts with b'WEFX'"),
        (MAGIC + b"\x01", Status.UNSUPPORTED_VERSION, "tunnel version 1"),
        (MAGIC + bytes((VERSION, Kind.CONNECT)), Status.BAD_HEADER, "expected a SETTINGS"),
        (MAGIC + bytes((VERSION, Kind.SETTINGS)) + (600).to_bytes(2, "big"),
         Status.HEADER_TOO_LARGE, "preface declares 608 bytes"),
        (MAGIC + bytes((VERSION, Kind.SETTINGS, 0, 0)), Status.BAD_HEADER, "preface lacks"),
        (MAGIC + bytes((VERSION, Kind.SETTINGS, 0, 6)) + field(0x01, b"\0" * 4),
         Status.BAD_HEADER, "a SETTINGS cannot carry TARGET_V4"),
        (MAGIC + bytes((VERSION, Kind.SETTINGS, 0, 3)) + bytes((0x04, 9, 0)),
         Status.BAD_HEADER, "declares 9 bytes, only 1 present"),
        (MAGIC + bytes((VERSION, Kind.SETTINGS, 0, 2)) + bytes((0x40, 0)),
         Status.BAD_HEADER, "unknown critical field 0x40"),
    ],
)  # fmt: skip
def test_preface_refusals(data: bytes, status: Status, detail: str) -> None:
    event = PrefaceDecoder().feed(data)
    assert isinstance(event, Invalid) and event.status is status
    assert detail in event.detail


def test_the_magic_is_refused_at_the_first_wrong_byte() -> None:
    decoder = PrefaceDecoder()
    assert decoder.feed(b"W") == NeedMore()
    event = decoder.feed(b"X")
    assert isinstance(event, Invalid) and "b'WX'" in event.detail
    assert decoder.feed(b"anything") == event  # and stays refused


@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_arbitrary_bytes_never_make_the_preface_decoder_raise(data: bytes, cuts: list[int]) -> None:
    decoder = PrefaceDecoder()
    for chunk in split(data, cuts):
        decoder.feed(chunk)


def test_settings_are_range_checked() -> None:
    with pytest.raises(ValueError, match=r"max_streams must be 1\.\.65536, got 0"):
        Settings(max_streams=0)
    with pytest.raises(ValueError, match="window must be 16 KiB"):
        Settings(window=100)
    with pytest.raises(ValueError, match="max_frame must be 16 KiB"):
        Settings(max_frame=1 << 24)


# --- OPEN and ANSWER payloads ---------------------------------------------------------------

targets = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
)
extensions = st.lists(st.tuples(st.integers(0x80, 0xFF), st.binary(max_size=50)), max_size=4)


def test_open_layout_is_the_version_1_target_field() -> None:
    assert encode_open_payload(("10.0.0.7", 8080)) == field(
        0x01, bytes([10, 0, 0, 7]) + (8080).to_bytes(2, "big")
    )


@given(target=targets, ext=extensions)
def test_open_round_trip(target: tuple[str, int], ext: list[tuple[int, bytes]]) -> None:
    got = decode_open_payload(encode_open_payload(target, tuple(ext)))
    assert got == ConnectRequest(canonical(target), tuple(ext))


@pytest.mark.parametrize("status", list(Status))
def test_answer_round_trip(status: Status) -> None:
    answer = decode_answer_payload(encode_answer_payload(status))
    assert (
        isinstance(answer, Answer)
        and answer.status is status
        and answer.ok == (status is Status.OK)
    )


def test_an_answer_code_from_a_newer_agent_is_a_refusal_not_garbage() -> None:
    answer = decode_answer_payload(encode_answer_payload(0x7E))
    assert isinstance(answer, Answer) and answer.status is None and not answer.ok


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"", Status.BAD_HEADER, "exactly one target field, got 0"),
        (field(0x01, b"\0" * 6) + field(0x02, b"\0" * 18), Status.BAD_HEADER, "got 2"),
        (field(0x01, bytes([10, 0, 0, 1, 0, 0])), Status.BAD_HEADER, "has port 0"),
        (field(0x01, b"\0" * 5), Status.BAD_HEADER, "must be 6 bytes"),
        (field(0x03, b"\0"), Status.BAD_HEADER, "a CONNECT cannot carry STATUS"),
        (field(0x01, b"\0" * 6) * 2, Status.BAD_HEADER, "appears twice"),
        (b"\x80" * (MAX_HEADER_SIZE + 1), Status.HEADER_TOO_LARGE, "at most 512"),
    ],
)
def test_open_refusals(body: bytes, status: Status, detail: str) -> None:
    event = decode_open_payload(body)
    assert isinstance(event, Invalid) and event.status is status and detail in event.detail


def test_answer_refusals() -> None:
    event = decode_answer_payload(b"")
    assert isinstance(event, Invalid) and "needs a STATUS" in event.detail
    event = decode_answer_payload(field(0x01, b"\0" * 6))
    assert isinstance(event, Invalid) and "cannot carry TARGET_V4" in event.detail


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (("10.0.0.1", 0), "port must be 1..65535"),
        (("web", 80), "must be an IP address"),
        (("fe80::1%eth0", 80), "has a zone"),
    ],
)
def test_unencodable_targets(target: tuple[str, int], message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        encode_open_payload(target)


def test_retryable_statuses() -> None:
    assert {s for s in Status if s.retryable} == {
        Status.TARGET_NOT_ON_NODE,
        Status.TARGET_UNREACHABLE,
        Status.TARGET_IDENTITY_MISMATCH,
        Status.UNKNOWN_TARGET,
    }


@given(body=st.binary(max_size=600))
def test_arbitrary_payloads_decode_or_are_refused_never_raise(body: bytes) -> None:
    assert isinstance(decode_open_payload(body), (ConnectRequest, Invalid))
    assert isinstance(decode_answer_payload(body), (Answer, Invalid))


# --- frames ------------------------------------------------------------------------------------


def test_frame_layout_is_as_documented() -> None:
    assert end_frame(7) == struct.pack("!II", FrameType.END << 24, 7)
    assert reset_frame(7, Reset.CANCEL) == struct.pack("!II", FrameType.RESET << 24 | 1, 7) + b"\1"
    assert window_frame(3, 1000) == struct.pack("!III", FrameType.WINDOW << 24 | 4, 3, 1000)
    assert goaway_frame(9, Reset.NO_ERROR) == struct.pack("!IIIB", FrameType.GOAWAY << 24 | 5,
                                                          0, 9, 0)  # fmt: skip
    assert data_frames(1, b"hi", MAX_FRAME) == struct.pack("!II", 2, 1) + b"hi"


def test_every_frame_decodes_to_its_event() -> None:
    wire = (
        frame(FrameType.OPEN, 1, encode_open_payload(("10.0.0.1", 80)))
        + frame(FrameType.ANSWER, 1, encode_answer_payload(Status.OK))
        + data_frames(1, b"abc", MAX_FRAME)
        + window_frame(1, 3)
        + end_frame(1)
        + reset_frame(1, Reset.CANCEL)
        + goaway_frame(1, Reset.NO_ERROR)
    )
    assert decode_all(wire) == [
        Open(1, ConnectRequest(("10.0.0.1", 80))),
        Answered(1, Answer(Status.OK)),
        Data(1, b"abc"),
        WindowUpdate(1, 3),
        End(1),
        StreamReset(1, Reset.CANCEL),
        GoAway(1, Reset.NO_ERROR),
    ]


def test_large_data_is_split_at_max_frame() -> None:
    data = bytes(range(256)) * 1000  # 256,000 bytes
    events = decode_all(data_frames(5, data, 60_000))
    assert [len(e.data) for e in events if isinstance(e, Data)] == [60_000] * 4 + [16_000]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == data


def test_a_bad_open_payload_is_a_stream_event_not_a_violation() -> None:
    (event,) = decode_all(frame(FrameType.OPEN, 3, b""))
    assert isinstance(event, Open) and isinstance(event.request, Invalid)


def test_optional_frame_types_are_skipped() -> None:
    assert decode_all(frame(0x90, 0, b"future") + end_frame(1)) == [End(1)]


@pytest.mark.parametrize(
    ("wire", "detail"),
    [
        (struct.pack("!II", MAX_FRAME + 1, 1), f"a {MAX_FRAME + 1}-byte frame; at most"),
        (data_frames(0, b"x", MAX_FRAME), "DATA on stream 0"),
        (end_frame(0), "END on stream 0"),
        (frame(FrameType.GOAWAY, 3, b"\0" * 5), "GOAWAY on stream 3"),
        (frame(FrameType.END, 1, b"x"), "END with a 1-byte payload"),
        (frame(FrameType.RESET, 1, b""), "RESET with a 0-byte payload"),
        (frame(FrameType.WINDOW, 1, b"\0" * 4), "WINDOW of 0 on stream 1"),
        (frame(0x42, 1, b""), "unknown frame type 0x42"),
    ],
)
def test_frame_violations(wire: bytes, detail: str) -> None:
    events = decode_all(wire + end_frame(1))
    assert isinstance(events[-1], Violation) and detail in events[-1].detail
    assert len(events) == 1  # nothing after the violation is decoded


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    (event,) = decoder.feed(struct.pack("!II", 1 << 20, 1))
    assert isinstance(event, Violation)
    assert decoder.feed(b"more") == []


stream_frames = st.one_of(
    st.builds(lambda s, d: data_frames(s, d, 1000), st.integers(1, 9), st.binary(max_size=3000)),
    st.builds(end_frame, st.integers(1, 9)),
    st.builds(reset_frame, st.integers(1, 9), st.sampled_from(Reset)),
    st.builds(window_frame, st.integers(1, 9), st.integers(1, 1 << 31)),
)


@given(
    frames=st.lists(stream_frames, max_size=12), cuts=st.lists(st.integers(0, 4000), max_size=10)
)
@settings(max_examples=200)
def test_frames_decode_the_same_however_split(frames: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frames)
    whole = decode_all(wire)
    assert decode_all(wire, cuts) == whole
    assert not any(isinstance(e, Violation) for e in whole)


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_arbitrary_bytes_never_make_the_frame_decoder_raise(data: bytes, cuts: list[int]) -> None:
    events = decode_all(data, cuts)
    assert all(not isinstance(e, Violation) for e in events[:-1])


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


def test_h2_opens_say_the_client_judges_their_requests() -> None:
    from nodeagent.proxy.tunnel.wire import (
        judges_requests,
        protocol_extension,
        requested_protocol,
    )

    h2, h1 = protocol_extension("h2"), protocol_extension("http/1.1")
    assert requested_protocol(h2) == "h2" and judges_requests(h2)
    assert requested_protocol(h1) == "http/1.1" and not judges_requests(h1)
    assert not judges_requests(((0x80, b"h2"),))  # an older client node: opaque to policy
