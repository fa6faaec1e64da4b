"""The node agent's client for the control plane's certificate API (``weft.wire``).

One short connection per request: TLS 1.3 only, the server's chain verified against the
trust bundle and its identity checked as a SPIFFE ID
(``spiffe://<td>/ns/weft-system/sa/weft-controlplane``), one HTTP/1.1 request with
``Connection: close``, one response read with hard limits, then close.

Design choices:

* **Connection per request, not a pool.**  The API is low-rate (one request per local
  identity per ~17 h, one bootstrap per ~45 min), so a kept-alive connection would sit
  idle through control-plane restarts and load-balancer timeouts and fail on first use.
  A fresh connection also picks up a new trust bundle or node certificate without any
  invalidation logic beyond rebuilding the ``SSLContext``.
* **A minimal HTTP/1.1 client of our own**, not aiohttp/httpx: the agent needs exactly
  one request shape and must bound what a misbehaving peer can make it buffer.  The
  codec (`encode_request`, `parse_response_head`) is sans-I/O so it can be tested and
  fuzzed without sockets; the response must carry ``Content-Length`` (no chunked
  encoding, no read-until-close), the head is capped at ``max_head_bytes``, the body at
  ``max_body_bytes``.
* **Identity, not hostnames.**  ``check_hostname`` is off and the server's single URI
  SAN is compared with the expected SPIFFE ID after the handshake: control plane
  certificates name a workload, not a DNS name, and an agent may reach the control plane
  by IP, service name or load balancer.
* **Node certificate renewed lazily.**  The node certificate (~1 h) is only ever
  presented by this client, so it is checked before every mTLS request and the node
  bootstraps again once less than ``1 - node_refresh_fraction`` of its lifetime remains
  (`ensure_node_certificate`).  A background task would be one more long-lived task for
  no benefit; a future long-lived user (a discovery stream) calls
  `ensure_node_certificate` before each connect.  If the control plane rejects the node
  certificate anyway (clock skew, an issuer it no longer trusts), the client bootstraps
  again once and retries.
* **Trust bundle follows the control plane.**  The initial anchors come from a file
  (``trust_bundle_path``: the lab writes it, on Kubernetes a mounted ConfigMap); every
  response carries the current anchors, which replace the in-memory set — replace, not
  union, so that an anchor removed after a rotation stops being trusted.  A bundle is
  only adopted if the certificate in the same response chains to it, so a broken answer
  cannot lock the agent out of its control plane.

* **Sidecars use no node certificate.**  A sidecar (one pod's proxy) calls
  `use_pod_token` instead of `bootstrap`: each certificate request then goes to
  ``/v1/pod-certificates`` with the pod's own token (read on every request: the kubelet
  rotates it), and the discovery stream is opened with the pod's workload certificate.

Errors: `RefusedError` when the control plane answered with a refusal (its
`weft.wire.RefusalCode` says why); `ControlPlaneUnavailable` (and its subclasses
`ServerIdentityError`, `InvalidResponse`) when there was no usable answer — retry later.

The module also holds the agent's conventions for key material on disk (`write_private`,
`check_issued`, `warn_if_not_tmpfs`), shared with :mod:`nodeagent.certs` which imports
this module (never the other way round).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.certtypes import TlsMaterial
from weft.files import write_atomic
from weft.http import HttpProtocolError, close_writer, encode_request, parse_response_head
from weft.identity import (
    DEFAULT_TRUST_DOMAIN,
    IdentityError,
    SpiffeId,
    build_csr,
    cert_pem,
    generate_key,
    key_pem,
    load_certs,
    spiffe_id_of,
)
from weft.meshwire import CONTENT_TYPE as STREAM_CONTENT_TYPE
from weft.wire import (
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

log = logging.getLogger("weft.cpclient")

CONTROLPLANE_NAMESPACE = "weft-system"
CONTROLPLANE_SERVICE_ACCOUNT = "weft-controlplane"

TokenSource = Callable[[], str]
"""Returns the current bootstrap credential.  A callable because Kubernetes rotates
projected ServiceAccount tokens in place: read the file on every bootstrap."""

# TLS alerts a server sends when it does not accept the client certificate.  Seen by the
# client only when it first reads (TLS 1.3 finishes the client's handshake before the
# server has checked the client certificate).
_CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


def controlplane_id(trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
    """The SPIFFE ID the control plane's server certificate must carry."""
    return SpiffeId.workload(CONTROLPLANE_NAMESPACE, CONTROLPLANE_SERVICE_ACCOUNT, trust_domain)


