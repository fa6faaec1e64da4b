"""Address and name planning for the lab — pure data, no I/O.

The lab lays out a small cluster inside network namespaces.  Every address below lives
only inside namespaces the lab creates, so the plan can reuse well-known private ranges
without touching the host's routing:

======================  ===========================  =====================================
what                    range                        example
======================  ===========================  =====================================
node network (fabric)   10.240.0.0/24                node-1 = 10.240.0.11, node-2 = .12
pod network             10.244.0.0/16, /24 per node  node-1 pods 10.244.1.0/24, gw .1
service VIPs            10.96.0.0/16                 service ``echo`` = 10.96.0.10
======================  ===========================  =====================================

Nodes are joined by a Linux bridge in a ``<lab>-fabric`` namespace (pure L2, no address),
like machines on one switch.  Inside each node namespace a bridge ``cni0`` carries the
node's pod subnet, as the kubenet/bridge CNI does; nodes route to each other's pod subnets
through their fabric address.  Service VIPs are not routed anywhere: the mesh resolves them.

Pods are numbered per workload across nodes round-robin (``echo-1`` on node-1, ``echo-2`` on
node-2, ...) so that "at least one replica per node" holds for any replica count >= nodes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from weft import mesh
from weft.mesh import InboundMode, inbound_mode, is_captured

NODE_CIDR = ipaddress.IPv4Network("10.240.0.0/24")
POD_CIDR = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")
CONTROLPLANE_IP = str(NODE_CIDR.network_address + 2)
"""The lab's control plane host (namespace ``<lab>-cp``) on the fabric."""
NODE_HOST_OFFSET = 10
"""node-i gets host number 10+i on the fabric: low numbers stay free for future gateways."""
MAX_NODES = 200
MAX_PODS_PER_NODE = 250
"""A /24 per node minus network, gateway (.1) and broadcast leaves 253 pod addresses."""

# The lab's pods carry what Kubernetes pods would carry as a label or an annotation.
CAPTURE_LABEL = mesh.CAPTURE_LABEL
INBOUND_MODE_LABEL = mesh.INBOUND_MODE_KEY
"""``strict`` or ``permissive`` (the default); see `weft.mesh.inbound_mode`."""
TRUST_DOMAIN = "cluster.local"
ECHO_PORT = 8080
ECHO_GRPC_PORT = 9090
"""The echo pods' gRPC port (service port 9090 too)."""
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class PlanError(ValueError):
    """The requested lab shape cannot be laid out."""


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    ip: str
    pod_cidr: str
    gateway: str


