"""The CSR API over real TLS on 127.0.0.1: bootstrap, mTLS, bad input, and the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import time

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from controlplane.identity.ca import init_ca, validate_ca
from controlplane.identity.server import (
    AdminServer,
    ApiServer,
    ControlPlane,
    ControlPlaneConfig,
    IdentityConfig,
    Readiness,
    ServerConfig,
)
from controlplane.identity.signer import Signer, controlplane_identity
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, key_pem, spiffe_id_of
from weft.wire import (
    BOOTSTRAP_PATH,
    CERTIFICATES_PATH,
    MAX_BODY,
    BootstrapRequest,
    CertificateRequest,
    CertificateResponse,
    Refusal,
    RefusalCode,
)

pytestmark = pytest.mark.sockets

TD = "cluster.local"
ECHO = SpiffeId.workload("default", "echo", TD)
NODE1 = SpiffeId.node("node-1", TD)


class Binding:
    def identities_on(self, node):
        return {ECHO} if node == "node-1" else set()


class Tokens:
    def node_for(self, token):
        return {"tok-1": "node-1"}.get(token)


@pytest.fixture(scope="module")
def ca():
    b = init_ca(TD)
    return b, validate_ca(cert_pem(b.anchor), cert_pem(b.issuer), key_pem(b.issuer_key))


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def signer(ca, registry):
    return Signer(ca[1], Binding(), Tokens(), TD, registry=registry)


CONFIG = ServerConfig(
    listen_address="127.0.0.1",
    api_port=0,
    handshake_timeout=1.0,
    request_timeout=0.5,
    write_timeout=1.0,
    drain_seconds=1.0,
)


@pytest.fixture
async def server(signer, registry):
    srv = ApiServer(signer, CONFIG, registry=registry)
    await srv.start()
    yield srv
    await srv.stop()


def client_context(ca, tmp_path=None, chain=None, key=None, tls12_only=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cert_pem(ca[0].anchor).decode())
    # SPIFFE: no hostnames; the server's URI SAN is checked after the handshake.
    ctx.check_hostname = False
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if chain is not None:
        path = tmp_path / f"client-{id(chain)}.pem"
        path.write_bytes(chain + key)
        ctx.load_cert_chain(path)
    return ctx


def http_post(path, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: weft-controlplane\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def roundtrip(port, ctx, raw: bytes, *, check_server=True):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        if check_server:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert spiffe_id_of(x509.load_der_x509_certificate(der)) == controlplane_identity(TD)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def exchange(port, ctx, raw: bytes) -> bytes | BaseException:
    """Handshake, send ``raw``, read to EOF: the bytes answered, or the TLS/connection
    error that ended it (nothing is swallowed as a parse error)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    except (ssl.SSLError, ConnectionError) as e:
        return e
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except (ssl.SSLError, ConnectionError) as e:
        return e
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def requests_counted(registry: CollectorRegistry) -> float:
    """Agent API requests the server handled, whatever their endpoint and status."""
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "weft_controlplane_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def refusal(body: bytes) -> Refusal:
    return Refusal.decode(body)


async def bootstrap(port, ca, node="node-1", token="tok-1"):
    key = generate_key()
    req = BootstrapRequest(node, token, build_csr(key, SpiffeId.node(node, TD)).decode())
    status, body = await roundtrip(
        port, client_context(ca), http_post(BOOTSTRAP_PATH, req.encode())
    )
    return status, body, key


async def node_context(port, ca, tmp_path):
    status, body, key = await bootstrap(port, ca)
    assert status == 200, body
    resp = CertificateResponse.decode(body)
    chain = (resp.certificate_pem + "".join(resp.chain_pem)).encode()
    return client_context(ca, tmp_path, chain, key_pem(key))


def certificate_request(identity=ECHO) -> bytes:
    req = CertificateRequest(str(identity), build_csr(generate_key(), identity).decode())
    return http_post(CERTIFICATES_PATH, req.encode())


# --------------------------------------------------------------------------- happy path


