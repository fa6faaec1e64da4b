"""The mesh's certificate authority: trust anchor → issuer → workload leaf.

Two levels, as Istio, Linkerd and SPIRE deployments usually run them:

* The **trust anchor** (root, ``pathLen 1``) is what every node trusts.  Its key is needed
  only to sign an issuer, so :func:`init_ca` *discards* it unless the operator asks to keep
  it in a separate file.  Keeping it next to the issuer key would mean that whoever reads
  the control plane's Secret can mint issuers forever, and replacing the issuer would not
  undo that; discarding it costs nothing routine, because renewing the CA is an anchor
  rotation (two anchors in the bundle during an overlap, see docs/identity.md), which the
  agents support anyway.  An operator who wants issuer-only renewals keeps the anchor key
  offline (``--keep-anchor-key``) and signs new issuers with ``--anchor-key``.
* The **issuer** (intermediate, ``pathLen 0``) lives in the control plane and signs leaves.
* **Leaves** carry one SPIFFE URI SAN and nothing else, are short-lived (24 h by default),
  and never outlive the issuer.

ECDSA P-256 everywhere we make keys: small certificates, fast handshakes, and what every
TLS 1.3 stack supports.  An operator-supplied anchor may use another algorithm (a corporate
RSA root, say); the issuer key must be P-256 because it signs every leaf.

:func:`load_ca` validates operator-supplied material once, at start, and refuses with one
message per problem; a control plane that started with a broken chain would hand out
certificates nobody can verify, and the agents would only say "handshake failed".
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from weft.files import write_atomic
from weft.identity import SpiffeId, cert_pem, generate_key, key_pem

log = logging.getLogger("weft.controlplane.identity")

# Directory layout written by `weft identity init --dir`.
ANCHOR_FILE = "anchor.pem"
"""The trust bundle: one anchor, or two during a rotation overlap."""
ISSUER_FILE = "issuer.pem"
"""The issuer certificate first, then any further intermediates up to (not incl.) an anchor."""
ISSUER_KEY_FILE = "issuer.key"
# The same material as a Kubernetes TLS Secret mounted as a directory — the layout that
# cert-manager writes, so its Secret can be mounted as is (docs/identity.md).
SECRET_CA = "ca.crt"
SECRET_CERT = "tls.crt"
SECRET_KEY = "tls.key"

MAX_ANCHORS = 2
"""Old and new during a rotation; a third would be a forgotten anchor still trusted."""
EXPIRY_WARNING = dt.timedelta(days=30)
DEFAULT_LEAF_LIFETIME = dt.timedelta(hours=24)
DEFAULT_SKEW = dt.timedelta(minutes=5)
"""Leaves (and CA certificates made here) start this far in the past, so that a node whose
clock is a little behind does not reject a certificate issued a moment ago."""


class CaError(ValueError):
    """The CA material is unusable; the message names each problem and what to do."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as ``openssl x509 -fingerprint -sha256`` shows it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def key_fingerprint(key: ec.EllipticCurvePublicKey | x509.Certificate) -> str:
    """SHA-256 of the SubjectPublicKeyInfo (hex): names a key without revealing anything."""
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def describe(cert: x509.Certificate) -> str:
    """A short human name for a CA certificate in messages: its subject."""
    return cert.subject.rfc4514_string() or f"<empty subject, serial {cert.serial_number:x}>"


def is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "").replace("PrivateKey", "")


# --------------------------------------------------------------------------- issuing


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