# --- errors -------------------------------------------------------------------------------


class ControlPlaneError(Exception):
    """Base of everything this client raises about the control plane."""


class ControlPlaneUnavailable(ControlPlaneError):
    """No usable answer: connection refused or reset, timeout, 5xx, TLS failure.

    Retry later with backoff; keep using what you have meanwhile.
    """


class ServerIdentityError(ControlPlaneUnavailable):
    """The peer is not our control plane: its certificate does not chain to the trust
    bundle, or it carries another SPIFFE ID.  Usually a wrong address or a stale bundle."""


class InvalidResponse(ControlPlaneUnavailable):
    """The control plane answered, but not with something usable (HTTP, JSON, or
    certificate content).  A control plane bug or version skew; retried like an outage."""


class RefusedError(ControlPlaneError):
    """The control plane refused the request; ``refusal.code`` says why."""

    def __init__(self, refusal: Refusal, what: str = "request") -> None:
        self.refusal = refusal
        details = "".join(f", {k}={v}" for k, v in sorted(refusal.details.items()))
        super().__init__(f"{what} refused: {refusal.code.value}: {refusal.message}{details}")

    @property
    def code(self) -> RefusalCode:
        return self.refusal.code


class _ClientCertRejected(ControlPlaneUnavailable):
    """The server refused, or probably refused, our node certificate at the TLS layer
    (only for mTLS requests): worth one new bootstrap before giving up."""


# --- sans-I/O HTTP/1.1 --------------------------------------------------------------------