async def test_bootstrap_then_workload_certificate_over_mtls(server, ca, tmp_path, registry):
    status, body, key = await bootstrap(server.port, ca)
    assert status == 200
    node = CertificateResponse.decode(body)
    assert spiffe_id_of(x509.load_pem_x509_certificate(node.certificate_pem.encode())) == NODE1
    ctx = client_context(
        ca, tmp_path, (node.certificate_pem + "".join(node.chain_pem)).encode(), key_pem(key)
    )
    status, body = await roundtrip(server.port, ctx, certificate_request())
    assert status == 200, body
    leaf = x509.load_pem_x509_certificate(CertificateResponse.decode(body).certificate_pem.encode())
    assert spiffe_id_of(leaf) == ECHO
    assert registry.get_sample_value("weft_csr_issued_total", {"kind": "workload"}) == 1.0
    assert (
        registry.get_sample_value(
            "weft_controlplane_requests_total", {"endpoint": CERTIFICATES_PATH, "status": "200"}
        )
        == 1.0
    )


async def test_a_client_sending_only_its_leaf_is_accepted(server, ca, tmp_path):
    status, body, key = await bootstrap(server.port, ca)
    node = CertificateResponse.decode(body)
    ctx = client_context(ca, tmp_path, node.certificate_pem.encode(), key_pem(key))
    status, body = await roundtrip(server.port, ctx, certificate_request())
    assert status == 200, body


async def test_node_binding_over_the_wire(server, ca, tmp_path):
    ctx = await node_context(server.port, ca, tmp_path)
    other = SpiffeId.workload("shop", "cart", TD)
    status, body = await roundtrip(server.port, ctx, certificate_request(other))
    assert status == 403 and refusal(body).code == RefusalCode.NODE_NOT_BOUND


# --------------------------------------------------------------------------- authentication


async def test_bad_bootstrap_token_is_401(server, ca):
    status, body, _ = await bootstrap(server.port, ca, token="guess")
    assert status == 401 and refusal(body).code == RefusalCode.UNAUTHENTICATED


async def test_certificates_without_client_cert_is_401(server, ca):
    status, body = await roundtrip(server.port, client_context(ca), certificate_request())
    assert status == 401
    r = refusal(body)
    assert r.code == RefusalCode.UNAUTHENTICATED and "/v1/bootstrap" in r.message


async def test_workload_cert_is_not_a_node_credential(server, ca, tmp_path):
    # A workload certificate chains to the bundle but must not buy other certificates.
    ctx = await node_context(server.port, ca, tmp_path)
    status, body = await roundtrip(server.port, ctx, certificate_request())
    workload = CertificateResponse.decode(body)
    wkey = generate_key()  # the leaf's key is not ours; issue one for a key we hold
    status, body = await roundtrip(
        server.port,
        ctx,
        http_post(
            CERTIFICATES_PATH,
            CertificateRequest(str(ECHO), build_csr(wkey, ECHO).decode()).encode(),
        ),
    )
    leaf = CertificateResponse.decode(body)
    wctx = client_context(
        ca, tmp_path, (leaf.certificate_pem + "".join(workload.chain_pem)).encode(), key_pem(wkey)
    )
    status, body = await roundtrip(server.port, wctx, certificate_request())
    assert status == 401 and "not a node identity" in refusal(body).message


async def test_client_cert_from_another_ca_fails_the_handshake(server, ca, tmp_path, registry):
    other = init_ca(TD)
    other_issuer = validate_ca(
        cert_pem(other.anchor), cert_pem(other.issuer), key_pem(other.issuer_key)
    )
    key = generate_key()
    fake = Signer(other_issuer, Binding(), Tokens(), TD).issue_controlplane(
        x509.load_pem_x509_csr(build_csr(key, NODE1))
    )
    ctx = client_context(ca, tmp_path, cert_pem(fake) + cert_pem(other.issuer), key_pem(key))
    # TLS 1.3: the client finishes first; the server's alert arrives on the first read.
    outcome = await exchange(server.port, ctx, certificate_request())
    assert isinstance(outcome, (ssl.SSLError, ConnectionError)) or outcome == b"", outcome
    # Refused at the handshake, not answered and closed: no request reached the API.
    assert requests_counted(registry) == 0
    status, _, _ = await bootstrap(server.port, ca)
    assert status == 200  # and the listener keeps serving
    assert requests_counted(registry) == 1  # (the count does see handled requests)