# TLS 1.3 with ECDSA uses the certificate key only to sign the handshake (key exchange is
# ephemeral ECDHE), so digitalSignature is all a leaf needs; keyAgreement would only matter
# for static-ECDH TLS 1.2 suites, which Weft never negotiates.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def _ca_name(role: str, trust_domain: str, now: dt.datetime) -> x509.Name:
    # A date and a random suffix keep two anchors (or issuers) of one trust domain apart by
    # name during a rotation — in `weft identity check` output and in chain building.
    cn = f"weft {role} {trust_domain} {now:%Y-%m-%d} {secrets.token_hex(3)}"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "weft"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
        ]
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _random_serial() -> int:
    """A positive serial of 128 random bits (RFC 5280 allows up to 20 octets)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


@dataclass(frozen=True)
class CaBundle:
    """A freshly made (or re-issued) CA: anchor, issuer and their keys, in memory."""

    trust_domain: str
    anchor: x509.Certificate
    issuer: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey
    anchor_key: ec.EllipticCurvePrivateKey | None
    """None when the anchor was supplied without its key (cannot happen today) — callers
    decide whether to keep it; :meth:`write` writes it only to an explicit separate path."""

    def write(
        self, directory: Path, *, force: bool = False, anchor_key_path: Path | None = None
    ) -> list[Path]:
        """Write ``anchor.pem``, ``issuer.pem``, ``issuer.key`` (0600) into ``directory``.

        Refuses to replace an existing CA unless ``force``: overwriting the issuer of a
        running mesh makes every node's next refresh fail verification elsewhere.  The
        anchor key is written only to ``anchor_key_path``, which must lie outside the
        directory (the directory is what gets mounted into the control plane).
        """
        directory = directory.absolute()
        targets = [directory / n for n in (ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE)]
        if anchor_key_path is not None:
            anchor_key_path = anchor_key_path.absolute()
            if anchor_key_path.parent == directory or directory in anchor_key_path.parents:
                raise CaError(
                    [
                        f"--keep-anchor-key {anchor_key_path} is inside the CA directory "
                        f"{directory}: keep the anchor key elsewhere (offline), it must not be "
                        "mounted into the control plane with the issuer key"
                    ]
                )
            if self.anchor_key is None:
                raise CaError(["no anchor key to keep: the anchor was supplied without it"])
            targets.append(anchor_key_path)
        existing = [p for p in targets if p.exists()]
        if existing and not force:
            raise CaError(
                [
                    f"{', '.join(map(str, existing))} already exist(s): refusing to replace a "
                    "CA (nodes trust the old anchor); pass --force to overwrite, or see "
                    "docs/identity.md for rotating without downtime"
                ]
            )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The key first: a crash then leaves no certificate without its key.
        write_file_atomic(directory / ISSUER_KEY_FILE, key_pem(self.issuer_key), 0o600)
        write_file_atomic(directory / ISSUER_FILE, cert_pem(self.issuer), 0o644)
        write_file_atomic(directory / ANCHOR_FILE, cert_pem(self.anchor), 0o644)
        written = [directory / ISSUER_KEY_FILE, directory / ISSUER_FILE, directory / ANCHOR_FILE]
        if anchor_key_path is not None and self.anchor_key is not None:
            write_file_atomic(anchor_key_path, key_pem(self.anchor_key), 0o600)
            written.append(anchor_key_path)
        return written

    def secret_manifest(self, namespace: str = "weft-system", name: str = "weft-ca") -> str:
        """A Secret (``kubernetes.io/tls``: issuer cert/key, ``ca.crt`` = anchors) and a
        ConfigMap with only the anchors, as YAML on stdout for ``kubectl apply -f -``.

        The ConfigMap exists because node agents need the trust bundle but must never be
        able to read the issuer key; RBAC grants them the ConfigMap, not the Secret.  The
        YAML is written by hand (JSON strings are valid YAML scalars) to avoid a YAML
        dependency for two flat documents.
        """
        anchors = cert_pem(self.anchor).decode()
        data = {
            SECRET_CA: anchors,
            SECRET_CERT: cert_pem(self.issuer).decode(),
            SECRET_KEY: key_pem(self.issuer_key).decode(),
        }
        q = json.dumps
        labels = '    app.kubernetes.io/part-of: "weft"\n'
        annotations = f"    weft.io/trust-domain: {q(self.trust_domain)}\n"
        secret = (
            "apiVersion: v1\n"
            "kind: Secret\n"
            "metadata:\n"
            f"  name: {q(name)}\n"
            f"  namespace: {q(namespace)}\n"
            f"  labels:\n{labels}"
            f"  annotations:\n{annotations}"
            'type: "kubernetes.io/tls"\n'
            "data:\n"
            + "".join(
                f"  {q(k)}: {q(base64.b64encode(v.encode()).decode())}\n" for k, v in data.items()
            )
        )
        bundle = (
            "apiVersion: v1\n"
            "kind: ConfigMap\n"
            "metadata:\n"
            f"  name: {q(name.removesuffix('-ca') + '-trust-bundle')}\n"
            f"  namespace: {q(namespace)}\n"
            f"  labels:\n{labels}"
            f"  annotations:\n{annotations}"
            "data:\n"
            f"  {q(SECRET_CA)}: {q(anchors)}\n"
        )
        header = (
            f"# Weft CA for trust domain {self.trust_domain}: issuer {describe(self.issuer)}, "
            f"valid until {self.issuer.not_valid_after_utc:%Y-%m-%d}.\n"
            "# The Secret holds the issuer key: only the control plane may read it.\n"
            "# The trust anchor's key is not included (see docs/identity.md).\n"
        )
        return f"{header}---\n{secret}---\n{bundle}"


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write with ``mode`` from the start (no window where a key is 0644), then rename."""
    write_atomic(path, data, mode)


