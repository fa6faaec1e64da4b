"""WorkloadCertManager against a fake control plane client, on fake time.

The fake clock only moves when a test calls ``advance``; the manager's sleeps wake in
deadline order, so a day of certificate lifetime takes milliseconds and every schedule
(70 % refresh, jitter bounds, backoff growth, expiry) is asserted exactly.  The fake
client signs the CSR it is sent with a test PKI (tests/pki.py), so what the manager
installs is a real certificate for its own key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import logging
import os
import random
import ssl
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client import CollectorRegistry

from nodeagent.certs import CertConfig, CertManagerError, WorkloadCertManager, identity_dirname
from nodeagent.certtypes import CertSource
from nodeagent.cpclient import ControlPlaneUnavailable, RefusedError
from tests.pki import Pki
from weft.identity import SpiffeId, cert_pem, load_certs, spiffe_id_of
from weft.wire import CertificateResponse, Refusal, RefusalCode

A = SpiffeId.workload("shop", "web")
B = SpiffeId.workload("shop", "db")
LIFETIME = 1000.0
EXPIRY = "identity_cert_expiration_timestamp_seconds"
REFRESH = "identity_cert_refresh_total"


async def settle() -> None:
    """Let every runnable task run until it blocks again (on the fake clock)."""
    for _ in range(30):
        await asyncio.sleep(0)


class FakeClock:
    def __init__(self) -> None:
        self.t = float(int(time.time()))  # whole seconds: X.509 times have no fractions
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.t + max(seconds, 0.0), self._seq, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in order and letting them run."""
        target = self.t + seconds
        await settle()
        for _ in range(100_000):  # a bound, so a busy loop fails the test instead of hanging
            while self._sleepers and self._sleepers[0][2].done():  # cancelled sleepers
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            when, _, fut = heapq.heappop(self._sleepers)
            self.t = max(self.t, when)
            fut.set_result(None)
            await settle()
        else:
            raise AssertionError(f"more than 100000 wake-ups before t+{seconds}: a busy loop?")
        self.t = target
        await settle()


class FixedJitter:
    """``uniform(a, b)`` at a fixed relative position: 0 is a, 1 is b."""

    def __init__(self, position: float) -> None:
        self.position = position

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.position


def sign(
    pki: Pki, csr_pem: bytes, identity: SpiffeId, now: float, lifetime: float, backdate: float = 0
) -> x509.Certificate:
    """Sign like the control plane: notBefore backdated, notAfter ``lifetime`` from now."""
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert spiffe_id_of(csr) == identity
    start = dt.datetime.fromtimestamp(now - backdate, dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.issuer.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=backdate + lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(pki.issuer_key, hashes.SHA256())
    )