async def test_tls12_client_is_refused_at_the_handshake(server, ca):
    # asyncio closes a failed server handshake without flushing OpenSSL's alert, so the
    # client sees a reset rather than a protocol_version alert; either way, no session.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await roundtrip(server.port, client_context(ca, tls12_only=True), b"")
    status, _, _ = await bootstrap(server.port, ca)
    assert status == 200


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /v1/bootstrap HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (http_post("/v1/other", b"{}"), 404),
        (b"POST /v1/bootstrap HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"POST /v1/bootstrap HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST /v1/bootstrap HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 505),
        (
            b"POST /v1/bootstrap HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            400,
        ),
        (b"POST /v1/bootstrap HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (http_post(BOOTSTRAP_PATH, b"x" * 10), 400),  # not JSON
        # Body shorter than announced (TLS has no half-close): waits, then times out.
        (http_post(BOOTSTRAP_PATH, b"{}", "X: y\r\n")[:-1], 408),
        (b"\x16\x03\x01 garbage\r\n\r\n", 400),
    ],
    ids=[
        "get",
        "unknown-path",
        "no-length",
        "chunked",
        "http-1.0",
        "two-lengths",
        "huge-head",
        "not-json",
        "short-body",
        "garbage",
    ],
)
async def test_bad_http_is_refused_with_its_status(server, ca, raw, status):
    got, body = await roundtrip(server.port, client_context(ca), raw)
    assert got == status
    assert refusal(body).code == RefusalCode.MALFORMED_REQUEST


async def test_oversized_body_is_refused_before_it_is_read(server, ca):
    raw = (
        f"POST {BOOTSTRAP_PATH} HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode() + b"{"
    )
    status, body = await roundtrip(server.port, client_context(ca), raw)
    assert status == 413 and str(MAX_BODY) in refusal(body).message


async def test_garbage_before_tls_is_dropped_while_others_are_served(server, ca):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
    status, _, _ = await bootstrap(server.port, ca)
    assert status == 200
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, no answer
    writer.close()


async def test_handshake_that_never_finishes_times_out(server, ca):
    start = time.monotonic()  # before the connect: the server's clock starts later
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    status, _, _ = await bootstrap(server.port, ca)
    assert status == 200
    assert await asyncio.wait_for(reader.read(), CONFIG.handshake_timeout + 10) == b""
    # Closed by the handshake timeout, not by anything sooner.
    assert time.monotonic() - start >= CONFIG.handshake_timeout
    writer.close()


async def test_slow_client_gets_408_while_another_is_served(server, ca):
    start = time.monotonic()  # before the connect: the server's request clock starts later
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client_context(ca))
    writer.write(b"POST /v1/bootstrap HTTP/1.1\r\nContent-Le")  # ... and then nothing
    status, _, _ = await bootstrap(server.port, ca)
    assert status == 200
    data = await asyncio.wait_for(reader.read(), CONFIG.request_timeout + 10)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start >= CONFIG.request_timeout  # not cut short
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


# --------------------------------------------------------------------------- event loop


class SlowSigner(Signer):
    """Blocks whatever thread it runs on for 100 ms per request, like heavy CPU work."""

    def bootstrap(self, req):
        time.sleep(0.1)
        return super().bootstrap(req)


async def _max_loop_stall(stop: asyncio.Event) -> float:
    worst, last = 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.005)
        now = time.monotonic()
        worst, last = max(worst, now - last - 0.005), now
    return worst


@pytest.mark.parametrize("offload", [True, False])
async def test_signing_does_not_block_the_loop(ca, registry, offload):
    signer = SlowSigner(ca[1], Binding(), Tokens(), TD, registry=registry)
    srv = ApiServer(signer, CONFIG, registry=registry, offload=offload)
    await srv.start()
    stop = asyncio.Event()
    stall = asyncio.create_task(_max_loop_stall(stop))
    try:
        slow = [asyncio.create_task(bootstrap(srv.port, ca)) for _ in range(16)]
        if offload:
            await asyncio.sleep(0.15)  # 16 x 100 ms on 2 threads: signing until ~0.8 s
            status, _ = await roundtrip(srv.port, client_context(ca), certificate_request())
            assert status == 401
            # Answered in the middle of the burst, not behind it: signing is off the loop.
            # (How long it took is a benchmark's business; on a loaded machine it varies.)
            assert sum(not t.done() for t in slow) > 0
        statuses = [s for s, _, _ in await asyncio.gather(*slow)]
    finally:
        stop.set()
        worst = await stall
        await srv.stop()
    assert statuses == [200] * 16
    if not offload:
        # Signing on the loop stalls it for a whole request (at least 100 ms, however
        # loaded the machine): what the executor buys, and proof that the burst above
        # would have been answered behind the signing if it ran on the loop.
        assert worst >= 0.09


