"""The mesh's shared vocabulary: workloads, services, endpoints and their changes.

Immutable values that the control plane's discovery produces and the node agent
consumes, so both sides import them from here (neither may import the other).  The
versioned store that numbers changes lives in :mod:`controlplane.discovery.model`; the
wire encoding of these values on the agent stream is :mod:`weft.meshwire`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from weft.identity import SpiffeId
from weft.policy import MESH_DEFAULT, DefaultPolicy, Policy, refuses_plaintext, restricts_plaintext
from weft.routes import Route
from weft.traffic import DEFAULT as DEFAULT_TRAFFIC
from weft.traffic import TrafficPolicy

log = logging.getLogger("weft.discovery")

CAPTURE_LABEL = "weft.io/capture"
"""``enabled`` on a namespace or pod captures it; ``disabled`` on a pod opts it out."""
INBOUND_MODE_KEY = "weft.io/inbound-mode"
"""Pod annotation (Kubernetes) or label (the lab): ``strict`` or ``permissive``."""
OPAQUE_PORTS_KEY = "weft.io/opaque-ports"
"""Service or pod annotation: ports (``25,2525,8000-8010``) whose connections are opaque
TCP, without protocol detection (server-first or binary protocols). Linkerd's
``config.linkerd.io/opaque-ports`` is read too, so existing annotations carry over."""
LINKERD_OPAQUE_PORTS_KEY = "config.linkerd.io/opaque-ports"
MAX_OPAQUE_PORTS = 1024
CAPTURE_ENABLED = "enabled"
CAPTURE_DISABLED = "disabled"
MODE_KEY = "weft.io/mode"
"""Pod annotation (Kubernetes) or label (the lab): ``sidecar`` runs the pod's proxy
inside it (`weft inject`, docs/kubernetes.md "Sidecar mode") instead of its node's."""
SIDECAR_MODE = "sidecar"
SIDECAR_TUNNEL_PORT = 15008
"""The port a sidecar-mode pod declares (``weft-tunnel``) and serves its own tunnel on."""


class InboundMode(StrEnum):
    STRICT = "strict"
    """Only the node proxy (and the node address, for kubelet probes) may connect in."""
    PERMISSIVE = "permissive"
    """Plaintext from uncaptured clients is still accepted."""