@dataclass(frozen=True)
class ContainerPlan:
    """One container of a pod made from a Deployment (``weft lab apply -f``): the lab runs
    no images, so a container is its ``command`` + ``args`` run as a process inside the
    pod's namespaces and cgroup, with ``env`` already resolved for this pod."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    ports: tuple[int, ...] = ()
    """TCP ``containerPort``s: the lab waits for them to accept before it says started."""


@dataclass(frozen=True)
class PodPlan:
    name: str
    node: str
    ip: str
    namespace: str
    service_account: str
    labels: dict[str, str]
    app: str | None
    """Which demo program runs in the pod (``echo``), or None for an idle pod or one whose
    ``containers`` say what runs."""
    ports: tuple[int, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    containers: tuple[ContainerPlan, ...] = ()
    owner: str | None = None
    """``Deployment <namespace>/<name>`` for a pod ``weft lab apply -f`` made."""

    @property
    def inbound_mode(self) -> InboundMode:
        """What the mesh enforces for this pod (`weft.mesh.inbound_mode` decides, for the
        lab's status and for the agents alike: any value but ``permissive`` is strict)."""
        return inbound_mode(self.annotations, self.labels)

    @property
    def strict(self) -> bool:
        """Strict inbound mode: only the node proxy (and node address) may connect in."""
        return self.inbound_mode is InboundMode.STRICT


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = "http"
    protocol: str = "TCP"


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    selector: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    """What a Kubernetes Service's annotations carry (retries, timeouts: `weft.traffic`);
    set with ``weft lab annotate``."""

    def fqdn(self, trust_domain: str = TRUST_DOMAIN) -> str:
        return f"{self.name}.{self.namespace}.svc.{trust_domain}"


@dataclass(frozen=True)
class LabPlan:
    name: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    """Namespace labels (``weft.io/capture``) by name."""
    namespace_annotations: dict[str, dict[str, str]] = field(default_factory=dict)
    """Namespace annotations (``weft.io/default-inbound-policy``) by name."""

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def netns(self, thing: str) -> str:
        return netns_name(self.name, thing)

    def captured(self, pod: PodPlan) -> bool:
        """Whether the mesh captures ``pod``: its own label, else its namespace's
        (`weft.mesh.is_captured` decides, as it does for discovery)."""
        return is_captured(pod.labels, self.namespaces.get(pod.namespace, {}))


def netns_name(lab: str, thing: str) -> str:
    """Network namespace name of a lab node, pod or the fabric.

    Lab names are ``[a-z][a-z0-9]*`` (no dash), so the prefix ``<lab>-`` identifies one
    lab's namespaces unambiguously — ``down`` relies on it after a crash.
    """
    return f"{lab}-{thing}"


def validate_lab_name(name: str) -> str:
    if not LAB_NAME_RE.match(name):
        raise PlanError(
            f"invalid lab name {name!r}: use 1-12 lowercase letters/digits, starting with a letter"
        )
    return name


def node_plan(index: int) -> NodePlan:
    if not 1 <= index <= MAX_NODES:
        raise PlanError(f"node index {index} out of range 1..{MAX_NODES}")
    subnet = ipaddress.IPv4Network((int(POD_CIDR.network_address) + (index << 8), 24))
    return NodePlan(
        name=f"node-{index}",
        index=index,
        ip=str(NODE_CIDR.network_address + NODE_HOST_OFFSET + index),
        pod_cidr=str(subnet),
        gateway=str(subnet.network_address + 1),
    )


def plan_lab(
    name: str = "weft",
    nodes: int = 2,
    pods_per_node: int | None = None,
    demo: bool = False,
) -> LabPlan:
    """Lay out a lab.

    With ``demo``, ``pods_per_node`` is the number of echo replicas per node (default 1) and
    each node also gets one ``client-i`` pod; these carry the capture label.  ``plain-1``
    on node-1 is an uncaptured client.
    Without ``demo`` it is the number of idle, uncaptured pods ``pod-1..`` per node
    (default 0) — a bare network to experiment on.
    """
    validate_lab_name(name)
    if not 1 <= nodes <= MAX_NODES:
        raise PlanError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    per_node = pods_per_node if pods_per_node is not None else (1 if demo else 0)
    if per_node < 0:
        raise PlanError(f"--pods-per-node must be >= 0, got {per_node}")
    total_per_node = per_node + (1 if demo else 0)
    if total_per_node > MAX_PODS_PER_NODE:
        raise PlanError(
            f"{total_per_node} pods per node exceed the /24 pod subnet ({MAX_PODS_PER_NODE} max)"
        )
    node_plans = tuple(node_plan(i) for i in range(1, nodes + 1))
    next_host = {n.name: 2 for n in node_plans}  # .1 is the node's cni0 gateway

    def pod_ip(node: NodePlan) -> str:
        host = next_host[node.name]
        next_host[node.name] = host + 1
        return str(ipaddress.IPv4Network(node.pod_cidr).network_address + host)

    pods: list[PodPlan] = []
    services: list[ServicePlan] = []

    def add(name: str, node: NodePlan, sa: str, labels: dict[str, str], app: str | None) -> None:
        ports = (ECHO_PORT, ECHO_GRPC_PORT) if app == "echo" else ()
        pods.append(PodPlan(name, node.name, pod_ip(node), "default", sa, labels, app, ports))

    if demo:
        captured = {CAPTURE_LABEL: "enabled"}
        for k in range(per_node * nodes):
            add(f"echo-{k + 1}", node_plans[k % nodes], "echo", {"app": "echo", **captured}, "echo")
        for node in node_plans:
            add(f"client-{node.index}", node, "client", {"app": "client", **captured}, None)
        # An uncaptured client, to show (and test) the difference capture makes.
        add("plain-1", node_plans[0], "plain", {"app": "plain"}, None)
        services.append(
            ServicePlan(
                name="echo",
                namespace="default",
                vip=str(SERVICE_CIDR.network_address + 10),
                ports=(
                    ServicePort(port=80, target_port=ECHO_PORT),
                    ServicePort(port=ECHO_GRPC_PORT, target_port=ECHO_GRPC_PORT, name="grpc"),
                ),
                selector={"app": "echo"},
            )
        )
    else:
        for k in range(per_node * nodes):
            add(f"pod-{k + 1}", node_plans[k % nodes], "default", {"app": "idle"}, None)
    return LabPlan(
        name=name,
        nodes=node_plans,
        pods=tuple(pods),
        services=tuple(services),
        namespaces={"default": {}},
    )


def endpoints(plan_pods: tuple[PodPlan, ...], service: ServicePlan) -> list[PodPlan]:
    """Pods selected by a service, in a stable order (the lab has no readiness yet)."""
    return [
        p
        for p in plan_pods
        if p.namespace == service.namespace
        and all(p.labels.get(k) == v for k, v in service.selector.items())
    ]


def free_pod_ip(node: NodePlan, taken: set[str]) -> str:
    """The lowest pod address of ``node`` that is not in ``taken`` (.1 is the gateway)."""
    net = ipaddress.IPv4Network(node.pod_cidr)
    for host in range(2, 2 + MAX_PODS_PER_NODE):
        ip = str(net.network_address + host)
        if ip not in taken:
            return ip
    raise PlanError(f"{node.name} has no free pod address ({MAX_PODS_PER_NODE} pods max)")


def hosts_file(plan: LabPlan, pod: PodPlan) -> str:
    """The /etc/hosts a pod sees: itself, every service (short and cluster names), every pod."""
    lines = [
        "# written by weft lab; bind-mounted over /etc/hosts inside the pod",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod.ip}\t{pod.name}",
        "# services",
    ]
    for svc in plan.services:
        names = [
            svc.name,
            f"{svc.name}.{svc.namespace}",
            f"{svc.name}.{svc.namespace}.svc",
            svc.fqdn(),
        ]
        lines.append(f"{svc.vip}\t{' '.join(names)}")
    lines.append("# pods")
    lines.extend(f"{p.ip}\t{p.name}" for p in plan.pods if p.name != pod.name)
    lines.append("# nodes")
    lines.extend(f"{n.ip}\t{n.name}" for n in plan.nodes)
    return "\n".join(lines) + "\n"
