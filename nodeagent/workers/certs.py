"""A worker's view of the node's workload certificates (`nodeagent.certtypes.CertSource`).

Keys never cross the channel.  The agent's certificate manager writes each identity's
key (mode 0600) and chain to per-generation files on a tmpfs; the agent tells its
workers which files serve which identity (`CertMessage`), and a worker's TLS contexts
load them from there, as the agent's own would.  A worker is told about workload
identities only: the node's bootstrap token and the node certificate's key (what the
control plane knows the node by) are never named to it, and it opens no control-plane
connection.  Workers run as the agent's user with ``PR_SET_DUMPABLE`` 0, so another
process of that user cannot ptrace them or read their memory through /proc.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.certtypes import CertSource, TlsMaterial
from weft.identity import SpiffeId


@dataclass(frozen=True)
class CertMessage:
    """What the agent sends when material or the trust bundle changes."""

    trust_pem: bytes
    trust_generation: int
    materials: tuple[TlsMaterial, ...]

    @classmethod
    def of(cls, source: CertSource, identities: frozenset[SpiffeId]) -> CertMessage:
        found = (source.material(i) for i in sorted(identities, key=str))
        return cls(
            source.trust_bundle_pem(),
            source.trust_generation,
            tuple(m for m in found if m is not None),
        )

    def encode(self) -> bytes:
        return json.dumps(
            {
                "trust_pem": self.trust_pem.decode(),
                "trust_generation": self.trust_generation,
                "materials": [
                    {
                        "identity": str(m.identity),
                        "key": str(m.key_path),
                        "chain": str(m.chain_path),
                        "not_after": m.not_after,
                        "generation": m.generation,
                    }
                    for m in self.materials
                ],
            }
        ).encode()

    @classmethod
    def decode(cls, body: bytes) -> CertMessage:
        obj: dict[str, Any] = json.loads(body)
        return cls(
            obj["trust_pem"].encode(),
            int(obj["trust_generation"]),
            tuple(
                TlsMaterial(
                    SpiffeId.parse(m["identity"]),
                    Path(m["key"]),
                    Path(m["chain"]),
                    float(m["not_after"]),
                    int(m["generation"]),
                )
                for m in obj["materials"]
            ),
        )


class SharedCerts:
    """`CertSource` for a worker, fed by `CertMessage`s."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._now = clock
        self._materials: dict[SpiffeId, TlsMaterial] = {}
        self._trust_pem = b""
        self._trust_generation = 0
        self.updates = 0

    def update(self, msg: CertMessage) -> None:
        self._materials = {m.identity: m for m in msg.materials}
        self._trust_pem = msg.trust_pem
        self._trust_generation = msg.trust_generation
        self.updates += 1

    def material(self, identity: SpiffeId) -> TlsMaterial | None:
        mat = self._materials.get(identity)
        if mat is None or mat.not_after <= self._now():
            return None  # never an expired certificate, even before the agent's update
        return mat

    def trust_bundle_pem(self) -> bytes:
        return self._trust_pem

    @property
    def trust_generation(self) -> int:
        return self._trust_generation

    @property
    def identities(self) -> frozenset[SpiffeId]:
        return frozenset(self._materials)

    def snapshot(self) -> dict[str, object]:
        return {
            "identities": {
                str(i): {"generation": m.generation, "not_after": m.not_after}
                for i, m in sorted(self._materials.items(), key=lambda kv: str(kv[0]))
            },
            "trust_generation": self._trust_generation,
            "updates": self.updates,
        }
