"""The mTLS tunnel over real sockets on 127.0.0.1, with certificates from tests/pki.py.

Two "nodes" share one loop: the client side's `TlsContexts` holds the source workload's
material, the server side's the destination workloads'. Targets are small protocol
servers standing in for pods. Every bad-input case asserts its own failure counter and
log line, or the client's own exception, and then that the server still serves a good
tunnel.

Like tests/sockets/test_outbound_proxy.py, every test runs on asyncio's loop and on
uvloop through the ``run`` fixture (`tests.loops`), which also fails a test that leaks
tasks.
Timeouts that a test waits for are configured short (0.2 s); everything else is awaited
as an event, bounded by ``WAIT`` only so that a bug shows as a failure, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from nodeagent.certtypes import TlsMaterial
from nodeagent.proxy.outbound import Address, OutboundProxy
from nodeagent.proxy.tls import TlsContexts, sni_for
from nodeagent.proxy.tunnel import (
    Authorize,
    Decision,
    NotLocal,
    TunnelClient,
    TunnelClientConfig,
    TunnelError,
    TunnelHandshakeError,
    TunnelImpersonation,
    TunnelNoRoute,
    TunnelOverloaded,
    TunnelRefused,
    TunnelRoute,
    TunnelServer,
    TunnelServerConfig,
    TunnelSetupError,
    TunnelUnreachable,
    tunnel_connector,
    tunnel_listener,
)
from nodeagent.proxy.tunnel.bench import bench_handshakes
from nodeagent.proxy.tunnel.wire import (
    FIXED_SIZE,
    MAGIC,
    VERSION,
    Answer,
    Answered,
    Data,
    FrameDecoder,
    FrameType,
    GoAway,
    Invalid,
    Kind,
    Preface,
    PrefaceDecoder,
    Reset,
    Settings,
    Status,
    StreamReset,
    data_frames,
    encode_answer_payload,
    encode_open_payload,
    encode_preface,
    frame,
    reset_frame,
)
from tests.loops import WAIT, Body, wait
from tests.pki import NOW, Pki
from weft.identity import SpiffeId

pytestmark = pytest.mark.sockets

SHORT = 0.2  # the timeouts tests wait for
STEADY = 3.0
"""The server's timeouts in tests that are not about them: a loaded CI machine can take
longer than SHORT to finish a handshake, and that must not fail an unrelated test."""
SHORT_TIMEOUTS = TunnelServerConfig(handshake_timeout=SHORT, header_timeout=SHORT)
LINGER_RESET = struct.pack("ii", 1, 0)
LOGGER = "weft.proxy.tunnel"

SOURCE = SpiffeId.workload("shop", "frontend")
DEST = SpiffeId.workload("shop", "backend")
OTHER = SpiffeId.workload("shop", "payments")


async def _until(check: Callable[[], bool]) -> None:
    """Poll ``check`` (state a background task changes) for up to ``WAIT`` seconds."""
    async with asyncio.timeout(WAIT):
        while not check():  # noqa: ASYNC110 (no event to wait on: the check is the state)
            await asyncio.sleep(0.01)


# --- certificates --------------------------------------------------------------------


@dataclass
class FixedCerts:
    """A `CertSource` with fixed material, as the tunnel's tests need it."""

    bundle: bytes
    materials: dict[SpiffeId, TlsMaterial] = field(default_factory=dict)
    trust_generation: int = 1

    def material(self, identity: SpiffeId) -> TlsMaterial | None:
        return self.materials.get(identity)

    def trust_bundle_pem(self) -> bytes:
        return self.bundle


_dirs = itertools.count()


@dataclass
class Certs:
    """The test PKI and where its material goes."""

    pki: Pki
    other: Pki  # another mesh's CA
    tmp: Path

    def issue(
        self, identity: SpiffeId | str, *, pki: Pki | None = None, generation: int = 1, **kw: Any
    ) -> TlsMaterial:
        directory = self.tmp / f"m{next(_dirs)}"
        key, chain = (pki or self.pki).write_leaf(directory, identity, **kw)
        spiffe = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
        return TlsMaterial(spiffe, key, chain, 0.0, generation)

    def source(self, *materials: TlsMaterial) -> FixedCerts:
        return FixedCerts(self.pki.bundle_pem, {m.identity: m for m in materials})


@pytest.fixture(scope="module")
def pkis() -> tuple[Pki, Pki]:
    return Pki(), Pki("other")


@pytest.fixture
def certs(pkis: tuple[Pki, Pki], tmp_path: Path) -> Certs:
    return Certs(pkis[0], pkis[1], tmp_path)


def client_tls(certs: Certs, material: TlsMaterial | None = None) -> TlsContexts:
    """The client node's contexts, holding SOURCE's material unless told otherwise."""
    return TlsContexts(certs.source(material or certs.issue(SOURCE)))


# --- targets (pods) ------------------------------------------------------------------


class TargetConn(asyncio.Protocol):
    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.target.conns.append(self)
        if self.target.banner is not None:
            self.transport.write(self.target.banner)
            self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.received += data
        if self.target.echo:
            self.transport.write(data)
        if self.target.reset_on_data:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.abort()

    def eof_received(self) -> bool:
        self.eof.set()
        if self.target.reply is not None:
            assert self.transport is not None
            self.transport.write(self.target.reply(bytes(self.received)))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()


@dataclass
class Target:
    """A pod: a server on 127.0.0.1:0 behaving as one test needs."""

    echo: bool = False
    reply: Callable[[bytes], bytes] | None = None  # answer sent on EOF, then close
    banner: bytes | None = None  # sent, then half-close, on connect
    reset_on_data: bool = False
    conns: list[TargetConn] = field(default_factory=list)
    address: Address = ("", 0)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> Target:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: TargetConn(self), "127.0.0.1", 0
        )
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()
        await asyncio.gather(*(wait(conn.lost.wait()) for conn in self.conns))

    def conn(self) -> TargetConn:
        (conn,) = self.conns
        return conn


def digest(data: bytes) -> bytes:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()


def closed_port() -> Address:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[:2]


# --- the server and its clients --------------------------------------------------------


@dataclass
class Node:
    server: TunnelServer
    address: Address
    tls: TlsContexts
    pods: dict[Address, SpiffeId | NotLocal]
    """What the server's ``locate_target`` answers; tests add their targets."""


