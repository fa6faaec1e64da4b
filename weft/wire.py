"""The agent ↔ control plane certificate API: messages, refusal codes, JSON codec.

Transport: HTTP/1.1 over TLS 1.3 on the control plane's port 15010.

* ``POST /v1/bootstrap`` — server-authenticated TLS only.  A node proves itself with a
  bootstrap credential (lab: a per-node token; Kubernetes: a projected ServiceAccount
  token checked with TokenReview) and gets a short-lived *node* certificate
  (``spiffe://<td>/weft/node/<node>``) for its CSR.
* ``POST /v1/certificates`` — mutual TLS with that node certificate.  The node asks for
  a *workload* certificate; the control plane signs only if a pod with that namespace and
  service account is scheduled on the node (node binding).
* ``POST /v1/pod-certificates`` — server-authenticated TLS only.  A sidecar (one pod's
  proxy) asks for its own pod's workload certificate with that pod's projected
  ServiceAccount token; the control plane signs only the identity of the pod the token is
  bound to (:class:`PodCertificateRequest`).  No node certificate is involved: a pod's
  credential must never buy what a node's does (every identity on the node).

Both answer ``200`` with a :class:`CertificateResponse`, or an error status with a
:class:`Refusal` whose ``code`` the agent logs and a metric counts.  JSON was chosen over
a binary schema because the API is low-rate (one request per identity per ~17 h), easy to
inspect with curl, and needs no code generation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

API_PORT = 15010
ADMIN_PORT = 15014
BOOTSTRAP_PATH = "/v1/bootstrap"
CERTIFICATES_PATH = "/v1/certificates"
POD_CERTIFICATES_PATH = "/v1/pod-certificates"
MAX_BODY = 64 * 1024
"""A CSR is ~500 bytes; anything near this limit is not a legitimate request."""


class WireError(ValueError):
    """A message does not decode; the text says which field."""


class RefusalCode(StrEnum):
    UNAUTHENTICATED = "UNAUTHENTICATED"
    """No or bad node credential (bootstrap token, TokenReview, node certificate)."""
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    """Not JSON, missing fields, too large, wrong method or path."""
    MALFORMED_CSR = "MALFORMED_CSR"
    """The CSR is not a PEM PKCS#10 request."""
    BAD_CSR_SIGNATURE = "BAD_CSR_SIGNATURE"
    """The CSR's self-signature does not verify (proof of key possession)."""
    KEY_NOT_P256 = "KEY_NOT_P256"
    """Only ECDSA P-256 keys are signed."""
    SAN_MISMATCH = "SAN_MISMATCH"
    """The CSR's SAN is not exactly the requested SPIFFE ID (or has extra names)."""
    FOREIGN_TRUST_DOMAIN = "FOREIGN_TRUST_DOMAIN"
    """The requested identity is not in this control plane's trust domain."""
    NODE_NOT_BOUND = "NODE_NOT_BOUND"
    """No pod with that namespace and service account is scheduled on the asking node."""
    ISSUER_UNAVAILABLE = "ISSUER_UNAVAILABLE"
    """The issuer is expired, not yet valid, or not loaded: nothing can be signed."""
    CREDENTIAL_CHECK_UNAVAILABLE = "CREDENTIAL_CHECK_UNAVAILABLE"
    """The node credential could not be checked now (the API server did not answer the
    TokenReview); agents back off and retry.  Not a verdict on the credential."""
    NOT_POD_IDENTITY = "NOT_POD_IDENTITY"
    """A pod's token asked for an identity other than its own pod's namespace and service
    account (``/v1/pod-certificates``)."""
    POD_NOT_SIDECAR = "POD_NOT_SIDECAR"
    """The token's pod is not in sidecar mode (no ``weft.io/mode: sidecar``, no injected
    sidecar), not scheduled, or finished: its certificate comes from its node agent."""
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    """The node already holds the most discovery streams allowed; agents back off."""
    INTERNAL = "INTERNAL"
    """A bug on the control plane's side; agents back off and retry."""


HTTP_STATUS = {
    RefusalCode.UNAUTHENTICATED: 401,
    RefusalCode.NODE_NOT_BOUND: 403,
    RefusalCode.NOT_POD_IDENTITY: 403,
    RefusalCode.POD_NOT_SIDECAR: 403,
    RefusalCode.ISSUER_UNAVAILABLE: 503,
    RefusalCode.CREDENTIAL_CHECK_UNAVAILABLE: 503,
    RefusalCode.TOO_MANY_STREAMS: 429,
    RefusalCode.INTERNAL: 500,
}
"""Everything else is a 400."""


def _str(data: dict[str, Any], key: str, max_len: int = MAX_BODY) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise WireError(f"field {key!r} must be a non-empty string (<= {max_len} chars)")
    return value


def _obj(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY:
        raise WireError(f"message larger than {MAX_BODY} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise WireError("expected a JSON object")
    return data


@dataclass(frozen=True)
class BootstrapRequest:
    node: str
    token: str
    csr_pem: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BootstrapRequest:
        d = _obj(raw)
        return cls(
            node=_str(d, "node", 253), token=_str(d, "token", 8192), csr_pem=_str(d, "csr_pem")
        )


@dataclass(frozen=True)
class CertificateRequest:
    identity: str
    """The SPIFFE ID asked for."""
    csr_pem: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CertificateRequest:
        d = _obj(raw)
        return cls(identity=_str(d, "identity", 2048), csr_pem=_str(d, "csr_pem"))


@dataclass(frozen=True)
class PodCertificateRequest:
    """A sidecar's request for its own pod's certificate (``/v1/pod-certificates``)."""

    token: str
    """The pod's projected ServiceAccount token (audience: the control plane's)."""
    identity: str
    """The SPIFFE ID asked for: must be the token's pod's own."""
    csr_pem: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PodCertificateRequest:
        d = _obj(raw)
        return cls(
            token=_str(d, "token", 8192),
            identity=_str(d, "identity", 2048),
            csr_pem=_str(d, "csr_pem"),
        )


@dataclass(frozen=True)
class CertificateResponse:
    certificate_pem: str
    """The leaf."""
    chain_pem: list[str]
    """Intermediates from the leaf's issuer up to (not including) the trust anchor."""
    trust_bundle_pem: list[str]
    """Current trust anchors (two during an anchor rotation)."""
    not_after: float
    """The leaf's expiry, Unix seconds."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CertificateResponse:
        d = _obj(raw)
        chain, bundle, not_after = d.get("chain_pem"), d.get("trust_bundle_pem"), d.get("not_after")
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise WireError("field 'chain_pem' must be a list of strings")
        if (
            not isinstance(bundle, list)
            or not bundle
            or not all(isinstance(c, str) for c in bundle)
        ):
            raise WireError("field 'trust_bundle_pem' must be a non-empty list of strings")
        if not isinstance(not_after, int | float):
            raise WireError("field 'not_after' must be a number")
        return cls(_str(d, "certificate_pem"), chain, bundle, float(not_after))


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    message: str
    details: dict[str, str] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    def encode(self) -> bytes:
        return json.dumps(
            {"error": {"code": self.code.value, "message": self.message, "details": self.details}}
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Refusal:
        err = _obj(raw).get("error")
        if not isinstance(err, dict):
            raise WireError("expected an 'error' object")
        try:
            code = RefusalCode(str(err.get("code")))
        except ValueError:
            raise WireError(f"unknown refusal code {err.get('code')!r}") from None
        details = err.get("details") or {}
        if not isinstance(details, dict):
            raise WireError("field 'details' must be an object")
        return cls(code, _str(err, "message"), {str(k): str(v) for k, v in details.items()})
