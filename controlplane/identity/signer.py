"""Who gets which certificate: the control plane's signing decisions, without I/O.

:class:`Signer` takes decoded requests and returns a :class:`~weft.wire.CertificateResponse`
or a :class:`~weft.wire.Refusal`; the TLS server (:mod:`.server`) only moves bytes and
says which node is asking.  Keeping the decisions here makes every refusal path a plain
unit test and lets the server run the CPU-heavy part on a worker thread.

Three requests (wire format in :mod:`weft.wire`):

* **bootstrap** — a node proves itself with a credential (lab: a per-node token) and gets
  a short-lived *node* certificate, ``spiffe://<td>/weft/node/<node>``.  It is short (1 h)
  because nothing revokes it: a node removed from the token file stops getting
  certificates within the hour.
* **certificate** — a node, authenticated by that node certificate over mTLS, asks for a
  *workload* certificate.  Granted only if a pod with that namespace and service account is
  scheduled on that node (node binding, as Istio does for ztunnel), so a compromised node
  can impersonate only the workloads it already runs.
* **pod certificate** — a sidecar (one pod's proxy, sidecar mode) presents its own pod's
  credential (Kubernetes: the pod's projected ServiceAccount token) and gets exactly that
  pod's workload certificate: :class:`PodCredentials` says which pod the credential is
  bound to, and the request must name that pod's ``ns/<ns>/sa/<sa>``.  Nothing node-wide
  is granted, so a compromised sidecar pod can be only itself.

Checks run cheapest first and each failure has its own :class:`~weft.wire.RefusalCode`:
the agent logs it, ``weft_csr_refused_total{code}`` counts it, and the audit log records
it.  Nothing but the public key is copied from a CSR: the certificate's name comes from
the checked request, its extensions from the issuer's policy.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import SignatureAlgorithmOID
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.identity.ca import CaError, Issuer, is_p256, key_fingerprint
from weft.identity import SPIFFE_SCHEME, IdentityError, SpiffeId, cert_pem, spiffe_id_of
from weft.wire import (
    BootstrapRequest,
    CertificateRequest,
    CertificateResponse,
    PodCertificateRequest,
    Refusal,
    RefusalCode,
)

audit = logging.getLogger("weft.audit")
"""One line per issuance and per refusal: who asked, for what, what was decided."""
log = logging.getLogger("weft.controlplane.identity")

KIND_NODE = "node"
KIND_WORKLOAD = "workload"
KIND_CONTROLPLANE = "controlplane"
DEFAULT_NODE_LIFETIME = dt.timedelta(hours=1)
CONTROLPLANE_NAMESPACE = "weft-system"
CONTROLPLANE_SERVICE_ACCOUNT = "weft-controlplane"


_ECDSA_SIGNATURES = frozenset(
    {
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    }
)


def controlplane_identity(trust_domain: str) -> SpiffeId:
    """The identity the control plane serves with; agents check the server against it."""
    return SpiffeId.workload(CONTROLPLANE_NAMESPACE, CONTROLPLANE_SERVICE_ACCOUNT, trust_domain)


class NodeBinding(Protocol):
    """Which workload identities have a pod scheduled on a node (lab state, Kubernetes)."""

    def identities_on(self, node: str) -> set[SpiffeId]: ...


class BootstrapTokens(Protocol):
    """Maps a node bootstrap credential to the node it belongs to, or None.  Raises
    :class:`CredentialCheckUnavailable` when it cannot decide now."""

    def node_for(self, token: str) -> str | None: ...


class CredentialCheckUnavailable(Exception):
    """The credential could not be checked now (its authority did not answer)."""


class CredentialRefused(Exception):
    """The credential was checked and is not good for this; ``code`` and the message say
    why (the message goes back to the caller, so it names no secret)."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PodClaim:
    """The pod a credential is bound to, as its authority (the API server) vouches."""

    namespace: str
    name: str
    uid: str
    service_account: str
    node: str

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId.workload(self.namespace, self.service_account, trust_domain)