async def test_real_signing_burst_leaves_the_loop_responsive(server, ca, tmp_path):
    ctx = await node_context(server.port, ca, tmp_path)
    bodies = [certificate_request() for _ in range(200)]
    done_at: list[float] = []

    async def timed(body: bytes) -> tuple[int, bytes]:
        result = await roundtrip(server.port, ctx, body)
        done_at.append(time.monotonic())
        return result

    burst = [asyncio.create_task(timed(b)) for b in bodies]
    await asyncio.sleep(0.05)
    status, _ = await roundtrip(server.port, client_context(ca), certificate_request())
    answered = time.monotonic()
    results = await asyncio.gather(*burst)
    assert status == 401
    assert [s for s, _ in results] == [200] * 200
    # Answered before the burst was through, not queued behind 200 signings (how long it
    # took is a benchmark's business: on a loaded machine it varies).
    assert answered < max(done_at)


# --------------------------------------------------------------------------- renewal, admin


async def test_serving_certificate_is_renewed_before_expiry(ca, registry):
    signer = Signer(
        ca[1],
        Binding(),
        Tokens(),
        TD,
        registry=registry,
        leaf_lifetime=dt.timedelta(seconds=2),
        skew=dt.timedelta(0),
    )
    srv = ApiServer(signer, CONFIG, registry=registry)
    await srv.start()
    try:
        first = srv.serving.cert
        assert first is not None
        await asyncio.sleep(1.8)  # renewal at 70 % of 2 s, i.e. 1.4 s
        _, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=client_context(ca))
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        seen = x509.load_der_x509_certificate(der)
        assert seen.serial_number != first.serial_number
        assert seen.not_valid_after_utc > first.not_valid_after_utc
    finally:
        await srv.stop()


async def _get(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


async def test_admin_metrics_and_ready(registry, signer):
    readiness = Readiness()
    admin = AdminServer(registry, readiness, "127.0.0.1", 0)
    await admin.start()
    try:
        readiness.block("api", "agent API not listening yet")
        readiness.add_check("issuer", lambda: None)
        assert await _get(admin.port, "/ready") == (
            503,
            "not ready: api: agent API not listening yet\n",
        )
        readiness.unblock("api")
        assert await _get(admin.port, "/ready") == (200, "ready\n")
        status, text = await _get(admin.port, "/metrics")
        assert status == 200
        assert 'weft_csr_refused_total{code="NODE_NOT_BOUND"} 0.0' in text
        assert (await _get(admin.port, "/nope"))[0] == 404
    finally:
        await admin.stop()


async def test_control_plane_runs_until_stopped(ca, registry, tmp_path):
    config = ControlPlaneConfig(
        identity=IdentityConfig(ca_dir=tmp_path),
        server=ServerConfig(listen_address="127.0.0.1", api_port=0, admin_port=0),
    )
    cp = ControlPlane(config, Signer(ca[1], Binding(), Tokens(), TD, registry=registry), registry)
    seen = {}

    async def started():
        seen["ready"] = await _get(cp.admin.port, "/ready")
        seen["boot"] = (await bootstrap(cp.api.port, ca))[0]
        cp.request_stop()

    await cp.run(started)
    assert seen == {"ready": (200, "ready\n"), "boot": 200}


def test_config_from_mapping():
    config = ControlPlaneConfig.from_mapping(
        {
            "ca_dir": "/etc/weft/ca",
            "leaf_lifetime": "12h",
            "api_port": "15010",
            "state_file": "/run/weft/lab/weft/state.json",
            "tokens_file": "/run/weft/lab/weft/bootstrap-tokens.json",
        }
    )
    assert config.identity.leaf_lifetime == dt.timedelta(hours=12)
    assert config.lab is not None and config.lab.tokens_file.name == "bootstrap-tokens.json"
    with pytest.raises(ValueError, match="unknown setting 'cadir'"):
        ControlPlaneConfig.from_mapping({"cadir": "x"})
    with pytest.raises(ValueError, match="leaf_lifetime must be at least 10 s"):
        ControlPlaneConfig.from_mapping({"ca_dir": "x", "leaf_lifetime": "1s"})
    with pytest.raises(ValueError, match="not a duration"):
        ControlPlaneConfig.from_mapping({"ca_dir": "x", "leaf_lifetime": "soon"})
    assert json.dumps(config.describe())
