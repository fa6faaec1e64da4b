"""ControlPlaneClient, and WorkloadCertManager through it, against a fake control plane.

The fake speaks just enough of ``weft.wire`` over real TLS 1.3 on 127.0.0.1: bootstrap
with a per-node token (no client certificate), CSR signing over mTLS with the node
certificate and node binding, refusals with their codes.  It signs with the test PKI
(tests/pki.py), so nothing here depends on the real control plane.

Every test runs on asyncio's loop and on uvloop (the agent's), through the ``run``
fixture, which also fails a test that leaves tasks behind (see test_outbound_proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import CollectorRegistry

from nodeagent.certs import CertConfig, WorkloadCertManager
from nodeagent.cpclient import (
    ClientConfig,
    ControlPlaneClient,
    ControlPlaneError,
    ControlPlaneUnavailable,
    InvalidResponse,
    RefusedError,
    ServerIdentityError,
    controlplane_id,
)
from tests.pki import Pki
from weft.http import HttpProtocolError, parse_response_head
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, load_certs, spiffe_id_of
from weft.wire import (
    BOOTSTRAP_PATH,
    CERTIFICATES_PATH,
    BootstrapRequest,
    CertificateRequest,
    CertificateResponse,
    Refusal,
    RefusalCode,
)

pytestmark = pytest.mark.sockets

Body = Callable[[], Coroutine[Any, Any, None]]
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
A = SpiffeId.workload("shop", "web")
B = SpiffeId.workload("shop", "db")
NODE = "node-1"
TOKEN = "token-node-1"


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[[Body], None]:
    """Run a test body on a fresh loop of each kind; fail it if it leaks tasks."""
    factory = LOOP_FACTORIES[request.param]

    def run_body(body: Body) -> None:
        async def guarded() -> None:
            async with asyncio.timeout(30):
                await body()
            leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in leaked:
                task.cancel()
            await asyncio.gather(*leaked, return_exceptions=True)
            if leaked:
                pytest.fail("tasks leaked: " + ", ".join(sorted(repr(t) for t in leaked)))

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(guarded())

    return run_body


def issue(
    pki: Pki, csr_pem: str, identity: SpiffeId, lifetime: float, backdate: float = 0.0
) -> x509.Certificate:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=backdate)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.issuer.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=backdate + lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(pki.issuer_key, hashes.SHA256())
    )


def http(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


@dataclass
class FakeControlPlane:
    pki: Pki
    tmp: Path
    server_identity: str = str(controlplane_id())
    server_pki: Pki | None = None
    """Signs the server certificate (default: ``pki``)."""
    tokens: dict[str, str] = field(default_factory=lambda: {NODE: TOKEN})
    bound: dict[str, set[SpiffeId]] = field(default_factory=lambda: {NODE: {A}})
    leaf_lifetime: float = 3600.0
    node_lifetime: float = 3600.0
    node_backdate: float = 0.0
    anchors: list[Pki] = field(default_factory=list)
    """Trust bundle sent back (default: ``pki``'s anchor)."""
    raw_answer: bytes | None = None
    """Answer every request with exactly these bytes."""
    bootstraps: int = 0
    peers: list[SpiffeId | None] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def __aenter__(self) -> FakeControlPlane:
        key_path, chain_path = (self.server_pki or self.pki).write_leaf(
            self.tmp / "cp-server", self.server_identity
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(chain_path, key_path)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # bootstrap comes without a client certificate
        ctx.load_verify_locations(cadata=self.pki.bundle_pem.decode())
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await handshakes_settled()

    @property
    def bundle_file(self) -> Path:
        path = self.tmp / "anchors.pem"
        if not path.exists():
            path.write_bytes(self.pki.bundle_pem)
        return path

    def client(self, **kw: Any) -> ControlPlaneClient:
        return ControlPlaneClient(
            "127.0.0.1", self.bundle_file, self.tmp / "node", port=self.port, **kw
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            lines = head.split("\r\n")
            _, path, _ = lines[0].split(" ")
            headers = dict(line.split(": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(headers["Content-Length"]))
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            peer = spiffe_id_of(x509.load_der_x509_certificate(der)) if der else None
            self.peers.append(peer)
            if self.raw_answer is not None:
                writer.write(self.raw_answer)
            else:
                writer.write(self._answer(path, body, peer))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # a client that went away or failed the handshake
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(task)

    def _answer(self, path: str, body: bytes, peer: SpiffeId | None) -> bytes:
        def refuse(code: RefusalCode, message: str) -> bytes:
            refusal = Refusal(code, message, {"test": "yes"})
            return http(refusal.http_status, refusal.encode())

        if path == BOOTSTRAP_PATH:
            boot = BootstrapRequest.decode(body)
            if self.tokens.get(boot.node) != boot.token:
                return refuse(RefusalCode.UNAUTHENTICATED, "unknown bootstrap token")
            identity = SpiffeId.node(boot.node)
            cert = issue(self.pki, boot.csr_pem, identity, self.node_lifetime, self.node_backdate)
            self.bootstraps += 1
        elif path == CERTIFICATES_PATH:
            if peer is None or not peer.is_node:
                return refuse(RefusalCode.UNAUTHENTICATED, "a node certificate is required")
            req = CertificateRequest.decode(body)
            identity = SpiffeId.parse(req.identity)
            if identity not in self.bound.get(peer.node_name or "", set()):
                return refuse(RefusalCode.NODE_NOT_BOUND, f"no pod of {identity} on {peer}")
            cert = issue(self.pki, req.csr_pem, identity, self.leaf_lifetime)
        else:
            return refuse(RefusalCode.MALFORMED_REQUEST, f"no such path {path}")
        anchors = self.anchors or [self.pki]
        return http(
            200,
            CertificateResponse(
                certificate_pem=cert_pem(cert).decode(),
                chain_pem=[cert_pem(self.pki.issuer).decode()],
                trust_bundle_pem=[cert_pem(p.anchor).decode() for p in anchors],
                not_after=cert.not_valid_after_utc.timestamp(),
            ).encode(),
        )


async def handshakes_settled() -> None:
    """Wait for server-side handshakes still in flight (a client that rejected the server
    went away; the server learns it a moment later).  asyncio's ``Server.wait_closed``
    does not wait for those on Python 3.11."""
    for _ in range(200):
        if not any("_accept_connection" in repr(t.get_coro()) for t in asyncio.all_tasks()):
            return
        await asyncio.sleep(0.01)
    pytest.fail("server-side TLS handshakes still running 2 s after the server closed")


def csr_for(identity: SpiffeId) -> bytes:
    return build_csr(generate_key(), identity)


# --- the client ---------------------------------------------------------------------------


def test_bootstrap_then_request_over_mtls(run, tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeControlPlane(Pki(), tmp_path) as cp:
            client = cp.client()
            await client.bootstrap(NODE, TOKEN)
            assert client.node_identity == SpiffeId.node(NODE)
            key_file, chain_file = tmp_path / "node/node-key.pem", tmp_path / "node/node-chain.pem"
            assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
            assert spiffe_id_of(load_certs(chain_file.read_bytes())[0]) == SpiffeId.node(NODE)

            resp = await client.request_certificate(A, csr_for(A))
            (leaf,) = load_certs(resp.certificate_pem.encode())
            assert spiffe_id_of(leaf) == A
            assert resp.not_after == leaf.not_valid_after_utc.timestamp()
            # bootstrap without a client certificate, the CSR with the node's
            assert cp.peers == [None, SpiffeId.node(NODE)]
            assert cp.bootstraps == 1

    run(body)


def test_refusals_carry_their_code(run, tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeControlPlane(Pki(), tmp_path) as cp:
            client = cp.client()
            with pytest.raises(RefusedError) as bad_token:
                await client.bootstrap(NODE, "wrong")
            assert bad_token.value.code is RefusalCode.UNAUTHENTICATED
            assert "bootstrap refused: UNAUTHENTICATED: unknown bootstrap token" in str(
                bad_token.value
            )

            # The credential is kept: once it is right, requests bootstrap by themselves.
            tokens = iter(["wrong", TOKEN])
            with pytest.raises(RefusedError):
                await client.bootstrap(NODE, lambda: next(tokens))
            resp = await client.request_certificate(A, csr_for(A))
            assert resp.certificate_pem

            with pytest.raises(RefusedError) as not_bound:
                await client.request_certificate(B, csr_for(B))
            assert not_bound.value.code is RefusalCode.NODE_NOT_BOUND
            assert not_bound.value.refusal.details == {"test": "yes"}
            assert str(B) in str(not_bound.value)

    run(body)


@pytest.mark.parametrize("case", ["other-spiffe-id", "other-ca"])
def test_a_server_that_is_not_the_control_plane_is_rejected(run, tmp_path: Path, case: str) -> None:
    async def body() -> None:
        pki = Pki()
        impostor = (
            {"server_identity": str(A)} if case == "other-spiffe-id" else {"server_pki": Pki()}
        )
        async with FakeControlPlane(pki, tmp_path, **impostor) as cp:
            client = cp.client()
            with pytest.raises(ServerIdentityError) as err:
                await client.bootstrap(NODE, TOKEN)
            if case == "other-spiffe-id":
                assert f"presented {A}, expected {controlplane_id()}" in str(err.value)
                assert cp.peers == []  # not a byte of the request was sent
            else:
                assert "does not verify against the trust bundle" in str(err.value)
            assert isinstance(err.value, ControlPlaneUnavailable)  # retried like an outage
            assert cp.bootstraps == 0

    run(body)


def test_control_plane_down_fails_fast(run, tmp_path: Path) -> None:
    async def body() -> None:
        pki = Pki()
        (tmp_path / "anchors.pem").write_bytes(pki.bundle_pem)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: connection refused
        client = ControlPlaneClient(
            "127.0.0.1", tmp_path / "anchors.pem", tmp_path / "node", port=port
        )
        start = time.monotonic()
        with pytest.raises(ControlPlaneUnavailable, match="cannot connect"):
            await client.bootstrap(NODE, TOKEN)
        # Refused at once: not a wait for the connect timeout (5 s), nor retried inside.
        assert time.monotonic() - start < client.config.connect_timeout

    run(body)


def test_silent_server_times_out(run, tmp_path: Path) -> None:
    async def body() -> None:
        pki = Pki()
        (tmp_path / "anchors.pem").write_bytes(pki.bundle_pem)
        held: list[asyncio.StreamWriter] = []

        async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)  # accept TCP, never speak TLS

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = ControlPlaneClient(
            "127.0.0.1",
            tmp_path / "anchors.pem",
            tmp_path / "node",
            port=port,
            config=ClientConfig(connect_timeout=0.3),
        )
        start = time.monotonic()
        try:
            with pytest.raises(ControlPlaneUnavailable, match=r"no TLS connection within 0.3s"):
                await client.bootstrap(NODE, TOKEN)
            assert time.monotonic() - start < 2.0
        finally:
            for w in held:
                w.close()
            server.close()
            await server.wait_closed()

    run(body)


def test_node_certificate_is_renewed_before_it_expires(run, tmp_path: Path) -> None:
    async def body() -> None:
        # Backdated like the real control plane does: the 5 min before issuance must not
        # count as used lifetime, or every request would bootstrap again.
        async with FakeControlPlane(Pki(), tmp_path, node_lifetime=60.0, node_backdate=300.0) as cp:
            now = [time.time()]
            client = cp.client(clock=lambda: now[0])
            await client.bootstrap(NODE, TOKEN)
            await client.request_certificate(A, csr_for(A))
            now[0] += 30.0
            await client.request_certificate(A, csr_for(A))
            assert cp.bootstraps == 1
            now[0] += 15.0  # past 70 % of the node certificate's 60 s
            await client.request_certificate(A, csr_for(A))
            assert cp.bootstraps == 2
            assert cp.peers.count(SpiffeId.node(NODE)) == 3

    run(body)


def test_rejected_node_certificate_triggers_one_bootstrap(run, tmp_path: Path) -> None:
    """The client's clock says the node certificate is fresh; the server's says it has
    expired (clock skew): the TLS alert makes the client bootstrap again and retry."""

    async def body() -> None:
        async with FakeControlPlane(Pki(), tmp_path, node_lifetime=1.0, node_backdate=60) as cp:
            frozen = time.time()
            client = cp.client(clock=lambda: frozen - 50)
            await client.bootstrap(NODE, TOKEN)
            await asyncio.sleep(max(0.0, cp_node_expiry(tmp_path) - time.time()) + 0.2)
            resp = await client.request_certificate(A, csr_for(A))
            assert resp.certificate_pem
            assert cp.bootstraps == 2

    run(body)


def cp_node_expiry(tmp_path: Path) -> float:
    leaf = load_certs((tmp_path / "node/node-chain.pem").read_bytes())[0]
    return leaf.not_valid_after_utc.timestamp()


def test_trust_bundle_follows_the_control_plane(run, tmp_path: Path) -> None:
    async def body() -> None:
        pki, new = Pki(), Pki("new")
        async with FakeControlPlane(pki, tmp_path, anchors=[pki, new]) as cp:
            client = cp.client()
            assert client.trust_bundle_pem() == pki.bundle_pem
            await client.bootstrap(NODE, TOKEN)
            assert client.trust_bundle_pem() == pki.bundle_pem + new.bundle_pem
            cp.anchors = [new]  # does not contain what the leaf chains to: not adopted
            with pytest.raises(InvalidResponse, match="does not end at an anchor"):
                await client.request_certificate(A, csr_for(A))
            assert client.trust_bundle_pem() == pki.bundle_pem + new.bundle_pem

    run(body)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}", InvalidResponse, "Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            InvalidResponse,
            "Transfer-Encoding",
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", InvalidResponse, "HTTP/1.1"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
            InvalidResponse,
            "exceeds the 65536-byte limit",
        ),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: y\r\n" * 4000, InvalidResponse, "larger than 16384"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", InvalidResponse, "unreadable answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}", ControlPlaneUnavailable, "closed"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", ControlPlaneUnavailable, "502"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", InvalidResponse, "404"),
        (b"garbage\r\n\r\n", InvalidResponse, "expected HTTP/1.1"),
    ],
)
def test_bad_answers_are_errors_not_crashes(
    run, tmp_path: Path, answer: bytes, error: type[ControlPlaneError], match: str
) -> None:
    async def body() -> None:
        async with FakeControlPlane(Pki(), tmp_path, raw_answer=answer) as cp:
            client = cp.client()
            with pytest.raises(error, match=match) as caught:
                await client.bootstrap(NODE, TOKEN)
            assert type(caught.value) is error

    run(body)


def test_missing_trust_bundle_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match=r"cannot read the trust bundle .*ConfigMap"):
        ControlPlaneClient("127.0.0.1", tmp_path / "nope.pem", tmp_path / "node")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ControlPlaneError, match=r"bad\.pem"):
        ControlPlaneClient("127.0.0.1", tmp_path / "bad.pem", tmp_path / "node")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
    ],
)
def test_response_head_parser_is_strict(head: bytes) -> None:
    with pytest.raises(HttpProtocolError):
        parse_response_head(head)


