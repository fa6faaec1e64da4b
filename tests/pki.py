"""A throwaway PKI for tests: anchor -> issuer -> leaf, with knobs for the bad cases.

Production signing is :mod:`controlplane.identity`; this builds certificates directly so
that tests of the node side do not depend on the control plane, and so that tests can
make certificates the real CA would refuse to make (expired, wrong key usage, two SANs).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from weft.identity import SpiffeId, cert_pem, generate_key, key_pem

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    """Anchor and issuer; ``leaf()`` issues workload certificates."""

    name: str = "test"
    anchor_key: ec.EllipticCurvePrivateKey = field(default_factory=generate_key)
    issuer_key: ec.EllipticCurvePrivateKey = field(default_factory=generate_key)

    def __post_init__(self) -> None:
        self.anchor = self._ca_cert(
            _name(f"{self.name} anchor"), self.anchor_key, _name(f"{self.name} anchor"),
            self.anchor_key, path_len=1,
        )  # fmt: skip
        self.issuer = self._ca_cert(
            _name(f"{self.name} issuer"), self.issuer_key, _name(f"{self.name} anchor"),
            self.anchor_key, path_len=0,
        )  # fmt: skip

    def _ca_cert(self, subject, key, issuer_name, signer, path_len):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(hours=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(signer, hashes.SHA256())
        )

    def leaf(
        self,
        identity: SpiffeId | str,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        extra_uris: tuple[str, ...] = (),
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = key or generate_key()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
        sans += [x509.UniformResourceIdentifier(u) for u in extra_uris]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(minutes=5))
            .not_valid_after(not_after or NOW + dt.timedelta(hours=24))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.issuer_key, hashes.SHA256())
        )
        return key, cert

    def write_leaf(
        self, directory: Path, identity: SpiffeId | str, **kw: object
    ) -> tuple[Path, Path]:
        """Issue a leaf and write (key.pem 0600, chain.pem = leaf + issuer); return paths."""
        key, cert = self.leaf(identity, **kw)  # type: ignore[arg-type]
        directory.mkdir(parents=True, exist_ok=True)
        key_path, chain_path = directory / "key.pem", directory / "chain.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem(key))
        chain_path.write_bytes(cert_pem(cert) + cert_pem(self.issuer))
        return key_path, chain_path

    @property
    def bundle_pem(self) -> bytes:
        return cert_pem(self.anchor)
