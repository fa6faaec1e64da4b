"""Measurement tools (tests and `weft bench` use them; the data path does not):
`bench_handshakes`, what a fresh tunnel connection costs against a pooled stream and
plain TCP, both ends on one loop; `bench_framing`, the framing layer alone against
HTTP/2's (`h2`), in memory."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from nodeagent.proxy import tls
from nodeagent.proxy.listener import Address
from nodeagent.proxy.tunnel.client import TunnelClient
from nodeagent.proxy.tunnel.hooks import NotLocal
from nodeagent.proxy.tunnel.server import TunnelServer, tunnel_listener
from nodeagent.proxy.tunnel.session import Session, Stream
from nodeagent.proxy.tunnel.wire import Settings, Status, encode_answer_payload, encode_open_payload
from weft.identity import SpiffeId


@dataclass(frozen=True)
class HandshakeBench:
    """Result of `bench_handshakes`. Client and server run on one event loop (one
    core), so the rates include the CPU work of *both* ends of every tunnel."""

    tunnels: int
    concurrency: int
    seconds: float
    """Wall time to open, use (one byte echoed) and close all tunnels, each on a fresh
    connection (a new client: TCP + TLS + prefaces + OPEN/ANSWER)."""
    pooled_seconds: float
    """The same over one pooled client (streams on shared connections)."""
    plain_seconds: float
    """The same with plain TCP straight to the target, for comparison."""
    open_ms: tuple[float, ...]
    """Time each fresh `TunnelClient.connect` took, ms."""
    connections: int
    """Tunnel connections the pooled run made."""

    @property
    def ms_per_tunnel(self) -> float:
        return 1000 * self.seconds / self.tunnels

    @property
    def tunnels_per_second(self) -> float:
        return self.tunnels / self.seconds

    @property
    def pooled_ms_per_stream(self) -> float:
        return 1000 * self.pooled_seconds / self.tunnels

    @property
    def plain_ms_per_connection(self) -> float:
        return 1000 * self.plain_seconds / self.tunnels

    @property
    def open_ms_p50(self) -> float:
        return statistics.median(self.open_ms)

    @property
    def open_ms_p99(self) -> float:
        ordered = sorted(self.open_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def summary(self) -> str:
        return (
            f"{self.tunnels} tunnels, concurrency {self.concurrency}: "
            f"{self.ms_per_tunnel:.2f} ms each ({self.tunnels_per_second:.0f}/s, both ends on "
            f"one core); open p50 {self.open_ms_p50:.2f} ms, p99 {self.open_ms_p99:.2f} ms; "
            f"pooled {self.pooled_ms_per_stream:.3f} ms each over {self.connections} "
            f"connection(s); plain TCP {self.plain_ms_per_connection:.3f} ms each"
        )


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Ping(asyncio.Protocol):
    """Sends one byte, waits for it to come back, closes."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"x")

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def bench_handshakes(
    n: int,
    *,
    contexts: tls.TlsContexts,
    source: SpiffeId,
    destination: SpiffeId,
    concurrency: int = 1,
) -> HandshakeBench:
    """Open ``n`` tunnels (``concurrency`` at a time) through a server on 127.0.0.1,
    each to an echo target, send one byte and close: each on a fresh connection, then
    as streams of one pooled client; and the same over plain TCP. ``contexts`` must
    hold material for ``source`` and ``destination``."""
    if n < 1 or concurrency < 1:
        raise ValueError(f"need n >= 1 and concurrency >= 1, got {n} and {concurrency}")
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    target: Address = echo.sockets[0].getsockname()[:2]
    server = TunnelServer(
        contexts=contexts,
        locate_target=lambda address: destination if address == target else NotLocal.UNKNOWN,
    )
    listener = tunnel_listener("127.0.0.1", 0)
    node: Address = listener.getsockname()[:2]
    serving = loop.create_task(server.serve(listener), name="weft.bench tunnel server")
    pooled = TunnelClient(contexts)
    open_ms: list[float] = []

    async def one_tunnel() -> None:
        ping = _Ping()
        fresh = TunnelClient(contexts)
        start = time.perf_counter()
        await fresh.connect(source, node, target, destination, lambda: ping)
        open_ms.append(1000 * (time.perf_counter() - start))
        await ping.done
        await fresh.close()

    async def one_stream() -> None:
        ping = _Ping()
        await pooled.connect(source, node, target, destination, lambda: ping)
        await ping.done

    async def one_plain() -> None:
        ping = _Ping()
        await loop.create_connection(lambda: ping, *target)
        await ping.done

    async def run(one: Callable[[], Awaitable[None]]) -> float:
        remaining = n

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        return time.perf_counter() - start

    try:
        await one_tunnel()  # warm the context cache, as a running node would be
        open_ms.clear()
        seconds = await run(one_tunnel)
        pooled_seconds = await run(one_stream)
        connections = pooled.stats.connections
        plain = await run(one_plain)
    finally:
        await pooled.close()
        await server.close(grace=1.0)
        await serving
        echo.close()
        await echo.wait_closed()
    return HandshakeBench(
        n, concurrency, seconds, pooled_seconds, plain, tuple(open_ms), connections
    )


