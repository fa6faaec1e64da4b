"""Discovery: which workloads and services exist, as versioned state for the agents.

* :mod:`controlplane.discovery.model` — the immutable model and :class:`DiscoveryStore`.
* :mod:`controlplane.discovery.lab` — the lab registry source (the lab's state file).
* :mod:`controlplane.discovery.kube` — the Kubernetes source (list + watch).  Not imported
  here: it pulls in the ``kubernetes`` client (seconds of import time), which a lab control
  plane never needs, and it is the only module allowed to import it.

A source is anything with ``async def run()`` that feeds a store until cancelled; the
control plane runs exactly one, as a named task whose unexpected end stops the process.
"""

from __future__ import annotations

from typing import Protocol

from controlplane.discovery.model import (
    CAPTURE_LABEL,
    INBOUND_MODE_KEY,
    Delta,
    DiscoveryStore,
    Endpoint,
    InboundMode,
    Kind,
    Service,
    ServicePort,
    Snapshot,
    Workload,
    WorkloadPort,
    inbound_mode,
    is_captured,
    service_key,
)


class Source(Protocol):
    async def run(self) -> None:
        """Feed the store until cancelled; return or raise only on a fatal error."""
        ...


__all__ = [
    "CAPTURE_LABEL",
    "INBOUND_MODE_KEY",
    "Delta",
    "DiscoveryStore",
    "Endpoint",
    "InboundMode",
    "Kind",
    "Service",
    "ServicePort",
    "Snapshot",
    "Source",
    "Workload",
    "WorkloadPort",
    "inbound_mode",
    "is_captured",
    "service_key",
]