class PodCredentials(Protocol):
    """Maps a pod's own credential to the sidecar-mode pod it is bound to.  Raises
    :class:`CredentialRefused` (with the reason) or :class:`CredentialCheckUnavailable`."""

    def pod_for(self, token: str) -> PodClaim: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _untrusted(value: str, limit: int = 160) -> str:
    """A client-supplied string made safe for one log line: quoted, escaped, bounded."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


class _Refused(Exception):
    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Signer:
    """Decides and signs.  Thread-safe: the server calls it from worker threads."""

    def __init__(
        self,
        issuer: Issuer,
        binding: NodeBinding,
        tokens: BootstrapTokens,
        trust_domain: str,
        *,
        registry: CollectorRegistry | None = None,
        leaf_lifetime: dt.timedelta = dt.timedelta(hours=24),
        node_lifetime: dt.timedelta = DEFAULT_NODE_LIFETIME,
        skew: dt.timedelta = dt.timedelta(minutes=5),
        clock: Callable[[], dt.datetime] = _now,
        pods: PodCredentials | None = None,
    ) -> None:
        SpiffeId.node("x", trust_domain)  # validates the spelling early
        self.binding = binding
        self.tokens = tokens
        self.pods = pods
        """Pod credentials for sidecars (Kubernetes: TokenReview); None refuses them."""
        self.trust_domain = trust_domain
        self.leaf_lifetime = leaf_lifetime
        self.node_lifetime = node_lifetime
        self.skew = skew
        self.clock = clock
        registry = registry if registry is not None else CollectorRegistry()
        self.issued = Counter(
            "weft_csr_issued",
            "Certificates issued, by kind (node, workload, controlplane).",
            ["kind"],
            registry=registry,
        )
        self.refused = Counter(
            "weft_csr_refused",
            "Certificate requests refused, by refusal code.",
            ["code"],
            registry=registry,
        )
        self._issuer_expiry = Gauge(
            "weft_issuer_expiration_timestamp_seconds",
            "When the issuer chain stops being valid (Unix seconds): alert well before it.",
            registry=registry,
        )
        # Zero-valued series exist from the start, so rate() and alerts see them.
        for kind in (KIND_NODE, KIND_WORKLOAD, KIND_CONTROLPLANE):
            self.issued.labels(kind)
        for code in RefusalCode:
            self.refused.labels(code.value)
        self.issuer = issuer

    @property
    def issuer(self) -> Issuer:
        return self._issuer

    @issuer.setter
    def issuer(self, issuer: Issuer) -> None:
        """Swapping the issuer (a reload) is one reference assignment: threads signing
        right now finish with the old one, which is still valid."""
        self._issuer = issuer
        self._issuer_expiry.set(issuer.not_after.timestamp())

    # ------------------------------------------------------------------ requests

    def bootstrap(self, req: BootstrapRequest) -> CertificateResponse | Refusal:
        """Exchange a node bootstrap token and a CSR for a short-lived node certificate."""
        node = req.node
        try:
            try:
                expected = SpiffeId.node(node, self.trust_domain)
            except IdentityError as e:
                raise _Refused(RefusalCode.MALFORMED_REQUEST, f"bad node name: {e}") from None
            try:
                owner = self.tokens.node_for(req.token)
            except CredentialCheckUnavailable as e:
                raise _Refused(
                    RefusalCode.CREDENTIAL_CHECK_UNAVAILABLE,
                    f"cannot check the bootstrap credential now ({e}); retry later",
                ) from None
            if owner is None:
                raise _Refused(
                    RefusalCode.UNAUTHENTICATED,
                    "the bootstrap token is not valid: use the token the lab (or installer) "
                    "wrote for this node",
                )
            if owner != node:
                raise _Refused(
                    RefusalCode.UNAUTHENTICATED,
                    f"the bootstrap token does not belong to node {node!r}",
                )
            csr, key = self._check_csr(req.csr_pem)
            self._check_san(csr, expected)
            return self._issue(key, expected, node, KIND_NODE, self.node_lifetime)
        except _Refused as r:
            return self.refuse(r.code, r.message, node=node)

    def certificate(self, node: str, req: CertificateRequest) -> CertificateResponse | Refusal:
        """Sign a workload certificate for ``node`` (already authenticated by its node
        certificate) if the request passes every check."""
        try:
            csr, key = self._check_csr(req.csr_pem)
            identity = self._requested_identity(req.identity)
            self._check_san(csr, identity)
            if identity not in self.binding.identities_on(node):
                raise _Refused(
                    RefusalCode.NODE_NOT_BOUND,
                    f"no pod with namespace {identity.namespace!r} and service account "
                    f"{identity.service_account!r} is scheduled on node {node!r}; a node gets "
                    "certificates only for its own pods (if the pod was just scheduled, retry)",
                )
            return self._issue(key, identity, node, KIND_WORKLOAD, self.leaf_lifetime)
        except _Refused as r:
            return self.refuse(r.code, r.message, node=node, identity=req.identity)

    def pod_certificate(self, req: PodCertificateRequest) -> CertificateResponse | Refusal:
        """Sign a sidecar's own workload certificate if its pod credential is bound to a
        sidecar-mode pod with exactly the requested namespace and service account.

        The CSR is checked before the credential: it costs a fraction of a millisecond,
        the credential check an API round trip, and a malformed request needs neither."""
        pod = "-"
        try:
            csr, key = self._check_csr(req.csr_pem)
            identity = self._requested_identity(req.identity)
            self._check_san(csr, identity)
            if self.pods is None:
                raise _Refused(
                    RefusalCode.UNAUTHENTICATED,
                    "this control plane takes no pod credentials (the lab's sidecars "
                    "bootstrap with their node's token)",
                )
            try:
                claim = self.pods.pod_for(req.token)
            except CredentialCheckUnavailable as e:
                raise _Refused(
                    RefusalCode.CREDENTIAL_CHECK_UNAVAILABLE,
                    f"cannot check the pod's token now ({e}); retry later",
                ) from None
            except CredentialRefused as e:
                raise _Refused(e.code, e.message) from None
            pod = f"{claim.namespace}/{claim.name}"
            own = claim.identity(self.trust_domain)
            if identity != own:
                raise _Refused(
                    RefusalCode.NOT_POD_IDENTITY,
                    f"the token belongs to pod {pod}, which runs as {own}; a pod's token "
                    f"gets only its own identity, not {identity}",
                )
            return self._issue(key, identity, claim.node, KIND_WORKLOAD, self.leaf_lifetime,
                               pod=pod)  # fmt: skip
        except _Refused as r:
            return self.refuse(r.code, r.message, identity=req.identity, pod=pod)

    def issue_controlplane(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """The control plane's own serving certificate (no node, no binding: it is us).
        Raises :class:`~.ca.CaError` if the issuer cannot sign."""
        identity = controlplane_identity(self.trust_domain)
        cert = self.issuer.sign_leaf(csr, identity, self.leaf_lifetime, self.skew, self.clock())
        self._audit_issued(cert, identity, "-", KIND_CONTROLPLANE)
        return cert

    def refuse(
        self,
        code: RefusalCode,
        message: str,
        *,
        node: str | None = None,
        identity: str | None = None,
        peer: str | None = None,
        pod: str | None = None,
    ) -> Refusal:
        """Count, log and build a refusal.  The server uses it too (bad HTTP, no client
        certificate), so every refusal is counted and logged the same way."""
        self.refused.labels(code.value).inc()
        audit.warning(
            "refused code=%s node=%s identity=%s peer=%s%s reason=%s",
            code.value,
            _untrusted(node) if node else "-",
            _untrusted(identity) if identity else "-",
            peer or "-",
            f" pod={pod}" if pod else "",
            message,
        )
        details = {k: v for k, v in (("node", node), ("identity", identity)) if v}
        return Refusal(code, message, details)

    # ------------------------------------------------------------------ checks

    def _check_csr(
        self, pem: str
    ) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
        try:
            csr = x509.load_pem_x509_csr(pem.encode())
            # Extensions parse lazily; a malformed one must count as a malformed CSR here,
            # not surface later as a crash.
            csr.extensions  # noqa: B018
        except (ValueError, UnicodeEncodeError, x509.InvalidVersion) as e:
            # InvalidVersion is not a ValueError in every cryptography release (46 raises
            # it for a CSR whose version field is not 0); hypothesis found that one.
            raise _Refused(
                RefusalCode.MALFORMED_CSR, f"not a PEM PKCS#10 certificate request: {e}"
            ) from None
        try:
            key = csr.public_key()
        except (UnsupportedAlgorithm, ValueError):
            key = None
        # The key check comes before the signature check: it is cheaper, and it keeps
        # signature verification to the one algorithm we accept.
        if not isinstance(key, ec.EllipticCurvePublicKey) or not is_p256(key):
            raise _Refused(
                RefusalCode.KEY_NOT_P256,
                "the CSR's key is not ECDSA P-256; generate the workload key with "
                "weft.identity.generate_key()",
            )
        # Equivalent to ``csr.is_signature_valid`` for ECDSA, but reuses the key parsed
        # above (parsing it is ~15 % of the cost of a request) and the key goes on to
        # ``sign_leaf`` the same way.
        try:
            if csr.signature_algorithm_oid not in _ECDSA_SIGNATURES:
                raise InvalidSignature
            hash_algorithm = csr.signature_hash_algorithm
            if hash_algorithm is None:
                raise InvalidSignature
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(hash_algorithm))
        except (InvalidSignature, UnsupportedAlgorithm):
            raise _Refused(
                RefusalCode.BAD_CSR_SIGNATURE,
                "the CSR's signature does not verify with its own key (corrupted, or not "
                "signed by the key it carries)",
            ) from None
        return csr, key

    def _requested_identity(self, raw: str) -> SpiffeId:
        # The trust domain is compared before the full parse, so that a well-formed ID of
        # another mesh is reported as foreign rather than as malformed.
        if raw.startswith(SPIFFE_SCHEME):
            domain = raw[len(SPIFFE_SCHEME) :].partition("/")[0]
            if domain != self.trust_domain:
                raise _Refused(
                    RefusalCode.FOREIGN_TRUST_DOMAIN,
                    f"identity is in trust domain {domain!r}; this control plane signs only "
                    f"for {self.trust_domain!r}",
                )
        try:
            identity = SpiffeId.parse(raw)
        except IdentityError as e:
            raise _Refused(RefusalCode.MALFORMED_REQUEST, f"bad identity: {e}") from None
        if identity.is_node:
            raise _Refused(
                RefusalCode.MALFORMED_REQUEST,
                "node identities come from /v1/bootstrap; /v1/certificates signs workload "
                "identities (spiffe://<td>/ns/<ns>/sa/<sa>)",
            )
        return identity

    def _check_san(self, csr: x509.CertificateSigningRequest, expected: SpiffeId) -> None:
        try:
            got = spiffe_id_of(csr)
        except IdentityError as e:
            raise _Refused(
                RefusalCode.SAN_MISMATCH,
                f"the CSR's subjectAltName must be exactly {expected} and nothing else: {e}",
            ) from None
        if got != expected:
            raise _Refused(
                RefusalCode.SAN_MISMATCH,
                f"the CSR names {got} but the request is for {expected}",
            )

    # ------------------------------------------------------------------ issuing

    def _issue(
        self,
        key: ec.EllipticCurvePublicKey,
        identity: SpiffeId,
        node: str,
        kind: str,
        lifetime: dt.timedelta,
        *,
        pod: str | None = None,
    ) -> CertificateResponse:
        issuer = self.issuer  # one snapshot for the whole response (a reload may swap it)
        now = self.clock()
        problem = issuer.problem(now)
        if problem:
            raise _Refused(RefusalCode.ISSUER_UNAVAILABLE, problem)
        try:
            cert = issuer.sign_leaf(key, identity, lifetime, self.skew, now)
        except CaError as e:  # only if the issuer expired between the check and here
            raise _Refused(RefusalCode.ISSUER_UNAVAILABLE, str(e)) from None
        self._audit_issued(cert, identity, node, kind, key, pod=pod)
        return CertificateResponse(
            certificate_pem=cert_pem(cert).decode(),
            chain_pem=issuer.chain_pem,
            trust_bundle_pem=issuer.bundle_pem,
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def _audit_issued(
        self,
        cert: x509.Certificate,
        identity: SpiffeId,
        node: str,
        kind: str,
        key: ec.EllipticCurvePublicKey | None = None,
        *,
        pod: str | None = None,
    ) -> None:
        self.issued.labels(kind).inc()
        audit.info(
            "issued kind=%s node=%s%s identity=%s serial=%032x not_after=%s key_sha256=%s",
            kind,
            node,
            f" pod={pod}" if pod else "",
            identity,
            cert.serial_number,
            # isoformat: a third of strftime's cost, on the path measured by the bench.
            cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
            key_fingerprint(key or cert),
        )
