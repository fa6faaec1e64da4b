"""Workload identity on the control plane: the CA and CSR signing (docs/identity.md).

* :mod:`.ca` — trust anchor → issuer → leaf: ``init_ca``, ``load_ca``, ``Issuer.sign_leaf``
* :mod:`.signer` — who gets which certificate, without I/O: ``Signer``, ``NodeBinding``,
  ``BootstrapTokens``
* :mod:`.lab` — the lab's node binding and bootstrap tokens
* :mod:`.server` — the TLS agent API (:15010), the admin port (:15014), ``run_controlplane``
* :mod:`.bench` — ``bench_signing``: CSRs signed per second on one core
"""
