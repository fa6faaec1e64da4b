"""The agent <-> worker channel: typed frames over one connected ``AF_UNIX`` stream.

The agent makes a ``socketpair`` per worker and the worker inherits its end as a
descriptor (``pass_fds``): nobody else can reach the channel, no path names it.  A frame
is a 5-byte header — body length (u32, big-endian) and kind (u8) — then the body.
`FrameReader` is the sans-I/O part; `Channel` puts it on asyncio streams.

What flows (see `Kind`): the agent sends the configuration, discovery messages exactly
as it applied them (`weft.meshwire` payloads), which certificate files serve which
identity, the node's addresses, tap on/off and drain; a worker sends "listening",
periodic counters, its metrics text when asked, and tap events while a tap runs.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from collections import deque
from collections.abc import Iterator

_HEAD = struct.Struct("!IB")
MAX_BODY = 256 * 1024 * 1024
"""The largest frame: a discovery snapshot of a big mesh (`weft.meshwire.MAX_FRAME`)."""
MAX_BUFFERED = 512 * 1024 * 1024
"""Bytes the agent may have queued toward one worker; past it the worker is taken for
wedged (it stopped reading) and replaced, rather than let the agent's memory grow."""


class ChannelError(Exception):
    """The peer broke the framing or went away."""


class Kind(enum.IntEnum):
    # agent -> worker
    CONFIG = 1
    """The worker's `AgentConfig`, pickled: the channel is private between parent and
    child, so pickle's trust in its input is the parent's own."""
    MESH = 2
    """One discovery message, as the agent applied it (a `weft.meshwire` payload)."""
    CERTS = 3
    """JSON: the trust bundle and, per identity, the files of its key and chain."""
    ADDRS = 4
    """JSON: the node's own addresses."""
    TAP = 5
    """``1``: forward tap events; ``0``: stop."""
    DRAIN = 6
    """Stop accepting, let connections finish (drain seconds), exit."""
    SCRAPE = 7
    """JSON ``{"id": n}``: send the metrics text."""
    # worker -> agent
    LISTENING = 8
    """JSON ``{"pid": n}``: the worker's listeners joined the ports' groups."""
    METRICS = 9
    """u32 request id, then the Prometheus text."""
    STATS = 10
    """JSON: the worker's counters for ``/debug/state``."""
    TAP_EVENTS = 11
    """JSON list of tap events."""


def encode(kind: Kind, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ChannelError(f"{kind.name} frame of {len(body)} bytes exceeds {MAX_BODY}")
    return _HEAD.pack(len(body), kind) + body


class FrameReader:
    """Sans-I/O: bytes in, (kind, body) frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Kind, bytes]]:
        self._buf += data
        while len(self._buf) >= _HEAD.size:
            length, code = _HEAD.unpack_from(self._buf)
            if length > MAX_BODY:
                raise ChannelError(f"frame of {length} bytes announced (at most {MAX_BODY})")
            try:
                kind = Kind(code)
            except ValueError:
                raise ChannelError(f"unknown frame kind {code}") from None
            end = _HEAD.size + length
            if len(self._buf) < end:
                return
            body = bytes(self._buf[_HEAD.size : end])
            del self._buf[:end]
            yield kind, body


class Channel:
    """One end of the channel on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader()
        self._ready: deque[tuple[Kind, bytes]] = deque()

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, kind: Kind, body: bytes = b"") -> None:
        """Queue a frame (never blocks). `ChannelError` if the peer has stopped reading
        for so long that `MAX_BUFFERED` bytes wait, or has gone."""
        if self._writer.is_closing():
            raise ChannelError("the channel is closed")
        if self._writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            raise ChannelError(f"the peer has not read {MAX_BUFFERED} queued bytes")
        self._writer.write(encode(kind, body))

    async def drain(self) -> None:
        await self._writer.drain()

    async def recv(self) -> tuple[Kind, bytes]:
        """The next frame; `ChannelError` when the peer closed or broke the framing."""
        while not self._ready:
            data = await self._reader.read(1 << 20)
            if not data:
                raise ChannelError("the peer closed the channel")
            self._ready.extend(self._frames.feed(data))
        return self._ready.popleft()

    def close(self) -> None:
        self._writer.close()
