"""Upstream HTTP/1.1 connections and their pool.

`Http1Client` is the protocol of one upstream connection — a tunnel stream to another
node's proxy, or plaintext TCP to a pod — carrying one exchange at a time: it writes the
request head and body (re-chunked when the client sent chunks), parses the response
(`ResponseCodec`) into the exchange, and goes back to its `Http1Pool` when both messages
are complete and both ends keep the connection alive. Anything else (a response that
ended early, ``Connection: close``, a HEAD, a parse error) closes it.

The pool keys connections by ``(source identity, endpoint)``: an upstream connection
over the tunnel carries one workload's identity, so two workloads never share one. Idle
connections are reused most-recent-first (the rest age out after ``idle_timeout``), and
at most ``max_idle`` per key are kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, cast

from nodeagent.proxy.flow import PEER_BLOCKED, FlowControl
from nodeagent.proxy.http.h1 import (
    LAST_CHUNK,
    H1Error,
    Limits,
    ResponseCodec,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
)
from nodeagent.proxy.http.message import Headers, ResponseHead
from nodeagent.proxy.relay import reset_transport

if TYPE_CHECKING:
    from nodeagent.proxy.http.server import Exchange

log = logging.getLogger("weft.proxy.http")


class UpstreamLost(ConnectionError):
    """The upstream connection (HTTP/2: the stream) failed during an exchange."""

    def __init__(
        self,
        detail: str,
        *,
        response_started: bool,
        bad_response: bool = False,
        refused: bool = False,
        code: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.response_started = response_started
        self.bad_response = bad_response
        self.refused = refused
        """Known not to have been processed (HTTP/2 REFUSED_STREAM, or a stream above a
        GOAWAY's last stream id): safe to send again whatever the method."""
        self.code = code
        """HTTP/2: the RST_STREAM error code."""

    def retryable(self, exchange_idempotent: bool, reused: bool) -> bool:
        """Whether a body-less request lost this way may be sent once more: refused
        streams always; a request lost on a *reused* connection before any response
        byte (the keep-alive race) only if its method is idempotent, since the first
        attempt may have been processed (RFC 9110 §9.2.2)."""
        if self.response_started:
            return False
        return self.refused or (reused and exchange_idempotent)


class Http1Client(asyncio.Protocol):
    def __init__(self, key: Hashable, *, label: str, limits: Limits | None = None) -> None:
        self.key = key
        self.label = label
        self.codec = ResponseCodec(self, limits)
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self._exchange: Exchange | None = None
        self._done: asyncio.Future[None] | None = None
        self._on_done: Callable[[BaseException | None], None] | None = None
        self._chunked = False
        self._request_sent = False
        self._upgrade_head: ResponseHead | None = None
        self._detached = False
        self.lost = False
        self.exchanges = 0
        self.pool: Http1Pool | None = None
        self.idle_since = 0.0
        self._corked = 0
        self._out: list[bytes] = []

    @property
    def busy(self) -> bool:
        return self._exchange is not None

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    # --- sending an exchange -------------------------------------------------------------

    def send(self, exchange: Exchange) -> asyncio.Future[None]:
        """Send ``exchange``'s request; the future resolves when its response is
        complete, or fails with `UpstreamLost`."""
        self._done = done = asyncio.get_running_loop().create_future()
        self._send(exchange)
        return done

    def start(self, exchange: Exchange, on_done: Callable[[BaseException | None], None]) -> None:
        """`send` without a future (the forwarder's fast path): ``on_done`` is called
        with None when the response is complete, or with the `UpstreamLost`."""
        self._on_done = on_done
        self._send(exchange)

    def _send(self, exchange: Exchange) -> None:
        assert self.transport is not None and self._exchange is None
        self._exchange = exchange
        self._chunked = exchange.head.chunked
        self._request_sent = False
        self.exchanges += 1
        self.codec.expect(exchange.head.method)
        self.cork()  # the head and any body already read leave as one write
        try:
            self._write(encode_request_head(exchange.head))
            exchange.bind(self)
        finally:
            self.uncork()

    def _write(self, data: bytes) -> None:
        if self._corked:
            self._out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def cork(self) -> None:
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        out = self._out
        if not self._corked and out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if self.transport is not None:
                self.transport.write(data)

    def write_body(self, data: bytes) -> None:
        self._write(encode_chunk(data) if self._chunked else data)

    def end_body(self, trailers: Headers) -> None:
        self._request_sent = True
        if self._chunked:
            self._write(encode_last_chunk(trailers) if trailers else LAST_CHUNK)

    def pause_reading(self) -> None:
        if self.flow is not None:
            self.flow.hold(PEER_BLOCKED)

    def resume_reading(self) -> None:
        if self.flow is not None:
            self.flow.release(PEER_BLOCKED)

    def take_transport(self) -> asyncio.Transport:
        assert self.transport is not None
        self._detached = True
        self._finish(None)
        return self.transport

    # --- ResponseSink --------------------------------------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        if head.status == 101 and exchange.head.upgrade is not None:
            self._upgrade_head = head
            return
        exchange.response_head(head)

    def response_body(self, data: bytes) -> None:
        if self._exchange is not None:
            self._exchange.response_body(data)

    def response_end(self, head: ResponseHead) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.response_end(head)
        reusable = (
            self.codec.reusable
            and head.keep_alive
            and self._request_sent
            and exchange.head.keep_alive
            and exchange.head.upgrade is None
        )
        notify = self._finish(None, notify=False)
        if reusable and self.pool is not None and self.usable:
            self.pool.put(self)  # before the caller hears: its next request may take it
        else:
            self.close()
        if notify is not None:
            notify(None)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow = FlowControl(transport)

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes while idle: the server is talking out of turn; this connection
            # cannot be trusted with another exchange.
            log.info("%s: %d unexpected bytes from an idle upstream; closing", self.label,
                     len(data))  # fmt: skip
            self.lost = True
            self.close()
            return
        exchange.cork()  # what this read completes of the response leaves as one write
        try:
            leftover = self.codec.feed(data)
        except H1Error as exc:
            self._fail(f"malformed response: {exc.detail}", bad_response=True)
            return
        finally:
            exchange.uncork()
        if leftover is not None and self._upgrade_head is not None and self._exchange is not None:
            self._exchange.upgrade(self._upgrade_head, leftover)

    def eof_received(self) -> bool:
        if self._exchange is not None and self.codec.feed_eof():
            return False
        if self._exchange is not None:
            self._fail("the upstream closed the connection before the response was complete")
        self.lost = True
        return False

    def pause_writing(self) -> None:
        if self._exchange is not None:
            self._exchange.upstream_blocked(True)

    def resume_writing(self) -> None:
        if self._exchange is not None:
            self._exchange.upstream_blocked(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.flow is not None:
            self.flow.finish()
        if self.pool is not None:
            self.pool.discard(self)
        if self._exchange is not None and not self._detached:
            if exc is None and self.codec.feed_eof():
                return
            why = f"reset ({exc})" if exc else "closed"
            self._fail(f"the upstream connection was {why} before the response was complete")

    # --- ending --------------------------------------------------------------------------

    def _fail(self, detail: str, *, bad_response: bool = False) -> None:
        exchange = self._exchange
        started = exchange.response_started if exchange is not None else False
        if exchange is not None:
            exchange.upstream_blocked(False)
        self._finish(UpstreamLost(detail, response_started=started, bad_response=bad_response))
        self.lost = True
        if self.transport is not None:
            reset_transport(self.transport)

    def _finish(
        self, error: BaseException | None, *, notify: bool = True
    ) -> Callable[[BaseException | None], None] | None:
        """End the exchange; tell its sender (``notify``), or return the callback for
        the caller to call once it has settled the connection."""
        exchange, done, on_done = self._exchange, self._done, self._on_done
        self._exchange = None
        self._done = None
        self._on_done = None
        if exchange is not None:
            exchange.upstream_blocked(False)
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        if self.flow is not None:
            self.flow.release(PEER_BLOCKED)
        if on_done is not None and notify:
            on_done(error)
            return None
        return on_done

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            reset_transport(self.transport)

    def cancel(self, exchange: object) -> None:
        """The exchange is abandoned mid-flight: this connection cannot be reused."""
        self._on_done = None
        self.abort()


Dial = Callable[[Callable[[], asyncio.Protocol]], Awaitable[object]]
"""Opens a new upstream connection with the given protocol factory (the dial stage,
bound to one endpoint and identity)."""


class Http1Pool:
    def __init__(self, *, max_idle: int = 64, idle_timeout: float = 60.0,
                 limits: Limits | None = None) -> None:  # fmt: skip
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.limits = limits
        self._idle: dict[Hashable, deque[Http1Client]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.opened = 0
        self.reused = 0

    @property
    def idle(self) -> int:
        return sum(map(len, self._idle.values()))

    def has_idle(self, key: Hashable) -> bool:
        return any(c.usable for c in self._idle.get(key, ()))

    def take(self, key: Hashable) -> Http1Client | None:
        """An idle connection for ``key`` (most recently used first), or None."""
        idle = self._idle.get(key)
        while idle:
            client = idle.pop()
            if client.usable:
                if not idle:
                    del self._idle[key]
                self.reused += 1
                return client
        self._idle.pop(key, None)
        return None

    async def open(self, key: Hashable, dial: Dial, label: str) -> Http1Client:
        client = Http1Client(key, label=label, limits=self.limits)
        client.pool = self
        await dial(lambda: client)
        if client.transport is None:
            raise RuntimeError("the dial stage returned without attaching the HTTP client")
        self.opened += 1
        return client

    def put(self, client: Http1Client) -> None:
        idle = self._idle.setdefault(client.key, deque())
        if len(idle) >= self.max_idle:
            client.close()
            return
        loop = asyncio.get_running_loop()
        client.idle_since = loop.time()
        idle.append(client)
        # One sweep for the whole pool, not a timer per idle connection (a timer per
        # request is measurable at saturation: the heap push and the cancel).
        if self._sweep is None:
            self._sweep = loop.call_later(self.idle_timeout / 4, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_timeout
        for key in list(self._idle):
            idle = self._idle[key]
            # Oldest first: connections are appended as they go idle.
            while idle and idle[0].idle_since <= cutoff:
                idle.popleft().close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweep = loop.call_later(self.idle_timeout / 4, self._expire)

    def discard(self, client: Http1Client) -> None:
        idle = self._idle.get(client.key)
        if idle is not None:
            try:
                idle.remove(client)
            except ValueError:
                return
            if not idle:
                del self._idle[client.key]

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in list(self._idle.values()):
            for client in list(idle):
                client.close()
        self._idle.clear()

    def retain(self, keep: Callable[[Hashable], bool]) -> None:
        """Close idle connections whose key ``keep`` rejects (endpoints gone)."""
        for key in [k for k in self._idle if not keep(k)]:
            for client in self._idle.pop(key):
                client.close()
