"""`Session` and `Stream` (nodeagent.proxy.tunnel.session) alone, over a fake transport:
flow control both ways, fair sharing, the endings, violations and bounds. The socket
tests (tests/sockets/test_tunnel.py) run the same code over real TLS."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodeagent.proxy.tunnel.session import Session, Stream, StreamLost
from nodeagent.proxy.tunnel.wire import (
    Answered,
    ConnectRequest,
    Data,
    End,
    FrameDecoder,
    FrameEvent,
    FrameType,
    GoAway,
    Invalid,
    Open,
    Reset,
    Settings,
    Status,
    StreamReset,
    WindowUpdate,
    data_frames,
    encode_answer_payload,
    encode_open_payload,
    encode_preface,
    end_frame,
    frame,
    goaway_frame,
    reset_frame,
    window_frame,
)

WINDOW = 16 * 1024
SETTINGS = Settings(max_streams=4, window=WINDOW, max_frame=16 * 1024)
TARGET = ("10.0.0.9", 8080)


class FakeTransport(asyncio.Transport):
    """Collects what the session writes; its write buffer is what a test says."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.buffered = 0
        self.session: Session | None = None

    def write(self, data: Any) -> None:
        self.out += data

    def set_protocol(self, protocol: Any) -> None:
        self.session = protocol

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16 * 1024, 64 * 1024)

    def take(self) -> list[FrameEvent]:
        """The frames written since the last call (after the preface). The session
        sends what it queued at the end of a loop iteration; these tests run none, so
        that end is now."""
        if self.session is not None:
            self.session._write_out()
        data = bytes(self.out)
        self.out.clear()
        preface = encode_preface(SETTINGS)
        if data.startswith(preface):
            data = data[len(preface) :]
        return FrameDecoder(1 << 20).feed(data)


