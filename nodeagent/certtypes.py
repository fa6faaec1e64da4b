"""What the node proxy needs of workload certificates, independent of how they are got.

:mod:`nodeagent.certs` implements :class:`CertSource` (keys made on the node, CSRs signed
by the control plane); the tunnel (:mod:`nodeagent.proxy.tunnel`) only consumes it, and
tests plug in fixed material.  Python's ``ssl`` loads keys and certificates from files
only, so material is a pair of paths on a tmpfs (``/run``), the key file mode 0600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from weft.identity import SpiffeId


@dataclass(frozen=True)
class TlsMaterial:
    identity: SpiffeId
    key_path: Path
    """PEM PKCS#8 private key, mode 0600, on tmpfs; never logged, never sent."""
    chain_path: Path
    """PEM: the leaf first, then the intermediates up to (not including) the anchor."""
    not_after: float
    """The leaf's expiry, Unix seconds."""
    generation: int
    """Increases on every renewal: cache SSL contexts by (identity, generation)."""


class CertSource(Protocol):
    def material(self, identity: SpiffeId) -> TlsMaterial | None:
        """Current material for a local workload identity, None if there is none (yet)."""
        ...

    def trust_bundle_pem(self) -> bytes:
        """PEM trust anchors peers must chain to (two during an anchor rotation)."""
        ...

    @property
    def trust_generation(self) -> int:
        """Increases whenever the trust bundle changes."""
        ...