@contextlib.asynccontextmanager
async def tunnel_server(
    certs: Certs,
    pods: dict[Address, SpiffeId | NotLocal],
    *,
    materials: tuple[TlsMaterial, ...] | None = None,
    tls: TlsContexts | None = None,
    authorize: Authorize | None = None,
    config: TunnelServerConfig | None = None,
) -> AsyncIterator[Node]:
    """A tunnel server on 127.0.0.1:0 holding DEST's (or the given) material; ``pods``
    maps target addresses to the local pod's identity or why there is none."""
    if tls is None:
        held = materials if materials is not None else (certs.issue(DEST),)
        tls = TlsContexts(certs.source(*held))
    server = TunnelServer(
        contexts=tls,
        locate_target=lambda address: pods.get(address, NotLocal.UNKNOWN),
        authorize=authorize,
        config=config or TunnelServerConfig(handshake_timeout=STEADY, header_timeout=STEADY),
    )
    listener = tunnel_listener("127.0.0.1", 0)
    address = listener.getsockname()[:2]
    serving = asyncio.create_task(server.serve(listener), name="test: tunnel serve")
    try:
        yield Node(server, address, tls, pods)
    finally:
        await server.close(grace=0)
        await wait(serving)


class App(asyncio.Protocol):
    """The application end of a tunnel: a StreamReader fed by the protocol."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return True  # keep writing after the peer's half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.reader.set_exception(exc)
        else:
            self.reader.feed_eof()
        self.lost.set_result(exc)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def itself(self) -> App:
        """As a protocol factory."""
        return self

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        await wait(self.lost)


async def open_tunnel(
    node: Node,
    target: Address,
    *,
    tls: TlsContexts,
    expected: SpiffeId = DEST,
    source: SpiffeId = SOURCE,
    config: TunnelClientConfig | None = None,
) -> App:
    app = App()
    client = TunnelClient(tls, config=config)
    await wait(client.connect(source, node.address, target, expected, lambda: app))
    return app


async def assert_serves(node: Node, certs: Certs, tls: TlsContexts | None = None) -> None:
    """A good client still gets a working tunnel from ``node`` (whose pods must map
    some echo target's address to DEST; one is started here if the test has none)."""
    async with Target(echo=True) as target:
        node.pods[target.address] = DEST
        app = await open_tunnel(node, target.address, tls=tls or client_tls(certs))
        app.write(b"still serving")
        assert await wait(app.reader.readexactly(13)) == b"still serving"
        await app.close()


async def raw_tls(
    node: Node,
    context: ssl.SSLContext,
    server_hostname: str | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-driven TLS client, for what TunnelClient would never send."""
    return await wait(
        asyncio.open_connection(
            *node.address,
            ssl=context,
            server_hostname=server_hostname or sni_for(DEST),
        )
    )


def raw_context(
    material: TlsMaterial | None, *, pki: Pki, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=pki.bundle_pem.decode())
    if max_version is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = max_version
    if material is not None:
        context.load_cert_chain(material.chain_path, material.key_path)
    return context


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await wait(writer.wait_closed())


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a reset or TLS error counts as the end."""
    try:
        return await wait(reader.read())
    except (ConnectionError, ssl.SSLError):
        return b""


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(all(p in m for p in parts) for m in caplog.messages)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


NOT_FAILURES = {
    "accepted", "active", "established", "bytes_in", "bytes_out", "sessions",
    "sessions_active", "streams_active", "goaways",
}  # fmt: skip


def only_failure(node: Node, name: str) -> None:
    """Exactly one failure counter is set, and it is ``name``."""
    stats = vars(node.server.stats)
    counters = {k: v for k, v in stats.items() if v and k not in NOT_FAILURES}
    assert counters == {name: 1}


# --- happy paths -----------------------------------------------------------------------


def test_bytes_flow_both_ways_through_a_tunnel(run: Callable[[Body], None], certs: Certs) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            client_side = client_tls(certs)
            client = TunnelClient(client_side)
            app = App()
            transport = await wait(
                client.connect(SOURCE, node.address, target.address, DEST, lambda: app)
            )
            assert transport.get_protocol() is app
            app.write(b"ping")
            assert await wait(app.reader.readexactly(4)) == b"ping"
            payload = os.urandom(3 * 1024 * 1024)
            app.write(payload)
            assert await wait(app.reader.readexactly(len(payload))) == payload
            assert app.transport is not None
            app.transport.write_eof()
            assert await wait(app.reader.read()) == b""  # the echo pod closed after our EOF
            assert await wait(app.lost) is None
            await node.server.close(grace=WAIT)
            stats = node.server.stats
            assert (stats.accepted, stats.established, stats.active) == (1, 1, 0)
            assert stats.bytes_out == stats.bytes_in == 4 + len(payload)
            assert (client.stats.attempts, client.stats.opened) == (1, 1)
            # The pod saw the connection come from the tunnel server, as a pod should.
            assert bytes(target.conn().received[:4]) == b"ping"

    run(body)


def test_application_half_close_crosses_the_tunnel(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        async with (
            Target(reply=lambda data: b"you said " + data) as target,
            tunnel_server(certs, {}) as node,
        ):
            app = await open_tunnel_to(node, target, certs)
            app.write(b"hello")
            assert app.transport is not None
            app.transport.write_eof()
            # The reply is only sent once the pod saw our EOF: the END frame carried it,
            # and the other direction kept flowing.
            assert await wait(app.reader.read()) == b"you said hello"
            assert await wait(app.lost) is None
            await wait(target.conn().lost.wait())
            assert target.conn().lost_exc is None

    run(body)


def test_pod_half_close_lets_the_client_keep_sending(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        async with Target(banner=b"ready") as target, tunnel_server(certs, {}) as node:
            app = await open_tunnel_to(node, target, certs)
            assert await wait(app.reader.read()) == b"ready"  # then the pod's END
            app.write(b"still talking")
            assert app.transport is not None
            app.transport.write_eof()
            conn = target.conn()
            await wait(conn.eof.wait())
            assert bytes(conn.received) == b"still talking"
            assert await wait(app.lost) is None

    run(body)


def test_a_pod_reset_resets_the_tunnel(run: Callable[[Body], None], certs: Certs) -> None:
    async def body() -> None:
        async with Target(reset_on_data=True) as target, tunnel_server(certs, {}) as node:
            app = await open_tunnel_to(node, target, certs)
            app.write(b"boom")
            assert isinstance(await wait(app.lost), ConnectionResetError)

    run(body)


async def open_tunnel_to(node: Node, target: Target, certs: Certs) -> App:
    node.pods[target.address] = DEST
    return await open_tunnel(node, target.address, tls=client_tls(certs))


def test_through_the_outbound_proxy_half_close_and_refusal_reach_the_app(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    """The tunnel client as the outbound proxy's upstream seam, end to end."""

    async def body() -> None:
        async with (
            Target(reply=digest) as target,
            tunnel_server(certs, {}) as node,
        ):
            elsewhere = ("127.0.0.1", 1)
            node.pods[target.address] = DEST
            node.pods[elsewhere] = NotLocal.ELSEWHERE
            client = TunnelClient(client_tls(certs))

            def route(app: Address, destination: Address) -> TunnelRoute | None:
                return TunnelRoute(SOURCE, node.address, DEST)

            routes: dict[int, Address] = {}
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            proxy_address = listener.getsockname()[:2]
            proxy = OutboundProxy(
                original_destination=lambda conn: routes.get(conn.getpeername()[1]),
                is_self=lambda ip, port: False,
                connect=tunnel_connector(client, route),
            )
            serving = asyncio.create_task(proxy.serve(listener), name="test: outbound serve")
            try:

                async def app_connect(
                    destination: Address,
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                    sock = socket.socket()
                    sock.bind(("127.0.0.1", 0))
                    routes[sock.getsockname()[1]] = destination
                    sock.setblocking(False)
                    await wait(asyncio.get_running_loop().sock_connect(sock, proxy_address))
                    return await asyncio.open_connection(sock=sock)

                reader, writer = await app_connect(target.address)
                payload = os.urandom(2 * 1024 * 1024)
                writer.write(payload)
                writer.write_eof()
                assert await wait(reader.read()) == digest(payload)
                await close_writer(writer)

                reader, writer = await app_connect(elsewhere)
                with pytest.raises(ConnectionResetError):
                    await wait(reader.read())
                await close_writer(writer)
                assert proxy.stats.upstream_failed == 1
                assert logged(logs, "upstream connect failed (TunnelRefused:", "TARGET_NOT_ON_NODE")
                assert (client.stats.opened, client.stats.refused) == (1, 1)
            finally:
                await proxy.close(grace=WAIT)
                await wait(serving)

    run(body)


def test_rotation_keeps_established_tunnels_and_new_ones_get_the_new_certificate(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        old = certs.issue(DEST, generation=1)
        source = certs.source(old)
        server_tls = TlsContexts(source)
        async with Target(echo=True) as target, tunnel_server(certs, {}, tls=server_tls) as node:
            client_side = client_tls(certs)
            first = await open_tunnel_to_with(node, target, client_side)
            serial_1 = peer_serial(first)
            source.materials[DEST] = certs.issue(DEST, generation=2)  # renewed
            second = await open_tunnel_to_with(node, target, client_side)
            assert peer_serial(second) != serial_1
            for app in (first, second):  # the old tunnel still works
                app.write(b"x")
                assert await wait(app.reader.readexactly(1)) == b"x"
                await app.close()
            builds = server_tls.builds
            third = await open_tunnel_to_with(node, target, client_side)
            assert server_tls.builds == builds  # cached while nothing changes
            await third.close()
            source.trust_generation += 1  # a new trust bundle rebuilds the contexts
            fourth = await open_tunnel_to_with(node, target, client_side)
            assert server_tls.builds == builds + 1
            await fourth.close()

    run(body)


async def open_tunnel_to_with(node: Node, target: Target, tls: TlsContexts) -> App:
    node.pods[target.address] = DEST
    return await open_tunnel(node, target.address, tls=tls)


def peer_serial(app: App) -> int:
    assert app.transport is not None
    der = app.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_bench_handshakes_measures_fresh_tunnels(run: Callable[[Body], None], certs: Certs) -> None:
    async def body() -> None:
        both = TlsContexts(certs.source(certs.issue(SOURCE), certs.issue(DEST)))
        result = await bench_handshakes(5, contexts=both, source=SOURCE, destination=DEST)
        assert result.tunnels == 5 and len(result.open_ms) == 5
        assert result.ms_per_tunnel > 0 and result.tunnels_per_second > 0
        assert "tunnels, concurrency 1" in result.summary()

    run(body)


# --- bad input: the handshake ----------------------------------------------------------


def test_garbage_instead_of_tls(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with tunnel_server(certs, {}) as node:
            reader, writer = await wait(asyncio.open_connection(*node.address))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await read_to_end(reader) == b""
            await close_writer(writer)
            await assert_serves(node, certs)
            only_failure(node, "not_tls")
            assert logged(logs, "TLS handshake refused: not a TLS client", "[not_tls]")

    run(body)


def test_handshake_that_never_finishes_times_out(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with tunnel_server(certs, {}, config=SHORT_TIMEOUTS) as node:
            reader, writer = await wait(asyncio.open_connection(*node.address))
            writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then silence
            where = "{}:{}".format(*writer.get_extra_info("sockname"))
            assert await read_to_end(reader) == b""  # the server gave up after SHORT
            await close_writer(writer)
            await assert_serves(node, certs)
            only_failure(node, "handshake_timeout")
            assert logged(
                logs, f"tunnel from {where}: TLS handshake refused: no complete TLS handshake "
                f"within {SHORT:g}s", "[handshake_timeout]",
            )  # fmt: skip

    run(body)


def test_tls_1_2_is_refused(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    class Tls12(TlsContexts):
        def client_context(self, source: SpiffeId) -> ssl.SSLContext | None:
            context = super().client_context(source)
            assert context is not None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            return context

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            client_side = Tls12(certs.source(certs.issue(SOURCE)))
            with pytest.raises(TunnelHandshakeError, match="TLS handshake failed"):
                await open_tunnel(node, target.address, tls=client_side)
            await assert_serves(node, certs)
            only_failure(node, "tls_version")
            assert logged(logs, "protocol version not accepted", "[tls_version]")

    run(body)


@pytest.mark.parametrize(
    ("case", "counter", "log"),
    [
        ("another CA", "client_cert_untrusted", "unable to get local issuer certificate"),
        ("expired", "client_cert_expired", "certificate has expired"),
        ("not yet valid", "client_cert_not_yet_valid", "certificate is not yet valid"),
    ],
)
def test_bad_client_certificates_are_refused(
    run: Callable[[Body], None],
    certs: Certs,
    logs: pytest.LogCaptureFixture,
    case: str,
    counter: str,
    log: str,
) -> None:
    options: dict[str, dict[str, Any]] = {
        "another CA": {"pki": certs.other},
        "expired": {
            "not_before": NOW - dt.timedelta(days=2),
            "not_after": NOW - dt.timedelta(days=1),
        },
        "not yet valid": {
            "not_before": NOW + dt.timedelta(days=1),
            "not_after": NOW + dt.timedelta(days=2),
        },
    }
    kwargs = options[case]

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            bad = client_tls(certs, certs.issue(SOURCE, **kwargs))
            # TLS 1.3: the client's side of the handshake completes before the server
            # checks the client's certificate, so the client learns of it as a close.
            with pytest.raises(TunnelHandshakeError, match="closed the connection without"):
                await open_tunnel(node, target.address, tls=bad)
            await assert_serves(node, certs)
            only_failure(node, counter)
            assert logged(logs, f"TLS handshake refused: client certificate: {log}", counter)

    run(body)


def test_no_client_certificate_is_refused(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with tunnel_server(certs, {}) as node:
            reader, writer = await raw_tls(node, raw_context(None, pki=certs.pki))
            writer.write(GOOD_PREFACE)
            assert await read_to_end(reader) == b""
            await close_writer(writer)
            await assert_serves(node, certs)
            only_failure(node, "client_cert_missing")
            assert logged(logs, "no client certificate", "[client_cert_missing]")

    run(body)


def test_the_server_must_be_the_expected_identity(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    """A node that answers for DEST with OTHER's certificate (chained to our CA, so TLS
    alone would accept it) is refused by the client before it sends the header."""
    impostor = certs.issue(OTHER)

    class Impostor(TlsContexts):
        def workload_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
            return super().workload_context(OTHER if identity == DEST else identity)

    async def body() -> None:
        server_side = Impostor(certs.source(impostor))
        async with Target(echo=True) as target, tunnel_server(certs, {}, tls=server_side) as node:
            client = TunnelClient(client_tls(certs))
            with pytest.raises(TunnelImpersonation) as caught:
                await wait(client.connect(SOURCE, node.address, target.address, DEST, App))
            assert (caught.value.expected, caught.value.actual) == (DEST, OTHER)
            assert f"the server presented {OTHER}, but discovery says this endpoint is {DEST}" in (
                str(caught.value)
            )
            assert client.stats.impersonation == 1
            await node.server.close(grace=WAIT)
            assert target.conns == []  # the header (the target) was never sent
            # The client resets right after its side of the handshake: the server sees
            # that before or after its own side completed, depending on timing.
            failures = {k for k, v in vars(node.server.stats).items() if v} - NOT_FAILURES
            assert failures in ({"preface_truncated"}, {"handshake_aborted"})

    run(body)


def test_a_server_from_another_mesh_is_refused_by_the_client(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        foreign = certs.issue(DEST, pki=certs.other)
        async with tunnel_server(certs, {}, materials=(foreign,)) as node:
            with pytest.raises(TunnelHandshakeError, match="certificate did not verify"):
                await open_tunnel(node, ("127.0.0.1", 80), tls=client_tls(certs))
            await node.server.close(grace=WAIT)
            only_failure(node, "handshake_aborted")

    run(body)


@pytest.mark.parametrize("sni", ["unknown workload", "not weft", "no sni"])
def test_unknown_sni_fails_the_handshake(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture, sni: str
) -> None:
    async def body() -> None:
        async with tunnel_server(certs, {}) as node:
            if sni == "unknown workload":
                # A real client, reaching for a workload this node has no certificate of.
                with pytest.raises(TunnelHandshakeError, match="TLS handshake failed"):
                    await open_tunnel(
                        node, ("127.0.0.1", 80), tls=client_tls(certs), expected=OTHER
                    )
                expected_log = f"names {OTHER}, which has no certificate on this node"
            else:
                context = raw_context(certs.issue(SOURCE), pki=certs.pki)
                # An IP address as server_hostname: Python then sends no SNI at all.
                name = "example.com" if sni == "not weft" else "127.0.0.1"
                with pytest.raises((ConnectionError, ssl.SSLError)):
                    await wait(asyncio.open_connection(*node.address, ssl=context,
                                                       server_hostname=name))  # fmt: skip
                expected_log = (
                    "SNI 'example.com' is not a Weft workload name"
                    if sni == "not weft"
                    else "the client sent no SNI"
                )
            await assert_serves(node, certs)
            only_failure(node, "unknown_sni")
            assert logged(logs, "TLS handshake refused: ", expected_log, "[unknown_sni]")

    run(body)


@pytest.mark.parametrize(
    "identity", ["spiffe://cluster.local/weft/node/node-1", "spiffe://elsewhere.test/ns/a/sa/b"]
)
def test_client_identities_that_may_not_use_tunnels(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture, identity: str
) -> None:
    async def body() -> None:
        async with tunnel_server(certs, {}) as node:
            context = raw_context(certs.issue(identity), pki=certs.pki)
            reader, writer = await raw_tls(node, context)
            writer.write(GOOD_PREFACE)
            assert await read_to_end(reader) == b""
            await close_writer(writer)
            await assert_serves(node, certs)
            only_failure(node, "client_identity_refused")
            assert logged(logs, f"client identity {identity}", "[client_identity_refused]")

    run(body)


# --- bad input: the preface ------------------------------------------------------------


async def send_preface(node: Node, certs: Certs, data: bytes, *, then_close: bool = False) -> bytes:
    """Send ``data`` after a good handshake; return everything the server sent back."""
    reader, writer = await raw_tls(node, raw_context(certs.issue(SOURCE), pki=certs.pki))
    writer.write(data)
    if then_close:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await wait(writer.wait_closed())
        return b""
    answer = await read_to_end(reader)
    await close_writer(writer)
    return answer


V1_CONNECT = MAGIC + bytes((1, Kind.CONNECT, 0, 8, 1, 6, 127, 0, 0, 1, 0, 80))
GOOD_PREFACE = encode_preface(Settings())

BAD_PREFACES = [
        ("garbage", b"\x00garbage", "bad_header", "not a Weft tunnel"),
        ("wrong kind", MAGIC + bytes((VERSION, Kind.CONNECT, 0, 0)), "bad_header",
         "expected a SETTINGS preface"),
        ("future version", MAGIC + bytes((9, Kind.SETTINGS, 0, 0)), "unsupported_version",
         "tunnel version 9"),
        ("version 1 client", V1_CONNECT, "unsupported_version", "a version 1 tunnel client"),
        ("oversized", MAGIC + bytes((VERSION, Kind.SETTINGS)) + (60000).to_bytes(2, "big"),
         "header_too_large", "preface declares 60008 bytes"),
        ("no settings", MAGIC + bytes((VERSION, Kind.SETTINGS, 0, 0)), "bad_header",
         "preface lacks MAX_FRAME, MAX_STREAMS, WINDOW"),
        ("settings out of range",
         MAGIC + bytes((VERSION, Kind.SETTINGS, 0, 18, 4, 4, 0, 0, 0, 0, 5, 4, 0, 1, 0, 0,
                        6, 4, 0, 1, 0, 0)),
         "bad_header", "max_streams must be 1..65536, got 0"),
        ("incomplete", GOOD_PREFACE[:-3], "header_timeout",
         f"no complete preface within {SHORT:g}s"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "data", "failure", "log"), BAD_PREFACES, ids=[c[0] for c in BAD_PREFACES]
)
def test_bad_prefaces_close_the_connection_with_their_reason(
    run: Callable[[Body], None],
    certs: Certs,
    logs: pytest.LogCaptureFixture,
    case: str,
    data: bytes,
    failure: str,
    log: str,
) -> None:
    # Only the incomplete preface waits for the server's header timeout.
    config = (
        TunnelServerConfig(handshake_timeout=STEADY, header_timeout=SHORT)
        if case == "incomplete"
        else None
    )

    async def body() -> None:
        async with tunnel_server(certs, {}, config=config) as node:
            answer = await send_preface(node, certs, data)
            # The server's own preface, then the close: no stream was ever served.
            assert answer == encode_preface(node.server.config.settings())
            await assert_serves(node, certs)
            only_failure(node, failure)
            assert logged(logs, f"({SOURCE}): ", log, f"[{failure}]")

    run(body)


def test_truncated_preface(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with tunnel_server(certs, {}) as node:
            await send_preface(node, certs, GOOD_PREFACE[: FIXED_SIZE + 2], then_close=True)
            await assert_serves(node, certs)
            only_failure(node, "preface_truncated")
            assert logged(
                logs, f"({SOURCE}): the client closed the connection after {FIXED_SIZE + 2} "
                "bytes of its preface", "[preface_truncated]",
            )  # fmt: skip

    run(body)


# --- bad input: frames from an authenticated peer -------------------------------------------


class Raw:
    """A hand-driven tunnel client speaking frames, for what TunnelClient never sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 20)
        self.events: list[Any] = []
        self.settings: Settings | None = None

    @classmethod
    async def connect(cls, node: Node, certs: Certs) -> Raw:
        raw = cls(*await raw_tls(node, raw_context(certs.issue(SOURCE), pki=certs.pki)))
        raw.writer.write(GOOD_PREFACE)
        preface = PrefaceDecoder()
        while not preface.done:
            preface.feed(await wait(raw.reader.read(1)))
        got = preface.feed(b"")
        assert isinstance(got, Preface)
        raw.settings = got.settings
        return raw

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def until(self, check: Callable[[list[Any]], bool]) -> list[Any]:
        """Read frames until ``check(events)`` holds or the server closes."""
        while not check(self.events):
            try:
                data = await wait(self.reader.read(65536))
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                break
            self.events += self.decoder.feed(data)
        return self.events

    async def closed_with(self, reason: Reset) -> None:
        events = await self.until(lambda e: False)  # to the end
        assert isinstance(events[-1], GoAway) and events[-1].reason == reason, events[-3:]
        await close_writer(self.writer)


def _ok(answer: Answer | Invalid) -> bool:
    return isinstance(answer, Answer) and answer.ok


def opening(stream: int, target: Address) -> bytes:
    return frame(FrameType.OPEN, stream, encode_open_payload(target))


VIOLATIONS = [
    ("oversized frame", struct.pack("!II", (64 * 1024) + 1, 1) + b"x" * 65537,
     "a 65537-byte frame; at most 65536"),
    ("data for a stream never opened", data_frames(7, b"x", 1024),
     "DATA for stream 7, never opened"),
    ("an answer from the client", frame(FrameType.ANSWER, 1, encode_answer_payload(Status.OK)),
     "ANSWER for stream 1 sent to the server"),
    ("unknown frame type", frame(0x33, 1, b""), "unknown frame type 0x33"),
    ("stream IDs going back", opening(5, ("127.0.0.1", 9)) + opening(3, ("127.0.0.1", 9)),
     "OPEN for stream 3, not above the last (5)"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "wire", "log"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_framing_violations_close_that_connection_only(
    run: Callable[[Body], None],
    certs: Certs,
    logs: pytest.LogCaptureFixture,
    case: str,
    wire: bytes,
    log: str,
) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            bystander = await open_tunnel(node, target.address, tls=client_tls(certs))
            raw = await Raw.connect(node, certs)
            raw.send(wire)
            await raw.closed_with(Reset.PROTOCOL)
            await _until(lambda: node.server.stats.protocol_violation == 1)
            assert logged(logs, f"({SOURCE}): closed: {log}", "[protocol_violation]")
            # Another client's connection on the same node never noticed.
            bystander.write(b"fine")
            assert await wait(bystander.reader.readexactly(4)) == b"fine"
            await bystander.close()
            await assert_serves(node, certs)

    run(body)


def test_a_bad_open_is_refused_and_the_connection_goes_on(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            raw = await Raw.connect(node, certs)
            raw.send(frame(FrameType.OPEN, 1, b"\x01\x03ab"), opening(2, target.address))
            events = await raw.until(lambda e: len(e) >= 2)
            answers = {e.stream: e.answer.status for e in events if isinstance(e, Answered)}
            assert answers == {1: Status.BAD_HEADER, 2: Status.OK}
            raw.send(data_frames(2, b"ping", 1024))
            events = await raw.until(lambda e: any(isinstance(x, Data) for x in e))
            assert [e.data for e in events if isinstance(e, Data)] == [b"ping"]
            assert node.server.stats.bad_header == 1
            assert logged(logs, f"({SOURCE}): stream 1: refused BAD_HEADER: field 0x01 declares 3")
            await close_writer(raw.writer)

    run(body)


def test_a_stream_flood_is_refused_past_the_limit(
    run: Callable[[Body], None], certs: Certs
) -> None:
    config = TunnelServerConfig(handshake_timeout=STEADY, header_timeout=STEADY, max_streams=5)

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}, config=config) as node:
            node.pods[target.address] = DEST
            raw = await Raw.connect(node, certs)
            assert raw.settings is not None and raw.settings.max_streams == 5
            raw.send(*(opening(i, target.address) for i in range(1, 9)))
            events = await raw.until(lambda e: len(e) >= 8)
            ok = {e.stream for e in events if isinstance(e, Answered) and _ok(e.answer)}
            refused = {e.stream for e in events if isinstance(e, StreamReset)}
            assert ok == {1, 2, 3, 4, 5} and refused == {6, 7, 8}
            assert all(r.reason == Reset.REFUSED for r in events if isinstance(r, StreamReset))
            assert node.server.stats.streams_refused == 3
            # The five are served; ending one makes room for another.
            raw.send(reset_frame(1, Reset.CANCEL), opening(9, target.address))
            events = await raw.until(lambda e: any(getattr(x, "stream", 0) == 9 for x in e))
            assert [_ok(e.answer) for e in events if isinstance(e, Answered) and e.stream == 9] == [
                True
            ]
            await close_writer(raw.writer)

    run(body)


def test_rapid_reset_closes_the_connection(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    """Opening streams and cancelling them before their answer, without end (the HTTP/2
    rapid reset attack), costs the attacker its connection after a bounded burst."""
    config = TunnelServerConfig(handshake_timeout=STEADY, header_timeout=STEADY, rapid_resets=20)

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}, config=config) as node:
            node.pods[target.address] = DEST
            raw = await Raw.connect(node, certs)
            raw.send(
                *(opening(i, target.address) + reset_frame(i, Reset.CANCEL) for i in range(1, 200))
            )
            await raw.closed_with(Reset.RAPID_RESET)
            await _until(lambda: node.server.stats.protocol_violation == 1)
            assert logged(logs, "streams cancelled before their answer (rapid reset)")
            await assert_serves(node, certs)

    run(body)


# --- refusals: target and policy --------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "status", "log"),
    [
        ("unknown target", Status.UNKNOWN_TARGET, "no pod is known at this address"),
        ("not on node", Status.TARGET_NOT_ON_NODE, "the pod at this address runs on another node"),
        ("wrong identity", Status.TARGET_IDENTITY_MISMATCH,
         f"the pod runs as {OTHER}, but the client asked for {DEST}"),
        ("policy", Status.POLICY_DENIED, "frontend may not call backend"),
        ("refusing", Status.TARGET_UNREACHABLE, "connecting failed (ConnectionRefusedError"),
        ("hook raises", Status.INTERNAL_ERROR, "the authorization hook raised"),
    ],
)  # fmt: skip
def test_refusals_name_their_reason(
    run: Callable[[Body], None],
    certs: Certs,
    logs: pytest.LogCaptureFixture,
    case: str,
    status: Status,
    log: str,
) -> None:
    target = closed_port() if case == "refusing" else ("127.0.0.1", 9)
    choices: dict[str, dict[Address, SpiffeId | NotLocal]] = {
        "unknown target": {},
        "not on node": {target: NotLocal.ELSEWHERE},
        "wrong identity": {target: OTHER},
    }
    pods = choices.get(case, {target: DEST})

    def authorize(client: SpiffeId, address: Address, protocol: str | None) -> Decision:
        if address != target:
            return Decision.allow()  # assert_serves's target
        if case == "hook raises":
            raise RuntimeError("policy engine bug")
        if case == "policy":
            return Decision.deny("frontend may not call backend")
        return Decision.allow()

    async def body() -> None:
        async with tunnel_server(certs, pods, authorize=authorize) as node:
            client = TunnelClient(client_tls(certs))
            with pytest.raises(TunnelRefused) as caught:
                await wait(client.connect(SOURCE, node.address, target, DEST, App))
            assert caught.value.status is status
            assert f"refused {status.name}" in str(caught.value)
            assert client.stats.refused == 1
            await assert_serves(node, certs)
            only_failure(node, status.name.lower())
            where = f"({SOURCE}) to 127.0.0.1:{target[1]}: refused {status.name}: {log}"
            assert logged(logs, where)

    run(body)


# --- the client's own failures ----------------------------------------------------------


def test_client_errors_before_any_tunnel(run: Callable[[Body], None], certs: Certs) -> None:
    async def body() -> None:
        client = TunnelClient(TlsContexts(certs.source()))  # no material at all
        with pytest.raises(TunnelSetupError, match=f"no certificate for {SOURCE}"):
            await client.connect(SOURCE, ("127.0.0.1", 1), ("127.0.0.1", 80), DEST, App)

        client = TunnelClient(client_tls(certs))
        with pytest.raises(TunnelUnreachable, match="cannot connect to the node's tunnel port"):
            await client.connect(SOURCE, closed_port(), ("127.0.0.1", 80), DEST, App)
        assert (client.stats.attempts, client.stats.unreachable) == (1, 1)

        connect = tunnel_connector(client, lambda app, destination: None)
        with pytest.raises(TunnelNoRoute) as caught:
            await connect(("127.0.0.1", 5), ("127.0.0.1", 80), App)
        assert isinstance(caught.value, TunnelError) and isinstance(caught.value, ConnectionError)

    run(body)


def test_close_resets_tunnels_still_relaying(
    run: Callable[[Body], None], certs: Certs, logs: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            app = await open_tunnel_to(node, target, certs)
            app.write(b"x")
            assert await wait(app.reader.readexactly(1)) == b"x"
            await node.server.close(grace=0.05)
            assert isinstance(await wait(app.lost), ConnectionResetError)
            assert node.server.stats.active == 0
            assert logged(logs, "still serving streams at the shutdown deadline")

    run(body)


def test_cancelling_a_client_connect_leaves_nothing_open(
    run: Callable[[Body], None], certs: Certs
) -> None:
    """A connect cancelled while the server is still connecting to the pod (as the
    outbound proxy's timeout would cancel it) and a server closed meanwhile leave no
    task or connection behind."""

    async def body() -> None:
        entered = asyncio.Event()

        async def never_connect(target: Address, factory: Any) -> asyncio.BaseTransport:
            entered.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        server_tls = TlsContexts(certs.source(certs.issue(DEST)))
        server = TunnelServer(
            contexts=server_tls,
            locate_target=lambda address: DEST,
            connect_target=never_connect,
            config=TunnelServerConfig(target_connect_timeout=WAIT),
        )
        listener = tunnel_listener("127.0.0.1", 0)
        address = listener.getsockname()[:2]
        serving = asyncio.create_task(server.serve(listener), name="test: tunnel serve")
        try:
            client = TunnelClient(client_tls(certs))
            connecting = asyncio.create_task(
                client.connect(SOURCE, address, ("127.0.0.1", 80), DEST, App),
                name="test: connect",
            )
            await wait(entered.wait())
            connecting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await connecting
        finally:
            await server.close(grace=0)
            await wait(serving)

    run(body)


# --- pooling and multiplexing ---------------------------------------------------------------


async def open_many(client: TunnelClient, node: Node, target: Target, n: int) -> list[App]:
    apps = [App() for _ in range(n)]
    await wait(
        asyncio.gather(
            *(client.connect(SOURCE, node.address, target.address, DEST, a.itself) for a in apps)
        )
    )
    return apps


async def echo_each(apps: list[App]) -> None:
    for i, app in enumerate(apps):
        app.write(b"%05d" % i)
    for i, app in enumerate(apps):
        assert await wait(app.reader.readexactly(5)) == b"%05d" % i


def test_concurrent_connections_share_one_tls_connection(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs))
            apps = await open_many(client, node, target, 60)
            await echo_each(apps)
            assert client.connections == 1 and client.open_streams == 60
            assert client.stats.connections == 1 and client.stats.reused == 59
            assert node.server.stats.sessions == 1 and node.server.stats.streams_active == 60
            assert node.server.stats.established == 60
            for app in apps:
                await app.close()
            await _until(lambda: node.server.stats.streams_active == 0)
            # Sequential connections reuse it too: no handshake on their path.
            again = await open_many(client, node, target, 1)
            await echo_each(again)
            assert client.stats.connections == 1
            await again[0].close()
            await client.close()

    run(body)


@pytest.mark.parametrize("side", ["client", "server"])
def test_past_the_stream_limit_another_connection_opens(
    run: Callable[[Body], None], certs: Certs, side: str
) -> None:
    """The client's own limit, or the server's (from its preface), whichever is lower."""
    client_config = TunnelClientConfig(max_streams=10 if side == "client" else 100)
    server_config = TunnelServerConfig(
        handshake_timeout=STEADY, header_timeout=STEADY, max_streams=10 if side == "server" else 100
    )

    async def body() -> None:
        async with (
            Target(echo=True) as target,
            tunnel_server(certs, {}, config=server_config) as node,
        ):
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs), config=client_config)
            apps = await open_many(client, node, target, 25)
            await echo_each(apps)
            assert client.connections == 3 and node.server.stats.sessions == 3
            assert sorted(c["streams"] for c in client.pool_state()[0]["connections"]) == [
                5,
                10,
                10,
            ]
            assert node.server.stats.streams_refused == 0  # the client never asked for more
            for app in apps:
                await app.close()
            await client.close()

    run(body)


def test_a_reset_stream_leaves_its_siblings_alone(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        async with (
            Target(echo=True) as echo,
            Target(reset_on_data=True) as resetting,
            tunnel_server(certs, {}) as node,
        ):
            node.pods[echo.address] = node.pods[resetting.address] = DEST
            client = TunnelClient(client_tls(certs))
            healthy = await open_many(client, node, echo, 3)
            doomed = App()
            await wait(client.connect(SOURCE, node.address, resetting.address, DEST, doomed.itself))
            assert client.connections == 1
            doomed.write(b"boom")
            assert isinstance(await wait(doomed.lost), ConnectionResetError)
            # And the app's own reset crosses the tunnel as a reset, too.
            healthy[2].transport.abort()  # type: ignore[union-attr]
            await _until(lambda: len(echo.conns) == 3 and echo.conns[2].lost.is_set())
            await echo_each(healthy[:2])
            assert client.connections == 1 and client.open_streams == 2
            for app in healthy[:2]:
                await app.close()
            await client.close()

    run(body)


def test_a_stream_whose_reader_stalls_does_not_stall_its_siblings(
    run: Callable[[Body], None], certs: Certs
) -> None:
    """One app stops reading while its pod sends 8 MiB; the stream's window stops the
    pod's side after one window, the node buffers a bounded amount, and another stream
    on the same connection keeps its round trips."""
    window = Settings().window

    async def body() -> None:
        async with (
            Target(banner=b"z" * (8 << 20)) as flood,
            Target(echo=True) as echo,
            tunnel_server(certs, {}) as node,
        ):
            node.pods[flood.address] = node.pods[echo.address] = DEST
            client = TunnelClient(client_tls(certs))
            stalled = App()
            stalled.reader = asyncio.StreamReader(limit=1)
            await wait(client.connect(SOURCE, node.address, flood.address, DEST, stalled.itself))
            assert stalled.transport is not None
            stalled.transport.pause_reading()
            (busy,) = await open_many(client, node, echo, 1)
            for i in range(50):
                busy.write(b"%05d" % i)
                assert await wait(busy.reader.readexactly(5)) == b"%05d" % i
            assert client.connections == 1
            # Bounded: the client holds at most a window for the stalled stream, and the
            # server side at most its window of credit plus the relay's high-water mark.
            (session,) = [s for p in client._peers.values() for s in p.sessions]
            stream = session.streams[1]
            assert sum(map(len, stream._inbox)) <= window
            (server_session,) = node.server.sessions
            server_stream = server_session.streams[1]
            assert server_stream.get_write_buffer_size() <= 2 * window
            stalled.transport.resume_reading()
            got = 0
            while got < 8 << 20:
                got += len(await wait(stalled.reader.read(1 << 20)))
            await stalled.close()
            await busy.close()
            await client.close()

    run(body)


def test_idle_pooled_connections_close(run: Callable[[Body], None], certs: Certs) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs), config=TunnelClientConfig(idle_timeout=SHORT))
            (app,) = await open_many(client, node, target, 1)
            await echo_each([app])
            await app.close()
            await _until(lambda: client.connections == 0)
            await _until(lambda: node.server.stats.sessions_active == 0)
            assert node.server.stats.protocol_violation == 0
            # The next connection dials again.
            (app,) = await open_many(client, node, target, 1)
            await echo_each([app])
            assert client.stats.connections == 2
            await app.close()
            await client.close()

    run(body)


def test_drain_lets_open_streams_finish_and_refuses_new_ones(
    run: Callable[[Body], None], certs: Certs
) -> None:
    """GOAWAY on shutdown: the open stream keeps working within the grace period; the
    client opens nothing more on that connection (a new one would go to the new agent in
    a make-before-break restart; here there is none, so the connect fails to dial)."""

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs))
            (app,) = await open_many(client, node, target, 1)
            closing = asyncio.create_task(node.server.close(grace=WAIT))
            (session,) = [s for p in client._peers.values() for s in p.sessions]
            await _until(lambda: session.draining)
            await echo_each([app])  # still served
            with pytest.raises(TunnelUnreachable):
                await wait(client.connect(SOURCE, node.address, target.address, DEST, App))
            await app.close()
            await wait(closing)  # returns as soon as the last stream ended, not at WAIT
            assert node.server.stats.goaways == 1
            await _until(lambda: client.connections == 0)
            await client.close()

    run(body)


def test_a_rotated_client_certificate_gets_a_new_connection(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            source = certs.source(certs.issue(SOURCE))
            client = TunnelClient(TlsContexts(source))
            (old,) = await open_many(client, node, target, 1)
            source.materials[SOURCE] = certs.issue(SOURCE, generation=2)
            (new,) = await open_many(client, node, target, 1)
            await echo_each([old, new])
            assert client.stats.connections == 2 and client.stats.drained == 1
            # The old connection carries its stream to the end, then closes.
            assert client.connections == 2
            await old.close()
            await _until(lambda: client.connections == 1)
            await new.close()
            await client.close()

    run(body)


def test_a_rotated_server_certificate_sends_clients_to_a_new_connection(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        server_source = certs.source(certs.issue(DEST))
        server_tls = TlsContexts(server_source)
        async with Target(echo=True) as target, tunnel_server(certs, {}, tls=server_tls) as node:
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs))
            (first,) = await open_many(client, node, target, 1)
            server_source.materials[DEST] = certs.issue(DEST, generation=2)
            # Served on the old connection, which is then told to go away...
            (second,) = await open_many(client, node, target, 1)
            (session,) = [s for p in client._peers.values() for s in p.sessions]
            await _until(lambda: session.draining)
            # ... so the next one gets a connection with the new certificate.
            (third,) = await open_many(client, node, target, 1)
            await echo_each([first, second, third])
            assert client.stats.connections == 2 and node.server.stats.goaways == 1
            assert peer_serial(first) == peer_serial(second) != peer_serial(third)
            for app in (first, second, third):
                await app.close()
            await client.close()

    run(body)


def test_certificate_expiry_closes_the_connection(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
        server_tls = TlsContexts(certs.source(certs.issue(DEST, not_after=soon)))
        async with Target(echo=True) as target, tunnel_server(certs, {}, tls=server_tls) as node:
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs))
            (app,) = await open_many(client, node, target, 1)
            await echo_each([app])
            assert isinstance(await wait(app.lost), ConnectionResetError)
            assert client.connections == 0
            await client.close()

    run(body)


# --- handshake admission -----------------------------------------------------------------


def test_a_burst_waits_for_handshake_turns_and_queueing_never_times_out(
    run: Callable[[Body], None], certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 connects at once from 40 source identities (so 40 connections: one pool key
    each), one handshake at a time, each made slow (50 ms more): the queue takes ~2 s,
    four times the handshake timeout, yet every tunnel opens, because the timeout starts
    only when a connection has its turn."""
    real = TunnelClient._handshake
    running = 0
    most = 0

    async def slow_handshake(self: TunnelClient, *args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.05)
            return await real(self, *args)
        finally:
            running -= 1

    monkeypatch.setattr(TunnelClient, "_handshake", slow_handshake)

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            sources = [SpiffeId.workload("shop", f"client-{i}") for i in range(40)]
            client = TunnelClient(
                TlsContexts(certs.source(*(certs.issue(s) for s in sources))),
                config=TunnelClientConfig(max_handshakes=1, handshake_timeout=0.5),
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            transports = await wait(
                asyncio.gather(
                    *(
                        client.connect(source, node.address, target.address, DEST, App)
                        for source in sources
                    )
                )
            )
            elapsed = loop.time() - started
            assert len(transports) == 40 and client.stats.opened == 40
            assert elapsed > 4 * 0.5  # the queue outlasted the timeout several times
            assert most == 1
            adm = client.admission.stats
            assert (adm.admitted, adm.waited, adm.queued_peak) == (40, 39, 39)
            assert adm.refused_full == adm.refused_timeout == 0
            for t in transports:
                t.close()
            await node.server.close(grace=WAIT)

    run(body)


def test_a_full_handshake_queue_fails_fast_as_overloaded(
    run: Callable[[Body], None], certs: Certs
) -> None:
    async def body() -> None:
        # A port that completes TCP handshakes (the kernel's backlog) and never answers
        # a ClientHello: the one handshake slot stays taken.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = silent.getsockname()[:2]
        client = TunnelClient(
            client_tls(certs),
            config=TunnelClientConfig(max_handshakes=1, handshake_queue=1, handshake_timeout=WAIT),
        )
        target = ("127.0.0.1", 1)
        first = asyncio.create_task(client.connect(SOURCE, address, target, DEST, App))
        second = asyncio.create_task(client.connect(SOURCE, address, target, DEST, App))
        try:
            await asyncio.sleep(0.05)
            assert client.admission.stats.queued == 1
            with pytest.raises(TunnelOverloaded, match="already wait"):
                await client.connect(SOURCE, address, target, DEST, App)
            assert client.stats.overloaded == 1
        finally:
            for t in (first, second):
                t.cancel()
            await asyncio.gather(first, second, return_exceptions=True)
            silent.close()


def test_cancelled_handshakes_close_cleanly(
    run: Callable[[Body], None], certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Connects cancelled mid-handshake (shutdown, or the proxy's overall deadline) leave
    no descriptor behind and no "Fatal error on SSL protocol" in the log."""
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def body() -> None:
        async with Target(echo=True) as target, tunnel_server(certs, {}) as node:
            node.pods[target.address] = DEST
            client = TunnelClient(client_tls(certs), config=TunnelClientConfig(max_handshakes=64))
            fds_before = len(os.listdir("/proc/self/fd"))
            for delay in [i / 1000 for i in range(0, 40, 2)]:
                tasks = [
                    asyncio.create_task(
                        client.connect(SOURCE, node.address, target.address, DEST, App)
                    )
                    for _ in range(30)
                ]
                await asyncio.sleep(delay)
                for t in tasks:
                    t.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for r in results:
                    if isinstance(r, asyncio.BaseTransport):
                        r.close()
            await node.server.close(grace=WAIT)
            for _ in range(100):  # closing handshakes finish on the loop
                await asyncio.sleep(0.02)
                if len(os.listdir("/proc/self/fd")) <= fds_before:
                    break
            assert len(os.listdir("/proc/self/fd")) <= fds_before
        assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]

    run(body)


def test_the_server_bounds_its_handshakes_and_refuses_past_its_queue(
    run: Callable[[Body], None], certs: Certs
) -> None:
    """One handshake at a time and no queue: while a silent client holds the turn, a
    second client is reset at once (and fails over, as a remote failure); once the
    silent one times out, handshakes are served again."""

    async def body() -> None:
        config = TunnelServerConfig(
            handshake_timeout=1.0, header_timeout=STEADY, max_handshakes=1, handshake_queue=0
        )
        async with Target(echo=True) as target, tunnel_server(certs, {}, config=config) as node:
            node.pods[target.address] = DEST
            silent = socket.create_connection(node.address)  # takes the one turn
            try:
                await _until(lambda: node.server.admission.stats.in_flight == 1)
                client = TunnelClient(client_tls(certs))
                with pytest.raises(TunnelHandshakeError):
                    await wait(client.connect(SOURCE, node.address, target.address, DEST, App))
                assert node.server.stats.overloaded == 1
                await _until(lambda: node.server.stats.handshake_timeout == 1)
                transport = await wait(
                    client.connect(SOURCE, node.address, target.address, DEST, App)
                )
                transport.close()
            finally:
                silent.close()
            await node.server.close(grace=WAIT)

    run(body)