class App(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.resumed = 0

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


def peer_preface(session: Session, settings: Settings = SETTINGS) -> None:
    session.data_received(encode_preface(settings))


def pair(**kw: Any) -> tuple[Session, FakeTransport, list[tuple[Stream, Any]]]:
    """A server session with the peer's preface received; OPENs are collected."""
    opened: list[tuple[Stream, Any]] = []
    session = Session(
        label="test", local=SETTINGS, on_open=lambda s, r: opened.append((s, r)), **kw
    )
    transport = FakeTransport()
    transport.session = session
    session.connection_made(transport)
    peer_preface(session)
    transport.take()
    return session, transport, opened


def client(**kw: Any) -> tuple[Session, FakeTransport]:
    session = Session(label="test client", local=SETTINGS, **kw)
    transport = FakeTransport()
    transport.session = session
    session.connection_made(transport)
    peer_preface(session)
    transport.take()
    return session, transport


def open_stream(
    session: Session, transport: FakeTransport, opened: list[tuple[Stream, Any]], sid: int = 1
) -> tuple[Stream, App]:
    session.data_received(frame(FrameType.OPEN, sid, encode_open_payload(TARGET)))
    stream, request = opened[-1]
    assert request == ConnectRequest(TARGET)
    app = App()
    session.answer(stream, encode_answer_payload(Status.OK))
    stream.attach(app)
    assert transport.take() == [Answered(sid, decode_ok())]
    return stream, app


def decode_ok() -> Any:
    from nodeagent.proxy.tunnel.wire import decode_answer_payload

    return decode_answer_payload(encode_answer_payload(Status.OK))


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# --- sending ---------------------------------------------------------------------------------


async def test_writes_go_out_as_one_frame_while_there_is_window() -> None:
    session, transport, opened = pair()
    stream, _ = open_stream(session, transport, opened)
    stream.write(b"hello")
    assert transport.take() == [Data(1, b"hello")]
    assert stream.send_window == WINDOW - 5


async def test_a_sender_stops_at_the_window_and_credit_resumes_it() -> None:
    session, transport, opened = pair()
    stream, app = open_stream(session, transport, opened)
    stream.set_write_buffer_limits(high=8 * 1024, low=1024)
    stream.write(b"a" * (WINDOW + 10 * 1024))
    await settle()
    sent = [e for e in transport.take() if isinstance(e, Data)]
    assert sum(len(e.data) for e in sent) == WINDOW  # not a byte more
    assert stream.get_write_buffer_size() == 10 * 1024 and app.paused == 1
    session.data_received(window_frame(1, 9 * 1024 + 512))
    await settle()
    sent = [e for e in transport.take() if isinstance(e, Data)]
    assert sum(len(e.data) for e in sent) == 9 * 1024 + 512
    assert stream.get_write_buffer_size() == 512 and app.resumed == 1


async def test_waiting_streams_take_turns_one_frame_each() -> None:
    session, transport, opened = pair()
    a, _ = open_stream(session, transport, opened, 1)
    b, _ = open_stream(session, transport, opened, 2)
    session.data_received(window_frame(1, 3 * WINDOW) + window_frame(2, 3 * WINDOW))
    session.pause_writing()  # the TLS connection is full
    a.write(b"A" * 40_000)
    b.write(b"B" * 40_000)
    assert transport.take() == []
    session.resume_writing()
    await settle()
    order = [e.stream for e in transport.take() if isinstance(e, Data)]
    assert order[:6] == [1, 2, 1, 2, 1, 2]


async def test_write_eof_sends_end_after_what_waits() -> None:
    session, transport, opened = pair()
    stream, _ = open_stream(session, transport, opened)
    session.pause_writing()
    stream.write(b"tail")
    stream.write_eof()
    assert transport.take() == []
    session.resume_writing()
    await settle()
    assert transport.take() == [Data(1, b"tail"), End(1)]
    stream.write(b"after eof")  # dropped, as a socket would refuse it
    assert transport.take() == []


# --- receiving -------------------------------------------------------------------------------


async def test_credit_is_returned_once_half_the_window_is_consumed() -> None:
    session, transport, opened = pair()
    _, app = open_stream(session, transport, opened)
    session.data_received(data_frames(1, b"x" * (WINDOW // 2 - 1), 1 << 20))
    assert transport.take() == []
    session.data_received(data_frames(1, b"y", 1 << 20))
    assert transport.take() == [WindowUpdate(1, WINDOW // 2)]
    assert len(app.data) == WINDOW // 2


async def test_a_paused_reader_holds_at_most_a_window_and_returns_no_credit() -> None:
    session, transport, opened = pair()
    stream, app = open_stream(session, transport, opened)
    stream.pause_reading()
    session.data_received(data_frames(1, b"z" * WINDOW, 4096))
    assert app.data == b"" and transport.take() == []
    # One byte more than the window is the peer breaking the protocol.
    session.data_received(data_frames(1, b"!", 4096))
    assert isinstance(transport.take()[-1], GoAway) and transport.closed
    assert session.violation is not None and "beyond its window" in session.violation


async def test_resuming_delivers_what_was_held_then_credits_it() -> None:
    session, transport, opened = pair()
    stream, app = open_stream(session, transport, opened)
    stream.pause_reading()
    session.data_received(data_frames(1, b"q" * 1000, 4096) + end_frame(1))
    assert [app.eof] == [False]
    stream.resume_reading()
    assert app.data == b"q" * 1000 and app.eof
    assert transport.take() == [WindowUpdate(1, 1000)]


# --- endings ---------------------------------------------------------------------------------


async def test_close_sends_end_then_a_no_error_reset_if_the_peer_is_still_open() -> None:
    session, transport, opened = pair()
    stream, app = open_stream(session, transport, opened)
    stream.close()
    await settle()
    assert transport.take() == [End(1), StreamReset(1, Reset.NO_ERROR)]
    assert app.lost == [None] and session.streams == {}


async def test_both_ends_finished_closes_the_stream_quietly() -> None:
    session, transport, opened = pair()
    stream, app = open_stream(session, transport, opened)
    session.data_received(end_frame(1))
    assert app.eof
    stream.write_eof()
    await settle()
    assert transport.take() == [End(1)]
    assert app.lost == [None] and session.streams == {}


async def test_abort_resets_and_a_peer_reset_is_a_connection_reset() -> None:
    session, transport, opened = pair()
    a, app_a = open_stream(session, transport, opened, 1)
    _b, app_b = open_stream(session, transport, opened, 2)
    a.abort()
    session.data_received(reset_frame(2, Reset.CANCEL))
    await settle()
    assert transport.take() == [StreamReset(1, Reset.CANCEL)]
    assert app_a.lost == [None]
    assert isinstance(app_b.lost[0], StreamLost) and "CANCEL" in str(app_b.lost[0])
    # Frames still in flight for finished streams are dropped, not violations.
    session.data_received(data_frames(1, b"late", 1024) + end_frame(2))
    assert session.violation is None


async def test_losing_the_connection_resets_every_stream() -> None:
    session, transport, opened = pair()
    apps = [open_stream(session, transport, opened, i)[1] for i in (1, 2, 3)]
    session.connection_lost(None)
    await settle()
    assert all(isinstance(a.lost[0], ConnectionResetError) for a in apps)
    assert session.closed.done()


async def test_a_stream_beyond_the_limit_is_refused_unprocessed() -> None:
    session, transport, opened = pair()
    for sid in range(1, 5):
        open_stream(session, transport, opened, sid)
    session.data_received(frame(FrameType.OPEN, 5, encode_open_payload(TARGET)))
    assert transport.take() == [StreamReset(5, Reset.REFUSED)]
    assert len(opened) == 4 and session.streams_refused == 1


async def test_a_bad_open_reaches_the_handler_as_invalid() -> None:
    session, _, opened = pair()
    session.data_received(frame(FrameType.OPEN, 1, b""))
    ((_, request),) = opened
    assert isinstance(request, Invalid) and request.status is Status.BAD_HEADER


# --- the client side -------------------------------------------------------------------------


async def test_goaway_refuses_the_streams_the_server_never_took() -> None:
    session, transport = client()
    first, second = session.open(encode_open_payload(TARGET)), session.open(b"x")
    assert [type(e) for e in transport.take()] == [Open, Open]
    session.data_received(goaway_frame(1, Reset.NO_ERROR))
    assert session.draining and not session.usable
    assert second.answer is not None and second.answer.done()
    refused = second.answer.result()
    assert isinstance(refused, StreamLost) and refused.reason == Reset.REFUSED
    assert first.answer is not None and not first.answer.done()


async def test_the_server_may_not_open_streams() -> None:
    session, _transport = client()
    session.data_received(frame(FrameType.OPEN, 1, encode_open_payload(TARGET)))
    assert session.violation == "OPEN for stream 1 sent to the client"


# --- bounds ----------------------------------------------------------------------------------


async def test_a_held_session_sends_and_acts_on_nothing_before_start() -> None:
    opened: list[Any] = []
    session = Session(label="t", local=SETTINGS, on_open=lambda s, r: opened.append(r), held=True)
    transport = FakeTransport()
    transport.session = session
    session.connection_made(transport)
    session.data_received(
        encode_preface(SETTINGS) + frame(FrameType.OPEN, 1, encode_open_payload(TARGET))
    )
    assert transport.out == b"" and opened == []
    session.start()
    session._write_out()  # the end of the loop iteration
    assert transport.out.startswith(encode_preface(SETTINGS)) and len(opened) == 1


async def test_a_held_session_refuses_a_flood_before_start() -> None:
    session = Session(label="t", local=SETTINGS, on_open=lambda s, r: None, held=True)
    transport = FakeTransport()
    transport.session = session
    session.connection_made(transport)
    session.data_received(b"\0" * (300 * 1024))
    assert session.violation is not None and transport.closed


async def test_a_peer_that_provokes_frames_but_never_reads_is_dropped() -> None:
    session, transport, _ = pair(max_backlog=1024)
    session.pause_writing()
    transport.buffered = 64 * 1024 + 2048  # above high water plus the backlog
    session.data_received(frame(FrameType.OPEN, 1, encode_open_payload(TARGET)))
    session.data_received(frame(FrameType.OPEN, 2, b""))  # any frame we must answer
    for sid in range(3, 8):
        session.data_received(frame(FrameType.OPEN, sid, encode_open_payload(TARGET)))
    assert transport.aborted


async def test_rapid_resets_end_the_connection() -> None:
    session, transport, _opened = pair(rapid_resets=5)
    for sid in range(1, 5):
        session.data_received(frame(FrameType.OPEN, sid, encode_open_payload(TARGET)))
        session.data_received(reset_frame(sid, Reset.CANCEL))
    assert [session.violation] == [None]  # within the budget
    for sid in range(5, 12):
        session.data_received(frame(FrameType.OPEN, sid, encode_open_payload(TARGET)))
        session.data_received(reset_frame(sid, Reset.CANCEL))
    assert session.violation is not None and "rapid reset" in session.violation
    goaways = [e for e in transport.take() if isinstance(e, GoAway)]
    assert [g.reason for g in goaways] == [Reset.RAPID_RESET] and transport.closed


@pytest.mark.parametrize(
    ("wire", "detail"),
    [
        (data_frames(9, b"x", 1024), "DATA for stream 9, never opened"),
        (end_frame(9), "END for stream 9, never opened"),
        (frame(FrameType.ANSWER, 1, encode_answer_payload(Status.OK)), "sent to the server"),
    ],
)
async def test_frames_for_streams_never_opened_are_violations(wire: bytes, detail: str) -> None:
    session, transport, _ = pair()
    session.data_received(wire)
    assert session.violation is not None and detail in session.violation
    assert transport.closed
