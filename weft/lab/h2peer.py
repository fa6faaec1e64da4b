"""A small h2c client on the `h2` library, for the lab (`weft.lab.echoclient`: one
connection, many streams, to show per-stream balancing) and for the tests, which judge
the proxy from the outside with it (only the library is shared with the proxy)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

Headers = list[tuple[bytes, bytes]]


@dataclass
class Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: ErrorCodes | int | None = None


class H2Protocol(asyncio.Protocol):
    """An `h2` connection on asyncio, for a test or lab peer: subclasses handle the
    events (`events`); a protocol error sends h2's GOAWAY and closes."""

    client_side = True

    def __init__(self) -> None:
        config = H2Configuration(client_side=self.client_side, header_encoding=None)
        self.conn = H2Connection(config)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.events(events)
        self.flush()

    def events(self, events: Sequence[object]) -> None:
        raise NotImplementedError


class H2Peer(H2Protocol):
    """``await H2Peer.connect(port)``; ``await peer.request("GET", "/")``. ``window``:
    the stream window it advertises; ``read=False``: it never acknowledges DATA (a
    client that stops reading)."""

    def __init__(self, *, window: int | None = None, read: bool = True) -> None:
        super().__init__()
        self.window = window
        self.read = read
        self.streams: dict[int, tuple[Response, asyncio.Future[Response]]] = {}
        self.terminated: ConnectionTerminated | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", **kw: object) -> H2Peer:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(**kw), host, port)  # type: ignore[arg-type]
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.window is not None:
            self.conn.local_settings.update({SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        super().connection_made(transport)

    def events(self, events: Sequence[object]) -> None:
        for ev in events:
            if isinstance(ev, ResponseReceived):
                if ev.stream_id in self.streams:
                    r = self.streams[ev.stream_id][0]
                    hs = dict(ev.headers)
                    r.status = int(hs.pop(b":status"))
                    r.headers = hs
            elif isinstance(ev, DataReceived):
                self.received += len(ev.data)
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id][0].body += ev.data
                if self.read:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, TrailersReceived):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id][0].trailers = dict(ev.headers)
            elif isinstance(ev, StreamEnded):
                self._done(ev.stream_id)
            elif isinstance(ev, StreamReset):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id][0].reset = ev.error_code
                self._done(ev.stream_id)
            elif isinstance(ev, ConnectionTerminated):
                self.terminated = ev
                for sid in [s for s in self.streams if s > (ev.last_stream_id or 0)]:
                    self.streams[sid][0].reset = ErrorCodes.REFUSED_STREAM
                    self._done(sid)

    def _done(self, stream_id: int) -> None:
        got = self.streams.pop(stream_id, None)
        if got is not None and not got[1].done():
            got[1].set_result(got[0])

    def connection_lost(self, exc: Exception | None) -> None:
        for sid in list(self.streams):
            r = self.streams[sid][0]
            r.reset = r.reset if r.reset is not None else -1
            self._done(sid)
        if not self.lost.done():
            self.lost.set_result(None)

    def start(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        authority: str = "echo.default",
        end: bool = True,
    ) -> tuple[int, asyncio.Future[Response]]:
        sid = self.conn.get_next_available_stream_id()
        block = [
            (b":method", method.encode()), (b":scheme", b"http"),
            (b":authority", authority.encode()), (b":path", path.encode()), *headers,
        ]  # fmt: skip
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.streams[sid] = (Response(), fut)
        self.conn.send_headers(sid, block, end_stream=not body and end)
        if body:
            self._send_body(sid, body, end)
        self.flush()
        return sid, fut

    def _send_body(self, sid: int, body: bytes, end: bool) -> None:
        # Respects flow control: what does not fit waits for WINDOW_UPDATE (polled).
        async def pump() -> None:
            view = memoryview(body)
            while view:
                room = min(self.conn.local_flow_control_window(sid), 16384)
                if room <= 0:
                    await asyncio.sleep(0.005)
                    continue
                self.conn.send_data(sid, bytes(view[:room]))
                view = view[room:]
                self.flush()
            if end:
                self.conn.end_stream(sid)
                self.flush()

        asyncio.get_running_loop().create_task(pump())

    async def request(self, method: str, path: str, **kw: object) -> Response:
        _, fut = self.start(method, path, **kw)  # type: ignore[arg-type]
        return await asyncio.wait_for(fut, 30)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
