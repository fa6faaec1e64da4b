"""The control plane's agent API on :15010: CSR signing over TLS 1.3.

Shape of a connection (one request per connection: agents ask once per identity per
~17 h, so keep-alive would buy nothing and cost a state machine):

1. TLS 1.3 handshake (1.2 and below are refused by the context).  The server presents
   its own workload certificate, ``spiffe://<td>/ns/weft-system/sa/weft-controlplane``,
   which it issues to itself at start and renews at 70 % of its lifetime.  A client
   certificate is *optional* at the TLS layer — a node that is bootstrapping has none —
   but if one is sent it must chain to the trust bundle, or the handshake fails.
2. One strict HTTP/1.1 request: ``POST``, ``Content-Length`` (no chunked bodies), a head
   of at most 8 KiB, a body of at most :data:`~weft.wire.MAX_BODY`, the whole request
   within ``request_timeout``.  Anything else is answered with a :class:`~weft.wire.Refusal`
   and the connection is closed.
3. ``/v1/bootstrap`` and ``/v1/pod-certificates`` (a sidecar with its pod's token) need
   no client certificate; ``/v1/certificates`` needs one whose SPIFFE ID is a node ID of
   this trust domain, else ``401 UNAUTHENTICATED``.  ``/v1/discovery`` takes a node
   certificate or a sidecar's workload certificate (discovery is the same for every
   subscriber; a sidecar has no node certificate).
4. The :class:`~.signer.Signer` decides and signs **on a worker thread**: parsing and
   verifying a CSR and signing take ~0.3 ms of CPU, and discovery streams (which will
   share this event loop) must not stall behind a burst of CSRs — say, every node
   refreshing after a control plane restart.  ``cryptography`` releases the GIL while
   OpenSSL works, so the loop keeps running (docs/identity.md has the measurement).
   A semaphore bounds queued signing work so a flood waits in the kernel's accept queue
   instead of in memory.

The HTTP head parser is sans-I/O (bytes in, :class:`RequestHead` or :class:`HttpError`
out) and shared with the admin port (:15014, plain HTTP: ``/metrics`` and ``/ready``),
which lives here too for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import signal
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from controlplane.discovery import Source
from controlplane.discovery.model import DiscoveryStore
from controlplane.discovery.stream import DiscoveryStream, StreamConfig
from controlplane.identity.binding import StoreNodeBinding
from controlplane.identity.ca import CaError, load_ca
from controlplane.identity.signer import (
    BootstrapTokens,
    NodeBinding,
    PodCredentials,
    Signer,
    controlplane_identity,
)
from weft.http import (
    MAX_HEAD,
    TEXT,
    HttpError,
    RequestHead,
    answer_one,
    close_writer,
    parse_head,
    render_response,
)
from weft.identity import (
    DEFAULT_TRUST_DOMAIN,
    IdentityError,
    SpiffeId,
    build_csr,
    cert_pem,
    generate_key,
    key_pem,
    spiffe_id_of,
)
from weft.meshwire import CONTENT_TYPE as STREAM_CONTENT_TYPE
from weft.meshwire import DISCOVERY_PATH, MeshWireError, Subscribe
from weft.policy import DefaultPolicy
from weft.wire import (
    ADMIN_PORT,
    API_PORT,
    BOOTSTRAP_PATH,
    CERTIFICATES_PATH,
    MAX_BODY,
    POD_CERTIFICATES_PATH,
    BootstrapRequest,
    CertificateRequest,
    CertificateResponse,
    PodCertificateRequest,
    Refusal,
    RefusalCode,
    WireError,
)

if TYPE_CHECKING:
    from controlplane.discovery.kube import KubeConfig

log = logging.getLogger("weft.controlplane")

REFRESH_FRACTION = 0.7
"""Renew the serving certificate at 70 % of its lifetime, as agents do with theirs."""
RENEW_RETRY_SECONDS = 30.0
ADMIN_REQUEST_TIMEOUT = 5.0

T = TypeVar("T")


# --------------------------------------------------------------------------- sans-I/O HTTP


def check_api_head(head: RequestHead) -> int:
    """Route checks for the agent API; returns the body length to read."""
    if head.target not in (
        BOOTSTRAP_PATH,
        CERTIFICATES_PATH,
        POD_CERTIFICATES_PATH,
        DISCOVERY_PATH,
    ):
        raise HttpError(404, f"no such endpoint {head.target[:100]!r}")
    if head.method != "POST":
        raise HttpError(405, f"{head.target} accepts POST only")
    length = head.content_length
    if length is None:
        raise HttpError(411, "Content-Length is required")
    if length > MAX_BODY:
        raise HttpError(413, f"body of {length} bytes exceeds the {MAX_BODY}-byte limit")
    return length


STREAM_HEAD = (
    f"HTTP/1.1 200 OK\r\nContent-Type: {STREAM_CONTENT_TYPE}\r\n"
    "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
).encode("ascii")
"""Head of a discovery stream response: no length, frames until either side closes."""


class Readiness:
    """Named reasons for not being ready (STYLE.md §8); ready when there are none.

    Components block and unblock by name; checks computed on demand (the issuer's
    validity) join them, so ``/ready`` always says *why* not.
    """

    def __init__(self) -> None:
        self._blocked: dict[str, str] = {}
        self._checks: dict[str, Callable[[], str | None]] = {}

    def block(self, name: str, reason: str) -> None:
        self._blocked[name] = reason

    def unblock(self, name: str) -> None:
        self._blocked.pop(name, None)

    def add_check(self, name: str, check: Callable[[], str | None]) -> None:
        """``check`` returns a reason while not ready, None when fine."""
        self._checks[name] = check

    def blockers(self) -> dict[str, str]:
        out = dict(self._blocked)
        for name, check in self._checks.items():
            reason = check()
            if reason:
                out[name] = reason
        return out


class AdminServer:
    """``/metrics`` and ``/ready`` over plain HTTP: Prometheus and the kubelet's probe
    scrape it, and it carries nothing secret."""

    def __init__(
        self, registry: CollectorRegistry, readiness: Readiness, host: str, port: int
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin on http://%s:%d (/metrics, /ready)", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, head: RequestHead) -> tuple[int, bytes, str]:
        """Sans-I/O: a GET request head in, (status, body, content type) out."""
        path = head.target.split("?", 1)[0]
        if path == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path == "/ready":
            blockers = self.readiness.blockers()
            if not blockers:
                return 200, b"ready\n", TEXT
            text = "".join(f"not ready: {k}: {v}\n" for k, v in sorted(blockers.items()))
            return 503, text.encode(), TEXT
        return 404, b"try /metrics or /ready\n", TEXT

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_one(reader, writer, self.respond, within=ADMIN_REQUEST_TIMEOUT)


# --------------------------------------------------------------------------- config


def parse_duration(value: str) -> dt.timedelta:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` → timedelta."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (examples: 90s, 30m, 24h)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return dt.timedelta(seconds=float(m.group(1)) * unit)


class ConfigError(ValueError):
    """A configuration value is unusable; the message says which and why."""


@dataclass(frozen=True)
class IdentityConfig:
    ca_dir: Path
    """Directory with anchor.pem/issuer.pem/issuer.key, or a mounted TLS Secret
    (ca.crt/tls.crt/tls.key).  Validated at start; the control plane refuses to start
    on any problem."""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    """The SPIFFE trust domain signed for; requests for others are refused."""
    leaf_lifetime: dt.timedelta = dt.timedelta(hours=24)
    """Lifetime of workload certificates (and the control plane's own); agents refresh
    at 70 %."""
    node_lifetime: dt.timedelta = dt.timedelta(hours=1)
    """Lifetime of node certificates from bootstrap; short because nothing revokes them."""
    clock_skew: dt.timedelta = dt.timedelta(minutes=5)
    """How far into the past certificates start, for nodes with slow clocks."""


@dataclass(frozen=True)
class ServerConfig:
    listen_address: str = "0.0.0.0"
    """Address for both the agent API and the admin port."""
    api_port: int = API_PORT
    """Agent API (TLS); 0 picks a free port (tests)."""
    admin_port: int = ADMIN_PORT
    """Plain HTTP: /metrics and /ready.  Not for agents; keep it off the node network."""
    handshake_timeout: float = 10.0
    """Seconds a TLS handshake may take before the connection is dropped."""
    request_timeout: float = 10.0
    """Seconds for the whole request (head and body) after the handshake."""
    write_timeout: float = 10.0
    """Seconds to hand the response to a slow reader before giving up."""
    sign_workers: int = 2
    """Threads that parse, check and sign CSRs off the event loop."""
    max_pending_signs: int = 256
    """Requests allowed to wait for a signing thread; the rest wait to be read."""
    drain_seconds: float = 5.0
    """On shutdown, how long in-flight requests may finish before they are cut."""


@dataclass(frozen=True)
class LabSourceConfig:
    state_file: Path
    """The lab's state.json: which pods (namespace, service account) run on which node."""
    tokens_file: Path
    """``{node: sha256-hex(token)}`` written by ``weft lab up``."""


@dataclass(frozen=True)
class MeshConfig:
    default_inbound_policy: str = ""
    """The mesh-wide ``weft.io/default-inbound-policy`` (`weft.policy.DefaultPolicy`);
    empty: not set (``all-authenticated``, and permissive pods stay permissive)."""

    @property
    def default_policy(self) -> DefaultPolicy | None:
        return DefaultPolicy(self.default_inbound_policy) if self.default_inbound_policy else None


@dataclass(frozen=True)
class ControlPlaneConfig:
    identity: IdentityConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    lab: LabSourceConfig | None = None
    """Lab sources; None means Kubernetes (see :class:`KubeSettings`)."""
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        ident, srv = self.identity, self.server
        value = self.mesh.default_inbound_policy
        if value and value not in {d.value for d in DefaultPolicy}:
            known = ", ".join(d.value for d in DefaultPolicy)
            raise ConfigError(f"default_inbound_policy {value!r} is not one of {known}")
        try:
            SpiffeId.node("x", ident.trust_domain)
        except IdentityError as e:
            raise ConfigError(f"trust_domain: {e}") from None
        for name in ("leaf_lifetime", "node_lifetime"):
            if getattr(ident, name) < dt.timedelta(seconds=10):
                raise ConfigError(f"{name} must be at least 10 s")
        if not dt.timedelta(0) <= ident.clock_skew <= dt.timedelta(hours=1):
            raise ConfigError("clock_skew must be between 0 and 1 h")
        for name in ("api_port", "admin_port"):
            if not 0 <= getattr(srv, name) <= 65535:
                raise ConfigError(f"{name} must be 0..65535")
        if srv.sign_workers < 1 or srv.max_pending_signs < 1:
            raise ConfigError("sign_workers and max_pending_signs must be at least 1")
        for name in ("handshake_timeout", "request_timeout", "write_timeout"):
            if getattr(srv, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> ControlPlaneConfig:
        """Build from flat string keys (field names; durations like ``24h``), so tests,
        environment variables and CLI flags share one parser.  Unknown keys are errors."""
        groups: dict[str, dict[str, Any]] = {"identity": {}, "server": {}, "lab": {}, "mesh": {}}
        owners = {
            **{f.name: ("mesh", f.type) for f in fields(MeshConfig)},
            **{f.name: ("identity", f.type) for f in fields(IdentityConfig)},
            **{f.name: ("server", f.type) for f in fields(ServerConfig)},
            **{f.name: ("lab", f.type) for f in fields(LabSourceConfig)},
        }
        for key, raw in values.items():
            if key not in owners:
                raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(owners))})")
            group, typ = owners[key]
            try:
                if "timedelta" in str(typ):
                    value: Any = parse_duration(raw)
                elif "Path" in str(typ):
                    value = Path(raw)
                elif typ in ("int", int):
                    value = int(raw)
                elif typ in ("float", float):
                    value = float(raw)
                else:
                    value = raw
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            groups[group][key] = value
        if "ca_dir" not in groups["identity"]:
            raise ConfigError("ca_dir is required")
        lab = groups["lab"]
        if lab and set(lab) != {"state_file", "tokens_file"}:
            raise ConfigError("lab sources need both state_file and tokens_file")
        return cls(
            identity=IdentityConfig(**groups["identity"]),
            server=ServerConfig(**groups["server"]),
            lab=LabSourceConfig(**lab) if lab else None,
            mesh=MeshConfig(**groups["mesh"]),
        )

    def describe(self) -> str:
        """One line for the start-up log."""
        i, s = self.identity, self.server
        source = (
            f"lab state {self.lab.state_file}, tokens {self.lab.tokens_file}"
            if self.lab
            else "kubernetes"
        )
        return (
            f"trust_domain={i.trust_domain} ca_dir={i.ca_dir} leaf_lifetime={i.leaf_lifetime} "
            f"node_lifetime={i.node_lifetime} skew={i.clock_skew} "
            f"listen={s.listen_address} api_port={s.api_port} admin_port={s.admin_port} "
            f"sign_workers={s.sign_workers} sources=({source}) "
            f"default_inbound_policy={self.mesh.default_inbound_policy or '(not set)'}"
        )


