"""The HTTP/2 server stage under arbitrary input (hypothesis, CI-sized): random frame
sequences and raw bytes after the preface never raise out of the protocol, never grow
its state past its limits, and end either in served streams or in a GOAWAY and a close.
No sockets: a transport that records what the proxy writes, and a forwarder that
answers every stream itself."""

from __future__ import annotations

import asyncio
from typing import Any

from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.h2server import H2Exchange, H2Server
from nodeagent.proxy.http.message import ResponseHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An HPACK block for GET / (static table: :method GET, :scheme http, :path /) plus
# :authority "a" (literal, indexed name 1).
GET = b"\x82\x86\x84\x41\x01a"


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class Answering:
    """Answers every stream at once, with a small body."""

    async def forward(self, exchange: Any) -> None:
        assert isinstance(exchange, H2Exchange)
        head = ResponseHead(200, b"", b"2", [(b"content-length", b"2")], True, 2)
        exchange.response_head(head)
        exchange.response_body(b"ok")
        exchange.response_end(head)


def _flag(f, flags) -> None:
    for flag in flags:
        f.flags.add(flag)


def _frame(kind: str, stream: int, data: bytes, flags: set[str]) -> bytes:
    sid = stream * 2 + 1  # client streams are odd
    f: Frame
    if kind == "headers":
        f = HeadersFrame(sid, data=GET if "valid" in flags else data)
        _flag(f, flags & {"END_STREAM", "END_HEADERS"})
    elif kind == "continuation":
        f = ContinuationFrame(sid, data=data)
        _flag(f, flags & {"END_HEADERS"})
    elif kind == "data":
        f = DataFrame(sid, data=data)
        _flag(f, flags & {"END_STREAM"})
    elif kind == "rst":
        f = RstStreamFrame(sid, error_code=len(data) % 14)
    elif kind == "settings":
        f = SettingsFrame(0, settings={0x4: len(data) * 1000, 0x3: len(data)})
    elif kind == "ping":
        f = PingFrame(0, opaque_data=(data + bytes(8))[:8])
    elif kind == "window":
        f = WindowUpdateFrame(sid if data else 0, window_increment=len(data) + 1)
    elif kind == "priority":
        f = PriorityFrame(sid, depends_on=0, stream_weight=len(data) % 256)
    else:
        f = GoAwayFrame(0, last_stream_id=sid)
    return f.serialize()


_kinds = st.sampled_from(
    ["headers"] * 4
    + ["data"] * 2
    + ["continuation", "rst", "settings", "ping", "window", "priority", "goaway"]
)
# Mostly well-formed requests (so streams get served and reset mid-way), sometimes not.
_flags = st.one_of(
    st.just({"valid", "END_HEADERS"}),
    st.just({"valid", "END_HEADERS", "END_STREAM"}),
    st.sets(st.sampled_from(["END_STREAM", "END_HEADERS", "valid"])),
)
frames = st.lists(st.tuples(_kinds, st.integers(0, 5), st.binary(max_size=64), _flags), max_size=40)


def _run(chunks: list[bytes]) -> tuple[H2Server, Transport]:
    async def go() -> tuple[H2Server, Transport]:
        server = H2Server(Answering(), label="fuzz", config=H2Config(max_concurrent_streams=4))
        transport = Transport()
        server.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            if transport.closed:
                break
            server.data_received(chunk)
            await asyncio.sleep(0)  # let the streams' tasks run
        await asyncio.sleep(0)
        assert len(server.exchanges) <= 4 and len(server.outboxes) <= 8
        for box in server.outboxes.values():
            assert box.pending <= 64 * 1024
        server.connection_lost(None)
        return server, transport

    return asyncio.run(go())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_random_frame_sequences_are_served_or_refused_with_goaway(seq):
    server, transport = _run([PREFACE] + [_frame(*f) for f in seq])
    if server.close_reason and "protocol error" in server.close_reason:
        # A connection error: the GOAWAY (type 7) went out before the close.
        assert b"\x07" in bytes(transport.out)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=10))
def test_arbitrary_bytes_after_the_preface_never_escape(chunks):
    _run([PREFACE, *chunks])


def test_a_valid_request_is_answered():
    head = HeadersFrame(1, data=GET)
    _flag(head, {"END_STREAM", "END_HEADERS"})
    server, transport = _run([PREFACE + SettingsFrame(0).serialize() + head.serialize()])
    assert server.requests == 1
    assert b"ok" in bytes(transport.out)
