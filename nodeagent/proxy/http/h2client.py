"""Upstream HTTP/2 connections and their pool.

`H2Client` is one upstream connection — a tunnel stream to another node's proxy (which
serves it with its `H2Server`), or h2c to a pod — carrying many exchanges at once, one
stream each. It sends a stream's request head, body and trailers (under the upstream's
flow control, acknowledging the client's bytes only as they leave), and passes the
response into the exchange. A stream the upstream refused (RST_STREAM REFUSED_STREAM, or
above the last stream id of its GOAWAY) was not processed: `UpstreamLost.refused`, so
the forwarder may send it elsewhere. After a GOAWAY the connection takes no new streams
and closes when its last one ends.

`H2Pool` keeps connections per ``(source identity, endpoint)``, as the HTTP/1.1 pool
does, but shares them: a request takes any connection with a free stream, concurrent
requests wait for one dial instead of each opening their own, and a connection with no
stream for ``idle_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

from nodeagent.proxy.http.client import UpstreamLost
from nodeagent.proxy.http.h2conn import H2Config, H2Endpoint, Headers, Outbox
from nodeagent.proxy.http.h2server import response_head

if TYPE_CHECKING:
    from nodeagent.proxy.http.h2server import H2Exchange

log = logging.getLogger("weft.proxy.http")


class _Stream:
    """One stream of an `H2Client`: the exchange it carries (`H2Upstream`)."""

    __slots__ = ("client", "done", "exchange", "stream_id", "trailers")

    def __init__(self, client: H2Client, stream_id: int, exchange: H2Exchange) -> None:
        self.client = client
        self.stream_id = stream_id
        self.exchange = exchange
        self.trailers: Headers | None = None
        self.done: asyncio.Future[None] = client._loop.create_future()

    def write_body(self, data: bytes) -> None:
        self.client.send_data(self.stream_id, data)

    def end_body(self, trailers: Headers | None) -> None:
        self.client.end_stream(self.stream_id, trailers)

    def response_acked(self, n: int) -> None:
        self.client.ack(self.stream_id, n)


class H2Client(H2Endpoint):
    client_side = True

    def __init__(self, key: Hashable, *, label: str, config: H2Config | None = None) -> None:
        super().__init__(label=label, config=config)
        self.key = key
        self.streams: dict[int, _Stream] = {}
        self.pool: H2Pool | None = None
        self.draining = False
        self.exchanges = 0
        self.idle_since = self._loop.time()
        # The peer's SETTINGS_MAX_CONCURRENT_STREAMS, kept here: reading it through h2's
        # settings object on every pick was ~3 % of an h2 profile.
        self.max_streams = self.h2.remote_settings.max_concurrent_streams

    @property
    def streams_open(self) -> int:
        return len(self.streams)

    @property
    def available(self) -> bool:
        """Whether a new stream may start on this connection now."""
        return (
            not self.closing
            and not self.draining
            and self.transport is not None
            and len(self.streams) < self.max_streams
        )

    # --- sending an exchange ---------------------------------------------------------

    def send(self, exchange: H2Exchange) -> asyncio.Future[None]:
        """Open a stream for ``exchange``; the future resolves when its response is
        complete, or fails with `UpstreamLost`."""
        head = exchange.head
        stream_id = self.h2.get_next_available_stream_id()
        authority = head.pseudo_authority
        headers: Headers = [
            (b":method", head.method),
            (b":scheme", head.scheme),
            *(((b":authority", authority),) if authority else ()),
            (b":path", head.target),
            *head.headers,
        ]
        ends = (
            exchange.request_complete and not exchange.request_trailers and not exchange.held_body
        )
        stream = _Stream(self, stream_id, exchange)
        try:
            self.h2.send_headers(stream_id, headers, end_stream=ends)
        except ProtocolError as exc:
            raise UpstreamLost(f"request head not sendable ({exc})", response_started=False,
                               refused=True) from None  # fmt: skip
        self.exchanges += 1
        self.streams[stream_id] = stream
        box = self.outboxes[stream_id] = Outbox(ack=exchange.request_acked)
        if ends:
            box.end = box.done = True
            del self.outboxes[stream_id]
        exchange.bind(stream)
        self._schedule_flush()
        return stream.done

    def cancel(self, exchange: H2Exchange) -> None:
        """The exchange is abandoned (its client reset it, or the proxy shuts down):
        reset its stream, not the connection other streams share."""
        stream = exchange._upstream
        if isinstance(stream, _Stream) and self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            self.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
            self._settle()

    # --- events ----------------------------------------------------------------------

    def _event(self, event: object, now: float) -> bool:
        kind = type(event)
        if kind is ResponseReceived:
            assert isinstance(event, ResponseReceived)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                head = response_head(list(event.headers or ()))
                stream.exchange.response_head(head, ends=event.stream_ended is not None)
        elif kind is DataReceived:
            assert isinstance(event, DataReceived)
            data = event.data or b""
            if not data and event.stream_ended is None and self.empty_data(now):
                return True
            length = event.flow_controlled_length or 0
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.ack(event.stream_id, length)
                return False
            if length > len(data):
                self.ack(event.stream_id, length - len(data))
            if data:
                stream.exchange.response_body(data)
        elif kind is TrailersReceived:
            assert isinstance(event, TrailersReceived)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers or ())
        elif kind is StreamEnded:
            assert isinstance(event, StreamEnded)
            self._ended(event.stream_id)
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            self._reset(event.stream_id, event.error_code)
        elif kind is WindowUpdated:
            assert isinstance(event, WindowUpdated)
            self.window_opened(event.stream_id or 0)
        elif kind is ConnectionTerminated:
            assert isinstance(event, ConnectionTerminated)
            self._goaway(event.last_stream_id or 0, event.error_code)
        elif kind in (PingReceived, RemoteSettingsChanged, UnknownFrameReceived):
            if self.control_frame(kind.__name__, now):
                return True
            if kind is RemoteSettingsChanged:
                self.max_streams = self.h2.remote_settings.max_concurrent_streams
                self.window_opened(0)
        return self.closing

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        exchange = stream.exchange
        head = exchange.response or exchange.discarded  # discarded: swallowed for a retry
        if head is None:
            lost = UpstreamLost(
                "the stream ended without a response", response_started=False, bad_response=True
            )
            self._finish(stream, lost)
            return
        head.trailers = stream.trailers or []
        exchange.response_end(head)
        self._finish(stream, None)

    def _reset(self, stream_id: int, code: ErrorCodes | int | None) -> None:
        stream = self.streams.pop(stream_id, None)
        self.outboxes.pop(stream_id, None)
        if stream is None:
            return
        started = stream.exchange.response_started
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        self._finish(
            stream,
            UpstreamLost(
                f"the upstream reset the stream ({name})",
                response_started=started,
                refused=code == ErrorCodes.REFUSED_STREAM and not started,
                code=int(code) if code is not None else None,
            ),
        )

    def _goaway(self, last_stream_id: int, code: ErrorCodes | int | None) -> None:
        self.draining = True
        if self.pool is not None:
            self.pool.discard(self)
        for stream_id in [s for s in self.streams if s > last_stream_id]:
            stream = self.streams.pop(stream_id)
            self.outboxes.pop(stream_id, None)
            self._finish(stream, UpstreamLost(f"the upstream sent GOAWAY ({code})",
                                              response_started=False, refused=True))  # fmt: skip
        self._settle()

    def _finish(self, stream: _Stream, error: UpstreamLost | None) -> None:
        if not stream.done.done():
            if error is None:
                stream.done.set_result(None)
            else:
                stream.done.set_exception(error)
        self._settle()

    def _settle(self) -> None:
        if self.streams:
            return
        self.idle_since = self._loop.time()
        if self.draining and not self.closing:
            self._close("drained after GOAWAY", goaway=False)

    def _lost(self) -> None:
        if self.pool is not None:
            self.pool.discard(self)
        for stream in list(self.streams.values()):
            error = UpstreamLost(
                f"the upstream connection was lost ({self.close_reason})",
                response_started=stream.exchange.response_started,
            )
            if not stream.done.done():
                stream.done.set_exception(error)
        self.streams.clear()
        self.outboxes.clear()

    def close(self) -> None:
        self._close("closed by the pool")

    def drain(self) -> None:
        """No new streams; close when the open ones are done."""
        self.draining = True
        if self.pool is not None:
            self.pool.discard(self)
        self._settle()


Dial = Callable[[Callable[[], asyncio.Protocol]], Awaitable[object]]


class H2Pool:
    def __init__(self, *, config: H2Config | None = None, idle_timeout: float = 60.0) -> None:
        self.config = config or H2Config(idle_timeout=idle_timeout)
        self.idle_timeout = idle_timeout
        self._conns: dict[Hashable, list[H2Client]] = {}
        self._opening: dict[Hashable, asyncio.Future[H2Client]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.opened = 0
        self.reused = 0

    @property
    def connections(self) -> int:
        return sum(map(len, self._conns.values()))

    @property
    def idle(self) -> int:
        return sum(1 for conns in self._conns.values() for c in conns if not c.streams)

    def get(self, key: Hashable) -> H2Client | None:
        """A connection for ``key`` with a free stream: the least busy one."""
        best: H2Client | None = None
        for client in self._conns.get(key, ()):
            if client.available and (best is None or len(client.streams) < len(best.streams)):
                best = client
        if best is not None:
            self.reused += 1
        return best

    async def connection(self, key: Hashable, dial: Dial, label: str) -> tuple[H2Client, bool]:
        """A connection for ``key`` with a free stream (and whether it existed): an
        open one, the one being dialled, or a new one."""
        client = self.get(key)
        if client is not None:
            return client, True
        opening = self._opening.get(key)
        if opening is not None:
            client = await asyncio.shield(opening)
            if client.available:
                self.reused += 1
                return client, True
        return await self.open(key, dial, label), False

    async def open(self, key: Hashable, dial: Dial, label: str) -> H2Client:
        loop = asyncio.get_running_loop()
        opening: asyncio.Future[H2Client] = loop.create_future()
        mine = key not in self._opening
        if mine:
            self._opening[key] = opening
        client = H2Client(key, label=label, config=self.config)
        try:
            await dial(lambda: client)
            if client.transport is None:
                raise RuntimeError("the dial stage returned without attaching the HTTP/2 client")
        except BaseException as exc:
            if not opening.done():
                opening.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
                opening.exception()  # retrieved: waiters (if any) get it too
            raise
        finally:
            if mine and self._opening.get(key) is opening:
                del self._opening[key]
        opening.set_result(client)
        client.pool = self
        self._conns.setdefault(key, []).append(client)
        self.opened += 1
        if self._sweep is None:
            self._sweep = loop.call_later(self.idle_timeout / 4, self._expire)
        return client

    def _expire(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_timeout
        for key in list(self._conns):
            for client in [c for c in self._conns[key] if not c.streams and c.idle_since <= cutoff]:
                client.close()
                self.discard(client)
        if self._conns:
            self._sweep = loop.call_later(self.idle_timeout / 4, self._expire)

    def discard(self, client: H2Client) -> None:
        conns = self._conns.get(client.key)
        if conns is not None and client in conns:
            conns.remove(client)
            if not conns:
                del self._conns[client.key]

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conns in list(self._conns.values()):
            for client in list(conns):
                client.close()
        self._conns.clear()