# --------------------------------------------------------------------------- TLS


def _load_cert_chain(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """``SSLContext.load_cert_chain`` reads only files: hand it an anonymous in-memory
    file (memfd) so the control plane's key never touches a disk."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("weft-controlplane-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, chain + key)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="weft-cp-") as d:  # 0700
        path = Path(d) / "chain-and-key.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(chain + key)
        ctx.load_cert_chain(path)


class ServingIdentity:
    """The control plane's own certificate and the server ``SSLContext`` presenting it.

    Renewal loads the new chain into the same context: connections made afterwards use
    it, established ones keep theirs.  The trust bundle is loaded once; changing anchors
    is a restart (docs/identity.md, rotation).
    """

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.identity = controlplane_identity(signer.trust_domain)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        # Bootstrapping nodes have no certificate yet; /v1/certificates checks it itself.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # The issuer chain goes into the store too, so a client that sends only its leaf
        # still verifies; without X509_V_FLAG_PARTIAL_CHAIN OpenSSL still requires the
        # path to end at a self-signed anchor, so this adds no trust.
        ctx.load_verify_locations(
            cadata="".join(signer.issuer.bundle_pem + signer.issuer.chain_pem)
        )
        # One request per connection: session tickets would never be used.
        ctx.num_tickets = 0
        self.context = ctx
        self.cert: x509.Certificate | None = None

    def issue(self) -> tuple[x509.Certificate, bytes, bytes]:
        """Make a key and have it signed (CPU work: run it on a worker thread)."""
        key = generate_key()
        csr = x509.load_pem_x509_csr(build_csr(key, self.identity))
        cert = self.signer.issue_controlplane(csr)
        chain = cert_pem(cert) + "".join(self.signer.issuer.chain_pem).encode()
        return cert, chain, key_pem(key)

    def install(self, cert: x509.Certificate, chain: bytes, key: bytes) -> None:
        """Load into the context (on the event loop thread: an SSLContext must not change
        while another thread creates connections from it)."""
        _load_cert_chain(self.context, chain, key)
        self.cert = cert
        log.info(
            "serving as %s until %s",
            self.identity,
            cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def refresh_at(self) -> dt.datetime:
        assert self.cert is not None
        nb, na = self.cert.not_valid_before_utc, self.cert.not_valid_after_utc
        return nb + (na - nb) * REFRESH_FRACTION


# --------------------------------------------------------------------------- API server


@dataclass(frozen=True)
class _StreamRequest:
    """An authenticated, decoded discovery subscription, to hand to the stream."""

    node: str
    subscribe: Subscribe
    until: float | None
    """When the node certificate that authenticated the stream expires (Unix time)."""


def _peer_not_after(writer: asyncio.StreamWriter) -> float | None:
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        return None
    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


class _Unauthenticated(Exception):
    pass


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def guard(task: asyncio.Task[Any], on_failure: Callable[[BaseException], None]) -> None:
    """A long-lived task that ends by an exception is logged and reported, never silent."""

    def done(t: asyncio.Task[Any]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.critical("task %s died: %r", t.get_name(), exc, exc_info=exc)
            on_failure(exc)

    task.add_done_callback(done)


class ApiServer:
    """The TLS listener for /v1/bootstrap and /v1/certificates."""

    def __init__(
        self,
        signer: Signer,
        config: ServerConfig,
        *,
        registry: CollectorRegistry | None = None,
        readiness: Readiness | None = None,
        offload: bool = True,
        on_failure: Callable[[BaseException], None] = lambda e: None,
        stream: DiscoveryStream | None = None,
    ) -> None:
        self.signer = signer
        self.stream = stream
        """Serves /v1/discovery; None answers it 404 (a signing-only control plane)."""
        self.config = config
        self.readiness = readiness or Readiness()
        self.offload = offload
        """False signs on the event loop (only for measuring what offloading buys)."""
        self.on_failure = on_failure
        self.serving = ServingIdentity(signer)
        self.requests = Counter(
            "weft_controlplane_requests",
            "Agent API requests, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self._executor = ThreadPoolExecutor(config.sign_workers, thread_name_prefix="weft-sign")
        self._pending = asyncio.Semaphore(config.max_pending_signs)
        # Bootstraps get their own threads: their credential check may wait seconds on
        # the API server (TokenReview), and anyone can send one — workload certificate
        # renewals of authenticated nodes must never queue behind them.
        self._boot_executor = ThreadPoolExecutor(
            config.sign_workers, thread_name_prefix="weft-bootstrap"
        )
        self._boot_pending = asyncio.Semaphore(config.max_pending_signs)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.port = 0
        self.readiness.block("api", "agent API not listening yet")

    async def start(self) -> None:
        self.serving.install(*await self._run(self.serving.issue))
        self._server = await asyncio.start_server(
            self._handle,
            self.config.listen_address,
            self.config.api_port,
            ssl=self.serving.context,
            ssl_handshake_timeout=self.config.handshake_timeout,
            limit=MAX_HEAD,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._renewer = asyncio.create_task(self._renew_loop(), name="controlplane-cert-renewer")
        guard(self._renewer, self.on_failure)
        self.readiness.unblock("api")
        log.info(
            "agent API on %s:%d (TLS 1.3, %d signing threads)",
            self.config.listen_address,
            self.port,
            self.config.sign_workers,
        )

    async def stop(self, drain: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish until ``drain`` s, cut the rest."""
        self.readiness.block("api", "shutting down")
        if self._server is not None:
            self._server.close()
        if self.stream is not None:
            self.stream.close()  # streams never finish on their own: end them now
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        pending = set(self._connections)
        if pending:
            _, late = await asyncio.wait(
                pending, timeout=self.config.drain_seconds if drain is None else drain
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._boot_executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any, bootstrap: bool = False) -> T:
        pending = self._boot_pending if bootstrap else self._pending
        executor = self._boot_executor if bootstrap else self._executor
        async with pending:
            if not self.offload:
                return fn(*args)
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _renew_loop(self) -> None:
        while True:
            assert self.serving.cert is not None
            delay = (self.serving.refresh_at() - dt.datetime.now(dt.UTC)).total_seconds()
            await asyncio.sleep(max(delay, 1.0))
            while True:
                try:
                    issued = await self._run(self.serving.issue)
                except CaError as e:
                    expired = self.serving.cert.not_valid_after_utc <= dt.datetime.now(dt.UTC)
                    if expired:
                        self.readiness.block("serving-cert", f"expired and not renewable: {e}")
                    log.error(
                        "cannot renew the control plane's serving certificate: %s; "
                        "retrying in %.0f s",
                        e,
                        RENEW_RETRY_SECONDS,
                    )
                    await asyncio.sleep(RENEW_RETRY_SECONDS)
                    continue
                self.serving.install(*issued)
                self.readiness.unblock("serving-cert")
                break

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            # Only stop() cancels these, past its drain deadline.  Returning instead of
            # re-raising keeps Python 3.11's start_server callback from logging every
            # cancelled handler as an "exception in callback".
            writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = _peer(writer)
        try:
            answer = await self._respond(reader, writer, peer)
            if isinstance(answer, _StreamRequest):
                assert self.stream is not None
                self.requests.labels(DISCOVERY_PATH, "200").inc()
                writer.write(STREAM_HEAD)
                await self.stream.serve(
                    answer.node, answer.subscribe, writer, reader, until=answer.until
                )
                return
            endpoint, status, body = answer
            if status:
                self.requests.labels(endpoint, str(status)).inc()
                writer.write(render_response(status, body))
                async with asyncio.timeout(self.config.write_timeout):
                    await writer.drain()
        except (ConnectionError, TimeoutError, ssl.SSLError) as e:
            log.debug("connection from %s ended: %r", peer, e)
        finally:
            self._connections.discard(task)
            await close_writer(writer)

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[str, int, bytes] | _StreamRequest:
        """(endpoint label, status, body); status 0 means: say nothing, just close.
        A valid discovery subscription comes back as a :class:`_StreamRequest`."""
        endpoint = "other"
        node: str | None = None
        try:
            async with asyncio.timeout(self.config.request_timeout):
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    raise HttpError(431, f"request head larger than {MAX_HEAD} bytes") from None
                except asyncio.IncompleteReadError as e:
                    if not e.partial:
                        return endpoint, 0, b""  # connected and left: nothing to answer
                    raise HttpError(400, "connection closed inside the request head") from None
                head = parse_head(raw)
                length = check_api_head(head)
                endpoint = head.target
                if endpoint == DISCOVERY_PATH and self.stream is None:
                    raise HttpError(404, "this control plane serves no discovery stream")
                # Authenticate before reading the body: strangers get no more service.
                if endpoint == CERTIFICATES_PATH:
                    node = self._node_of(writer)
                elif endpoint == DISCOVERY_PATH:
                    node = self._subscriber_of(writer)
                try:
                    body = await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    raise HttpError(400, f"body shorter than Content-Length {length}") from None
        except TimeoutError:
            return self._refusal(
                endpoint,
                408,
                RefusalCode.MALFORMED_REQUEST,
                f"request not received within {self.config.request_timeout:g} s",
                peer,
            )
        except HttpError as e:
            return self._refusal(endpoint, e.status, RefusalCode.MALFORMED_REQUEST, e.message, peer)
        except _Unauthenticated as e:
            return self._refusal(endpoint, 401, RefusalCode.UNAUTHENTICATED, str(e), peer)

        if endpoint == DISCOVERY_PATH:
            assert node is not None
            assert self.stream is not None
            if not self.stream.admits(node):
                return self._refusal(
                    endpoint, 429, RefusalCode.TOO_MANY_STREAMS,
                    f"node {node} already holds {self.stream.config.max_per_node} discovery "
                    "streams", peer,
                )  # fmt: skip
            try:
                return _StreamRequest(node, Subscribe.decode(body), _peer_not_after(writer))
            except MeshWireError as e:
                return self._refusal(endpoint, 400, RefusalCode.MALFORMED_REQUEST, str(e), peer)
        try:
            result: CertificateResponse | Refusal
            if endpoint == POD_CERTIFICATES_PATH:
                # With the bootstraps: its credential check waits on the API server too.
                result = await self._run(
                    self.signer.pod_certificate, PodCertificateRequest.decode(body), bootstrap=True
                )
            elif node is None:
                result = await self._run(
                    self.signer.bootstrap, BootstrapRequest.decode(body), bootstrap=True
                )
            else:
                result = await self._run(
                    self.signer.certificate, node, CertificateRequest.decode(body)
                )
        except WireError as e:
            return self._refusal(endpoint, 400, RefusalCode.MALFORMED_REQUEST, str(e), peer)
        except Exception:
            # A bug, not a client error: a 5xx makes agents back off and retry.
            log.exception("signing a request from %s failed", peer)
            return self._refusal(
                endpoint,
                500,
                RefusalCode.INTERNAL,
                "internal error while signing; see the control plane's log",
                peer,
            )
        if isinstance(result, Refusal):
            return endpoint, result.http_status, result.encode()
        return endpoint, 200, result.encode()

    def _refusal(
        self, endpoint: str, status: int, code: RefusalCode, message: str, peer: str
    ) -> tuple[str, int, bytes]:
        return endpoint, status, self.signer.refuse(code, message, peer=peer).encode()

    def _subscriber_of(self, writer: asyncio.StreamWriter) -> str:
        """Who opens a discovery stream: a node (its name), or a sidecar by its workload
        certificate (``<SPIFFE ID>#<serial>``: each sidecar pod holds its own key and
        certificate, so its streams count apart from other replicas of the same
        identity).  The control plane's own identity never subscribes."""
        try:
            return self._node_of(writer)
        except _Unauthenticated as e:
            cert = self._peer_cert(writer)
            if cert is None:
                raise
            try:
                sid = spiffe_id_of(cert)
            except (IdentityError, ValueError):
                raise e from None
            if (
                sid.is_node
                or sid.trust_domain != self.signer.trust_domain
                or sid == self.serving.identity
            ):
                raise e from None
            return f"{sid}#{cert.serial_number:x}"

    @staticmethod
    def _peer_cert(writer: asyncio.StreamWriter) -> x509.Certificate | None:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        return x509.load_der_x509_certificate(der) if der else None

    def _node_of(self, writer: asyncio.StreamWriter) -> str:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise _Unauthenticated(
                "no client certificate: /v1/certificates needs mutual TLS with the node "
                "certificate from /v1/bootstrap"
            )
        # The TLS layer already verified the chain to the trust bundle; what is left is
        # *which* identity it is.
        try:
            sid = spiffe_id_of(x509.load_der_x509_certificate(der))
        except (IdentityError, ValueError) as e:
            raise _Unauthenticated(f"client certificate has no usable SPIFFE ID: {e}") from None
        if not sid.is_node or sid.trust_domain != self.signer.trust_domain:
            raise _Unauthenticated(
                f"client certificate is {sid}, not a node identity of "
                f"{self.signer.trust_domain}; use the node certificate from /v1/bootstrap"
            )
        assert sid.node_name is not None
        return sid.node_name


# --------------------------------------------------------------------------- process


class ControlPlane:
    """The identity half of the control plane: agent API + admin, with guarded tasks.

    The CA and the sources are injectable seams; :func:`run_controlplane` builds the real
    ones from the config.
    """

    def __init__(
        self,
        config: ControlPlaneConfig,
        signer: Signer,
        registry: CollectorRegistry,
        *,
        store: DiscoveryStore | None = None,
        source: Source | None = None,
        stream_config: StreamConfig | None = None,
        background: Mapping[str, Callable[[], Coroutine[Any, Any, None]]] | None = None,
    ) -> None:
        """``background``: more long-lived tasks by name (the trust bundle publisher),
        started and guarded like the discovery source."""
        self.config = config
        self.background = dict(background or {})
        self._background_tasks: list[asyncio.Task[None]] = []
        self.signer = signer
        self.registry = registry
        self.readiness = Readiness()
        self.readiness.add_check("issuer", lambda: signer.issuer.problem())
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self.store = store
        self.source = source
        self._source_task: asyncio.Task[None] | None = None
        self.stream = DiscoveryStream(store, stream_config, registry) if store is not None else None
        if store is not None:
            self.readiness.add_check(
                "discovery",
                lambda: None if store.synced else "discovery has no complete view yet",
            )
        self.api = ApiServer(
            signer,
            config.server,
            registry=registry,
            readiness=self.readiness,
            on_failure=self._fail,
            stream=self.stream,
        )
        self.admin = AdminServer(
            registry, self.readiness, config.server.listen_address, config.server.admin_port
        )

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        await self.admin.start()
        if self.source is not None:
            self._source_task = asyncio.create_task(self.source.run(), name="discovery-source")
            guard(self._source_task, self._fail)
        for name, run in self.background.items():
            task = asyncio.create_task(run(), name=name)
            guard(task, self._fail)
            self._background_tasks.append(task)
        if self.store is not None and not self.store.synced:
            # Node binding answers from discovery: signing before the first complete view
            # would refuse every workload.  Agents retry until the API is up.
            log.info("waiting for the first complete discovery view before serving agents")
            synced = asyncio.ensure_future(self.store.wait_synced())
            stopped = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({synced, stopped}, return_when=asyncio.FIRST_COMPLETED)
            synced.cancel()
            stopped.cancel()
            if self._stop.is_set():
                return
        await self.api.start()

    async def stop(self) -> None:
        await self.api.stop()
        if self._source_task is not None:
            self._source_task.cancel()
            await asyncio.gather(self._source_task, return_exceptions=True)
        for task in self._background_tasks:
            task.cancel()
        await asyncio.gather(*self._background_tasks, return_exceptions=True)
        await self.admin.stop()

    async def run(self, started: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve until SIGTERM/SIGINT or a guarded task dies (then raise)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            if started is not None:
                await started()
            await self._stop.wait()
            log.info("stopping: draining for up to %.1f s", self.config.server.drain_seconds)
        finally:
            await self.stop()
        if self._failure is not None:
            raise RuntimeError(f"control plane task failed: {self._failure!r}")


def build_signer(
    config: ControlPlaneConfig,
    registry: CollectorRegistry,
    binding: NodeBinding,
    tokens: BootstrapTokens | None = None,
    pods: PodCredentials | None = None,
) -> Signer:
    """Load and validate the CA (:class:`~.ca.CaError` names every problem) and wire the
    bootstrap credentials: the lab's token file, or injected ones (TokenReview)."""
    issuer = load_ca(config.identity.ca_dir)
    if tokens is None:
        if config.lab is None:
            raise ConfigError("no bootstrap credentials: lab tokens or TokenReview are needed")
        # Imported here: a Kubernetes deployment has no lab token file.
        from controlplane.identity.lab import LabBootstrapTokens

        tokens = LabBootstrapTokens(config.lab.tokens_file)
    ident = config.identity
    return Signer(
        issuer,
        binding,
        tokens,
        ident.trust_domain,
        registry=registry,
        leaf_lifetime=ident.leaf_lifetime,
        node_lifetime=ident.node_lifetime,
        skew=ident.clock_skew,
        pods=pods,
    )


@dataclass(frozen=True)
class KubeSettings:
    """The Kubernetes side of a control plane that is not a lab's."""

    api: KubeConfig
    """How to reach the API server (``controlplane.discovery.kube.KubeConfig``)."""
    audience: str = "weft-controlplane"
    """Audience the agents' projected tokens must carry."""
    agent: tuple[str, str] = ("weft-system", "weft-agent")
    """Namespace and service account of the agent DaemonSet."""


def run_controlplane(config: ControlPlaneConfig, kube: KubeSettings | None = None) -> None:
    """Validate the CA, start discovery, the agent API and admin ports, serve until
    signalled.  Sources: the lab's (``config.lab``) or Kubernetes (``kube``).

    Raises :class:`~.ca.CaError` or :class:`ConfigError` before binding anything if the
    CA or the configuration is unusable.
    """
    log.info("control plane: %s", config.describe())
    if config.lab is None and kube is None:
        raise ConfigError("no sources: give lab sources or Kubernetes settings")
    registry = CollectorRegistry()

    async def main() -> None:
        store = DiscoveryStore()
        source: Source
        tokens: BootstrapTokens | None = None
        pods: PodCredentials | None = None
        background: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        holder: list[Signer] = []
        if config.lab is not None:
            from controlplane.discovery.lab import LabSource

            source = LabSource(
                config.lab.state_file,
                store,
                trust_domain=config.identity.trust_domain,
                mesh_default=config.mesh.default_policy,
            )
        else:
            assert kube is not None
            # Imported here: the kubernetes client takes seconds to import and a lab
            # control plane never needs it.
            from controlplane.discovery.kube import KubeSource, make_api_client
            from controlplane.identity.kube import TokenReviewBootstrap, TrustBundlePublisher

            if kube.api.trust_domain != config.identity.trust_domain:
                raise ConfigError(
                    f"trust domain {kube.api.trust_domain!r} of the Kubernetes source differs "
                    f"from the CA's {config.identity.trust_domain!r}"
                )
            api = make_api_client(kube.api)
            source = KubeSource(kube.api, store, api, mesh_default=config.mesh.default_policy)
            tokens = pods = TokenReviewBootstrap(api, audience=kube.audience, agent=kube.agent)
            publisher = TrustBundlePublisher(
                api,
                lambda: "".join(holder[0].issuer.bundle_pem),
                trust_domain=config.identity.trust_domain,
                registry=registry,
            )
            source.namespace_listeners.append(publisher.poke)
            background["trust-bundle"] = publisher.run
            log.info(
                "Kubernetes sources: API server %s; agents bootstrap with projected tokens "
                "for audience %r as %s/%s, sidecars with their own pod's",
                kube.api.server, kube.audience, *kube.agent,
            )  # fmt: skip
        signer = build_signer(config, registry, StoreNodeBinding(store), tokens, pods)
        holder.append(signer)
        issuer = signer.issuer
        log.info(
            "issuer %s valid until %s; %d trust anchor(s)",
            issuer.cert.subject.rfc4514_string(),
            issuer.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            len(issuer.anchors),
        )
        await ControlPlane(
            config, signer, registry, store=store, source=source, background=background
        ).run()

    asyncio.run(main())
