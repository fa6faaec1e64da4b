"""`FrameScanner`: the inbound HTTP/2 observer's frame walk gives the same frames however
the byte stream is cut into reads, holds only inspected frames, and refuses what cannot
be HTTP/2."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.proxy.http.observe_h2 import (
    INSPECTED,
    MAX_INSPECTED_FRAME,
    PREFACE,
    FrameScanner,
    H2ObserveError,
)


def _frame(kind: int, sid: int, size: int, flags: bool) -> bytes:
    payload = bytes(i % 251 for i in range(size))
    f: Frame
    if kind == 0:
        f = DataFrame(sid, payload, flags={"END_STREAM"} if flags else set())
    elif kind == 1:
        f = HeadersFrame(sid, payload, flags={"END_HEADERS"} if flags else set())
    elif kind == 3:
        f = RstStreamFrame(sid, error_code=size)
    elif kind == 4:
        f = SettingsFrame(0, settings={1: size, 4: 65535})
    elif kind == 6:
        f = PingFrame(0, payload[:8].ljust(8, b"\0"))
    elif kind == 7:
        f = GoAwayFrame(0, last_stream_id=sid, additional_data=payload)
    elif kind == 8:
        f = WindowUpdateFrame(sid, window_increment=size + 1)
    else:
        f = ContinuationFrame(sid, payload)
    return f.serialize()


frames = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 3, 4, 6, 7, 8, 9]),
        st.integers(1, 99),
        st.integers(0, 40_000),
        st.booleans(),
    ),
    max_size=12,
)


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[int, int, int, object]] = []

    def frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.events.append((ftype, flags, sid, payload))

    def other(self, ftype: int, flags: int, sid: int, length: int) -> None:
        self.events.append((ftype, flags, sid, length))


def _expected(stream: bytes) -> list[tuple[int, int, int, object]]:
    out: list[tuple[int, int, int, object]] = []
    pos = 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        ftype, flags = stream[pos + 3], stream[pos + 4]
        sid = int.from_bytes(stream[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        payload = stream[pos + 9 : pos + 9 + length]
        out.append((ftype, flags, sid, payload if ftype in INSPECTED else length))
        pos += 9 + length
    return out


@given(frames, st.lists(st.integers(1, 70_000), max_size=30), st.booleans())
def test_any_cut_gives_the_same_frames(specs, cuts, preface):
    stream = b"".join(_frame(*spec) for spec in specs)
    data = (PREFACE if preface else b"") + stream
    seen = Seen()
    scanner = FrameScanner(seen.frame, seen.other, preface=preface)
    pos = 0
    for cut in cuts:
        scanner.feed(data[pos : pos + cut])
        pos += cut
    if pos < len(data):
        scanner.feed(data[pos:])
    assert seen.events == _expected(stream)


def test_a_wrong_preface_is_refused_even_when_cut():
    scanner = FrameScanner(Seen().frame, Seen().other, preface=True)
    scanner.feed(PREFACE[:10])
    with pytest.raises(H2ObserveError, match="preface"):
        scanner.feed(b"GET / HTTP/1.1\r\n")


def test_an_inspected_frame_too_large_to_hold_is_refused_from_its_header():
    header = (MAX_INSPECTED_FRAME + 1).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big")
    scanner = FrameScanner(Seen().frame, Seen().other, preface=False)
    scanner.feed(header[:5])
    with pytest.raises(H2ObserveError, match="HEADERS frame of"):
        scanner.feed(header[5:])


def test_a_large_data_frame_is_passed_by_length_not_held():
    seen = Seen()
    scanner = FrameScanner(seen.frame, seen.other, preface=False)
    header = (10_000_000).to_bytes(3, "big") + b"\x00\x01" + (1).to_bytes(4, "big")
    scanner.feed(header + b"x" * 100)
    for _ in range(99):
        scanner.feed(b"x" * 100_000)
    assert seen.events == [(0, 1, 1, 10_000_000)]
    scanner.feed(b"x" * 99_900 + _frame(6, 0, 8, False))
    assert seen.events[-1][0] == 6
