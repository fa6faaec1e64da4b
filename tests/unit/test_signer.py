"""Signing decisions: every refusal code, the audit log, metrics, and the lab sources."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from controlplane.identity.binding import StoreNodeBinding
from controlplane.identity.ca import init_ca, key_fingerprint, validate_ca
from controlplane.identity.lab import LabBootstrapTokens, write_lab_tokens
from controlplane.identity.signer import (
    CredentialCheckUnavailable,
    CredentialRefused,
    PodClaim,
    Signer,
    controlplane_identity,
)
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, key_pem, spiffe_id_of
from weft.lab.plan import plan_lab
from weft.lab.state import LabPaths, LabState
from weft.wire import (
    BootstrapRequest,
    CertificateRequest,
    CertificateResponse,
    PodCertificateRequest,
    Refusal,
    RefusalCode,
)

TD = "cluster.local"
ECHO = SpiffeId.workload("default", "echo", TD)
CLIENT = SpiffeId.workload("default", "client", TD)
ONLY_ON_1 = SpiffeId.workload("shop", "cart", TD)


class Binding:
    def __init__(self, by_node):
        self.by_node = by_node

    def identities_on(self, node):
        return set(self.by_node.get(node, ()))


class Tokens:
    def __init__(self, by_token):
        self.by_token = by_token

    def node_for(self, token):
        return self.by_token.get(token)


@pytest.fixture(scope="module")
def issuer():
    b = init_ca(TD)
    return validate_ca(cert_pem(b.anchor), cert_pem(b.issuer), key_pem(b.issuer_key))


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def signer(issuer, registry):
    return Signer(
        issuer,
        Binding({"node-1": {ECHO, CLIENT, ONLY_ON_1}, "node-2": {ECHO}}),
        Tokens({"tok-1": "node-1", "tok-2": "node-2"}),
        TD,
        registry=registry,
    )


def _csr(identity=ECHO, key=None) -> str:
    return build_csr(key or generate_key(), identity).decode()


def _csr_with(sans, key=None) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        csr = csr.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    signed = csr.sign(key or generate_key(), hashes.SHA256())
    return signed.public_bytes(serialization.Encoding.PEM).decode()


def _code(result) -> RefusalCode:
    assert isinstance(result, Refusal), result
    return result.code


def _refused(registry, code: RefusalCode) -> float:
    return registry.get_sample_value("weft_csr_refused_total", {"code": code.value}) or 0.0


# --------------------------------------------------------------------------- issuance


def test_workload_certificate_for_a_bound_identity(signer, issuer, registry):
    key = generate_key()
    result = signer.certificate("node-1", CertificateRequest(str(ECHO), _csr(ECHO, key)))
    assert isinstance(result, CertificateResponse)
    leaf = x509.load_pem_x509_certificate(result.certificate_pem.encode())
    assert spiffe_id_of(leaf) == ECHO
    assert leaf.public_key() == key.public_key()
    assert result.chain_pem == [cert_pem(issuer.cert).decode()]
    assert result.trust_bundle_pem == [cert_pem(a).decode() for a in issuer.anchors]
    assert result.not_after == leaf.not_valid_after_utc.timestamp()
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life == dt.timedelta(hours=24, minutes=5)
    assert registry.get_sample_value("weft_csr_issued_total", {"kind": "workload"}) == 1.0


def test_every_issuance_writes_one_audit_line(signer, caplog):
    key = generate_key()
    caplog.set_level(logging.INFO, logger="weft.audit")
    result = signer.certificate("node-1", CertificateRequest(str(ECHO), _csr(ECHO, key)))
    assert isinstance(result, CertificateResponse)
    leaf = x509.load_pem_x509_certificate(result.certificate_pem.encode())
    lines = [r for r in caplog.records if r.name == "weft.audit"]
    assert len(lines) == 1
    msg = lines[0].getMessage()
    assert msg.startswith("issued kind=workload node=node-1 ")
    assert f"identity={ECHO} " in msg
    assert f"serial={leaf.serial_number:032x} " in msg
    assert f"not_after={leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} " in msg  # whole seconds
    assert msg.endswith(f"key_sha256={key_fingerprint(key.public_key())}")


def test_bootstrap_exchanges_a_token_for_a_short_node_certificate(signer, registry):
    node_id = SpiffeId.node("node-2", TD)
    result = signer.bootstrap(BootstrapRequest("node-2", "tok-2", _csr(node_id)))
    assert isinstance(result, CertificateResponse)
    leaf = x509.load_pem_x509_certificate(result.certificate_pem.encode())
    assert spiffe_id_of(leaf) == node_id
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=1, minutes=5)
    assert registry.get_sample_value("weft_csr_issued_total", {"kind": "node"}) == 1.0


def test_controlplane_serving_certificate(signer, registry):
    csr = x509.load_pem_x509_csr(_csr(controlplane_identity(TD)).encode())
    cert = signer.issue_controlplane(csr)
    assert str(spiffe_id_of(cert)) == f"spiffe://{TD}/ns/weft-system/sa/weft-controlplane"
    assert registry.get_sample_value("weft_csr_issued_total", {"kind": "controlplane"}) == 1.0


# --------------------------------------------------------------------------- bootstrap refusals


@pytest.mark.parametrize(
    ("node", "token", "identity", "code"),
    [
        ("node-1", "wrong", SpiffeId.node("node-1", TD), RefusalCode.UNAUTHENTICATED),
        # node-2's token does not make anyone node-1.
        ("node-1", "tok-2", SpiffeId.node("node-1", TD), RefusalCode.UNAUTHENTICATED),
        ("Node_1", "tok-1", SpiffeId.node("node-1", TD), RefusalCode.MALFORMED_REQUEST),
        # A valid token buys a node certificate for that node only.
        ("node-1", "tok-1", SpiffeId.node("node-2", TD), RefusalCode.SAN_MISMATCH),
        ("node-1", "tok-1", ECHO, RefusalCode.SAN_MISMATCH),
        ("node-1", "tok-1", SpiffeId.node("node-1", "other.org"), RefusalCode.SAN_MISMATCH),
    ],
)
def test_bootstrap_refusals(signer, registry, node, token, identity, code):
    result = signer.bootstrap(BootstrapRequest(node, token, _csr(identity)))
    assert _code(result) == code
    assert _refused(registry, code) == 1.0


def test_bootstrap_checks_the_token_before_touching_the_csr(signer):
    result = signer.bootstrap(BootstrapRequest("node-1", "wrong", "not a csr"))
    assert _code(result) == RefusalCode.UNAUTHENTICATED


# --------------------------------------------------------------------------- workload refusals


def _tampered(pem: str, old: bytes, new: bytes) -> str:
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    body = base64.encodebytes(der.replace(old, new)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def test_malformed_csr(signer):
    for pem in ("garbage", _csr().replace("MII", "XYZ"), cert_pem(init_ca(TD).issuer).decode()):
        result = signer.certificate("node-1", CertificateRequest(str(ECHO), pem))
        assert _code(result) == RefusalCode.MALFORMED_CSR
        assert "PEM PKCS#10" in result.message


def test_tampered_csr_signature(signer):
    # The request is for client; someone rewrote a CSR for echo into one for client.
    forged = _tampered(_csr(ECHO), b"/sa/echo", b"/sa/abcd")
    assert spiffe_id_of(x509.load_pem_x509_csr(forged.encode())) == SpiffeId.workload(
        "default", "abcd", TD
    )
    result = signer.certificate("node-1", CertificateRequest(str(CLIENT), forged))
    assert _code(result) == RefusalCode.BAD_CSR_SIGNATURE


def test_csr_signed_by_another_key_than_it_carries(signer):
    # Proof of possession: a CSR whose key is not the one that signed it.
    victim = generate_key()
    csr = x509.load_pem_x509_csr(_csr(ECHO, victim).encode())
    attacker = generate_key()
    # DER signatures vary in length by a byte or two; splice in one of the same length.
    sig = next(
        s
        for s in (
            attacker.sign(csr.tbs_certrequest_bytes, ec.ECDSA(hashes.SHA256())) for _ in range(200)
        )
        if len(s) == len(csr.signature)
    )
    forged_der = csr.public_bytes(serialization.Encoding.DER).replace(csr.signature, sig)
    body = base64.encodebytes(forged_der).decode()
    pem = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    result = signer.certificate("node-1", CertificateRequest(str(ECHO), pem))
    assert _code(result) == RefusalCode.BAD_CSR_SIGNATURE


@pytest.mark.parametrize(
    "key",
    [
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa-2048", "p-384"],
)
def test_key_not_p256(signer, key):
    pem = _csr_with([x509.UniformResourceIdentifier(str(ECHO))], key=key())
    result = signer.certificate("node-1", CertificateRequest(str(ECHO), pem))
    assert _code(result) == RefusalCode.KEY_NOT_P256


def test_foreign_trust_domain(signer):
    foreign = SpiffeId.workload("default", "echo", "other.org")
    result = signer.certificate("node-1", CertificateRequest(str(foreign), _csr(foreign)))
    assert _code(result) == RefusalCode.FOREIGN_TRUST_DOMAIN
    assert "'other.org'" in result.message


@pytest.mark.parametrize(
    "identity",
    [
        "echo",
        "spiffe://cluster.local/not/a/workload",
        "spiffe://cluster.local/ns/Default/sa/echo",
        f"spiffe://{TD}/weft/node/node-1",  # node IDs come from bootstrap only
    ],
)
def test_malformed_requested_identity(signer, identity):
    result = signer.certificate("node-1", CertificateRequest(identity, _csr(ECHO)))
    assert _code(result) == RefusalCode.MALFORMED_REQUEST


@pytest.mark.parametrize(
    "sans",
    [
        [x509.UniformResourceIdentifier(str(CLIENT))],  # another identity
        [  # the right one plus another: it would let the holder pick
            x509.UniformResourceIdentifier(str(ECHO)),
            x509.UniformResourceIdentifier(str(CLIENT)),
        ],
        [x509.UniformResourceIdentifier(str(ECHO)), x509.DNSName("echo.default.svc")],
        [x509.DNSName("echo.default.svc")],
        [],  # no SAN at all
    ],
    ids=["other-identity", "two-uris", "uri-and-dns", "dns-only", "no-san"],
)
def test_san_must_be_exactly_the_requested_identity(signer, registry, sans):
    result = signer.certificate("node-1", CertificateRequest(str(ECHO), _csr_with(sans)))
    assert _code(result) == RefusalCode.SAN_MISMATCH
    assert _refused(registry, RefusalCode.SAN_MISMATCH) == 1.0


def test_node_binding_refuses_identities_of_other_nodes(signer, registry, caplog):
    result = signer.certificate("node-2", CertificateRequest(str(ONLY_ON_1), _csr(ONLY_ON_1)))
    assert _code(result) == RefusalCode.NODE_NOT_BOUND
    assert result.http_status == 403
    assert result.details == {"node": "node-2", "identity": str(ONLY_ON_1)}
    assert "'shop'" in result.message and "'node-2'" in result.message
    assert _refused(registry, RefusalCode.NODE_NOT_BOUND) == 1.0
    line = next(r for r in caplog.records if r.name == "weft.audit").getMessage()
    assert line.startswith("refused code=NODE_NOT_BOUND node='node-2' ")
    # The same identity from its own node is fine.
    ok = signer.certificate("node-1", CertificateRequest(str(ONLY_ON_1), _csr(ONLY_ON_1)))
    assert isinstance(ok, CertificateResponse)


def test_expired_issuer_stops_issuance(signer, issuer, registry):
    signer.clock = lambda: issuer.not_after + dt.timedelta(seconds=1)
    result = signer.certificate("node-1", CertificateRequest(str(ECHO), _csr(ECHO)))
    assert _code(result) == RefusalCode.ISSUER_UNAVAILABLE
    assert result.http_status == 503
    assert "expired" in result.message
    node_id = SpiffeId.node("node-1", TD)
    result = signer.bootstrap(BootstrapRequest("node-1", "tok-1", _csr(node_id)))
    assert _code(result) == RefusalCode.ISSUER_UNAVAILABLE
    assert registry.get_sample_value("weft_csr_issued_total", {"kind": "workload"}) == 0.0


def test_refusal_log_escapes_client_strings(signer, caplog):
    signer.certificate("node-1", CertificateRequest("x\nrefused code=FAKE", _csr(ECHO)))
    lines = [r.getMessage() for r in caplog.records if r.name == "weft.audit"]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_all_codes_are_exported_from_the_start(registry, signer):
    for code in RefusalCode:
        assert _refused(registry, code) == 0.0
    assert registry.get_sample_value("weft_issuer_expiration_timestamp_seconds") == (
        signer.issuer.not_after.timestamp()
    )


_VALID = _csr(ECHO)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    identity=st.one_of(st.text(max_size=80), st.just(str(ECHO))),
    csr=st.one_of(
        st.text(max_size=400),
        st.tuples(st.integers(0, len(_VALID) - 1), st.characters()).map(
            lambda p: _VALID[: p[0]] + p[1] + _VALID[p[0] + 1 :]
        ),
    ),
)
# Found by hypothesis: one changed base64 character gives a CSR whose version is 4,
# which cryptography 46 reports as InvalidVersion rather than ValueError.
@example(identity=str(ECHO), csr=_VALID[:48] + "B" + _VALID[49:])
def test_any_input_gets_an_answer_not_an_exception(signer, identity, csr):
    result = signer.certificate("node-1", CertificateRequest(identity, csr))
    assert isinstance(result, CertificateResponse | Refusal)
    if isinstance(result, CertificateResponse):
        # Only ever for the identity bound to node-1, and for the key the CSR holds.
        assert identity == str(ECHO)
        leaf = x509.load_pem_x509_certificate(result.certificate_pem.encode())
        assert spiffe_id_of(leaf) == ECHO
        request = x509.load_pem_x509_csr(csr.encode())
        assert leaf.public_key() == request.public_key()


# --------------------------------------------------------------------------- lab sources


def _lab_state(tmp_path, plan):
    state = LabState(
        plan=plan,
        phase="ready",
        paths=LabPaths(state_dir=tmp_path, cgroup_root=None, bpffs_dir=tmp_path / "pins"),
    )
    state.save()
    return state


def _lab_store(state):
    from controlplane.discovery.lab import lab_model
    from controlplane.discovery.model import DiscoveryStore

    store = DiscoveryStore()
    store.replace(*lab_model(state, TD))
    return store


def test_store_binding_follows_discovery(tmp_path):
    from controlplane.discovery.lab import lab_model

    state = _lab_state(tmp_path, plan_lab("t", nodes=2, demo=True))
    store = _lab_store(state)
    binding = StoreNodeBinding(store)
    on_1 = binding.identities_on("node-1")
    expected = {
        SpiffeId.workload(p.namespace, p.service_account, TD)
        for p in state.plan.pods
        if p.node == "node-1"
    }
    assert on_1 == expected and on_1
    assert binding.identities_on("node-9") == set()
    # The lab grows: the new node's pods bind through the store's deltas.
    bigger = _lab_state(tmp_path, plan_lab("t", nodes=3, demo=True))
    store.replace(*lab_model(bigger, TD))
    assert binding.identities_on("node-3")
    # ... and shrinks again: a node whose last pod left binds nothing.
    store.replace(*lab_model(state, TD))
    assert binding.identities_on("node-3") == set()
    assert binding.identities_on("node-1") == expected


def test_store_binding_moves_a_rescheduled_pod(tmp_path):
    import dataclasses

    state = _lab_state(tmp_path, plan_lab("t", nodes=2, demo=True))
    store = _lab_store(state)
    binding = StoreNodeBinding(store)
    only_1 = {w.identity for w in store.snapshot().workloads.values() if w.node == "node-1"} - {
        w.identity for w in store.snapshot().workloads.values() if w.node == "node-2"
    }
    assert only_1, "the demo plan has an identity only on node-1"
    moved = [
        dataclasses.replace(w, node="node-2")
        for w in store.snapshot().workloads.values()
        if w.node == "node-1"
    ]
    store.update(moved)
    assert binding.identities_on("node-1") == set()
    assert only_1 <= binding.identities_on("node-2")


def test_lab_tokens_are_stored_hashed_and_private(tmp_path):
    path = tmp_path / "bootstrap-tokens.json"
    tokens = write_lab_tokens(path, ["node-1", "node-2"])
    assert set(tokens) == {"node-1", "node-2"} and tokens["node-1"] != tokens["node-2"]
    assert len(tokens["node-1"]) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert tokens["node-1"] not in text
    assert set(json.loads(text)) == {"node-1", "node-2"}
    lookup = LabBootstrapTokens(path)
    assert lookup.node_for(tokens["node-1"]) == "node-1"
    assert lookup.node_for(tokens["node-2"]) == "node-2"
    assert lookup.node_for("guess") is None
    assert lookup.node_for(tokens["node-1"][:-1]) is None


def test_lab_tokens_reload_when_rewritten(tmp_path):
    path = tmp_path / "bootstrap-tokens.json"
    old = write_lab_tokens(path, ["node-1"])
    lookup = LabBootstrapTokens(path)
    assert lookup.node_for(old["node-1"]) == "node-1"
    new = write_lab_tokens(path, ["node-1"])
    future = time.time() + 5  # make sure mtime differs even on coarse clocks
    os.utime(path, (future, future))
    assert lookup.node_for(new["node-1"]) == "node-1"
    assert lookup.node_for(old["node-1"]) is None


def test_signer_with_lab_sources_end_to_end(tmp_path, issuer):
    state = _lab_state(tmp_path, plan_lab("t", nodes=2, demo=True))
    tokens = write_lab_tokens(tmp_path / "tok.json", ["node-1", "node-2"])
    signer = Signer(
        issuer,
        StoreNodeBinding(_lab_store(state)),
        LabBootstrapTokens(tmp_path / "tok.json"),
        TD,
    )
    node_id = SpiffeId.node("node-2", TD)
    boot = signer.bootstrap(BootstrapRequest("node-2", tokens["node-2"], _csr(node_id)))
    assert isinstance(boot, CertificateResponse)
    pod = next(p for p in state.plan.pods if p.node == "node-2")
    sid = SpiffeId.workload(pod.namespace, pod.service_account, TD)
    assert isinstance(
        signer.certificate("node-2", CertificateRequest(str(sid), _csr(sid))),
        CertificateResponse,
    )


# --------------------------------------------------------------------------- pod certificates


class Pods:
    """PodCredentials: token -> claim, or the refusal / outage the real one raises."""

    def __init__(self, by_token):
        self.by_token = by_token
        self.asked = 0

    def pod_for(self, token):
        self.asked += 1
        found = self.by_token.get(token)
        if isinstance(found, Exception):
            raise found
        if found is None:
            raise CredentialRefused(RefusalCode.UNAUTHENTICATED, "the pod token is not valid")
        return found


WEB_1 = PodClaim("default", "web-1", "uid-1", "echo", "node-1")


@pytest.fixture
def pod_signer(issuer, registry):
    pods = Pods(
        {
            "web-1": WEB_1,
            "outage": CredentialCheckUnavailable("TokenReview failed: HTTP 503"),
            "node-mode": CredentialRefused(RefusalCode.POD_NOT_SIDECAR, "not in sidecar mode"),
        }
    )
    signer = Signer(issuer, Binding({}), Tokens({}), TD, registry=registry, pods=pods)
    return signer, pods


def test_a_pod_token_gets_its_own_pods_identity(pod_signer, registry, caplog):
    signer, _ = pod_signer
    key = generate_key()
    with caplog.at_level(logging.INFO, logger="weft.audit"):
        result = signer.pod_certificate(PodCertificateRequest("web-1", str(ECHO), _csr(ECHO, key)))
    assert isinstance(result, CertificateResponse)
    leaf = x509.load_pem_x509_certificate(result.certificate_pem.encode())
    assert spiffe_id_of(leaf) == ECHO and leaf.public_key() == key.public_key()
    assert registry.get_sample_value("weft_csr_issued_total", {"kind": "workload"}) == 1.0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "weft.audit"]
    assert line.startswith("issued kind=workload node=node-1 pod=default/web-1 identity=")


@pytest.mark.parametrize(
    ("token", "identity", "code"),
    [
        ("web-1", CLIENT, RefusalCode.NOT_POD_IDENTITY),
        ("outage", ECHO, RefusalCode.CREDENTIAL_CHECK_UNAVAILABLE),
        ("node-mode", ECHO, RefusalCode.POD_NOT_SIDECAR),
        ("forged", ECHO, RefusalCode.UNAUTHENTICATED),
    ],
)
def test_a_pod_token_is_refused_for_anything_else(pod_signer, registry, token, identity, code):
    signer, _ = pod_signer
    result = signer.pod_certificate(PodCertificateRequest(token, str(identity), _csr(identity)))
    assert _code(result) == code
    assert _refused(registry, code) == 1.0
    if code is RefusalCode.NOT_POD_IDENTITY:
        assert isinstance(result, Refusal)
        assert result.http_status == 403
        assert f"pod default/web-1, which runs as {ECHO}" in result.message
        assert f"not {CLIENT}" in result.message


def test_a_bad_pod_csr_is_refused_before_the_token_is_reviewed(pod_signer):
    signer, pods = pod_signer
    mismatched = PodCertificateRequest("web-1", str(ECHO), _csr(CLIENT))
    assert _code(signer.pod_certificate(mismatched)) == RefusalCode.SAN_MISMATCH
    node_id = str(SpiffeId.node("node-1", TD))
    as_node = PodCertificateRequest("web-1", node_id, _csr(SpiffeId.node("node-1", TD)))
    assert _code(signer.pod_certificate(as_node)) == RefusalCode.MALFORMED_REQUEST
    assert pods.asked == 0


def test_without_pod_credentials_pod_tokens_are_refused(signer):
    result = signer.pod_certificate(PodCertificateRequest("web-1", str(ECHO), _csr(ECHO)))
    assert _code(result) == RefusalCode.UNAUTHENTICATED