def is_captured(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """Capture is inherited from the namespace unless the pod says otherwise.

    The pod's own label wins both ways: ``enabled`` captures it in any namespace,
    ``disabled`` opts it out of a captured namespace.  Any other pod value (or none)
    defers to the namespace, where only ``enabled`` counts.
    """
    own = pod_labels.get(CAPTURE_LABEL)
    if own == CAPTURE_ENABLED:
        return True
    if own == CAPTURE_DISABLED:
        return False
    return namespace_labels.get(CAPTURE_LABEL) == CAPTURE_ENABLED


def inbound_mode(annotations: Mapping[str, str], labels: Mapping[str, str]) -> InboundMode:
    """The pod's inbound mode: annotation first (Kubernetes), then label (the lab).

    Unset means permissive.  A value that is neither ``strict`` nor ``permissive`` (a typo,
    ``Strict``) is taken as strict: the operator asked for *something*, and failing closed
    on a security setting is the reversible mistake — a refused connection shows up at
    once, silently accepted plaintext does not.
    """
    value = annotations.get(INBOUND_MODE_KEY, labels.get(INBOUND_MODE_KEY))
    if value is None or value == InboundMode.PERMISSIVE:
        return InboundMode.PERMISSIVE
    if value != InboundMode.STRICT:
        log.debug("unknown %s value %r: treating it as strict", INBOUND_MODE_KEY, value)
    return InboundMode.STRICT


def enforced_inbound_mode(
    mode: InboundMode, default: DefaultPolicy, explicit: bool, policies: Iterable[Policy] = ()
) -> InboundMode:
    """The inbound mode the mesh enforces for a pod: its own, made strict when a default
    inbound policy set explicitly (`weft.policy.workload_default`) refuses plaintext, or
    when its policies would deny some plaintext caller (`weft.policy.restricts_plaintext`)
    — plaintext would otherwise reach a permissive pod without passing the proxy."""
    if explicit and refuses_plaintext(default):
        return InboundMode.STRICT
    if mode is not InboundMode.STRICT and restricts_plaintext(policies):
        return InboundMode.STRICT
    return mode


def open_to_plaintext(mode: InboundMode, default: DefaultPolicy, explicit: bool) -> bool:
    """Whether a pod would take plaintext but for its policies: its own inbound mode is
    permissive and no default set explicitly refuses plaintext (`Workload`)."""
    return mode is not InboundMode.STRICT and not (explicit and refuses_plaintext(default))


def opaque_ports(annotations: Mapping[str, str]) -> tuple[int, ...]:
    """The ports an object's ``weft.io/opaque-ports`` (or Linkerd's) annotation lists,
    sorted. Entries that are not a port or a ``low-high`` range are skipped with a log
    line: a typo must not stop the object from being served, it just stays detected."""
    value = annotations.get(OPAQUE_PORTS_KEY, annotations.get(LINKERD_OPAQUE_PORTS_KEY))
    if not value:
        return ()
    ports: set[int] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        low, sep, high = item.partition("-")
        try:
            a, b = int(low), int(high if sep else low)
        except ValueError:
            log.warning("%s: %r is not a port or a range; ignored", OPAQUE_PORTS_KEY, item)
            continue
        if not 1 <= a <= b <= 65535 or b - a + len(ports) > MAX_OPAQUE_PORTS:
            log.warning("%s: %r is out of range (or too many ports); ignored",
                        OPAQUE_PORTS_KEY, item)  # fmt: skip
            continue
        ports.update(range(a, b + 1))
    return tuple(sorted(ports))


@dataclass(frozen=True, slots=True)
class WorkloadPort:
    """A port a workload's containers declare (informational: capture is by address)."""

    port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod, as the mesh sees it."""

    uid: str
    """Kubernetes pod UID (lab: ``lab/<lab>/<namespace>/<pod>``); the store key."""
    name: str
    namespace: str
    node: str
    ips: tuple[str, ...]
    """Pod addresses, primary first (``status.podIPs``); empty until the pod has one."""
    service_account: str
    identity: SpiffeId
    captured: bool
    inbound_mode: InboundMode
    ports: tuple[WorkloadPort, ...] = ()
    ready: bool = True
    """The pod's Ready condition.  Traffic routing uses endpoint readiness instead; this
    is for agents' views of their local pods."""
    node_ip: str = ""
    """The node's address (``status.hostIP``): where its agent's tunnel listens; empty
    until the pod is scheduled and the kubelet has reported it."""
    opaque_ports: tuple[int, ...] = ()
    """Ports of this pod served as opaque TCP (``weft.io/opaque-ports``)."""
    default_policy: DefaultPolicy = MESH_DEFAULT
    """What decides for callers no ALLOW policy names (``weft.io/default-inbound-policy``
    of the pod, else its namespace, else the mesh's; `weft.policy`)."""
    policies: tuple[Policy, ...] = ()
    """The AuthorizationPolicies that apply to it, by name (the control plane selects
    them: `weft.policy.applicable`)."""
    open_to_plaintext: bool = False
    """It would accept plaintext but for its policies (`open_to_plaintext`): strict only
    so that they are not bypassed, so plaintext no policy denies still passes its eBPF
    filter (`weft.policy.plaintext`)."""

    @property
    def key(self) -> str:
        return self.uid

    @property
    def strict(self) -> bool:
        return self.inbound_mode is InboundMode.STRICT

    @property
    def sidecar(self) -> bool:
        """Its proxy runs inside it (sidecar mode): it declares the tunnel port, which
        ``weft inject`` adds to the sidecar container (the lab: to the pod's ports).  The
        declared ports are what discovery already carries, so this needs no new field on
        the wire; its node's agent then leaves it alone and peers tunnel to the pod's
        own address."""
        return any(p.port == SIDECAR_TUNNEL_PORT for p in self.ports)


def sidecar_mode(meta: Mapping[str, str]) -> bool:
    """Whether a pod's annotations (or the lab's labels) ask for sidecar mode."""
    return meta.get(MODE_KEY) == SIDECAR_MODE


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    """The port clients connect to on the service VIP."""
    target_port: int | str
    """A number, or a container port *name* resolved per endpoint (see
    :attr:`Endpoint.target_ports`) — Kubernetes allows pods behind one service to map a
    named port to different numbers."""
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    workload_uid: str | None
    """The pod behind the address (its identity is the workload's), or None for
    endpoints that are not pods (manually managed EndpointSlices)."""
    ready: bool = True
    target_ports: tuple[tuple[str, int], ...] = ()
    """Resolved numbers for service ports whose ``target_port`` is a name, as
    ``(service port name, number)``; empty when every target port is numeric."""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    vips: tuple[str, ...]
    """Cluster IPs; empty for a headless service."""
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    """Sorted by address, so the same endpoint set always compares equal."""
    opaque_ports: tuple[int, ...] = ()
    """Service ports served as opaque TCP (``weft.io/opaque-ports``)."""
    traffic: TrafficPolicy = DEFAULT_TRAFFIC
    """Retries and timeouts of its HTTP requests (`weft.traffic`, from annotations)."""
    routes: tuple[Route, ...] = ()
    """Gateway API routes attached to it (GAMMA ``parentRefs``), sorted by key."""

    @property
    def key(self) -> str:
        return service_key(self.namespace, self.name)

    def target_port(self, endpoint: Endpoint, port: ServicePort) -> int | None:
        """The port to dial on ``endpoint`` for ``port``; None if it does not serve it."""
        if isinstance(port.target_port, int):
            return port.target_port
        for name, number in endpoint.target_ports:
            if name == port.name:
                return number
        return None


def service_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


class Kind(StrEnum):
    WORKLOAD = "workload"
    SERVICE = "service"


Item = Workload | Service


def kind_of(item: Item) -> Kind:
    return Kind.WORKLOAD if isinstance(item, Workload) else Kind.SERVICE


@dataclass(frozen=True, slots=True)
class Delta:
    """One change: ``value`` is the new object, or None when ``key`` was deleted."""

    revision: int
    kind: Kind
    key: str
    value: Item | None

    @property
    def deleted(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class Snapshot:
    """The whole state at one revision.  Read-only views; never mutated afterwards."""

    epoch: str
    revision: int
    workloads: Mapping[str, Workload]
    services: Mapping[str, Service]