def test_response_head_parser_accepts_the_usual() -> None:
    head = parse_response_head(
        b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n"
        b"Content-Length:  12 \r\nContent-Length: 12\r\n\r\n"
    )
    assert (head.status, head.reason, head.content_length) == (403, "Forbidden", 12)
    assert head.headers["content-type"] == "application/json"


# --- the manager, end to end --------------------------------------------------------------


def test_workload_certificates_renew_against_the_control_plane(run, tmp_path: Path) -> None:
    """3-second certificates: renewed at ~2.1 s; a TLS session made with the old one
    survives the renewal, a new session gets the new one."""

    async def body() -> None:
        async with FakeControlPlane(Pki(), tmp_path, leaf_lifetime=3.0) as cp:
            client = cp.client()
            await client.bootstrap(NODE, TOKEN)
            registry = CollectorRegistry()
            config = CertConfig(cert_dir=tmp_path / "certs", backoff_base=0.1, backoff_cap=0.5)
            mgr = WorkloadCertManager(
                client, config, registry, trust_bundle_pem=client.trust_bundle_pem()
            )
            mgr.set_identities({A})
            guard = mgr.start()
            try:
                first = await poll(lambda: mgr.material(A))
                async with tls_server(mgr) as (port, serial_of_new_session):
                    old = await open_tls(port, mgr)
                    assert await serial_of_new_session(old) == first_serial(first)
                    second = await poll(
                        lambda: (m := mgr.material(A)) and m.generation > first.generation and m
                    )
                    assert first_serial(second) != first_serial(first)
                    # the session made before the renewal still works ...
                    old[1].write(b"ping")
                    assert await old[0].readexactly(4) == b"ping"
                    # ... and a new one is served the new certificate
                    new = await open_tls(port, mgr)
                    assert await serial_of_new_session(new) == first_serial(second)
                    for _, w in (old, new):
                        w.close()
                        with contextlib.suppress(OSError):
                            await w.wait_closed()
                ok = registry.get_sample_value(
                    "identity_cert_refresh_total", {"result": "success", "code": "OK"}
                )
                assert ok is not None and ok >= 2
                assert not guard.done()
            finally:
                await mgr.close()

    run(body)


