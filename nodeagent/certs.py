"""Workload certificates on the node: keys made here, CSRs signed by the control plane.

`WorkloadCertManager` keeps one certificate per SPIFFE ID that has a captured pod on this
node and serves it to the tunnel through the `nodeagent.certtypes.CertSource` protocol.

Lifecycle of an identity:

* **Added** (`set_identities`): if a previous agent run left a valid key and chain for it
  under ``cert_dir`` (same identity, key matches, chains to the trust bundle), that is
  served at once, so an agent restart while the control plane is away does not take the
  workload's mTLS down.  Otherwise a P-256 key is generated here and its CSR sent.
* **Renewed** at ``refresh_fraction`` (70 %) of the lifetime, ± ``refresh_jitter`` of the
  lifetime so that identities and nodes issued together (a node boot, a control plane
  back from an outage) do not renew together.  The lifetime counts from when the
  certificate arrived, not from its backdated notBefore.  Every renewal uses a new key and new file
  names (``<generation>.key.pem`` / ``<generation>.chain.pem``) written atomically, then
  bumps the material's ``generation``: TLS sessions established with the old certificate
  are untouched (OpenSSL holds it in memory), new contexts load the new pair, and a
  reader can never pair a new key with an old chain.  The previous generation's files
  stay until the next renewal for contexts built from an older `material` call.
* **Failing** renewals back off exponentially (``backoff_base`` doubling up to
  ``backoff_cap``, each delay scaled by a random factor in ``[1 - backoff_jitter, 1]``)
  while the still-valid certificate keeps being served.  ``NODE_NOT_BOUND`` starts from
  the slower ``not_bound_retry``: the pod may still be scheduling and the control plane
  not see it yet, and hammering it will not make it appear.  Refusals that a retry cannot
  fix (malformed CSR, SAN mismatch, foreign trust domain) wait ``backoff_cap``.
* **Expired** without a successful renewal: withdrawn — `material` returns None and an
  error line says so; serving an expired certificate would only move the failure to the
  peer's handshake, with a worse message.
* **Dropped** when its last local pod leaves: task cancelled, files and metric series
  removed.

Trust bundle: the control plane sends its current anchors with every certificate; the
manager serves exactly that set (not a union with older sets, so a retired anchor stops
being trusted), writes it to ``<cert_dir>/trust-bundle.pem`` and bumps `trust_generation`
when it changes.  Nothing limits the set to one anchor, which is what makes anchor
rotation possible without downtime:

1. the control plane serves the bundle {old, new} while still issuing from the old
   issuer; wait at least one leaf lifetime, so every agent has renewed once and trusts
   both anchors;
2. switch the control plane to an issuer under the new anchor; wait at least one leaf
   lifetime, so every leaf in the mesh chains to the new anchor (peers still on old
   leaves are accepted meanwhile because everyone trusts both);
3. drop the old anchor from the bundle.

Time, randomness and the control plane are injected (`Clock`, `Jitter`,
`CertificateClient`) so the schedule is tested with fake time.  Each identity has one
refresher task; the manager's guard task (`start`) ends with an error if a refresher
ever dies, which the agent treats like any other dead long-lived task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.certtypes import TlsMaterial
from nodeagent.cpclient import (
    ControlPlaneError,
    ControlPlaneUnavailable,
    InvalidResponse,
    Issued,
    RefusedError,
    check_issued,
    fingerprint,
    make_private_dir,
    warn_if_not_tmpfs,
    write_private,
)
from weft.identity import IdentityError, SpiffeId, build_csr, cert_pem, generate_key, key_pem
from weft.wire import CertificateResponse, RefusalCode

log = logging.getLogger("weft.certs")

BUNDLE_FILE = "trust-bundle.pem"

# Refusals a retry will not fix without a human (or a new version) changing something.
_HOPELESS = frozenset(
    {
        RefusalCode.MALFORMED_REQUEST,
        RefusalCode.MALFORMED_CSR,
        RefusalCode.BAD_CSR_SIGNATURE,
        RefusalCode.KEY_NOT_P256,
        RefusalCode.SAN_MISMATCH,
        RefusalCode.FOREIGN_TRUST_DOMAIN,
    }
)
_HINTS = {
    RefusalCode.NODE_NOT_BOUND: (
        "the control plane does not see a pod with this service account on this node "
        "(yet: pods may still be scheduling)"
    ),
    RefusalCode.UNAUTHENTICATED: "the node credential was not accepted: check the agent's "
    "bootstrap token and that agent and control plane share a trust domain",
    RefusalCode.ISSUER_UNAVAILABLE: "the control plane cannot sign (issuer expired, not yet "
    "valid or not loaded): renew the issuer (`weft identity init`, or your own CA)",
    RefusalCode.FOREIGN_TRUST_DOMAIN: "the agent's trust domain is not the control plane's: "
    "configure the same trust domain on both",
    RefusalCode.CREDENTIAL_CHECK_UNAVAILABLE: "the control plane could not check the node's "
    "credential (is the Kubernetes API server reachable from it?); retrying",
}
_BUG_HINT = "agent and control plane disagree about the API (version skew?); report this"


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock Unix seconds (certificate validity is wall-clock time)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Jitter(Protocol):
    def uniform(self, a: float, b: float) -> float:
        """A number in [a, b]; `random.Random` is one."""
        ...


class CertificateClient(Protocol):
    """The part of `nodeagent.cpclient.ControlPlaneClient` the manager uses."""

    async def request_certificate(
        self, identity: SpiffeId, csr_pem: bytes
    ) -> CertificateResponse: ...


class CertManagerError(RuntimeError):
    """A refresher task died: the manager can no longer keep certificates fresh."""


@dataclass(frozen=True)
class CertConfig:
    cert_dir: Path
    """Directory for keys (0600) and chains, one subdirectory per identity (made 0700).
    Must be on a tmpfs (e.g. ``/run/weft/certs``): keys must not reach a disk.  Files
    left by a previous agent run are reused if still valid."""
    refresh_fraction: float = 0.7
    """Renew when this fraction of a certificate's lifetime has passed."""
    refresh_jitter: float = 0.05
    """± this fraction of the lifetime, uniformly, added to the renewal time."""
    backoff_base: float = 1.0
    """Seconds before the first retry after a failed renewal; doubles per failure.
    Also the shortest wait before renewing a certificate that arrives already past its
    renewal point (clock skew), so a confused peer cannot make the agent spin."""
    backoff_cap: float = 300.0
    """Longest wait between retries; also the wait after refusals a retry cannot fix."""
    backoff_jitter: float = 0.2
    """Each retry delay is multiplied by a random factor in [1 - backoff_jitter, 1]."""
    not_bound_retry: float = 15.0
    """First retry after NODE_NOT_BOUND (doubles per failure, up to backoff_cap)."""
    max_sleep: float = 60.0
    """Longest single sleep: a wall-clock jump or a suspend is noticed within this."""

    def __post_init__(self) -> None:
        lo = self.refresh_fraction - self.refresh_jitter
        hi = self.refresh_fraction + self.refresh_jitter
        if self.refresh_jitter < 0 or not 0 < lo <= hi < 1:
            raise ValueError(
                "refresh_fraction ± refresh_jitter must stay within (0, 1), got "
                f"{self.refresh_fraction} ± {self.refresh_jitter}"
            )
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError(
                f"need 0 < backoff_base <= backoff_cap, got {self.backoff_base}, {self.backoff_cap}"
            )
        if not 0 <= self.backoff_jitter < 1:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {self.backoff_jitter}")
        if self.not_bound_retry <= 0 or self.max_sleep <= 0:
            raise ValueError("not_bound_retry and max_sleep must be > 0 seconds")

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> CertConfig:
        """Build from strings (flags, environment); keys are the field names."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown certificate setting(s) {', '.join(unknown)}; known: " + ", ".join(fields)
            )
        if "cert_dir" not in values:
            raise ValueError("cert_dir is required (a tmpfs directory such as /run/weft/certs)")
        kwargs: dict[str, Any] = {"cert_dir": Path(values["cert_dir"])}
        for name, raw in values.items():
            if name == "cert_dir":
                continue
            try:
                kwargs[name] = float(raw)
            except ValueError:
                raise ValueError(f"{name}: expected a number, got {raw!r}") from None
        return cls(**kwargs)


@dataclass
class _Slot:
    identity: SpiffeId
    directory: Path
    material: TlsMaterial | None = None
    issued_at: float = 0.0
    """When the served certificate's life started for us: the later of its notBefore and
    the time it was received (see `WorkloadCertManager._refresh_delay`)."""
    failures: int = 0
    last_error: str | None = None
    next_attempt: float | None = None
    task: asyncio.Task[None] | None = None


def identity_dirname(identity: SpiffeId) -> str:
    """``<trust-domain>_<namespace>_<service-account>``: unambiguous, because namespaces
    and service accounts cannot contain ``_``; readable, for an operator in ``/run``."""
    return f"{identity.trust_domain}_{identity.namespace}_{identity.service_account}"


def _identity_of_dirname(name: str) -> SpiffeId | None:
    parts = name.rsplit("_", 2)
    if len(parts) != 3:
        return None
    try:
        return SpiffeId.workload(parts[1], parts[2], parts[0])
    except IdentityError:
        return None


def _generation_of(path: Path) -> int | None:
    head = path.name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


class WorkloadCertManager:
    """Certificates of the local workload identities; a `nodeagent.certtypes.CertSource`."""

    def __init__(
        self,
        client: CertificateClient,
        config: CertConfig,
        registry: CollectorRegistry,
        *,
        trust_bundle_pem: bytes = b"",
        clock: Clock | None = None,
        jitter: Jitter | None = None,
    ) -> None:
        """``trust_bundle_pem``: anchors to serve before the control plane sends its own
        (the agent passes the anchor file it was given).  ``clock`` and ``jitter`` default
        to the system's; tests inject fakes."""
        self.config = config
        self._client = client
        self._clock: Clock = clock or SystemClock()
        self._jitter: Jitter = jitter or random.Random()
        self._slots: dict[SpiffeId, _Slot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._pruned = False
        self._guard: asyncio.Task[None] | None = None
        self._fatal: asyncio.Future[None] | None = None
        self._closed = False
        self._expiry = Gauge(
            "identity_cert_expiration_timestamp_seconds",
            "Expiry (Unix seconds) of the certificate served for a local workload identity",
            ["identity"],
            registry=registry,
        )
        self._refreshes = Counter(
            "identity_cert_refresh",
            "Workload certificate requests by result and code (refusal code, UNAVAILABLE, "
            "INVALID_RESPONSE, WRITE_FAILED, CLIENT_ERROR; OK on success)",
            ["result", "code"],
            registry=registry,
        )
        self._anchors_gauge = Gauge(
            "identity_trust_bundle_anchors",
            "Trust anchors currently served (2 during an anchor rotation)",
            registry=registry,
        )
        try:
            make_private_dir(config.cert_dir)
        except OSError as e:
            raise CertManagerError(
                f"cannot create the certificate directory {config.cert_dir}: {e.strerror}; "
                "point cert_dir at a writable tmpfs such as /run/weft/certs"
            ) from None
        warn_if_not_tmpfs(config.cert_dir, "certificate directory")
        self._anchors: tuple[x509.Certificate, ...] = ()
        self._bundle_pem = b""
        self._trust_generation = 0
        self._load_initial_bundle(trust_bundle_pem)

    # --- CertSource -----------------------------------------------------------------------

    def material(self, identity: SpiffeId) -> TlsMaterial | None:
        slot = self._slots.get(identity)
        mat = slot.material if slot else None
        # Checked here as well as by the refresher: never hand out an expired certificate,
        # even in the instant before the refresher wakes up to withdraw it.
        if mat is None or mat.not_after <= self._clock.now():
            return None
        return mat

    def trust_bundle_pem(self) -> bytes:
        return self._bundle_pem

    @property
    def trust_generation(self) -> int:
        return self._trust_generation

    # --- for the agent --------------------------------------------------------------------

    @property
    def trust_bundle_path(self) -> Path:
        return self.config.cert_dir / BUNDLE_FILE

    @property
    def identities(self) -> frozenset[SpiffeId]:
        return frozenset(self._slots)

    def set_identities(self, identities: Iterable[SpiffeId]) -> None:
        """The workload identities that have captured pods on this node, all of them.

        New identities get a certificate (reused from disk if still valid, else a new
        key and CSR); identities not in the set are dropped with their files.  The first
        call also removes directories of identities a previous run left behind, so make
        it with the complete set (after the pod source's first snapshot), not with an
        empty set at start-up.
        """
        wanted = set(identities)
        for identity in wanted:
            if identity.namespace is None:
                raise ValueError(f"{identity} is not a workload identity (/ns/<ns>/sa/<sa>)")
        for identity in sorted(set(self._slots) - wanted):
            self._drop(identity)
        for identity in sorted(wanted - set(self._slots)):
            slot = _Slot(identity, self.config.cert_dir / identity_dirname(identity))
            self._slots[identity] = slot
            self._adopt(slot)
            if self._guard is not None and not self._closed:
                self._spawn(slot)
        if not self._pruned:
            self._pruned = True
            self._prune_stale_dirs()

    def start(self) -> asyncio.Task[None]:
        """Start the refreshers; returns the guard task, which ends only with an error
        (`CertManagerError`) if a refresher dies.  Await it with the agent's other tasks."""
        if self._guard is not None or self._closed:
            raise RuntimeError("WorkloadCertManager.start() may be called once")
        loop = asyncio.get_running_loop()
        self._fatal = loop.create_future()
        self._guard = loop.create_task(self._supervise(), name="weft.certs")
        for slot in self._slots.values():
            self._spawn(slot)
        return self._guard

    async def close(self) -> None:
        """Stop all refreshers.  Files stay: the next agent run reuses valid ones."""
        self._closed = True
        tasks = list(self._tasks)
        if self._guard is not None:
            tasks.append(self._guard)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._fatal is not None and self._fatal.done() and not self._fatal.cancelled():
            self._fatal.exception()  # retrieved: it was logged when it happened

    def snapshot(self) -> dict[str, object]:
        """For ``/debug/state``: what is served and when it changes next."""
        now = self._clock.now()
        out: dict[str, object] = {}
        for identity, slot in sorted(self._slots.items()):
            mat = slot.material
            out[str(identity)] = {
                "generation": mat.generation if mat else None,
                "not_after": mat.not_after if mat else None,
                "valid": bool(mat and mat.not_after > now),
                "next_attempt_in": round(slot.next_attempt - now, 1)
                if slot.next_attempt is not None
                else None,
                "failures": slot.failures,
                "last_error": slot.last_error,
            }
        return {
            "identities": out,
            "trust_generation": self._trust_generation,
            "trust_anchors": [fingerprint(a) for a in self._anchors],
        }

    # --- tasks ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        assert self._fatal is not None
        await self._fatal  # raises when a refresher died; otherwise waits until cancelled

    def _spawn(self, slot: _Slot) -> None:
        task = asyncio.get_running_loop().create_task(
            self._maintain(slot), name=f"weft.certs.refresh {slot.identity}"
        )
        slot.task = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._refresher_done, slot))

    def _refresher_done(self, slot: _Slot, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        log.error(
            "identity %s: certificate refresher ended unexpectedly: %r; the agent must be "
            "restarted to keep certificates fresh",
            slot.identity, exc, exc_info=exc,
        )  # fmt: skip
        if self._fatal is not None and not self._fatal.done():
            err = CertManagerError(f"certificate refresher for {slot.identity} died: {exc!r}")
            err.__cause__ = exc
            self._fatal.set_exception(err)

    async def _maintain(self, slot: _Slot) -> None:
        delay = 0.0
        if slot.material is not None:  # adopted from a previous run
            delay = self._refresh_delay(slot.issued_at, slot.material.not_after)
        while True:
            await self._wait(slot, delay)
            delay = await self._renew(slot)

    async def _wait(self, slot: _Slot, delay: float) -> None:
        """Sleep ``delay`` seconds, withdrawing the certificate if it expires meanwhile.

        Sleeps in steps of at most ``max_sleep`` and re-reads the clock after each, so a
        wall-clock jump or a suspend is noticed within a step.
        """
        deadline = self._clock.now() + delay
        slot.next_attempt = deadline
        while True:
            now = self._clock.now()
            mat = slot.material
            if mat is not None and mat.not_after <= now:
                self._withdraw(slot)
                mat = None
            if now >= deadline:
                return
            step = min(deadline - now, self.config.max_sleep)
            if mat is not None:
                step = min(step, mat.not_after - now)
            await self._clock.sleep(step)

    # --- one renewal ----------------------------------------------------------------------

    async def _renew(self, slot: _Slot) -> float:
        """Request a certificate with a new key; install it. Returns seconds to the next
        attempt."""
        identity = slot.identity
        key = generate_key()  # here, on the node; only its CSR leaves the process
        try:
            resp = await self._client.request_certificate(identity, build_csr(key, identity))
            issued = check_issued(resp, identity, self._clock.now(), key)
        except RefusedError as e:
            return self._failed(slot, e.code.value, str(e), e.code)
        except InvalidResponse as e:
            return self._failed(slot, "INVALID_RESPONSE", str(e))
        except ControlPlaneUnavailable as e:
            return self._failed(slot, "UNAVAILABLE", str(e))
        except ControlPlaneError as e:
            return self._failed(slot, "CLIENT_ERROR", str(e))
        try:
            self._install(slot, key, issued)
        except OSError as e:
            return self._failed(
                slot, "WRITE_FAILED", f"cannot write the certificate under {slot.directory}: {e}"
            )
        self._refreshes.labels("success", "OK").inc()
        slot.failures, slot.last_error = 0, None
        delay = self._refresh_delay(slot.issued_at, issued.not_after)
        assert slot.material is not None
        log.info(
            "identity %s: certificate issued (generation %d, serial %x), valid until %s; "
            "renewal in %.0fs",
            identity, slot.material.generation, issued.leaf.serial_number,
            issued.leaf.not_valid_after_utc.isoformat(), delay,
        )  # fmt: skip
        return delay

    def _refresh_delay(self, issued_at: float, not_after: float) -> float:
        """Seconds until renewal: ``refresh_fraction`` (± jitter) of the lifetime.

        The lifetime counts from ``issued_at`` — the later of notBefore and when the
        certificate arrived — because the control plane backdates notBefore by a
        clock-skew allowance (5 min): with short certificates (a 60 s rotation test) that
        allowance would put the renewal point in the past at once and renew every second.
        """
        cfg = self.config
        lifetime = not_after - issued_at
        fraction = cfg.refresh_fraction + self._jitter.uniform(
            -cfg.refresh_jitter, cfg.refresh_jitter
        )
        now = self._clock.now()
        floor = min(cfg.backoff_base, max(not_after - now, 0.0) / 2)
        return max(issued_at + lifetime * fraction - now, floor)

    def _backoff(self, failures: int, base: float) -> float:
        cfg = self.config
        delay = min(cfg.backoff_cap, base * 2.0 ** min(failures - 1, 64))
        return delay * self._jitter.uniform(1.0 - cfg.backoff_jitter, 1.0)

    def _failed(
        self, slot: _Slot, code: str, error: str, refusal: RefusalCode | None = None
    ) -> float:
        cfg = self.config
        slot.failures += 1
        slot.last_error = f"{code}: {error}"
        self._refreshes.labels("failure", code).inc()
        if refusal == RefusalCode.NODE_NOT_BOUND:
            delay = self._backoff(slot.failures, cfg.not_bound_retry)
        elif refusal in _HOPELESS:
            delay = self._backoff(1, cfg.backoff_cap)
        else:
            delay = self._backoff(slot.failures, cfg.backoff_base)
        if refusal is not None:
            hint: str | None = _HINTS.get(refusal, _BUG_HINT)
        else:
            hint = _BUG_HINT if code == "INVALID_RESPONSE" else None
        now = self._clock.now()
        mat = slot.material
        if mat is not None and mat.not_after > now:
            serving = (
                f"still serving generation {mat.generation}, valid for another "
                f"{mat.not_after - now:.0f}s"
            )
        else:
            serving = "no valid certificate: tunnels for this workload fail until one is issued"
        transient = code == "UNAVAILABLE" or refusal == RefusalCode.NODE_NOT_BOUND
        log.log(
            logging.WARNING if transient else logging.ERROR,
            "identity %s: certificate request failed [%s]: %s%s; %s; retry in %.1fs",
            slot.identity, code, error, f" ({hint})" if hint else "", serving, delay,
        )  # fmt: skip
        return delay

    def _install(self, slot: _Slot, key: ec.EllipticCurvePrivateKey, issued: Issued) -> None:
        """Write the new generation's files, then switch to it (files first: a failure
        leaves the previous material in place)."""
        self._generation += 1
        generation = self._generation
        make_private_dir(slot.directory)
        key_path = slot.directory / f"{generation}.key.pem"
        chain_path = slot.directory / f"{generation}.chain.pem"
        try:
            write_private(key_path, key_pem(key))
            write_private(chain_path, issued.chain_pem, 0o644)
            self._set_bundle(issued.anchors)
        except OSError:
            for path in (key_path, chain_path):
                path.unlink(missing_ok=True)
            raise
        previous = slot.material
        slot.material = TlsMaterial(
            slot.identity, key_path, chain_path, issued.not_after, generation
        )
        slot.issued_at = max(issued.not_before, self._clock.now())
        self._expiry.labels(str(slot.identity)).set(issued.not_after)
        self._remove_files(slot, keep=(slot.material, previous))

    def _withdraw(self, slot: _Slot) -> None:
        mat = slot.material
        assert mat is not None
        log.error(
            "identity %s: certificate (generation %d) expired at %s and could not be "
            "renewed (last error: %s); withdrawn: tunnels for this workload fail until "
            "the control plane issues a new one",
            slot.identity, mat.generation, time.strftime("%Y-%m-%dT%H:%M:%SZ",
            time.gmtime(mat.not_after)), slot.last_error or "none",
        )  # fmt: skip
        slot.material = None
        self._remove_files(slot, keep=())

    # --- files ----------------------------------------------------------------------------

    def _remove_files(self, slot: _Slot, keep: Iterable[TlsMaterial | None]) -> None:
        """Remove key and chain files of this identity except those of ``keep``."""
        kept = {p for m in keep if m is not None for p in (m.key_path, m.chain_path)}
        try:
            paths = list(slot.directory.iterdir())
        except FileNotFoundError:
            return
        for path in paths:
            if path not in kept:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _adopt(self, slot: _Slot) -> None:
        """Serve a key and chain left by a previous run, if still good (see module doc)."""
        try:
            paths = sorted(slot.directory.iterdir())
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("identity %s: cannot read %s: %s", slot.identity, slot.directory, e)
            return
        generations = {g for p in paths if (g := _generation_of(p)) is not None}
        # New files must never reuse a name an older file has (or had) in this directory.
        self._generation = max(self._generation, *generations, 0)
        for generation in sorted(generations, reverse=True):
            key_path = slot.directory / f"{generation}.key.pem"
            chain_path = slot.directory / f"{generation}.chain.pem"
            issued = self._check_files(slot.identity, key_path, chain_path)
            if issued is not None:
                slot.material = TlsMaterial(
                    slot.identity, key_path, chain_path, issued.not_after, generation
                )
                # The chain file was written when the certificate arrived.
                received = chain_path.stat().st_mtime
                slot.issued_at = max(issued.not_before, min(received, self._clock.now()))
                self._expiry.labels(str(slot.identity)).set(issued.not_after)
                log.info(
                    "identity %s: reusing certificate generation %d from a previous run, "
                    "valid until %s",
                    slot.identity, generation, issued.leaf.not_valid_after_utc.isoformat(),
                )  # fmt: skip
                break
        self._remove_files(slot, keep=(slot.material,))

    def _check_files(self, identity: SpiffeId, key_path: Path, chain_path: Path) -> Issued | None:
        if not self._anchors:
            return None  # nothing to check the chain against
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certs = x509.load_pem_x509_certificates(chain_path.read_bytes())
        except (OSError, ValueError, TypeError):
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not certs:
            return None
        resp = CertificateResponse(
            certificate_pem=cert_pem(certs[0]).decode(),
            chain_pem=[cert_pem(c).decode() for c in certs[1:]],
            trust_bundle_pem=[cert_pem(a).decode() for a in self._anchors],
            not_after=certs[0].not_valid_after_utc.timestamp(),
        )
        try:
            return check_issued(resp, identity, self._clock.now(), key)
        except ControlPlaneError as e:
            log.info("identity %s: not reusing %s: %s", identity, chain_path.name, e)
            return None

    def _drop(self, identity: SpiffeId) -> None:
        slot = self._slots.pop(identity)
        if slot.task is not None:
            slot.task.cancel()  # close() awaits it if it is still winding down
        with contextlib.suppress(KeyError):
            self._expiry.remove(str(identity))
        try:
            shutil.rmtree(slot.directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("identity %s: cannot remove %s: %s", identity, slot.directory, e)
        log.info("identity %s: no local pod left; certificate and key removed", identity)

    def _prune_stale_dirs(self) -> None:
        try:
            entries = list(self.config.cert_dir.iterdir())
        except OSError:
            return
        for entry in entries:
            identity = _identity_of_dirname(entry.name)
            if identity is None or identity in self._slots or not entry.is_dir():
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log.info("identity %s: removed key material left by a previous run", identity)

    # --- trust bundle ---------------------------------------------------------------------

    def _load_initial_bundle(self, given: bytes) -> None:
        """Union of the given anchors and those a previous run saved: both are trusted
        until the control plane sends its current set, which then replaces them."""
        anchors: list[x509.Certificate] = []
        sources = [("the given trust bundle", given)]
        with contextlib.suppress(FileNotFoundError):
            sources.append((str(self.trust_bundle_path), self.trust_bundle_path.read_bytes()))
        for what, pem in sources:
            if not pem.strip():
                continue
            try:
                anchors += x509.load_pem_x509_certificates(pem)
            except ValueError as e:
                log.warning("ignoring %s: not PEM certificates (%s)", what, e)
        if anchors:
            try:
                self._set_bundle(tuple(anchors))
            except OSError as e:
                raise CertManagerError(
                    f"cannot write {self.trust_bundle_path}: {e.strerror}; point cert_dir at "
                    "a writable tmpfs such as /run/weft/certs"
                ) from None

    def _set_bundle(self, anchors: tuple[x509.Certificate, ...]) -> None:
        unique: dict[bytes, x509.Certificate] = {}
        for a in anchors:
            unique.setdefault(a.public_bytes(serialization.Encoding.DER), a)
        current = {a.public_bytes(serialization.Encoding.DER) for a in self._anchors}
        if set(unique) == current:
            return
        pem = b"".join(cert_pem(a) for a in unique.values())
        write_private(self.trust_bundle_path, pem, 0o644)
        old = {fingerprint(a) for a in self._anchors}
        new = {fingerprint(a) for a in unique.values()}
        self._anchors = tuple(unique.values())
        self._bundle_pem = pem
        self._trust_generation += 1
        self._anchors_gauge.set(len(self._anchors))
        log.info(
            "trust bundle generation %d: %d anchor(s) %s (added %s, removed %s)",
            self._trust_generation, len(new), ", ".join(sorted(new)),
            ", ".join(sorted(new - old)) or "none", ", ".join(sorted(old - new)) or "none",
        )  # fmt: skip