def init_ca(
    trust_domain: str,
    anchor_days: int = 365,
    issuer_days: int = 365,
    *,
    anchor: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    now: dt.datetime | None = None,
) -> CaBundle:
    """Make a trust anchor (self-signed, pathLen 1) and an issuer (pathLen 0), P-256.

    With ``anchor`` (its certificate and key), only a new issuer is made under it: an
    issuer renewal that needs no change to any node's trust bundle.
    """
    SpiffeId.node("x", trust_domain)  # validates the trust domain's spelling
    if anchor_days < 1 or issuer_days < 1:
        raise CaError(["--anchor-days and --issuer-days must be at least 1"])
    now = now or _now()
    start = now - DEFAULT_SKEW
    if anchor is None:
        if issuer_days > anchor_days:
            raise CaError(
                [
                    f"--issuer-days {issuer_days} exceeds --anchor-days {anchor_days}: an issuer "
                    "cannot outlive the anchor that signed it"
                ]
            )
        anchor_key = generate_key()
        name = _ca_name("anchor", trust_domain, now)
        ski = x509.SubjectKeyIdentifier.from_public_key(anchor_key.public_key())
        anchor_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(anchor_key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(start)
            .not_valid_after(now + dt.timedelta(days=anchor_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .sign(anchor_key, hashes.SHA256())
        )
    else:
        anchor_cert, anchor_key = anchor
        if anchor_cert.public_key() != anchor_key.public_key():
            raise CaError(
                ["--anchor-key does not match --anchor-cert: they are from different CAs"]
            )
        problems = _check_anchor(anchor_cert, now)
        if problems:
            raise CaError(problems)
        left = anchor_cert.not_valid_after_utc - now
        if dt.timedelta(days=issuer_days) > left:
            raise CaError(
                [
                    f"--issuer-days {issuer_days} exceeds the anchor's remaining {left.days} "
                    f"days: an issuer cannot outlive its anchor; use at most {left.days} or "
                    "rotate the anchor (docs/identity.md)"
                ]
            )
    issuer_key = generate_key()
    issuer_cert = (
        x509.CertificateBuilder()
        .subject_name(_ca_name("issuer", trust_domain, now))
        .issuer_name(anchor_cert.subject)
        .public_key(issuer_key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=issuer_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key()), critical=False
        )
        .add_extension(_aki(anchor_cert), critical=False)
        .sign(anchor_key, hashes.SHA256())
    )
    return CaBundle(trust_domain, anchor_cert, issuer_cert, issuer_key, anchor_key)


class Issuer:
    """A validated issuer: signs leaves, and knows the chain and bundle to hand out.

    Build it with :func:`load_ca` / :func:`validate_ca` (which check everything once), not
    directly.  Immutable after construction, so one instance is shared by signing threads.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        chain: Sequence[x509.Certificate],
        anchors: Sequence[x509.Certificate],
        warnings: Sequence[str] = (),
    ) -> None:
        self.key = key
        self.chain = tuple(chain)
        """The issuer, then intermediates up to (not including) the anchor."""
        self.anchors = tuple(anchors)
        self.warnings = tuple(warnings)
        self.cert = self.chain[0]
        signing_anchor = next((a for a in anchors if _issued_by(self.chain[-1], a)), None)
        if signing_anchor is None:
            raise CaError(["the issuer chain does not lead to an anchor: use validate_ca()"])
        path = [*self.chain, signing_anchor]
        # A leaf is only verifiable while every certificate above it is, so the window
        # that matters is the intersection of the whole path.
        self.not_before = max(c.not_valid_before_utc for c in path)
        self.not_after = min(c.not_valid_after_utc for c in path)
        self.chain_pem = [cert_pem(c).decode() for c in self.chain]
        self.bundle_pem = [cert_pem(a).decode() for a in self.anchors]
        # What every leaf shares, built once: builders are immutable, so each signing
        # extends this without copying the fixed parts again (~15 % of a signing's cost).
        self._template = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(_aki(self.cert), critical=False)
        )

    def problem(self, now: dt.datetime | None = None) -> str | None:
        """Why nothing can be signed right now, or None."""
        now = now or _now()
        if now >= self.not_after:
            return (
                f"the issuer chain expired at {self.not_after:%Y-%m-%d %H:%M:%SZ}: install a new "
                "issuer (weft identity init, docs/identity.md) and restart the control plane"
            )
        if now < self.not_before:
            return (
                f"the issuer chain is not valid before {self.not_before:%Y-%m-%d %H:%M:%SZ}: "
                "check this machine's clock"
            )
        return None

    def sign_leaf(
        self,
        csr: x509.CertificateSigningRequest | ec.EllipticCurvePublicKey,
        identity: SpiffeId,
        lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
        skew: dt.timedelta = DEFAULT_SKEW,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign ``csr``'s public key (or a public key already taken from a checked CSR)
        for ``identity``.  Nothing else is taken from the CSR.

        The caller (the :class:`~controlplane.identity.signer.Signer`) has already decided
        that the request is allowed; this only shapes the certificate.  Raises
        :class:`CaError` when the issuer cannot sign now.
        """
        now = now or _now()
        problem = self.problem(now)
        if problem:
            raise CaError([problem])
        not_before = max(now - skew, self.not_before)
        not_after = min(now + lifetime, self.not_after)
        public = csr if isinstance(csr, ec.EllipticCurvePublicKey) else csr.public_key()
        if not is_p256(public):
            raise CaError([f"refusing to sign a {_key_kind(public)} key: only ECDSA P-256"])
        return (
            self._template.public_key(public)
            .serial_number(_random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # The subject is empty, so RFC 5280 requires the SAN to be critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )


# --------------------------------------------------------------------------- validation


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _validity(cert: x509.Certificate, role: str, now: dt.datetime) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    name = describe(cert)
    if now >= cert.not_valid_after_utc:
        problems.append(
            f"{role} '{name}' expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; "
            "install a new one (weft identity init, or rotate: docs/identity.md)"
        )
    elif now < cert.not_valid_before_utc:
        problems.append(
            f"{role} '{name}' is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}; "
            "check this machine's clock"
        )
    elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
        days = (cert.not_valid_after_utc - now).days
        warnings.append(
            f"{role} '{name}' expires in {days} day(s), at "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}: rotate it soon (docs/identity.md)"
        )
    return problems, warnings


def _check_ca_cert(cert: x509.Certificate, role: str, below: int) -> list[str]:
    """CA constraints of a certificate with ``below`` intermediate CAs under it."""
    problems = []
    name = describe(cert)
    bc = _basic_constraints(cert)
    if bc is None or not bc.ca:
        problems.append(
            f"{role} '{name}' is not a CA (BasicConstraints cA is "
            f"{'missing' if bc is None else 'false'}); use a CA certificate"
        )
    elif bc.path_length is not None and bc.path_length < below:
        problems.append(
            f"{role} '{name}' has pathLen {bc.path_length} but {below} intermediate(s) below "
            "it: verifiers will reject every leaf; reissue it with a larger pathLen"
        )
    try:
        ku: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    # RFC 5280 requires KeyUsage in CA certificates; an anchor is tolerated without it
    # (old roots), since verifiers take trust anchors as given.
    if (ku is None and role != "anchor") or (ku is not None and not ku.key_cert_sign):
        problems.append(
            f"{role} '{name}' KeyUsage lacks keyCertSign: it may not sign certificates; "
            "reissue it with keyCertSign (and cRLSign)"
        )
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    # OpenSSL applies a CA's EKU to everything below it: without both TLS purposes the
    # leaves would fail as client or as server certificates.
    if eku is not None and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        missing = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - set(eku)
        if missing:
            problems.append(
                f"{role} '{name}' ExtendedKeyUsage lacks "
                f"{' and '.join(sorted(_EKU_NAMES[o] for o in missing))}: leaves under it "
                "cannot be used for mutual TLS; reissue it without EKU or with "
                "serverAuth+clientAuth"
            )
    return problems


def _check_anchor(anchor: x509.Certificate, now: dt.datetime) -> list[str]:
    problems = []
    if anchor.subject != anchor.issuer or not _issued_by(anchor, anchor):
        problems.append(
            f"anchor '{describe(anchor)}' is not self-signed: the trust bundle holds root "
            "certificates only; put intermediates after the issuer in issuer.pem"
        )
    problems += _check_ca_cert(anchor, "anchor", 0)
    problems += _validity(anchor, "anchor", now)[0]
    return problems


def _load_pems(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaError([f"{what}: not PEM certificates ({e})"]) from None


def validate_ca(
    anchors_pem: bytes,
    issuer_pem: bytes,
    issuer_key_pem: bytes,
    *,
    names: tuple[str, str, str] = (ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE),
    now: dt.datetime | None = None,
) -> Issuer:
    """Check an operator-supplied chain and build the :class:`Issuer`, or raise
    :class:`CaError` listing every problem found.  ``names`` are the file names used in
    messages."""
    now = now or _now()
    anchor_name, issuer_name, key_name = names
    anchors = _load_pems(anchors_pem, anchor_name)
    chain = _load_pems(issuer_pem, issuer_name)
    try:
        key = serialization.load_pem_private_key(issuer_key_pem, password=None)
    except TypeError:
        raise CaError(
            [
                f"{key_name} is encrypted: Weft needs it unencrypted (PKCS#8 or SEC1); protect "
                "it with file permissions or the Secret's RBAC instead"
            ]
        ) from None
    except ValueError as e:
        raise CaError([f"{key_name}: not a PEM private key ({e})"]) from None

    problems: list[str] = []
    warnings: list[str] = []
    if len(anchors) > MAX_ANCHORS:
        problems.append(
            f"{anchor_name} holds {len(anchors)} certificates; at most {MAX_ANCHORS} anchors "
            "(old and new during a rotation): remove the retired one"
        )
    # A full chain ending in the root (some tools write tls.crt that way) is accepted.
    if len(chain) > 1 and chain[-1] in anchors:
        chain = chain[:-1]
    issuer = chain[0]
    if issuer.subject == issuer.issuer and _issued_by(issuer, issuer):
        problems.append(
            f"{issuer_name} holds the self-signed '{describe(issuer)}': signing leaves with the "
            "trust anchor's key would keep it online; sign an intermediate with it "
            "(weft identity init does) and put that into issuer.pem"
        )
        raise CaError(problems)
    for anchor in anchors:
        problems += _check_anchor(anchor, now)
        warnings += _validity(anchor, "anchor", now)[1]

    roles = ["issuer"] + ["intermediate"] * (len(chain) - 1)
    for below, (cert, role) in enumerate(zip(chain, roles, strict=True)):
        problems += _check_ca_cert(cert, role, below)
        p, w = _validity(cert, role, now)
        problems += p
        warnings += w
    for lower, upper in itertools.pairwise(chain):
        if not _issued_by(lower, upper):
            problems.append(
                f"{issuer_name}: '{describe(lower)}' is not signed by the next certificate "
                f"'{describe(upper)}'; order it issuer first, then each signer up the chain"
            )
    top = chain[-1]
    signing = [a for a in anchors if _issued_by(top, a)]
    if not signing:
        listed = ", ".join(f"'{describe(a)}'" for a in anchors)
        problems.append(
            f"{'issuer' if len(chain) == 1 else 'chain top'} '{describe(top)}' is not signed "
            f"by an anchor in {anchor_name} ({listed}); put the anchor that signed it into "
            f"{anchor_name}"
        )
    else:
        bc = _basic_constraints(signing[0])
        if bc is not None and bc.path_length is not None and bc.path_length < len(chain):
            problems.append(
                f"anchor '{describe(signing[0])}' has pathLen {bc.path_length} but "
                f"{len(chain)} intermediate(s) below it: verifiers will reject every leaf"
            )

    if not is_p256(issuer.public_key()):
        problems.append(
            f"issuer '{describe(issuer)}' has a {_key_kind(issuer.public_key())} key, not "
            "ECDSA P-256: reissue the issuer with a P-256 key"
        )
    if not is_p256(key):
        problems.append(
            f"{key_name} is a {_key_kind(key)} key, not ECDSA P-256: Weft signs leaves only "
            "with P-256"
        )
    elif key.public_key() != issuer.public_key():
        problems.append(
            f"{key_name} does not match the certificate in {issuer_name}: they are from "
            "different issuers; supply the key that belongs to the issuer certificate"
        )
    if problems:
        raise CaError(problems)
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # is_p256 checked it
    return Issuer(key, chain, anchors, warnings)


def ca_files(directory: Path) -> tuple[Path, Path, Path]:
    """The anchor, issuer and key files of a CA directory, in either layout."""
    ours = tuple(directory / n for n in (ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE))
    secret = tuple(directory / n for n in (SECRET_CA, SECRET_CERT, SECRET_KEY))
    has_ours, has_secret = any(p.exists() for p in ours), any(p.exists() for p in secret)
    if has_ours and has_secret:
        raise CaError(
            [
                f"{directory} holds both {ANCHOR_FILE}/{ISSUER_FILE}/{ISSUER_KEY_FILE} and "
                f"{SECRET_CA}/{SECRET_CERT}/{SECRET_KEY}: keep one layout"
            ]
        )
    files = secret if has_secret else ours
    missing = [p.name for p in files if not p.exists()]
    if missing:
        raise CaError(
            [
                f"{directory} lacks {', '.join(missing)}: create a CA with `weft identity init "
                f"--dir {directory}`, or mount a TLS Secret with {SECRET_CA}, {SECRET_CERT}, "
                f"{SECRET_KEY}"
            ]
        )
    return files  # type: ignore[return-value]


def load_ca(directory: Path, now: dt.datetime | None = None) -> Issuer:
    """Load and validate the CA in ``directory`` (``anchor.pem``, ``issuer.pem``,
    ``issuer.key``, or a mounted TLS Secret's ``ca.crt``, ``tls.crt``, ``tls.key``).

    Raises :class:`CaError` naming every problem; logs a warning for anything expiring
    within 30 days (also kept in :attr:`Issuer.warnings`).
    """
    files = ca_files(directory)
    try:
        data = [p.read_bytes() for p in files]
    except OSError as e:
        raise CaError([f"cannot read {e.filename}: {e.strerror}"]) from None
    key_file = files[2]
    mode = key_file.stat().st_mode & 0o777
    warn_mode = (
        [f"{key_file} is readable by group or others (mode {mode:o}): chmod 600 it"]
        if mode & 0o077 and not key_file.is_symlink() and not _on_kubernetes_volume(key_file)
        else []
    )
    issuer = validate_ca(*data, names=(files[0].name, files[1].name, files[2].name), now=now)
    issuer.warnings = (*issuer.warnings, *warn_mode)
    for w in issuer.warnings:
        log.warning("CA %s: %s", directory, w)
    return issuer


def _on_kubernetes_volume(path: Path) -> bool:
    # Secret volumes are tmpfs files behind ..data symlinks with the pod's defaultMode;
    # their mode is the manifest's business, not something the control plane can fix.
    return (path.parent / "..data").exists()