async def poll(probe: Callable[[], Any], within: float = 6.0) -> Any:
    """Poll ``probe`` until it returns something truthy (the manager has no event to wait
    on, by design: its consumers read `material` when they need it)."""
    for _ in range(int(within / 0.05)):
        if value := probe():
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"condition not met within {within}s")


def first_serial(material: Any) -> int:
    return int(load_certs(material.chain_path.read_bytes())[0].serial_number)


@contextlib.asynccontextmanager
async def tls_server(mgr: WorkloadCertManager) -> Any:
    """An echo server presenting A's current certificate, chosen per handshake (by SNI,
    as the tunnel does) from a context cached per generation."""
    contexts: dict[int, ssl.SSLContext] = {}

    def current() -> ssl.SSLContext:
        mat = mgr.material(A)
        assert mat is not None
        if mat.generation not in contexts:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(mat.chain_path, mat.key_path)
            contexts[mat.generation] = ctx
        return contexts[mat.generation]

    base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    base.minimum_version = ssl.TLSVersion.TLSv1_3

    def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = current()

    base.sni_callback = pick
    handlers: set[asyncio.Task[Any]] = set()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while data := await r.read(1024):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()
            handlers.discard(task)

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=base)

    async def serial(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
        der = conn[1].get_extra_info("ssl_object").getpeercert(binary_form=True)
        leaf = x509.load_der_x509_certificate(der)
        assert spiffe_id_of(leaf) == A
        return int(leaf.serial_number)

    try:
        yield server.sockets[0].getsockname()[1], serial
    finally:
        server.close()
        await server.wait_closed()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def open_tls(
    port: int, mgr: WorkloadCertManager
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is identified by its SPIFFE ID (checked by caller)
    ctx.load_verify_locations(cadata=mgr.trust_bundle_pem().decode())
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="web.shop.weft"
    )
