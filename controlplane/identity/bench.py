"""How many CSRs the control plane signs per second on one core.

Measured with the real :class:`~.signer.Signer` — PEM CSR parse, P-256 and signature
checks, identity and SAN checks, node binding lookup, leaf signing, PEM encoding of the
response, the audit line (formatted and written, to /dev/null) and the metrics — on
CSRs made beforehand, so key generation on the "node" side is not counted.  The process
is pinned to one CPU for the run, so the figure is per core whatever the machine has.

Also reported: the pure signing rate (:meth:`~.ca.Issuer.sign_leaf` on an already
parsed CSR), to show how much of the cost is checks versus the signature itself.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from typing import Any

import cryptography
from cryptography import x509

from controlplane.identity.ca import init_ca, validate_ca
from controlplane.identity.signer import Signer
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, key_pem
from weft.wire import CertificateRequest, CertificateResponse

_TRUST_DOMAIN = "cluster.local"
_NODE = "node-1"


class _StaticBinding:
    def __init__(self, ids: set[SpiffeId]) -> None:
        self.ids = ids

    def identities_on(self, node: str) -> set[SpiffeId]:
        return self.ids if node == _NODE else set()


class _NoTokens:
    def node_for(self, token: str) -> str | None:
        return None


def _pin_one_cpu() -> set[int] | None:
    """Pin to the CPU we run on; returns the old affinity to restore (None if unpinnable)."""
    try:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(old)})
    except (AttributeError, OSError):
        return None
    return old


def bench_signing(n: int = 2000) -> dict[str, Any]:
    """Sign ``n`` workload CSRs through the Signer, then ``n`` through the bare issuer."""
    bundle = init_ca(_TRUST_DOMAIN)
    issuer = validate_ca(
        cert_pem(bundle.anchor), cert_pem(bundle.issuer), key_pem(bundle.issuer_key)
    )
    # A realistic binding: a few dozen identities on the node, each asked for in turn.
    ids = [SpiffeId.workload(f"ns-{i % 8}", f"sa-{i}", _TRUST_DOMAIN) for i in range(32)]
    signer = Signer(issuer, _StaticBinding(set(ids)), _NoTokens(), _TRUST_DOMAIN)
    requests = []
    for i in range(n):
        identity = ids[i % len(ids)]
        requests.append(
            CertificateRequest(str(identity), build_csr(generate_key(), identity).decode())
        )
    parsed = [x509.load_pem_x509_csr(r.csr_pem.encode()) for r in requests]

    audit = logging.getLogger("weft.audit")
    saved = (audit.handlers[:], audit.level, audit.propagate)
    devnull = open(os.devnull, "w")  # noqa: SIM115 — closed in finally
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    audit.handlers, audit.level, audit.propagate = [handler], logging.INFO, False
    old_affinity = _pin_one_cpu()
    try:
        latencies = []
        t0 = time.perf_counter()
        for req in requests:
            s = time.perf_counter()
            result = signer.certificate(_NODE, req)
            result.encode()  # the bytes that go on the wire
            latencies.append(time.perf_counter() - s)
        full = time.perf_counter() - t0
        if not isinstance(result, CertificateResponse):
            raise RuntimeError(f"benchmark request was refused: {result}")

        t0 = time.perf_counter()
        for csr, req in zip(parsed, requests, strict=True):
            issuer.sign_leaf(csr, SpiffeId.parse(req.identity))
        pure = time.perf_counter() - t0
    finally:
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)
        audit.handlers, audit.level, audit.propagate = saved
        devnull.close()

    latencies.sort()
    return {
        "n": n,
        "csr_per_second": round(n / full),
        "sign_only_per_second": round(n / pure),
        "latency_us": {
            "p50": round(statistics.median(latencies) * 1e6),
            "p99": round(latencies[int(0.99 * (n - 1))] * 1e6),
        },
        "target_per_second": 2000,
        "pinned_to_one_cpu": old_affinity is not None,
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_signing(), indent=2))
