"""The CA: making one, validating operator-supplied chains, and the shape of leaves."""

from __future__ import annotations

import base64
import datetime as dt
import stat

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from controlplane.identity.ca import (
    CaError,
    Issuer,
    init_ca,
    load_ca,
    validate_ca,
)
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, key_pem, spiffe_id_of

TD = "cluster.local"
NOW = dt.datetime.now(dt.UTC)
WORKLOAD = SpiffeId.workload("default", "echo", TD)


def _csr(identity=WORKLOAD, key=None):
    return x509.load_pem_x509_csr(build_csr(key or generate_key(), identity))


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(cert_sign=True):
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca(
    cn,
    key,
    signer_cert=None,
    signer_key=None,
    *,
    path_len=0,
    ca=True,
    cert_sign=True,
    not_before=None,
    not_after=None,
    eku=None,
):
    """A CA certificate with knobs for everything validation must catch."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(signer_cert.subject if signer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=100))
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_len if ca else None), critical=True
        )
        .add_extension(_ku(cert_sign), critical=True)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(signer_key or key, hashes.SHA256())


def _root(cn="root", path_len=1, **kw):
    key = generate_key()
    return _ca(cn, key, path_len=path_len, **kw), key


def _validate(anchors, issuer_chain, key, **kw) -> Issuer:
    return validate_ca(
        b"".join(cert_pem(a) for a in anchors),
        b"".join(cert_pem(c) for c in issuer_chain),
        key_pem(key) if isinstance(key, ec.EllipticCurvePrivateKey) else key,
        **kw,
    )


# --------------------------------------------------------------------------- init


def test_init_makes_a_two_level_p256_hierarchy():
    b = init_ca(TD)
    assert b.anchor.subject == b.anchor.issuer
    b.anchor.verify_directly_issued_by(b.anchor)
    b.issuer.verify_directly_issued_by(b.anchor)
    bc = b.anchor.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    bc = b.issuer.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    for cert in (b.anchor, b.issuer):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
    life = b.issuer.not_valid_after_utc - b.issuer.not_valid_before_utc
    assert dt.timedelta(days=365) <= life <= dt.timedelta(days=365, minutes=6)
    # Distinct names, so old and new anchors are told apart during a rotation.
    assert init_ca(TD).anchor.subject != b.anchor.subject


def test_init_refuses_an_issuer_outliving_its_anchor_and_bad_domains():
    with pytest.raises(CaError, match="cannot outlive"):
        init_ca(TD, anchor_days=30, issuer_days=60)
    with pytest.raises(ValueError, match="trust domain"):
        init_ca("Not A Domain")


def test_init_under_an_existing_anchor_makes_only_a_new_issuer():
    first = init_ca(TD)
    assert first.anchor_key is not None
    second = init_ca(TD, issuer_days=30, anchor=(first.anchor, first.anchor_key))
    assert second.anchor == first.anchor
    second.issuer.verify_directly_issued_by(first.anchor)
    with pytest.raises(CaError, match="remaining"):
        init_ca(TD, issuer_days=400, anchor=(first.anchor, first.anchor_key))
    with pytest.raises(CaError, match="does not match"):
        init_ca(TD, anchor=(first.anchor, generate_key()))


def test_write_directory_modes_and_no_anchor_key(tmp_path):
    b = init_ca(TD)
    d = tmp_path / "ca"
    b.write(d)
    assert sorted(p.name for p in d.iterdir()) == ["anchor.pem", "issuer.key", "issuer.pem"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "issuer.key").stat().st_mode) == 0o600
    # The anchor key is discarded: nothing in the directory can sign an issuer.
    assert b"PRIVATE KEY" not in (d / "anchor.pem").read_bytes()
    issuer = load_ca(d)
    assert issuer.cert == b.issuer and issuer.anchors == (b.anchor,)


def test_write_refuses_to_replace_a_ca_unless_forced(tmp_path):
    d = tmp_path / "ca"
    init_ca(TD).write(d)
    before = (d / "anchor.pem").read_bytes()
    with pytest.raises(CaError, match="--force"):
        init_ca(TD).write(d)
    assert (d / "anchor.pem").read_bytes() == before
    init_ca(TD).write(d, force=True)
    assert (d / "anchor.pem").read_bytes() != before


def test_keep_anchor_key_goes_to_a_separate_0600_file(tmp_path):
    b = init_ca(TD)
    with pytest.raises(CaError, match="inside the CA directory"):
        b.write(tmp_path / "ca", anchor_key_path=tmp_path / "ca" / "anchor.key")
    b.write(tmp_path / "ca", anchor_key_path=tmp_path / "offline" / "anchor.key")
    kept = tmp_path / "offline" / "anchor.key"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(kept.read_bytes(), None)
    assert key.public_key() == b.anchor.public_key()


def test_secret_manifest_is_a_tls_secret_plus_a_keyless_trust_bundle():
    b = init_ca(TD)
    docs = [d for d in yaml.safe_load_all(b.secret_manifest("mesh", "my-ca")) if d]
    secret, bundle = docs
    assert secret["kind"] == "Secret" and secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"] == {
        "name": "my-ca",
        "namespace": "mesh",
        "labels": {"app.kubernetes.io/part-of": "weft"},
        "annotations": {"weft.io/trust-domain": TD},
    }
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    issuer = validate_ca(data["ca.crt"], data["tls.crt"], data["tls.key"])
    assert issuer.cert == b.issuer
    assert bundle["kind"] == "ConfigMap" and bundle["metadata"]["name"] == "my-trust-bundle"
    assert bundle["data"] == {"ca.crt": cert_pem(b.anchor).decode()}
    assert "PRIVATE" not in str(bundle)


def test_a_mounted_tls_secret_directory_loads(tmp_path):
    b = init_ca(TD)
    (tmp_path / "ca.crt").write_bytes(cert_pem(b.anchor))
    (tmp_path / "tls.crt").write_bytes(cert_pem(b.issuer))
    (tmp_path / "tls.key").write_bytes(key_pem(b.issuer_key))
    assert load_ca(tmp_path).cert == b.issuer
    (tmp_path / "anchor.pem").write_bytes(cert_pem(b.anchor))
    with pytest.raises(CaError, match="keep one layout"):
        load_ca(tmp_path)


def test_missing_files_say_how_to_make_a_ca(tmp_path):
    (tmp_path / "anchor.pem").write_bytes(b"")
    with pytest.raises(CaError, match=r"lacks issuer.pem, issuer.key.*weft identity init"):
        load_ca(tmp_path)


# --------------------------------------------------------------------------- validation


def test_issuer_not_signed_by_an_anchor_in_the_bundle():
    a, other = init_ca(TD), init_ca(TD)
    with pytest.raises(CaError, match=r"is not signed by an anchor in anchor\.pem"):
        _validate([other.anchor], [a.issuer], a.issuer_key)


def test_issuer_that_is_not_a_ca():
    root, root_key = _root()
    key = generate_key()
    issuer = _ca("issuer", key, root, root_key, ca=False)
    with pytest.raises(CaError, match="is not a CA"):
        _validate([root], [issuer], key)


def test_issuer_without_key_cert_sign():
    root, root_key = _root()
    key = generate_key()
    issuer = _ca("issuer", key, root, root_key, cert_sign=False)
    with pytest.raises(CaError, match="KeyUsage lacks keyCertSign"):
        _validate([root], [issuer], key)


def test_anchor_path_len_forbidding_the_intermediate():
    root, root_key = _root(path_len=0)
    key = generate_key()
    issuer = _ca("issuer", key, root, root_key)
    with pytest.raises(CaError, match="pathLen 0 but 1 intermediate"):
        _validate([root], [issuer], key)


def test_issuer_key_not_p256():
    root, root_key = _root()
    key = ec.generate_private_key(ec.SECP384R1())
    issuer = _ca("issuer", key, root, root_key)
    with pytest.raises(CaError, match="secp384r1 key, not ECDSA P-256"):
        _validate([root], [issuer], key)
    rsa_key = rsa.generate_private_key(65537, 2048)
    issuer = _ca("issuer", rsa_key, root, root_key)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(CaError, match="not ECDSA P-256"):
        _validate([root], [issuer], rsa_pem)


def test_key_that_does_not_match_the_certificate():
    b = init_ca(TD)
    with pytest.raises(CaError, match=r"issuer\.key does not match the certificate in issuer\.pem"):
        _validate([b.anchor], [b.issuer], generate_key())


def test_encrypted_or_garbage_key():
    b = init_ca(TD)
    encrypted = b.issuer_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(CaError, match="encrypted"):
        _validate([b.anchor], [b.issuer], encrypted)
    with pytest.raises(CaError, match="not a PEM private key"):
        _validate([b.anchor], [b.issuer], b"nonsense")
    with pytest.raises(CaError, match=r"issuer\.pem: not PEM certificates"):
        validate_ca(cert_pem(b.anchor), b"nonsense", key_pem(b.issuer_key))


def test_expired_and_not_yet_valid_issuer():
    b = init_ca(TD)
    later = b.issuer.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(CaError, match=r"issuer .* expired at"):
        _validate([b.anchor], [b.issuer], b.issuer_key, now=later)
    earlier = b.issuer.not_valid_before_utc - dt.timedelta(seconds=1)
    with pytest.raises(CaError, match=r"not valid before .*check this machine's clock"):
        _validate([b.anchor], [b.issuer], b.issuer_key, now=earlier)


def test_expiring_soon_is_a_warning_not_a_refusal(tmp_path, caplog):
    b = init_ca(TD, issuer_days=20)
    issuer = _validate([b.anchor], [b.issuer], b.issuer_key)
    assert any("expires in 19 day(s)" in w for w in issuer.warnings)
    b.write(tmp_path)
    load_ca(tmp_path)
    assert "expires in" in caplog.text and caplog.records[-1].levelname == "WARNING"


def test_bundle_with_two_anchors_is_the_rotation_overlap():
    old, new = init_ca(TD), init_ca(TD)
    for b in (old, new):
        issuer = _validate([old.anchor, new.anchor], [b.issuer], b.issuer_key)
        assert issuer.bundle_pem == [cert_pem(old.anchor).decode(), cert_pem(new.anchor).decode()]
        assert issuer.chain_pem == [cert_pem(b.issuer).decode()]
    third = init_ca(TD)
    with pytest.raises(CaError, match="holds 3 certificates; at most 2 anchors"):
        _validate([old.anchor, new.anchor, third.anchor], [old.issuer], old.issuer_key)


def test_bundle_must_hold_roots_and_issuer_must_not_be_one():
    b = init_ca(TD)
    with pytest.raises(CaError, match="is not self-signed"):
        _validate([b.anchor, b.issuer], [b.issuer], b.issuer_key)
    root, root_key = _root()
    with pytest.raises(CaError, match=r"self-signed .* keep it online"):
        _validate([root], [root], root_key)


def test_issuer_eku_must_allow_both_tls_roles():
    root, root_key = _root()
    key = generate_key()
    issuer = _ca("issuer", key, root, root_key, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(CaError, match="ExtendedKeyUsage lacks clientAuth"):
        _validate([root], [issuer], key)


def test_deeper_chain_from_an_external_pki():
    root, root_key = _root(path_len=None)
    mid_key = generate_key()
    mid = _ca("corp intermediate", mid_key, root, root_key, path_len=None)
    key = generate_key()
    issuer = _ca("weft issuer", key, mid, mid_key, path_len=0)
    got = _validate([root], [issuer, mid], key)
    assert got.chain == (issuer, mid)
    # Order matters, and a trailing root (some tools write full chains) is tolerated.
    assert _validate([root], [issuer, mid, root], key).chain == (issuer, mid)
    with pytest.raises(CaError, match="is not signed by the next certificate"):
        _validate([root], [mid, issuer], mid_key)
    tight_root, tight_key = _root(path_len=0)
    mid2 = _ca("corp intermediate", mid_key, tight_root, tight_key, path_len=None)
    with pytest.raises(CaError, match="pathLen 0 but 2 intermediate"):
        _validate([tight_root], [issuer, mid2], key)


def test_every_problem_is_reported_at_once():
    root, root_key = _root()
    key = ec.generate_private_key(ec.SECP384R1())
    issuer = _ca("issuer", key, root, root_key, cert_sign=False, ca=False)
    with pytest.raises(CaError) as e:
        _validate([root], [issuer], key)
    assert len(e.value.problems) == 4  # not a CA, keyCertSign, cert key, key file


# --------------------------------------------------------------------------- leaves


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    b = init_ca(TD)
    return _validate([b.anchor], [b.issuer], b.issuer_key)


def test_leaf_carries_the_spiffe_id_and_nothing_else(issuer):
    leaf = issuer.sign_leaf(_csr(), WORKLOAD)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WORKLOAD))]
    assert spiffe_id_of(leaf) == WORKLOAD


def test_leaf_extensions_for_tls_client_and_server(issuer):
    leaf = issuer.sign_leaf(_csr(), WORKLOAD)
    ext = leaf.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.key_agreement or ku.value.key_encipherment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    )
    leaf.verify_directly_issued_by(issuer.cert)
    # An independent RFC 5280 path validator accepts it as a client certificate.
    # At the real time of signing, not the module's import time: a long test run (the lab
    # tier first) puts NOW before the leaf's backdated notBefore.
    at = dt.datetime.now(dt.UTC)
    verifier = PolicyBuilder().store(Store(list(issuer.anchors))).time(at).build_client_verifier()
    assert verifier.verify(leaf, [issuer.cert]).subjects == [
        x509.UniformResourceIdentifier(str(WORKLOAD))
    ]


def test_leaf_lifetime_and_backdate(issuer):
    now = NOW + dt.timedelta(hours=1)
    leaf = issuer.sign_leaf(_csr(), WORKLOAD, now=now.replace(microsecond=0))
    assert leaf.not_valid_before_utc == now.replace(microsecond=0) - dt.timedelta(minutes=5)
    assert leaf.not_valid_after_utc == now.replace(microsecond=0) + dt.timedelta(hours=24)
    short = issuer.sign_leaf(
        _csr(), WORKLOAD, lifetime=dt.timedelta(seconds=60), skew=dt.timedelta(0), now=now
    )
    assert short.not_valid_after_utc - short.not_valid_before_utc == dt.timedelta(seconds=60)


def test_leaf_serials_are_random_positive_128_bit(issuer):
    serials = [issuer.sign_leaf(_csr(), WORKLOAD).serial_number for _ in range(64)]
    assert len(set(serials)) == 64
    assert all(0 < s < 2**128 for s in serials)
    # 128 random bits: the top byte is not always zero (it would be for a 120-bit number).
    assert max(serials).bit_length() > 120


def test_leaf_never_outlives_the_issuer():
    b = init_ca(TD, issuer_days=1)
    issuer = _validate([b.anchor], [b.issuer], b.issuer_key)
    near_end = b.issuer.not_valid_after_utc - dt.timedelta(hours=2)
    leaf = issuer.sign_leaf(_csr(), WORKLOAD, now=near_end)
    assert leaf.not_valid_after_utc == b.issuer.not_valid_after_utc
    assert issuer.problem(b.issuer.not_valid_after_utc) is not None
    with pytest.raises(CaError, match="expired"):
        issuer.sign_leaf(_csr(), WORKLOAD, now=b.issuer.not_valid_after_utc)


def test_sign_leaf_refuses_non_p256_keys(issuer):
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(ec.generate_private_key(ec.SECP384R1()), hashes.SHA256())
    )
    with pytest.raises(CaError, match="only ECDSA P-256"):
        issuer.sign_leaf(csr, WORKLOAD)


# --------------------------------------------------------------------------- CLI


def test_cli_init_check_and_refusals(tmp_path):
    from click.testing import CliRunner

    from weft.cli.identity import identity

    runner = CliRunner()
    d = tmp_path / "ca"
    result = runner.invoke(identity, ["init", "--dir", str(d), "--issuer-days", "20"])
    assert result.exit_code == 0, result.output
    assert "anchor's key was discarded" in result.output
    again = runner.invoke(identity, ["init", "--dir", str(d)])
    assert again.exit_code == 1 and "--force" in again.output
    check = runner.invoke(identity, ["check", "--dir", str(d)])
    assert check.exit_code == 0, check.output
    assert "issuer" in check.output and "SHA-256" in check.output
    assert "expires in 19 day(s)" in check.output
    (d / "issuer.key").write_bytes(key_pem(generate_key()))
    bad = runner.invoke(identity, ["check", "--dir", str(d)])
    assert bad.exit_code == 1 and "does not match" in bad.output
    both = runner.invoke(identity, ["init", "--dir", str(d), "--secret-manifest"])
    assert both.exit_code == 2 and "exactly one of" in both.output


def test_cli_secret_manifest_and_issuer_renewal_under_a_kept_anchor(tmp_path):
    from click.testing import CliRunner

    from weft.cli.identity import identity

    runner = CliRunner()
    kept = tmp_path / "offline" / "anchor.key"
    result = runner.invoke(identity, ["init", "--secret-manifest", "--keep-anchor-key", str(kept)])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["Secret", "ConfigMap"]
    anchor = tmp_path / "anchor.pem"
    anchor.write_bytes(base64.b64decode(docs[0]["data"]["ca.crt"]))
    renewed = runner.invoke(
        identity,
        ["init", "--dir", str(tmp_path / "ca2"), "--issuer-days", "30",
         "--anchor-cert", str(anchor), "--anchor-key", str(kept)],
    )  # fmt: skip
    assert renewed.exit_code == 0, renewed.output
    assert (tmp_path / "ca2" / "anchor.pem").read_bytes() == anchor.read_bytes()
    assert load_ca(tmp_path / "ca2").anchors[0].public_key() == (
        serialization.load_pem_private_key(kept.read_bytes(), None).public_key()
    )


def test_cli_controlplane_needs_sources_and_a_valid_ca(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from weft.cli.controlplane import controlplane

    for var in ("WEFT_LAB", "WEFT_KUBE_SERVER", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    result = runner.invoke(controlplane, [])
    assert result.exit_code == 2 and "--ca-dir is required without --lab" in result.output
    # Kubernetes mode outside a pod, without an API server: say how to give one.
    result = runner.invoke(controlplane, ["--ca-dir", str(tmp_path)])
    assert result.exit_code == 2 and "KUBERNETES_SERVICE_HOST" in result.output
    result = runner.invoke(controlplane, ["--ca-dir", str(tmp_path), "--agent-identity", "x"])
    assert result.exit_code == 2 and "NAMESPACE/SERVICEACCOUNT" in result.output
    result = runner.invoke(controlplane, ["--lab", "t", "--ca-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "weft identity init" in result.output and "did not start" in result.output