# --- framing: this protocol against HTTP/2 (h2), in memory ------------------------------


class _Pipe(asyncio.Transport):
    """One direction of an in-memory connection: writes queue up for the peer."""

    def __init__(self, queue: list[bytes]) -> None:
        super().__init__()
        self.queue = queue

    def write(self, data: Any) -> None:
        self.queue.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 1 << 20)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _Sink(asyncio.Protocol):
    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)


async def _weft_round_trip_us(rounds: int, size: int) -> float:
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    echo = _Sink(echo=True)

    def on_open(stream: Stream, request: Any) -> None:
        server.answer(stream, encode_answer_payload(Status.OK))
        stream.attach(echo)

    settings = Settings()
    client = Session(label="bench client", local=settings)
    server = Session(label="bench server", local=settings, on_open=on_open)
    client.connection_made(_Pipe(to_server))
    server.connection_made(_Pipe(to_client))

    def pump() -> None:
        while to_server or to_client:
            while to_server:
                server.data_received(to_server.pop(0))
            while to_client:
                client.data_received(to_client.pop(0))

    pump()
    stream = client.open(encode_open_payload(("10.0.0.1", 80)))
    pump()
    sink = _Sink(echo=False)
    stream.attach(sink)
    message = b"x" * size
    start = time.perf_counter()
    for _ in range(rounds):
        stream.write(message)
        pump()
    elapsed = time.perf_counter() - start
    assert sink.got == rounds * size
    return 1e6 * elapsed / rounds


def _h2_round_trip_us(rounds: int, size: int) -> float | None:
    """The same exchange over HTTP/2 with the `h2` library (HBONE's framing): a CONNECT
    stream, DATA both ways, flow-control credit returned as data is consumed."""
    try:
        import h2.config
        import h2.connection
        import h2.events
    except ImportError:
        return None

    def side(client: bool) -> Any:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        return conn

    c, s = side(True), side(False)
    for _ in range(2):
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
    s.receive_data(c.data_to_send())
    s.send_headers(sid, [(b":status", b"200")])
    c.receive_data(s.data_to_send())
    message = b"x" * size
    got = 0
    start = time.perf_counter()
    for _ in range(rounds):
        c.send_data(sid, message)
        for event in s.receive_data(c.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                s.acknowledge_received_data(event.flow_controlled_length, sid)
                s.send_data(sid, event.data)
        for event in c.receive_data(s.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                c.acknowledge_received_data(event.flow_controlled_length, sid)
                got += len(event.data)
        s.receive_data(c.data_to_send())
    elapsed = time.perf_counter() - start
    assert got == rounds * size
    return 1e6 * elapsed / rounds


async def bench_framing(rounds: int = 20_000, size: int = 1024) -> dict[str, Any]:
    """CPU per request/response round trip over an open stream, both ends on this
    thread, no sockets, no TLS: the framing layers alone. Returns µs per round trip
    for this protocol and for HTTP/2 (`h2`, if installed)."""
    weft_us = await _weft_round_trip_us(rounds, size)
    h2_us = _h2_round_trip_us(rounds, size)
    version = None
    if h2_us is not None:
        import h2

        version = h2.__version__
    return {
        "rounds": rounds,
        "message_bytes": size,
        "weft_us": round(weft_us, 2),
        "h2_us": round(h2_us, 2) if h2_us is not None else None,
        "h2_version": version,
        "h2_over_weft": round(h2_us / weft_us, 1) if h2_us is not None else None,
    }
