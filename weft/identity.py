"""Workload and node identities, shared by the control plane and the node agent.

Names (DESIGN.md "Identity"):

* workload: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``
* node (lab bootstrap and node-bound requests): ``spiffe://<trust-domain>/weft/node/<node>``

Keys are ECDSA P-256 everywhere; TLS is 1.3 only.  This module holds only what both
sides need — parsing and formatting IDs, reading a certificate's single SPIFFE URI SAN,
making keys and CSRs.  Signing lives in :mod:`controlplane.identity`; holding workload
certificates on a node lives in :mod:`nodeagent.certs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DEFAULT_TRUST_DOMAIN = "cluster.local"
SPIFFE_SCHEME = "spiffe://"
# Kubernetes names: DNS-1123 labels/subdomains; trust domains: lowercase DNS-ish names.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.\-_]{0,253}[a-z0-9])?$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$")


class IdentityError(ValueError):
    """A SPIFFE ID, certificate or CSR does not have the expected shape."""


def _check_name(kind: str, value: str) -> str:
    if not _K8S_NAME_RE.match(value):
        raise IdentityError(f"invalid {kind} {value!r}: expected a lowercase DNS-1123 name")
    return value


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A Weft SPIFFE ID: a workload (namespace + service account) or a node."""

    trust_domain: str
    path: str
    """Everything after the trust domain, starting with ``/``."""

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN_RE.match(self.trust_domain):
            raise IdentityError(f"invalid trust domain {self.trust_domain!r}")
        if not self.path.startswith("/") or "//" in self.path or self.path.endswith("/"):
            raise IdentityError(f"invalid SPIFFE path {self.path!r}")
        parts = self.path.strip("/").split("/")
        if parts[0] == "ns":
            if len(parts) != 4 or parts[2] != "sa":
                raise IdentityError(f"workload ID must be /ns/<ns>/sa/<sa>, got {self.path!r}")
            _check_name("namespace", parts[1])
            _check_name("service account", parts[3])
        elif parts[:2] == ["weft", "node"]:
            if len(parts) != 3:
                raise IdentityError(f"node ID must be /weft/node/<node>, got {self.path!r}")
            _check_name("node name", parts[2])
        else:
            raise IdentityError(
                f"unknown SPIFFE path {self.path!r}: expected /ns/<ns>/sa/<sa> or /weft/node/<n>"
            )

    @classmethod
    def workload(
        cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> SpiffeId:
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @classmethod
    def node(cls, node: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        return cls(trust_domain, f"/weft/node/{node}")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not uri.startswith(SPIFFE_SCHEME):
            raise IdentityError(f"not a SPIFFE ID (no spiffe:// scheme): {uri!r}")
        rest = uri[len(SPIFFE_SCHEME) :]
        domain, sep, path = rest.partition("/")
        if not sep:
            raise IdentityError(f"SPIFFE ID without a path: {uri!r}")
        return cls(domain, "/" + path)

    @property
    def is_node(self) -> bool:
        return self.path.startswith("/weft/node/")

    @property
    def namespace(self) -> str | None:
        parts = self.path.strip("/").split("/")
        return parts[1] if parts[0] == "ns" else None

    @property
    def service_account(self) -> str | None:
        parts = self.path.strip("/").split("/")
        return parts[3] if parts[0] == "ns" else None

    @property
    def node_name(self) -> str | None:
        return self.path.rsplit("/", 1)[1] if self.is_node else None

    def __str__(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}{self.path}"


def spiffe_ids_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """All URI SANs of a certificate or CSR (raw strings; none if it has no SAN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)]


def spiffe_id_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> SpiffeId:
    """The single SPIFFE ID of a certificate or CSR; anything else is an error.

    Weft certificates carry exactly one URI SAN and no DNS or IP SANs: a certificate
    with two identities would let its holder pick the one that suits it.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise IdentityError("no subjectAltName: a SPIFFE URI SAN is required") from None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    others = [n for n in san.value if not isinstance(n, x509.UniformResourceIdentifier)]
    if len(uris) != 1 or others:
        raise IdentityError(
            f"expected exactly one URI SAN and nothing else, got {len(uris)} URI(s) "
            f"and {len(others)} other name(s)"
        )
    return SpiffeId.parse(uris[0])


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR whose only SAN is ``identity`` (the subject is left empty, as SPIFFE does)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise IdentityError(f"not PEM certificates: {e}") from None