@dataclass
class FakeClient:
    pki: Pki
    clock: FakeClock
    lifetime: float = LIFETIME
    backdate: float = 0.0
    bundle: list[Pki] = field(default_factory=list)
    """Anchors sent back; default: the signing PKI's."""
    fail: Exception | None = None
    wrong_identity: bool = False
    calls: list[tuple[float, SpiffeId]] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    async def request_certificate(self, identity: SpiffeId, csr_pem: bytes) -> CertificateResponse:
        await asyncio.sleep(0)
        self.calls.append((self.clock.now(), identity))
        self.sent.append(csr_pem)
        if self.fail is not None:
            raise self.fail
        cert = sign(self.pki, csr_pem, identity, self.clock.now(), self.lifetime, self.backdate)
        if self.wrong_identity:
            cert = sign_as(self.pki, cert, SpiffeId.workload("other", "sa"))
        anchors = self.bundle or [self.pki]
        return CertificateResponse(
            certificate_pem=cert_pem(cert).decode(),
            chain_pem=[cert_pem(self.pki.issuer).decode()],
            trust_bundle_pem=[cert_pem(p.anchor).decode() for p in anchors],
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def times(self, identity: SpiffeId = A) -> list[float]:
        return [t - self.calls[0][0] for t, i in self.calls if i == identity]


def sign_as(pki: Pki, cert: x509.Certificate, identity: SpiffeId) -> x509.Certificate:
    """Re-issue ``cert``'s key under another SPIFFE ID (a control plane bug)."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.issuer.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(pki.issuer_key, hashes.SHA256())
    )


@dataclass
class Env:
    pki: Pki
    clock: FakeClock
    client: FakeClient
    registry: CollectorRegistry
    mgr: WorkloadCertManager
    cert_dir: Path

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    assert not leaked, "tasks leaked: " + ", ".join(sorted(t.get_name() for t in leaked))


@pytest.fixture(autouse=True)
def verbose_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="weft")


@pytest.fixture
def pki() -> Pki:
    return Pki()


@pytest.fixture
def make(tmp_path: Path, pki: Pki):
    managers: list[WorkloadCertManager] = []

    def build(position: float = 0.5, cert_dir: Path | None = None, **overrides: float) -> Env:
        clock = FakeClock()
        client = FakeClient(pki, clock)
        registry = CollectorRegistry()
        cert_dir = cert_dir or tmp_path / "certs"
        config = CertConfig(
            cert_dir=cert_dir,
            **{"backoff_base": 1.0, "backoff_cap": 16.0, "not_bound_retry": 15.0, **overrides},
        )
        mgr = WorkloadCertManager(
            client,
            config,
            registry,
            trust_bundle_pem=pki.bundle_pem,
            clock=clock,
            jitter=FixedJitter(position),
        )
        managers.append(mgr)
        return Env(pki, clock, client, registry, mgr, cert_dir)

    return build


@pytest.fixture
async def env(make) -> AsyncIterator[Env]:
    e: Env = make()
    yield e
    await e.mgr.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- issuance -----------------------------------------------------------------------------


async def test_issue_on_set_identities(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    source: CertSource = env.mgr  # what the tunnel consumes (checked by mypy)
    assert source.material(A) is None
    env.mgr.set_identities({A})
    env.mgr.start()
    await settle()

    mat = source.material(A)
    assert mat is not None and mat.identity == A and mat.generation >= 1
    assert env.client.calls == [(env.clock.t, A)]
    assert mode(mat.key_path) == 0o600
    assert mode(mat.key_path.parent) == 0o700
    assert mat.key_path.parent == env.cert_dir / identity_dirname(A)
    leaf, issuer = load_certs(mat.chain_path.read_bytes())
    assert spiffe_id_of(leaf) == A and issuer == env.pki.issuer
    assert mat.not_after == leaf.not_valid_after_utc.timestamp() == env.clock.t + LIFETIME
    key = serialization.load_pem_private_key(mat.key_path.read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    # The material works as Python's ssl needs it: files, key matching the leaf.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(mat.chain_path, mat.key_path)

    # The key never leaves: not in any log line, not in what was sent.
    assert key_not_logged(mat.key_path, caplog.text)
    assert key_not_logged(mat.key_path, b"".join(env.client.sent).decode())
    assert f"identity {A}: certificate issued" in caplog.text

    assert env.sample(EXPIRY, identity=str(A)) == mat.not_after
    assert env.sample(REFRESH, result="success", code="OK") == 1
    assert env.mgr.trust_bundle_pem() == env.pki.bundle_pem
    assert env.mgr.trust_bundle_path.read_bytes() == env.pki.bundle_pem
    assert env.mgr.snapshot()["identities"][str(A)]["valid"] is True  # type: ignore[index]


async def test_node_identity_is_refused(env: Env) -> None:
    with pytest.raises(ValueError, match="not a workload identity"):
        env.mgr.set_identities({SpiffeId.node("node-1")})


@pytest.mark.parametrize(("position", "expected"), [(0.0, 650.0), (0.5, 700.0), (1.0, 750.0)])
async def test_refresh_at_70_percent_within_jitter(make, position: float, expected: float) -> None:
    env: Env = make(position)
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await settle()
        first = env.mgr.material(A)
        assert first is not None
        await env.clock.advance(expected - 0.5)
        assert len(env.client.calls) == 1
        await env.clock.advance(1.0)
        assert env.client.times() == [0.0, expected]
        second = env.mgr.material(A)
        assert second is not None and second.generation > first.generation
        assert second.key_path != first.key_path
        assert second.key_path.read_bytes() != first.key_path.read_bytes()  # a new key
        # The previous generation stays loadable (contexts built from it keep working).
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(first.chain_path, first.key_path)

        await env.clock.advance(expected + 1.0)  # one more renewal
        third = env.mgr.material(A)
        assert third is not None and third.generation > second.generation
        assert len(env.client.calls) == 3
        left = sorted(p.name for p in third.key_path.parent.iterdir())
        assert left == sorted(
            p.name for p in (second.key_path, second.chain_path, third.key_path, third.chain_path)
        )
        assert not first.key_path.exists()
        assert env.sample(REFRESH, result="success", code="OK") == 3
    finally:
        await env.mgr.close()


async def test_backdated_not_before_does_not_count_as_used_lifetime(make) -> None:
    """The control plane backdates notBefore by 5 min; with 60 s certificates, counting
    from notBefore would renew every second.  Counted from receipt: at 70 % of 60 s."""
    env: Env = make(0.5)
    env.client.lifetime, env.client.backdate = 60.0, 300.0
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await env.clock.advance(100.0)
        assert env.client.times() == [0.0, 42.0, 84.0]
    finally:
        await env.mgr.close()


def test_jitter_spreads_renewals(make) -> None:
    """With a real random source, renewals land within 70 % ± 5 % of the lifetime."""
    env: Env = make()
    env.mgr._jitter = random.Random(7)
    now = env.clock.now()
    delays = [env.mgr._refresh_delay(now, now + LIFETIME) for _ in range(500)]
    assert 650.0 <= min(delays) < 660.0
    assert 740.0 < max(delays) <= 750.0


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(("position", "factor"), [(1.0, 1.0), (0.0, 0.8)])
async def test_backoff_grows_and_caps(
    make, position: float, factor: float, caplog: pytest.LogCaptureFixture
) -> None:
    env: Env = make(position, backoff_jitter=0.2)
    env.client.fail = ControlPlaneUnavailable("control plane at 10.0.0.1:15010: connection refused")
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await env.clock.advance(200.0)
        times = env.client.times()
        gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
        expected = [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
        assert gaps[:7] == [pytest.approx(g * factor) for g in expected]
        assert max(gaps) <= 16.0
        assert env.mgr.material(A) is None
        failures = env.sample(REFRESH, result="failure", code="UNAVAILABLE")
        assert failures == len(times)
        assert f"identity {A}: certificate request failed [UNAVAILABLE]" in caplog.text
        assert "no valid certificate" in caplog.text

        env.client.fail = None  # back: the next retry succeeds and resets the backoff
        await env.clock.advance(16.0)
        assert env.mgr.material(A) is not None
        assert env.mgr.snapshot()["identities"][str(A)]["failures"] == 0  # type: ignore[index]
    finally:
        await env.mgr.close()


async def test_valid_cert_kept_during_outage_then_withdrawn_at_expiry(
    make, caplog: pytest.LogCaptureFixture
) -> None:
    env: Env = make(0.5, backoff_cap=60.0)
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await settle()
        issued = env.mgr.material(A)
        assert issued is not None
        env.client.fail = ControlPlaneUnavailable("connection refused")
        await env.clock.advance(LIFETIME - 1.0)
        assert len(env.client.calls) > 5  # it kept trying from 70 % on
        assert env.mgr.material(A) == issued  # and kept serving the valid certificate
        assert "still serving generation" in caplog.text
        assert env.mgr.trust_generation == 1

        await env.clock.advance(1.0)  # the leaf's notAfter
        assert env.mgr.material(A) is None
        assert f"identity {A}: certificate (generation {issued.generation}) expired" in (
            caplog.text
        )
        assert "withdrawn" in caplog.text
        assert not issued.key_path.exists()
        # The expiry stays visible (alerting on it is the point); refreshes still run.
        assert env.sample(EXPIRY, identity=str(A)) == issued.not_after

        env.client.fail = None
        await env.clock.advance(60.0)
        again = env.mgr.material(A)
        assert again is not None and again.generation > issued.generation
        assert key_not_logged(again.key_path, caplog.text)
    finally:
        await env.mgr.close()


def key_not_logged(key_path: Path, text: str) -> bool:
    return all(
        line not in text for line in key_path.read_text().splitlines() if "-----" not in line
    )


def refusal(code: RefusalCode) -> RefusedError:
    return RefusedError(Refusal(code, f"{code.value.lower()} (test)"), "CSR for test")


async def test_node_not_bound_is_retried_on_a_slower_schedule(
    make, caplog: pytest.LogCaptureFixture
) -> None:
    env: Env = make(1.0, backoff_cap=120.0, not_bound_retry=15.0)
    env.client.fail = refusal(RefusalCode.NODE_NOT_BOUND)
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await env.clock.advance(500.0)
        assert env.client.times()[:6] == [0.0, 15.0, 45.0, 105.0, 225.0, 345.0]
        assert env.sample(REFRESH, result="failure", code="NODE_NOT_BOUND") == len(env.client.calls)
        assert f"identity {A}: certificate request failed [NODE_NOT_BOUND]" in caplog.text
        assert "pods may still be scheduling" in caplog.text
        warned = [r for r in caplog.records if "NODE_NOT_BOUND" in r.getMessage()]
        assert {r.levelno for r in warned} == {logging.WARNING}

        env.client.fail = None  # the control plane caught up with the scheduler
        await env.clock.advance(120.0)
        assert env.mgr.material(A) is not None
    finally:
        await env.mgr.close()


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (RefusalCode.SAN_MISMATCH, "version skew"),
        (RefusalCode.FOREIGN_TRUST_DOMAIN, "same trust domain"),
    ],
)
async def test_unfixable_refusal_waits_the_cap_and_logs_an_error(
    make, code: RefusalCode, hint: str, caplog: pytest.LogCaptureFixture
) -> None:
    env: Env = make(1.0, backoff_cap=100.0)
    env.client.fail = refusal(code)
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await env.clock.advance(250.0)
        assert env.client.times() == [0.0, 100.0, 200.0]
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and all(str(A) in r.getMessage() for r in errors)
        assert hint in caplog.text and code.value in caplog.text
    finally:
        await env.mgr.close()


async def test_issuer_unavailable_backs_off_normally(make, caplog) -> None:
    env: Env = make(1.0)
    env.client.fail = refusal(RefusalCode.ISSUER_UNAVAILABLE)
    env.mgr.set_identities({A})
    env.mgr.start()
    try:
        await env.clock.advance(10.0)
        assert env.client.times() == [0.0, 1.0, 3.0, 7.0]
        assert "renew the issuer" in caplog.text
    finally:
        await env.mgr.close()


async def test_wrong_certificate_is_not_installed(env: Env, caplog) -> None:
    env.client.wrong_identity = True
    env.mgr.set_identities({A})
    env.mgr.start()
    await settle()
    assert env.mgr.material(A) is None
    assert env.sample(REFRESH, result="failure", code="INVALID_RESPONSE") == 1
    assert "names spiffe://cluster.local/ns/other/sa/sa instead" in caplog.text


async def test_guard_task_fails_when_a_refresher_dies(env: Env, caplog) -> None:
    env.client.fail = RuntimeError("bug in the client")
    env.mgr.set_identities({A})
    guard = env.mgr.start()
    await settle()
    assert guard.done()
    with pytest.raises(CertManagerError, match=r"refresher for .*shop/sa/web died"):
        guard.result()
    assert "ended unexpectedly" in caplog.text


# --- identities come and go ---------------------------------------------------------------


async def test_dropped_identity_loses_files_task_and_metric_series(env: Env, caplog) -> None:
    env.mgr.set_identities({A, B})
    env.mgr.start()
    await settle()
    mat_b = env.mgr.material(B)
    assert mat_b is not None and env.mgr.material(A) is not None
    assert env.sample(EXPIRY, identity=str(B)) is not None

    env.mgr.set_identities({A})
    await settle()
    assert env.mgr.material(B) is None
    assert not mat_b.key_path.parent.exists()
    assert env.sample(EXPIRY, identity=str(B)) is None
    assert env.sample(EXPIRY, identity=str(A)) is not None
    assert f"identity {B}: no local pod left" in caplog.text
    await env.clock.advance(2 * LIFETIME)
    assert B not in {i for _, i in env.client.calls[2:]}  # its refresher is gone
    assert env.mgr.identities == {A}

    env.mgr.set_identities({A, B})  # a pod of B is back: a fresh key and certificate
    await settle()
    again = env.mgr.material(B)
    assert again is not None and again.generation > mat_b.generation


async def test_reuses_valid_files_from_a_previous_run(make) -> None:
    first: Env = make()
    first.mgr.set_identities({A, B})
    first.mgr.start()
    await settle()
    old_a = first.mgr.material(A)
    await first.mgr.close()
    assert old_a is not None
    # B's files are made unusable (a corrupt chain): it must be requested again.
    old_b = first.mgr.material(B)
    assert old_b is not None
    old_b.chain_path.write_text("garbage")

    second: Env = make(cert_dir=first.cert_dir)
    second.clock.t = first.clock.t + 100.0
    second.mgr.set_identities({A, B})
    assert second.mgr.material(A) == old_a  # served before the control plane answers
    assert second.mgr.material(B) is None
    second.mgr.start()
    try:
        await settle()
        assert [i for _, i in second.client.calls] == [B]
        new_b = second.mgr.material(B)
        assert new_b is not None and new_b.generation > old_b.generation
        assert not old_b.key_path.exists()
        await second.clock.advance(650.0)  # the adopted certificate renews on its schedule
        assert [i for _, i in second.client.calls] == [B, A]
    finally:
        await second.mgr.close()


async def test_first_snapshot_removes_identities_left_by_a_previous_run(make, pki) -> None:
    env: Env = make()
    stale = env.cert_dir / identity_dirname(SpiffeId.workload("gone", "sa"))
    pki.write_leaf(stale, SpiffeId.workload("gone", "sa"))
    (env.cert_dir / "not-ours").mkdir()
    env.mgr.set_identities({A})
    assert not stale.exists()
    assert (env.cert_dir / "not-ours").exists()
    await env.mgr.close()


# --- trust bundle -------------------------------------------------------------------------


async def test_trust_bundle_rotation_with_two_anchors(env: Env, caplog) -> None:
    new = Pki("new")
    assert env.mgr.trust_generation == 1
    env.mgr.set_identities({A})
    env.mgr.start()
    await settle()
    assert env.mgr.trust_generation == 1  # the same anchor as given: no change

    # 1. overlap: the control plane sends {old, new}, still issuing from the old issuer.
    env.client.bundle = [env.pki, new]
    await env.clock.advance(LIFETIME)
    assert env.mgr.trust_generation == 2
    assert env.mgr.trust_bundle_pem() == env.pki.bundle_pem + new.bundle_pem
    assert env.mgr.trust_bundle_path.read_bytes() == env.mgr.trust_bundle_pem()
    assert env.sample("identity_trust_bundle_anchors") == 2
    # the same set in another order is not a change
    env.client.bundle = [new, env.pki]
    await env.clock.advance(LIFETIME)
    assert env.mgr.trust_generation == 2

    # 2. the issuer switches to the new anchor; 3. the old anchor is dropped.
    env.client.pki = new
    env.client.bundle = [new, env.pki]
    await env.clock.advance(LIFETIME)
    mat = env.mgr.material(A)
    assert mat is not None
    assert load_certs(mat.chain_path.read_bytes())[1] == new.issuer
    env.client.bundle = [new]
    await env.clock.advance(LIFETIME)
    assert env.mgr.trust_generation == 3
    assert env.mgr.trust_bundle_pem() == new.bundle_pem
    assert env.sample("identity_trust_bundle_anchors") == 1
    assert "removed" in caplog.text


# --- config -------------------------------------------------------------------------------


def test_config_from_mapping(tmp_path: Path) -> None:
    cfg = CertConfig.from_mapping(
        {"cert_dir": str(tmp_path), "refresh_fraction": "0.6", "backoff_cap": "120"}
    )
    assert cfg.cert_dir == tmp_path and cfg.refresh_fraction == 0.6 and cfg.backoff_cap == 120
    assert cfg.backoff_base == 1.0
    with pytest.raises(ValueError, match=r"unknown certificate setting.*refresh_fractoin"):
        CertConfig.from_mapping({"cert_dir": "/run/x", "refresh_fractoin": "0.6"})
    with pytest.raises(ValueError, match="cert_dir is required"):
        CertConfig.from_mapping({})
    with pytest.raises(ValueError, match="backoff_cap: expected a number"):
        CertConfig.from_mapping({"cert_dir": "/run/x", "backoff_cap": "5m"})


@pytest.mark.parametrize(
    "bad",
    [
        {"refresh_fraction": 0.97},
        {"refresh_jitter": -0.1},
        {"backoff_base": 0.0},
        {"backoff_base": 10.0, "backoff_cap": 5.0},
        {"backoff_jitter": 1.0},
        {"max_sleep": 0.0},
    ],
)
def test_config_rejects_nonsense(tmp_path: Path, bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CertConfig(cert_dir=tmp_path, **bad)