@dataclass
class Stream:
    """A kept connection carrying a streamed answer; the caller reads and closes it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    where: str

    async def close(self) -> None:
        await close_writer(self.writer)


# --- certificate checks and files ---------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate from a `CertificateResponse`, checked (see `check_issued`)."""

    identity: SpiffeId
    leaf: x509.Certificate
    chain_pem: bytes
    """The leaf, then the intermediates: what a TLS endpoint presents."""
    anchors: tuple[x509.Certificate, ...]
    bundle_pem: bytes
    """The anchors, normalised (one PEM block each, in the order received)."""
    not_before: float
    not_after: float


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(cert: x509.Certificate) -> str:
    """A short SHA-256 fingerprint for log lines."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def parse_bundle(pems: list[str]) -> tuple[x509.Certificate, ...]:
    """Trust anchors from a response; each must be a CA certificate."""
    anchors: list[x509.Certificate] = []
    for i, pem in enumerate(pems):
        try:
            certs = load_certs(pem.encode())
        except (IdentityError, UnicodeEncodeError) as e:
            raise InvalidResponse(f"trust bundle entry {i}: {e}") from None
        for cert in certs:
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise InvalidResponse(
                    f"trust bundle entry {i} ({cert.subject.rfc4514_string()!r}) is not a CA"
                )
            anchors.append(cert)
    if not anchors:
        raise InvalidResponse("the trust bundle is empty")
    return tuple(anchors)


def check_issued(
    resp: CertificateResponse,
    identity: SpiffeId,
    now: float,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """Check that a response holds a usable certificate for ``identity``.

    The control plane is trusted, but a certificate that peers will reject is better
    caught here, with a message, than as handshake failures on the data path: the leaf
    must carry exactly ``identity``, be valid now, match ``key`` (when given: the key
    whose CSR was sent) and chain through ``chain_pem`` to an anchor of the response's own
    trust bundle.  Raises `InvalidResponse`.
    """
    what = f"certificate for {identity}"
    try:
        (leaf,) = load_certs(resp.certificate_pem.encode())
        intermediates = [c for pem in resp.chain_pem for c in load_certs(pem.encode())]
    except (IdentityError, UnicodeEncodeError, ValueError) as e:
        raise InvalidResponse(f"{what}: unreadable PEM ({e})") from None
    anchors = parse_bundle(resp.trust_bundle_pem)
    try:
        got = spiffe_id_of(leaf)
    except IdentityError as e:
        raise InvalidResponse(f"{what}: {e}") from None
    if got != identity:
        raise InvalidResponse(f"{what}: the certificate names {got} instead")
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise InvalidResponse(f"{what}: already expired (not after {leaf.not_valid_after_utc})")
    if not_after <= not_before:
        raise InvalidResponse(f"{what}: empty validity window")
    if key is not None and _spki(leaf.public_key()) != _spki(key.public_key()):
        raise InvalidResponse(f"{what}: the certificate is for another key than the CSR's")
    path = [leaf, *intermediates]
    try:
        for child, parent in itertools.pairwise(path):
            child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise InvalidResponse(f"{what}: chain_pem does not link up ({e!r})") from None
    top = path[-1]
    for anchor in anchors:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            top.verify_directly_issued_by(anchor)
            break
    else:
        raise InvalidResponse(
            f"{what}: the chain does not end at an anchor of the response's trust bundle"
        )
    return Issued(
        identity=identity,
        leaf=leaf,
        chain_pem=b"".join(cert_pem(c) for c in path),
        anchors=anchors,
        bundle_pem=b"".join(cert_pem(a) for a in anchors),
        not_before=not_before,
        not_after=not_after,
    )


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically, with ``mode`` (0600 by default) from the first byte."""
    write_atomic(path, data, mode)


def make_private_dir(path: Path) -> None:
    """Create a directory that only this user can enter (keys live below it)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (from ``/proc/self/mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/self/mounts escapes spaces and friends as octal (\040).
        point = fields[1].encode().decode("unicode_escape")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def warn_if_not_tmpfs(path: Path, what: str) -> None:
    """Log a warning when private keys would be written to a disk-backed filesystem."""
    fs = filesystem_type(path)
    if fs is not None and fs not in {"tmpfs", "ramfs"}:
        log.warning(
            "%s %s is on %s, not tmpfs: private keys will reach a disk; point it at a "
            "tmpfs such as /run/weft/...",
            what, path, fs,
        )  # fmt: skip


# --- the client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout: float = 5.0
    """Seconds for TCP connect plus the TLS handshake."""
    request_timeout: float = 15.0
    """Seconds for sending the request and reading the whole response (signing is fast;
    this only bounds a stuck peer)."""
    max_head_bytes: int = 16 * 1024
    """Largest response head (status line and headers) accepted."""
    max_body_bytes: int = MAX_BODY
    """Largest response body accepted; a response is a few KiB (leaf, chain, anchors)."""
    node_refresh_fraction: float = 0.7
    """Bootstrap again once this fraction of the node certificate's lifetime has passed."""

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("connect_timeout and request_timeout must be > 0 seconds")
        if not 0 < self.node_refresh_fraction < 1:
            raise ValueError(
                f"node_refresh_fraction must be in (0, 1), got {self.node_refresh_fraction}"
            )
        if self.max_head_bytes < 256 or self.max_body_bytes < 1024:
            raise ValueError("max_head_bytes >= 256 and max_body_bytes >= 1024 are needed")


@dataclass
class _NodeCert:
    identity: SpiffeId
    key_path: Path
    chain_path: Path
    issued_at: float
    """The later of notBefore and receipt: notBefore is backdated by the control plane's
    clock-skew allowance, which must not count as lifetime already used."""
    not_after: float
    generation: int


