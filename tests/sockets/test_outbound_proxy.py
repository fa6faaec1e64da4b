"""The outbound proxy over real sockets on 127.0.0.1.

A fake original-destination lookup maps each test client's local port to the upstream
it "meant" to reach, as eBPF would; upstreams are small ``asyncio.Protocol`` servers the
tests start, each behaving as one test needs (echo, reply on EOF, banner, slow reader).

Every test runs on asyncio's own loop and on uvloop (what the agent runs), through the
``run`` fixture rather than pytest-asyncio: picking pytest-asyncio's loop per test needs
a ``pytest_asyncio_loop_factories`` hook in a conftest. ``run`` also fails a test that
leaves tasks behind, and bounds the whole test body in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from nodeagent.proxy.outbound import (
    Address,
    OutboundConfig,
    OutboundProxy,
    UpstreamConnector,
    connect_plaintext,
)
from nodeagent.proxy.outbound import (
    Upstream as UpstreamResult,
)
from tests.loops import WAIT, Body, wait

pytestmark = pytest.mark.sockets

SMALL_BUF = 16 * 1024  # kernel socket buffer for tests about what the proxy buffers itself
MAX_READ = 256 * 1024  # the most one transport read delivers, on asyncio and uvloop
LINGER_RESET = struct.pack("ii", 1, 0)


# --- upstreams ----------------------------------------------------------------------


class UpstreamConn(asyncio.Protocol):
    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.conns.append(self)
        if self.server.banner is not None:
            self.transport.write(self.server.banner)
            self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.received += data
        server = self.server
        if server.on_data is not None:
            server.on_data()
        if server.echo:
            self.transport.write(data)
        if server.reset_on_data:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.abort()
        elif server.read_pause is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(server.read_pause, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof.set()
        if self.server.reply is not None:
            assert self.transport is not None
            self.transport.write(self.server.reply(bytes(self.received)))
        return False  # every behaviour ends its answer by closing

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()


@dataclass
class Upstream:
    """A server on 127.0.0.1:0 standing in for the app the client meant to reach."""

    echo: bool = False
    reply: Callable[[bytes], bytes] | None = None  # answer sent on the client's EOF
    banner: bytes | None = None  # sent, then half-close, on connect
    reset_on_data: bool = False
    read_pause: float | None = None  # pause reading this long after every read
    rcvbuf: int | None = None
    on_data: Callable[[], None] | None = None
    conns: list[UpstreamConn] = field(default_factory=list)
    address: Address = ("", 0)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        sock = socket.socket()
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.address = sock.getsockname()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: UpstreamConn(self), sock=sock
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()
        await asyncio.gather(*(wait(conn.lost.wait()) for conn in self.conns))

    def conn(self) -> UpstreamConn:
        (conn,) = self.conns
        return conn


def digest(data: bytes) -> bytes:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()


# --- the proxy and its clients --------------------------------------------------------


@dataclass
class Harness:
    proxy: OutboundProxy
    address: Address
    routes: dict[int, Address]  # client's local port -> original destination
    connects: list[Address]  # destinations the connector was asked for
    upstream_transports: list[asyncio.Transport]


@contextlib.asynccontextmanager
async def running_proxy(
    *,
    config: OutboundConfig | None = None,
    connect: UpstreamConnector = connect_plaintext,
    is_self: Callable[[str, int], bool] = lambda ip, port: False,
    listen_rcvbuf: int | None = None,
) -> AsyncIterator[Harness]:
    routes: dict[int, Address] = {}
    connects: list[Address] = []
    transports: list[asyncio.Transport] = []

    def original_destination(conn: socket.socket) -> Address | None:
        return routes.get(conn.getpeername()[1])

    async def recording_connect(
        client: Address, destination: Address, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.BaseTransport | UpstreamResult:
        connects.append(destination)
        transport = await connect(client, destination, factory)
        transports.append(cast(asyncio.Transport, transport))
        return transport

    listener = socket.socket()
    if listen_rcvbuf is not None:
        # Accepted sockets inherit it, which keeps the kernel from absorbing a payload.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listen_rcvbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    address = listener.getsockname()
    proxy = OutboundProxy(
        original_destination=original_destination,
        is_self=is_self,
        connect=recording_connect,
        config=config,
    )
    serving = asyncio.create_task(proxy.serve(listener), name="test: outbound serve")
    try:
        yield Harness(proxy, address, routes, connects, transports)
    finally:
        await proxy.close(grace=0)
        await wait(serving)


def client_socket(
    harness: Harness, destination: Address | None, *, sndbuf: int | None = None
) -> socket.socket:
    """A bound client socket whose original destination (None: unknown) is on record."""
    sock = socket.socket()
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    if destination is not None:
        harness.routes[sock.getsockname()[1]] = destination
    sock.setblocking(False)
    return sock


async def open_client(
    harness: Harness,
    destination: Address | None,
    *,
    sndbuf: int | None = None,
    sock: socket.socket | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the proxy as a captured app whose original destination is given."""
    if sock is None:
        sock = client_socket(harness, destination, sndbuf=sndbuf)
    try:
        await wait(asyncio.get_running_loop().sock_connect(sock, harness.address))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def expect_reset(harness: Harness, destination: Address | None) -> str:
    """Connect as an app the proxy must reset; return the app's address."""
    sock = client_socket(harness, destination)
    host, port = sock.getsockname()
    # The reset can win the race with the connect completing, or come on the first read.
    with pytest.raises(ConnectionResetError):
        reader, writer = await open_client(harness, destination, sock=sock)
        try:
            await wait(reader.read())
        finally:
            await close_writer(writer)
    return f"{host}:{port}"