class ControlPlaneClient:
    """Talks to one control plane address; see the module docstring."""

    def __init__(
        self,
        host: str,
        trust_bundle_path: Path,
        state_dir: Path,
        *,
        port: int = API_PORT,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        server_id: SpiffeId | None = None,
        config: ClientConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``trust_bundle_path``: PEM anchors to trust before the first answer (read now).
        ``state_dir``: tmpfs directory for the node key and certificate (made 0700).
        ``server_id``: the control plane's SPIFFE ID, by default
        ``spiffe://<trust_domain>/ns/weft-system/sa/weft-controlplane``.
        ``clock``: wall-clock seconds, for node certificate expiry (injected for tests)."""
        self.host = host
        self.port = port
        self.trust_domain = trust_domain
        self.server_id = server_id or controlplane_id(trust_domain)
        self.config = config or ClientConfig()
        self.state_dir = state_dir
        self._clock = clock
        self._trust_bundle_path = trust_bundle_path
        self._bundle_pem = self._read_initial_bundle(trust_bundle_path)
        self._bundle_generation = 1
        self._node: _NodeCert | None = None
        self._node_name: str | None = None
        self._token: TokenSource | None = None
        self._pod_token: TokenSource | None = None
        self._pod_material: Callable[[], TlsMaterial | None] | None = None
        self._node_lock = asyncio.Lock()
        self._contexts: dict[bool, tuple[tuple[object, ...], ssl.SSLContext]] = {}
        make_private_dir(state_dir)
        warn_if_not_tmpfs(state_dir, "node agent state directory")

    @staticmethod
    def _read_initial_bundle(path: Path) -> bytes:
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise ControlPlaneError(
                f"cannot read the trust bundle {path}: {e.strerror}; the lab writes it when "
                "it starts, on Kubernetes mount the weft-trust-bundle ConfigMap there"
            ) from None
        try:
            anchors = parse_bundle([pem.decode("ascii", "replace")])
        except InvalidResponse as e:
            raise ControlPlaneError(f"trust bundle {path}: {e}") from None
        return b"".join(cert_pem(a) for a in anchors)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def node_identity(self) -> SpiffeId | None:
        return self._node.identity if self._node else None

    def trust_bundle_pem(self) -> bytes:
        """The anchors this client currently trusts the control plane with."""
        return self._bundle_pem

    # --- public API -----------------------------------------------------------------------

    async def bootstrap(self, node: str, token: str | TokenSource) -> None:
        """Exchange the node's bootstrap credential for a node certificate.

        The node key is generated here and written (0600) with the certificate under
        ``state_dir``; they authenticate later `request_certificate` calls.  The node name
        and credential are kept even if this raises, so later requests bootstrap again by
        themselves: an agent that starts while the control plane is away can carry on.
        """
        self._node_name = SpiffeId.node(node, self.trust_domain).node_name
        self._token = token if callable(token) else (lambda: token)
        async with self._node_lock:
            await self._bootstrap_locked()

    def use_pod_token(
        self, token: TokenSource, client_material: Callable[[], TlsMaterial | None]
    ) -> None:
        """Sidecar mode: certificates are asked for with the pod's own ``token`` (no node
        certificate), and ``client_material`` (the pod's current workload certificate, None
        until there is one) authenticates the discovery stream."""
        self._pod_token = token
        self._pod_material = client_material

    @property
    def pod_mode(self) -> bool:
        return self._pod_token is not None

    async def ensure_node_certificate(self) -> None:
        """Bootstrap again if the node certificate is missing or near its end."""
        async with self._node_lock:
            if self._node_needs_renewal():
                await self._bootstrap_locked()

    async def request_certificate(self, identity: SpiffeId, csr_pem: bytes) -> CertificateResponse:
        """Ask for a workload certificate over mTLS with the node certificate.

        Raises `RefusedError` (the control plane said no: see ``.code``) or
        `ControlPlaneUnavailable` (no usable answer: retry later).
        """
        if self._pod_token is not None:
            return await self._pod_certificate(identity, csr_pem)
        if self._token is None:
            raise RuntimeError("call bootstrap(node, token) before request_certificate()")
        await self.ensure_node_certificate()
        body = CertificateRequest(str(identity), csr_pem.decode("ascii")).encode()
        try:
            return await self._certificates(identity, body)
        except RefusedError as e:
            if e.code != RefusalCode.UNAUTHENTICATED:
                raise
            reason: ControlPlaneError = e
        except _ClientCertRejected as e:
            reason = e
        rejected = self._node
        log.warning(
            "node certificate %s not accepted (%s); bootstrapping again and retrying once",
            rejected.identity if rejected else "?", reason,
        )  # fmt: skip
        async with self._node_lock:
            if self._node is rejected:  # nobody renewed it meanwhile
                await self._bootstrap_locked()
        return await self._certificates(identity, body)

    # --- internals ------------------------------------------------------------------------

    def _node_needs_renewal(self) -> bool:
        node = self._node
        if node is None:
            return True
        lifetime = node.not_after - node.issued_at
        return self._clock() >= node.issued_at + lifetime * self.config.node_refresh_fraction

    async def _bootstrap_locked(self) -> None:
        assert self._node_name is not None and self._token is not None
        node_id = SpiffeId.node(self._node_name, self.trust_domain)
        key = generate_key()
        try:
            token = self._token()
        except OSError as e:
            raise ControlPlaneError(f"cannot read the bootstrap token: {e}") from None
        request = BootstrapRequest(self._node_name, token, build_csr(key, node_id).decode())
        raw = await self._post(BOOTSTRAP_PATH, request.encode(), mtls=False, what="bootstrap")
        resp = self._decode(raw, "bootstrap")
        issued = check_issued(resp, node_id, self._clock(), key)
        self._adopt_bundle(issued)
        generation = self._node.generation + 1 if self._node else 1
        key_path = self.state_dir / "node-key.pem"
        chain_path = self.state_dir / "node-chain.pem"
        try:
            write_private(key_path, key_pem(key))
            write_private(chain_path, issued.chain_pem, 0o644)
        except OSError as e:
            raise ControlPlaneError(
                f"cannot write the node certificate under {self.state_dir}: {e}"
            ) from e
        self._node = _NodeCert(
            node_id,
            key_path,
            chain_path,
            max(issued.not_before, self._clock()),
            issued.not_after,
            generation,
        )
        log.info(
            "node certificate %s issued, valid until %s (serial %x)",
            node_id, issued.leaf.not_valid_after_utc.isoformat(), issued.leaf.serial_number,
        )  # fmt: skip

    async def _pod_certificate(self, identity: SpiffeId, csr_pem: bytes) -> CertificateResponse:
        assert self._pod_token is not None
        try:
            token = self._pod_token()
        except OSError as e:
            raise ControlPlaneError(f"cannot read the pod's token: {e}") from None
        what = f"pod CSR for {identity}"
        body = PodCertificateRequest(token, str(identity), csr_pem.decode("ascii")).encode()
        raw = await self._post(POD_CERTIFICATES_PATH, body, mtls=False, what=what)
        resp = self._decode(raw, what)
        self._adopt_bundle(check_issued(resp, identity, self._clock()))
        return resp

    async def _certificates(self, identity: SpiffeId, body: bytes) -> CertificateResponse:
        raw = await self._post(CERTIFICATES_PATH, body, mtls=True, what=f"CSR for {identity}")
        resp = self._decode(raw, f"CSR for {identity}")
        # No key here (the caller has it): check identity and chain, then trust the bundle.
        self._adopt_bundle(check_issued(resp, identity, self._clock()))
        return resp

    @staticmethod
    def _decode(raw: bytes, what: str) -> CertificateResponse:
        try:
            return CertificateResponse.decode(raw)
        except WireError as e:
            raise InvalidResponse(f"{what}: unreadable answer: {e}") from None

    def _adopt_bundle(self, issued: Issued) -> None:
        if issued.bundle_pem == self._bundle_pem:
            return
        self._bundle_pem = issued.bundle_pem
        self._bundle_generation += 1
        log.info(
            "control plane trust bundle updated: %d anchor(s) %s",
            len(issued.anchors), ", ".join(fingerprint(a) for a in issued.anchors),
        )  # fmt: skip

    def _client_material(self) -> tuple[Path, Path, tuple[object, ...]]:
        """(chain, key, version) of the client certificate for mTLS requests."""
        if self._pod_material is not None:
            material = self._pod_material()
            if material is None:
                raise ControlPlaneUnavailable(
                    "no workload certificate yet to open the stream with (sidecar)"
                )
            return material.chain_path, material.key_path, ("pod", material.generation)
        assert self._node is not None
        return self._node.chain_path, self._node.key_path, ("node", self._node.generation)

    def _context(self, mtls: bool) -> ssl.SSLContext:
        client = self._client_material() if mtls else None
        version = (self._bundle_generation, client[2] if client else None)
        cached = self._contexts.get(mtls)
        if cached is not None and cached[0] == version:
            return cached[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        # The server is identified by its SPIFFE ID (checked after the handshake), not by
        # a DNS name; the chain is still verified against the bundle.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self._bundle_pem.decode("ascii"))
        if client is not None:
            ctx.load_cert_chain(client[0], client[1])
        self._contexts[mtls] = (version, ctx)
        return ctx

    def _check_server_identity(self, writer: asyncio.StreamWriter) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise ServerIdentityError(f"control plane at {self.address} sent no certificate")
        try:
            got: SpiffeId | str = spiffe_id_of(x509.load_der_x509_certificate(der))
        except (IdentityError, ValueError) as e:
            got = f"no usable SPIFFE ID ({e})"
        if got != self.server_id:
            raise ServerIdentityError(
                f"server at {self.address} presented {got}, expected {self.server_id}: "
                "not talking to it; check the control plane address, or whether another "
                "service of the mesh listens there"
            )

    async def _post(self, path: str, body: bytes, *, mtls: bool, what: str) -> bytes:
        """One request on a fresh connection; returns the body of a 200 answer."""
        answer = await self._exchange(path, body, mtls=mtls, what=what, stream=False)
        assert isinstance(answer, bytes)
        return answer

    async def open_stream(self, path: str, body: bytes, *, what: str) -> Stream:
        """POST over mTLS with the node certificate and keep the connection for a
        streamed 200 answer (the discovery stream).  Refusals raise as for requests;
        an UNAUTHENTICATED refusal bootstraps again first, once.  A sidecar presents its
        pod's workload certificate instead (`use_pod_token`)."""
        if self._pod_material is not None:
            answer = await self._exchange(path, body, mtls=True, what=what, stream=True)
            assert isinstance(answer, Stream)
            return answer
        if self._token is None:
            raise RuntimeError("call bootstrap(node, token) before open_stream()")
        await self.ensure_node_certificate()
        try:
            answer = await self._exchange(path, body, mtls=True, what=what, stream=True)
        except (RefusedError, _ClientCertRejected) as e:
            if isinstance(e, RefusedError) and e.code != RefusalCode.UNAUTHENTICATED:
                raise
            rejected = self._node
            async with self._node_lock:
                if self._node is rejected:
                    await self._bootstrap_locked()
            answer = await self._exchange(path, body, mtls=True, what=what, stream=True)
        assert isinstance(answer, Stream)
        return answer

    async def _exchange(
        self, path: str, body: bytes, *, mtls: bool, what: str, stream: bool
    ) -> bytes | Stream:
        cfg = self.config
        try:
            ctx = self._context(mtls)
        except OSError as e:  # ssl.SSLError included: a node key/chain file gone or broken
            if mtls:
                self._node = None  # the next request bootstraps again
            raise ControlPlaneError(f"{what}: cannot load TLS material: {e}") from None
        where = f"control plane at {self.address}"
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=ctx, limit=cfg.max_head_bytes,
                    ssl_handshake_timeout=cfg.connect_timeout,
                )  # fmt: skip
        except TimeoutError:
            raise ControlPlaneUnavailable(
                f"{what}: {where}: no TLS connection within {cfg.connect_timeout:g}s"
            ) from None
        except ssl.SSLCertVerificationError as e:
            raise ServerIdentityError(
                f"{what}: {where}: its certificate does not verify against the trust bundle "
                f"({e.verify_message}); is the bundle ({self._trust_bundle_path}) the one of "
                "this control plane?"
            ) from None
        except (ssl.SSLError, OSError) as e:
            raise ControlPlaneUnavailable(f"{what}: {where}: cannot connect: {e}") from None
        answered = False
        kept: Stream | None = None
        try:
            self._check_server_identity(writer)
            async with asyncio.timeout(cfg.request_timeout):
                host = f"[{self.host}]" if ":" in self.host else self.host
                writer.write(encode_request("POST", path, f"{host}:{self.port}", body))
                await writer.drain()
                raw_head = await reader.readuntil(b"\r\n\r\n")
                answered = True
                head = parse_response_head(
                    raw_head, stream_type=STREAM_CONTENT_TYPE if stream else None
                )
                if stream and head.status == 200:
                    kept = Stream(reader, writer, where)
                    return kept
                if head.content_length > cfg.max_body_bytes:
                    raise HttpProtocolError(
                        f"response body of {head.content_length} bytes exceeds the "
                        f"{cfg.max_body_bytes}-byte limit"
                    )
                payload = await reader.readexactly(head.content_length)
        except TimeoutError:
            raise ControlPlaneUnavailable(
                f"{what}: {where}: no complete answer within {cfg.request_timeout:g}s"
            ) from None
        except HttpProtocolError as e:
            raise InvalidResponse(f"{what}: {where}: {e}") from None
        except asyncio.LimitOverrunError:
            raise InvalidResponse(
                f"{what}: {where}: response head larger than {cfg.max_head_bytes} bytes"
            ) from None
        except asyncio.IncompleteReadError as e:
            if mtls and not answered and not e.partial:
                # What a server that refuses our client certificate looks like from here
                # when its TLS stack drops the connection without flushing the alert (an
                # asyncio server does): the request went out and nothing came back.
                raise _ClientCertRejected(
                    f"{what}: {where}: connection closed without an answer (it may not "
                    "accept the node certificate)"
                ) from None
            raise ControlPlaneUnavailable(
                f"{what}: {where}: connection closed after {len(e.partial)} bytes of the answer"
            ) from None
        except ssl.SSLError as e:
            if mtls and e.reason in _CLIENT_CERT_ALERTS:
                raise _ClientCertRejected(
                    f"{what}: {where}: it did not accept the node certificate ({e.reason})"
                ) from None
            raise ControlPlaneUnavailable(f"{what}: {where}: TLS error: {e}") from None
        except OSError as e:
            if mtls and not answered and isinstance(e, ConnectionResetError):
                raise _ClientCertRejected(
                    f"{what}: {where}: connection reset without an answer (it may not "
                    "accept the node certificate)"
                ) from None
            raise ControlPlaneUnavailable(f"{what}: {where}: connection failed: {e}") from None
        finally:
            if kept is None:
                await close_writer(writer)
        if head.status == 200:
            return payload
        try:
            refusal = Refusal.decode(payload)
        except WireError as e:
            if head.status >= 500:
                raise ControlPlaneUnavailable(
                    f"{what}: {where} answered HTTP {head.status} {head.reason}"
                ) from None
            raise InvalidResponse(
                f"{what}: {where} answered HTTP {head.status} without a readable refusal ({e})"
            ) from None
        raise RefusedError(refusal, what)