def client_name(writer: asyncio.StreamWriter) -> str:
    host, port = writer.get_extra_info("sockname")
    return f"{host}:{port}"


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await wait(writer.wait_closed())


def closed_port() -> Address:
    """An address nobody listens on, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()


# --- tests ----------------------------------------------------------------------------


def test_bytes_flow_both_ways_and_are_counted(run: Callable[[Body], None]) -> None:
    async def body() -> None:
        async with Upstream(echo=True) as up, running_proxy() as h:
            reader, writer = await open_client(h, up.address)
            writer.write(b"ping")
            assert await wait(reader.readexactly(4)) == b"ping"
            payload = os.urandom(1 << 20)
            writer.write(payload)
            assert await wait(reader.readexactly(len(payload))) == payload
            writer.write_eof()
            assert await wait(reader.read()) == b""  # the echo server's close, passed on
            await close_writer(writer)
            await h.proxy.close(grace=WAIT)  # returns as soon as the relay has ended
            stats = h.proxy.stats
            assert (stats.accepted, stats.active, stats.upstream_failed) == (1, 0, 0)
            assert stats.bytes_out == stats.bytes_in == 4 + len(payload)
            assert h.connects == [up.address]

    run(body)


def test_a_large_upload_to_a_slow_upstream_is_not_buffered_by_the_proxy(
    run: Callable[[Body], None],
) -> None:
    high_water = 64 * 1024
    buffered: list[int] = []

    async def small_sndbuf_connect(
        client: Address, destination: Address, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.BaseTransport:
        # A small kernel send buffer, so what piles up shows in the proxy's own buffer.
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
            sock.setblocking(False)
            await loop.sock_connect(sock, destination)
        except BaseException:
            sock.close()
            raise
        transport, _ = await loop.create_connection(factory, sock=sock)
        return transport

    async def body() -> None:
        config = OutboundConfig(high_water=high_water, low_water=16 * 1024)
        async with (
            running_proxy(config=config, connect=small_sndbuf_connect) as h,
            Upstream(
                reply=digest,
                rcvbuf=SMALL_BUF,
                read_pause=0.001,
                # Sampled on every slow read: what the proxy holds for the upstream then.
                on_data=lambda: buffered.append(
                    sum(t.get_write_buffer_size() for t in h.upstream_transports)
                ),
            ) as up,
        ):
            reader, writer = await open_client(h, up.address)
            payload = os.urandom(5 * 1024 * 1024)
            writer.write(payload)
            await wait(writer.drain())
            writer.write_eof()
            assert await wait(reader.read()) == digest(payload)
            await close_writer(writer)
        assert len(buffered) > 1
        assert 0 < max(buffered) <= high_water + MAX_READ, "the proxy buffered the upload"

    run(body)


def test_client_is_not_read_while_the_upstream_connects(run: Callable[[Body], None]) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def gated_connect(
        client: Address, destination: Address, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.BaseTransport:
        entered.set()
        await release.wait()
        return await connect_plaintext(client, destination, factory)

    async def body() -> None:
        async with (
            Upstream(reply=digest) as up,
            running_proxy(connect=gated_connect, listen_rcvbuf=SMALL_BUF) as h,
        ):
            reader, writer = await open_client(h, up.address, sndbuf=SMALL_BUF)
            payload = os.urandom(4 * 1024 * 1024)
            writer.write(payload)
            await wait(entered.wait())
            drained = asyncio.create_task(writer.drain(), name="test: client drain")
            # Waiting for something that must not happen: the proxy holding the upload
            # in memory would let the client's buffer drain. Passing never waits longer.
            done, _ = await asyncio.wait({drained}, timeout=0.3)
            assert not done, "the proxy read the client while its upstream was connecting"
            assert h.proxy.stats.bytes_out <= MAX_READ
            release.set()
            await wait(drained)
            writer.write_eof()
            assert await wait(reader.read()) == digest(payload)
            await close_writer(writer)

    run(body)


def test_client_half_close_still_gets_the_reply(run: Callable[[Body], None]) -> None:
    async def body() -> None:
        async with Upstream(reply=lambda data: b"you said " + data) as up, running_proxy() as h:
            reader, writer = await open_client(h, up.address)
            writer.write(b"hello")
            writer.write_eof()
            # The reply is only sent after the upstream saw our EOF, so it crossed a
            # relay whose other direction had already ended.
            assert await wait(reader.read()) == b"you said hello"
            await wait(up.conn().lost.wait())
            assert up.conn().lost_exc is None
            await close_writer(writer)
            await h.proxy.close(grace=WAIT)
            stats = h.proxy.stats
            assert (stats.active, stats.bytes_out, stats.bytes_in) == (0, 5, 14)

    run(body)


def test_upstream_half_close_lets_the_client_keep_sending(run: Callable[[Body], None]) -> None:
    async def body() -> None:
        async with Upstream(banner=b"ready") as up, running_proxy() as h:
            reader, writer = await open_client(h, up.address)
            assert await wait(reader.read()) == b"ready"  # banner, then the upstream's EOF
            writer.write(b"still talking")
            writer.write_eof()
            conn = up.conn()
            await wait(conn.eof.wait())
            assert bytes(conn.received) == b"still talking"
            await wait(conn.lost.wait())
            assert conn.lost_exc is None
            await close_writer(writer)

    run(body)


def test_unknown_destination_is_reset_and_counted_and_others_still_served(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.proxy")

    async def body() -> None:
        async with Upstream(echo=True) as up, running_proxy() as h:
            stray = await expect_reset(h, None)

            reader, writer = await open_client(h, up.address)
            writer.write(b"x")
            assert await wait(reader.readexactly(1)) == b"x"
            await close_writer(writer)

            stats = h.proxy.stats
            assert (stats.accepted, stats.refused_unknown) == (2, 1)
            assert h.connects == [up.address]
            assert (
                f"no original destination for {stray}; refusing "
                "(is it captured by this node's eBPF?)"
            ) in caplog.messages

    run(body)


def test_destinations_that_are_the_proxy_itself_are_refused(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.proxy")
    inbound = ("127.0.0.1", 15008)  # another listener of this proxy, per is_self

    async def body() -> None:
        async with running_proxy(is_self=lambda ip, port: (ip, port) == inbound) as h:
            mapped = ("::ffff:127.0.0.1", h.address[1])  # the listener, as IPv6 reports it
            for destination in (h.address, inbound, mapped):
                await expect_reset(h, destination)
            assert h.proxy.stats.refused_loop == 3
            assert h.connects == []
            refusals = [m for m in caplog.messages if "refusing the loop" in m]
            assert len(refusals) == 3
            assert f"-> 127.0.0.1:{h.address[1]}:" in refusals[0]

    run(body)


def test_upstream_refusing_resets_the_client(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.proxy")
    dead = closed_port()

    async def body() -> None:
        async with running_proxy() as h:
            client = await expect_reset(h, dead)
            await h.proxy.close(grace=WAIT)
            assert (h.proxy.stats.upstream_failed, h.proxy.stats.active) == (1, 0)
            assert any(
                f"{client} -> 127.0.0.1:{dead[1]}: upstream connect failed" in m
                for m in caplog.messages
            )

    run(body)


def test_upstream_connect_timeout_resets_the_client(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.proxy")

    async def never_connect(
        client: Address, destination: Address, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.BaseTransport:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def body() -> None:
        config = OutboundConfig(connect_timeout=0.2)
        async with running_proxy(config=config, connect=never_connect) as h:
            await expect_reset(h, ("192.0.2.1", 80))
            assert h.proxy.stats.upstream_failed == 1
            assert any("timed out after 0.2s" in m for m in caplog.messages)

    run(body)


@pytest.mark.parametrize("resetting_side", ["upstream", "client"])
def test_a_reset_on_one_side_is_a_reset_on_the_other(
    run: Callable[[Body], None], resetting_side: str
) -> None:
    async def body() -> None:
        async with (
            Upstream(echo=True, reset_on_data=resetting_side == "upstream") as up,
            running_proxy() as h,
        ):
            reader, writer = await open_client(h, up.address)
            writer.write(b"x")
            if resetting_side == "upstream":
                with pytest.raises(ConnectionResetError):
                    await wait(reader.read())
            else:
                assert await wait(reader.readexactly(1)) == b"x"
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                writer.transport.abort()
                await wait(up.conn().lost.wait())
                assert isinstance(up.conn().lost_exc, ConnectionResetError)
            await close_writer(writer)

    run(body)


def test_idle_connections_are_closed(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.proxy")

    async def body() -> None:
        async with (
            Upstream(echo=True) as up,
            running_proxy(config=OutboundConfig(idle_timeout=0.3)) as h,
        ):
            reader, writer = await open_client(h, up.address)
            writer.write(b"x")
            assert await wait(reader.readexactly(1)) == b"x"
            assert await wait(reader.read()) == b""  # closed by the proxy, not by a peer
            await wait(up.conn().lost.wait())
            assert any(
                f"{client_name(writer)} -> 127.0.0.1:{up.address[1]}: no traffic either way" in m
                for m in caplog.messages
            )
            await close_writer(writer)

    run(body)


def test_close_lets_connections_finish_then_resets_the_rest(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.proxy")
    grace = 2.0

    async def body() -> None:
        async with Upstream(echo=True) as up, running_proxy() as h:
            finishing = await open_client(h, up.address)
            straggling = await open_client(h, up.address)
            straggler = client_name(straggling[1])
            for reader, writer in (finishing, straggling):
                writer.write(b"x")
                assert await wait(reader.readexactly(1)) == b"x"

            closing = asyncio.create_task(h.proxy.close(grace), name="test: proxy close")
            await asyncio.sleep(0)  # close() stops accepting before its first await
            with pytest.raises(ConnectionRefusedError):
                await open_client(h, up.address)

            reader, writer = finishing
            writer.write(b"bye")
            writer.write_eof()
            assert await wait(reader.read()) == b"bye"  # completed normally, no reset
            assert not closing.done()  # the straggler holds it until the deadline

            await wait(closing)
            reader, writer = straggling
            with pytest.raises(ConnectionResetError):
                await wait(reader.read())
            for _, writer in (finishing, straggling):
                await close_writer(writer)
            assert h.proxy.stats.active == 0
            assert f"1 connections finished within {grace:g}s, 1 were reset" in caplog.text
            assert any(
                f"{straggler} -> " in m and "shutdown deadline" in m for m in caplog.messages
            )

    run(body)


def test_a_pod_over_its_connection_share_is_refused_and_no_other_pod(
    run: Callable[[Body], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #18: one source pod (here 127.0.0.1) holding its limit of open connections
    gets its next one reset; another pod (127.0.0.2) is served, and once the first pod
    closes one it may open another."""
    caplog.set_level(logging.INFO, logger="weft.proxy")

    async def body() -> None:
        config = OutboundConfig(max_connections_per_source=2)
        async with Upstream(echo=True) as up, running_proxy(config=config) as h:
            held = [await open_client(h, up.address) for _ in range(2)]
            for reader, writer in held:  # both relaying: counted as open
                writer.write(b"x")
                assert await wait(reader.readexactly(1)) == b"x"
            await expect_reset(h, up.address)
            other = socket.socket()
            other.bind(("127.0.0.2", 0))
            h.routes[other.getsockname()[1]] = up.address
            other.setblocking(False)
            reader, writer = await open_client(h, up.address, sock=other)
            writer.write(b"y")
            assert await wait(reader.readexactly(1)) == b"y"
            await close_writer(writer)
            stats = h.proxy.stats
            assert stats.refused_busy == 1 and stats.refused_busy_by_source == {"127.0.0.1": 1}
            assert h.proxy.open_connections("127.0.0.1") == 2
            await close_writer(held[0][1])
            for _ in range(100):  # the relay ends a moment after the close
                if h.proxy.open_connections("127.0.0.1") < 2:
                    break
                await asyncio.sleep(0.02)
            reader, writer = await open_client(h, up.address)
            writer.write(b"z")
            assert await wait(reader.readexactly(1)) == b"z"
            for w in (writer, held[1][1]):
                await close_writer(w)
            assert any("already has 2 connections open" in m for m in caplog.messages)

    run(body)
