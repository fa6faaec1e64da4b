"""The Kubernetes source: list, then watch, Pods, Services, EndpointSlices and Namespaces,
and the optional custom resources (Gateway API HTTPRoutes and GRPCRoutes, Weft's
AuthorizationPolicies), whose status it writes back.

Shape (STYLE §6, after kopf's ``_cogs/clients/watching.py`` and client-go's reflector):
for each resource, list (paged) and remember the list's ``resourceVersion``; watch from it
with bookmarks and a server-side ``timeoutSeconds``; every event — bookmarks included —
advances the resourceVersion, so a reconnect resumes exactly where the last one stopped.
A ``410 Gone`` (an ``ERROR`` event with code 410, or an HTTP 410) means the server no
longer has history that old: relist, and diff the new list against what we hold, so
objects deleted meanwhile disappear (no phantoms) and new ones appear (none missed).
Connection errors and other API errors reconnect with exponential backoff and jitter
(a 429 or 503 waits at least its ``Retry-After``, which urllib3 is told not to sleep
away unseen; a 403 names the verb and resource, and keeps the last listed state, also
of a custom resource that was listed before); no bytes for ``inactivity_timeout`` (the
API server sends each watcher a bookmark about once a minute) means the connection is
dead, and is handled the same way.

**Threads, not an async client.**  The official ``kubernetes`` client is synchronous
(urllib3).  The alternatives were ``kubernetes_asyncio`` (a different, unofficial
package) or a hand-rolled HTTP client (loses the client's auth, TLS and proxy handling).
So the blocking calls run in threads, and everything else stays on the event loop:

* The state machine (list → watch → relist/backoff), the translation into the model and
  the store live on the loop, in one task per resource.  Cancellation, task names and the
  guard (a :class:`asyncio.TaskGroup`: one watcher dying takes the source down, loudly)
  work as for any other task, and nothing here needs a lock.
* Each resource gets its *own* single-thread executor (threads ``weft-kube-<resource>``).
  Four watches block for minutes at a time; in the loop's default executor they would
  starve every other ``to_thread`` user on a small machine.  One thread per resource also
  serialises that resource's calls, so "close this response" always runs after the read
  that was in flight.
* The thread reads one chunk of the watch stream per hop and parses it (JSON and the few
  fields Weft uses) before handing it over, so the loop never parses megabytes, and the
  server's stream is read only as fast as the loop consumes it: backpressure without a
  queue to bound.  Watch *events* are handed over in order per resource; since applying
  one is synchronous, that is the "one ordered queue per object" of STYLE §6 without
  queues.
* The inactivity timeout is the socket's read timeout (urllib3 ``read=``): it catches a
  half-open TCP connection even while the thread is blocked in ``recv``.  On cancellation
  the loop shuts the socket down (what ``Watch.stop()`` does), which unblocks the thread.

**Raw JSON, not ``kubernetes.watch.Watch`` and model objects.**  Responses are requested
with ``_preload_content=False`` and parsed as plain JSON: deserialising 10,000 Pods into
the client's models costs seconds and memory for fields Weft never reads, and only a few
fields per object are kept (:class:`PodFacts` etc.), never the objects themselves — at
10,000 pods that is the difference between a few MB and hundreds.  ``Watch`` itself was
not used because it deserialises by default, its ``deserialize=False`` mode fails on
``ERROR`` events (it reads ``event['raw_object']``, which only the deserialising path
sets), and it answers a 410 by re-watching once from the same expired version.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.discovery.model import (
    CAPTURE_LABEL,
    DiscoveryStore,
    Endpoint,
    InboundMode,
    Item,
    Kind,
    Service,
    ServicePort,
    Workload,
    WorkloadPort,
    inbound_mode,
    is_captured,
    opaque_ports,
    service_key,
)
from controlplane.discovery.routestatus import (
    CONTROLLER_NAME,
    Judge,
    StatusCondition,
    StatusObject,
    StatusPlanner,
    StatusWrite,
    WriteOutcome,
    conditions_judgement,
    route_judgement,
)
from weft.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from weft.mesh import enforced_inbound_mode, open_to_plaintext
from weft.policy import API_VERSION as POLICY_API_VERSION
from weft.policy import (
    DEFAULT_POLICY_KEY,
    DefaultPolicy,
    Policy,
    PolicyError,
    applicable,
    parse_policy,
    workload_default,
)
from weft.policy import GROUP as POLICY_GROUP
from weft.policy import KIND as POLICY_KIND
from weft.policy import VERSION as POLICY_VERSION
from weft.routes import GROUP as ROUTE_GROUP
from weft.routes import Route, RouteError, backend_services, parse_route
from weft.traffic import LastValid, traffic_keys

log = logging.getLogger("weft.discovery.kube")

JSON = dict[str, Any]
T = TypeVar("T")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""Set by the EndpointSlice controller: which Service a slice belongs to."""
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
IN_CLUSTER_CA = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
_MIN_WATCH_SECONDS = 1.0
"""A watch that ends cleanly sooner than this without one event counts as a failure:
otherwise a proxy that closes streams at once would have us reconnect in a hot loop."""


class KubeConfigError(ValueError):
    """The Kubernetes source is misconfigured; the text says which setting."""


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class KubeConfig:
    """How to reach the API server and how patiently to watch it."""

    server: str
    """API server URL, e.g. ``https://10.96.0.1:443``."""
    token_file: Path | None = None
    """Bearer token file, re-read when it changes (projected tokens rotate)."""
    token: str | None = None
    """A fixed bearer token, for tests and kubeconfig-less setups; ``token_file`` wins."""
    ca_file: Path | None = None
    """CA bundle that signs the API server's certificate; None: the system store."""
    verify_tls: bool = True
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    """Trust domain of the workload SPIFFE IDs built from namespace + service account."""
    page_size: int = 500
    """List page size (``limit``), as client-go's pager: bounds one response's size."""
    watch_timeout: float = 300.0
    """Server-side ``timeoutSeconds``, randomised up to twice this (as client-go does) so
    replicas do not reconnect in step."""
    inactivity_timeout: float = 120.0
    """No bytes for this long on a watch or list means the connection is dead."""
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    """First reconnect delay after an error; doubles per consecutive error, jittered."""
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if not self.server.startswith(("http://", "https://")):
            raise KubeConfigError(f"server must be an http(s) URL, got {self.server!r}")
        for name in ("watch_timeout", "inactivity_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise KubeConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.page_size < 1:
            raise KubeConfigError(f"page_size must be >= 1, got {self.page_size}")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise KubeConfigError(
                f"need 0 < backoff_initial <= backoff_max, got {self.backoff_initial} and "
                f"{self.backoff_max}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> KubeConfig:
        """Parse from string settings (``server``, ``token_file``, ``ca_file``, ...).

        Without ``server``, the in-cluster defaults apply: the API server from
        ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the pod's service account token and CA.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known - {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
        if unknown:
            raise KubeConfigError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        server = values.get("server")
        in_cluster = server is None
        if in_cluster:
            host = values.get("KUBERNETES_SERVICE_HOST")
            if not host:
                raise KubeConfigError(
                    "no API server: set `server`, or run in a pod (KUBERNETES_SERVICE_HOST)"
                )
            port = values.get("KUBERNETES_SERVICE_PORT", "443")
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        assert server is not None

        def path(name: str, default: Path | None) -> Path | None:
            value = values.get(name)
            return Path(value) if value else default

        def number(name: str, default: float) -> float:
            try:
                return float(values[name]) if name in values else default
            except ValueError:
                raise KubeConfigError(f"{name} must be a number, got {values[name]!r}") from None

        verify = values.get("verify_tls", "true").lower()
        if verify not in ("true", "false"):
            raise KubeConfigError(f"verify_tls must be true or false, got {verify!r}")
        return cls(
            server=server,
            token_file=path("token_file", IN_CLUSTER_TOKEN if in_cluster else None),
            token=values.get("token") or None,
            ca_file=path("ca_file", IN_CLUSTER_CA if in_cluster else None),
            verify_tls=verify == "true",
            trust_domain=values.get("trust_domain", DEFAULT_TRUST_DOMAIN),
            page_size=int(number("page_size", 500)),
            watch_timeout=number("watch_timeout", 300.0),
            inactivity_timeout=number("inactivity_timeout", 120.0),
            connect_timeout=number("connect_timeout", 10.0),
            backoff_initial=number("backoff_initial", 0.5),
            backoff_max=number("backoff_max", 30.0),
        )


def make_api_client(config: KubeConfig) -> k8s.ApiClient:
    """An ``ApiClient`` for ``config``; its token is re-read from the file when it changes."""
    conf = k8s.Configuration(host=config.server)
    conf.verify_ssl = config.verify_tls
    if config.ca_file is not None:
        conf.ssl_ca_cert = str(config.ca_file)
    # Two connections per resource: a long-lived watch, and a list while it relists;
    # one for status writes.
    conf.connection_pool_maxsize = 2 * len(RESOURCES) + 1
    # TCP keepalive as client-go dials: a dead peer is noticed even on an idle watch.
    conf.keep_alive = True
    # urllib3's default retries (three, for connection errors) but not its silent
    # "429/503 with Retry-After: sleep and retry": that sleep would block a watcher's
    # thread where cancellation cannot reach it, unlogged.  The watcher honours
    # Retry-After itself (`_retry_after`).
    conf.retries = urllib3.Retry(total=3, respect_retry_after_header=False)
    token_state: dict[str, Any] = {"stamp": None}

    def read_token(c: Any) -> None:
        assert config.token_file is not None
        try:
            st = config.token_file.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != token_state["stamp"]:
                c.api_key["BearerToken"] = config.token_file.read_text().strip()
                token_state["stamp"] = stamp
        except OSError as e:
            # Keep the last token: it may still be valid; the API will say if not.
            log.warning("cannot re-read API token %s: %s", config.token_file, e)

    if config.token_file is not None:
        try:
            first = config.token_file.read_text().strip()
        except OSError as e:
            raise KubeConfigError(f"cannot read API token {config.token_file}: {e}") from None
        conf.api_key = {"BearerToken": first}
        conf.api_key_prefix = {"BearerToken": "Bearer"}
        # The client declares the hook's attribute as None-typed; it is called per request.
        conf.refresh_api_key_hook = read_token  # type: ignore[assignment]
    elif config.token:
        conf.api_key = {"BearerToken": config.token}
        conf.api_key_prefix = {"BearerToken": "Bearer"}
    api = k8s.ApiClient(conf)
    api.user_agent = "weft-controlplane"
    return api


# -- what Weft keeps of each object (parsed in the watcher threads; pure) -----------------


@dataclass(frozen=True, slots=True)
class NamespaceFacts:
    name: str
    capture: str | None
    """The namespace's ``weft.io/capture`` label, which its pods inherit ..."""
    default_policy: str | None = None
    """... and its ``weft.io/default-inbound-policy`` annotation (`weft.policy`)."""

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class PodFacts:
    uid: str
    name: str
    namespace: str
    node: str
    ips: tuple[str, ...]
    node_ip: str
    service_account: str
    capture: str | None
    inbound_mode: InboundMode
    ports: tuple[WorkloadPort, ...]
    ready: bool
    terminal: bool
    """Succeeded or Failed: its IP may already belong to a new pod."""
    host_network: bool
    opaque_ports: tuple[int, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    """Sorted: what AuthorizationPolicy selectors match."""
    default_policy: str | None = None
    """``weft.io/default-inbound-policy`` (annotation, else label, as the inbound mode)."""

    @property
    def key(self) -> str:
        return self.uid


@dataclass(frozen=True, slots=True)
class ServiceFacts:
    name: str
    namespace: str
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    external_name: bool
    opaque_ports: tuple[int, ...] = ()
    traffic: tuple[tuple[str, str], ...] = ()
    """Its retry and timeout annotations as found (`weft.traffic`), parsed by the view
    (which keeps the last valid policy while they are invalid)."""

    @property
    def key(self) -> str:
        return service_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class RouteFacts:
    """An HTTPRoute or GRPCRoute: parsed (``route``), or not accepted (``error``)."""

    kind: str
    namespace: str
    name: str
    parents: tuple[str, ...]
    """Services it names as parents (``ns/name``), accepted or not (to recompute them)."""
    route: Route | None
    error: str = ""
    resource_version: str = ""
    obj: JSON = field(default_factory=dict)
    """The object (without ``managedFields``): what the route status writer judges and
    compares (routes are few; their specs are small)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_httproute(obj: JSON) -> RouteFacts:
    return parse_gateway_route({**obj, "kind": obj.get("kind") or "HTTPRoute"})


def parse_grpcroute(obj: JSON) -> RouteFacts:
    return parse_gateway_route({**obj, "kind": obj.get("kind") or "GRPCRoute"})


def parse_gateway_route(obj: JSON) -> RouteFacts:
    meta = _meta(obj)
    ns, name = meta["namespace"], meta["name"]
    parents = tuple(
        f"{p.get('namespace', ns)}/{p['name']}"
        for p in ((obj.get("spec") or {}).get("parentRefs") or ())
        if isinstance(p, dict) and p.get("kind") == "Service" and isinstance(p.get("name"), str)
    )
    try:
        route: Route | None = parse_route(obj)
        error = ""
    except RouteError as e:
        route, error = None, f"{e.reason}: {e}"
        log.warning("%s %s/%s not accepted: %s", obj.get("kind"), ns, name, error)
    # The whole metadata: parse_route reads annotations too.
    return RouteFacts(str(obj.get("kind")), ns, name, parents, route, error,
                      str(meta.get("resourceVersion") or ""), _for_status(obj, meta))  # fmt: skip


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """An AuthorizationPolicy: parsed (``policy``), or rejected (``error``)."""

    namespace: str
    name: str
    policy: Policy | None
    error: str = ""
    resource_version: str = ""
    obj: JSON = field(default_factory=dict)
    """The object without ``managedFields``, for its status (as `RouteFacts`)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_authorization_policy(obj: JSON) -> PolicyFacts:
    """A rejected policy is not an error here: the view logs it (once per reason) and
    keeps its last valid version in force; its status says why."""
    meta = _meta(obj)
    ns, name = meta["namespace"], meta["name"]
    # A custom resource's list items and events carry kind and apiVersion; be lenient.
    obj = {**obj, "apiVersion": obj.get("apiVersion") or POLICY_API_VERSION,
           "kind": obj.get("kind") or POLICY_KIND}  # fmt: skip
    policy: Policy | None
    try:
        policy, error = parse_policy(obj), ""
    except PolicyError as e:
        policy, error = None, str(e)
    return PolicyFacts(ns, name, policy, error, str(meta.get("resourceVersion") or ""),
                       _for_status(obj, meta))  # fmt: skip


def _for_status(obj: JSON, meta: JSON) -> JSON:
    """The whole object but ``managedFields``, which can be larger than the rest together
    and which no judgement reads."""
    keep: JSON = {k: obj[k] for k in ("apiVersion", "kind", "spec", "status") if k in obj}
    keep["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return keep


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    address: str
    ready: bool
    pod_uid: str | None


@dataclass(frozen=True, slots=True)
class SliceFacts:
    namespace: str
    name: str
    service: str | None
    """Key of the owning service (``namespace/name``), from the service-name label."""
    address_type: str
    endpoints: tuple[SliceEndpoint, ...]
    ports: tuple[tuple[str, int, str], ...]
    """``(service port name, target port number, protocol)``."""

    @property
    def key(self) -> str:
        return service_key(self.namespace, self.name)


Facts = NamespaceFacts | PodFacts | ServiceFacts | SliceFacts | RouteFacts | PolicyFacts


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError("object without metadata")
    return meta


def parse_namespace(obj: JSON) -> NamespaceFacts:
    meta = _meta(obj)
    return NamespaceFacts(
        name=meta["name"],
        capture=(meta.get("labels") or {}).get(CAPTURE_LABEL),
        default_policy=(meta.get("annotations") or {}).get(DEFAULT_POLICY_KEY),
    )


def parse_pod(obj: JSON) -> PodFacts:
    meta = _meta(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = meta.get("labels") or {}
    ips = tuple(p["ip"] for p in status.get("podIPs") or () if p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    return PodFacts(
        uid=meta["uid"],
        name=meta["name"],
        namespace=meta["namespace"],
        node=spec.get("nodeName") or "",
        ips=ips,
        node_ip=status.get("hostIP") or "",
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        capture=labels.get(CAPTURE_LABEL),
        inbound_mode=inbound_mode(meta.get("annotations") or {}, labels),
        ports=tuple(
            WorkloadPort(int(p["containerPort"]), p.get("protocol") or "TCP", p.get("name") or "")
            for c in spec.get("containers") or ()
            for p in c.get("ports") or ()
        ),
        ready=any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        ),
        terminal=status.get("phase") in ("Succeeded", "Failed"),
        host_network=bool(spec.get("hostNetwork")),
        opaque_ports=opaque_ports(meta.get("annotations") or {}),
        labels=tuple(sorted(labels.items())),
        default_policy=(meta.get("annotations") or {}).get(DEFAULT_POLICY_KEY,
                                                           labels.get(DEFAULT_POLICY_KEY)),
    )  # fmt: skip


def parse_service(obj: JSON) -> ServiceFacts:
    meta = _meta(obj)
    spec = obj.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return ServiceFacts(
        name=meta["name"],
        namespace=meta["namespace"],
        vips=tuple(ip for ip in ips if ip and ip != "None"),  # "None": headless
        ports=tuple(
            ServicePort(
                port=int(p["port"]),
                # IntOrString on the wire: a number, or a container port name.
                target_port=p.get("targetPort", p["port"]),
                protocol=p.get("protocol") or "TCP",
                name=p.get("name") or "",
            )
            for p in spec.get("ports") or ()
        ),
        external_name=spec.get("type") == "ExternalName",
        opaque_ports=opaque_ports(meta.get("annotations") or {}),
        traffic=tuple(sorted(traffic_keys(meta.get("annotations") or {}).items())),
    )


def parse_endpoint_slice(obj: JSON) -> SliceFacts:
    meta = _meta(obj)
    owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    endpoints = []
    for ep in obj.get("endpoints") or ():
        addresses = ep.get("addresses") or ()
        if not addresses:
            continue
        ref = ep.get("targetRef") or {}
        endpoints.append(
            SliceEndpoint(
                # The API: addresses are fungible and consumers may use only the first.
                address=addresses[0],
                # The API: a nil ready condition "should be interpreted as true".
                ready=(ep.get("conditions") or {}).get("ready") is not False,
                pod_uid=ref.get("uid") if ref.get("kind") == "Pod" else None,
            )
        )
    return SliceFacts(
        namespace=meta["namespace"],
        name=meta["name"],
        service=service_key(meta["namespace"], owner) if owner else None,
        address_type=obj.get("addressType") or "",
        endpoints=tuple(endpoints),
        ports=tuple(
            (p.get("name") or "", int(p["port"]), p.get("protocol") or "TCP")
            for p in obj.get("ports") or ()
            if p.get("port") is not None
        ),
    )


# -- the cluster as far as Weft cares: facts in, model changes out (no I/O) ---------------


@dataclass
class Changes:
    upserts: list[Item] = field(default_factory=list)
    deletes: list[tuple[Kind, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)


class ClusterView:
    """Joins the four resources into workloads and services, incrementally.

    A pod's workload depends on the pod, its namespace (capture and the default inbound
    policy are inherited) and the AuthorizationPolicies of its namespace; a service on
    the Service and every EndpointSlice labelled with its name.  Each change
    recomputes only the model objects it can affect; the store drops those that come out
    equal.  Nothing is emitted until every resource has been listed once, and then all at
    once: the first state agents see is complete, not pods without their namespaces'
    labels followed by a storm of corrections.
    """

    RESOURCES = ("namespaces", "pods", "services", "endpointslices", "httproutes", "grpcroutes",
                 "authorizationpolicies")  # fmt: skip

    def __init__(
        self, trust_domain: str = DEFAULT_TRUST_DOMAIN, mesh_default: DefaultPolicy | None = None
    ) -> None:
        self.trust_domain = trust_domain
        self.mesh_default = mesh_default
        """The control plane's ``--default-inbound-policy`` (None: not set)."""
        self.namespaces: dict[str, NamespaceFacts] = {}
        self.pods: dict[str, PodFacts] = {}
        self.services: dict[str, ServiceFacts] = {}
        self.slices: dict[str, SliceFacts] = {}
        self.httproutes: dict[str, RouteFacts] = {}
        self.grpcroutes: dict[str, RouteFacts] = {}
        self.policies: dict[str, PolicyFacts] = {}
        self.in_force: dict[str, dict[str, Policy]] = {}
        """namespace -> policy key -> the policy's last valid version: what applies (a
        policy made invalid keeps its last valid version in force until it is fixed or
        deleted, as Kubernetes users expect of a controller)."""
        self.traffic = LastValid()
        """Services' retry/timeout policies (and their rejected annotations)."""
        self._pods_by_ns: dict[str, set[str]] = {}
        self._slices_by_service: dict[str, set[str]] = {}
        self._listed: set[str] = set()
        self._dirty_workloads: set[str] = set()
        self._dirty_services: set[str] = set()

    @property
    def synced(self) -> bool:
        return self._listed.issuperset(self.RESOURCES)

    def replace(self, resource: str, facts: Iterable[Facts]) -> Changes:
        """A (re)list of ``resource``: hold exactly these objects."""
        table = self._table(resource)
        new = {f.key: f for f in facts}
        for key in table.keys() - new.keys():
            self._remove(resource, key)
        for key, f in new.items():
            if table.get(key) != f:
                self._put(resource, f)
        was_synced = self.synced
        self._listed.add(resource)
        if self.synced and not was_synced:
            # First complete view: everything is new.
            self._dirty_workloads = set(self.pods)
            self._dirty_services = set(self.services)
        return self._flush()

    def apply(self, resource: str, event_type: str, facts: Facts) -> Changes:
        """One watch event (ADDED, MODIFIED or DELETED)."""
        if event_type == "DELETED":
            self._remove(resource, facts.key)
        else:
            self._put(resource, facts)
        return self._flush()

    def _table(self, resource: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "namespaces": self.namespaces,
            "pods": self.pods,
            "services": self.services,
            "endpointslices": self.slices,
            "httproutes": self.httproutes,
            "grpcroutes": self.grpcroutes,
            "authorizationpolicies": self.policies,
        }
        return tables[resource]

    def _put(self, resource: str, f: Facts) -> None:
        if isinstance(f, PolicyFacts):
            self._put_policy(f)
            return
        self._remove(resource, f.key)
        if isinstance(f, PodFacts):
            self.pods[f.key] = f
            self._pods_by_ns.setdefault(f.namespace, set()).add(f.key)
            self._dirty_workloads.add(f.key)
        elif isinstance(f, NamespaceFacts):
            self.namespaces[f.key] = f
            self._dirty_workloads |= self._pods_by_ns.get(f.name, set())
        elif isinstance(f, ServiceFacts):
            self.services[f.key] = f
            self._dirty_services.add(f.key)
        elif isinstance(f, RouteFacts):
            self._table(resource)[f.key] = f
            self._dirty_services.update(f.parents)
            self._routes_changed(f.namespace)
        else:
            self.slices[f.key] = f
            if f.service is not None:
                self._slices_by_service.setdefault(f.service, set()).add(f.key)
                self._dirty_services.add(f.service)
            self._routes_changed(f.namespace)

    def _remove(self, resource: str, key: str) -> None:
        old = self._table(resource).pop(key, None)
        if old is None:
            return
        if isinstance(old, PodFacts):
            _discard(self._pods_by_ns, old.namespace, key)
            self._dirty_workloads.add(key)
        elif isinstance(old, NamespaceFacts):
            self._dirty_workloads |= self._pods_by_ns.get(old.name, set())
        elif isinstance(old, ServiceFacts):
            self._dirty_services.add(key)
        elif isinstance(old, RouteFacts):
            self._dirty_services.update(old.parents)
            self._routes_changed(old.namespace)
        elif isinstance(old, PolicyFacts):
            _discard_key(self.in_force, old.namespace, key)
            self._dirty_workloads |= self._pods_by_ns.get(old.namespace, set())
        elif isinstance(old, SliceFacts):
            if old.service is not None:
                _discard(self._slices_by_service, old.service, key)
                self._dirty_services.add(old.service)
            self._routes_changed(old.namespace)

    def _put_policy(self, f: PolicyFacts) -> None:
        old = self.policies.get(f.key)
        kept = self.in_force.get(f.namespace, {}).get(f.key)
        self.policies[f.key] = f
        if f.policy is not None:
            self.in_force.setdefault(f.namespace, {})[f.key] = f.policy
        elif old is None or old.error != f.error:
            # Once per reason, not per event: our own status write comes back as one.
            log.warning(
                "AuthorizationPolicy %s not accepted: %s; %s", f.key, f.error,
                "its last valid version stays in force" if kept is not None
                else "not applied",
            )  # fmt: skip
        self._dirty_workloads |= self._pods_by_ns.get(f.namespace, set())
        p = f.policy
        if p is not None and (old is None or old.policy != p) and not p.target_routes:
            pods = (self.pods[k] for k in self._pods_by_ns.get(f.namespace, ()))
            if self.synced and not any(p.selects(x.namespace, dict(x.labels)) for x in pods):
                # Accepted (pods may come later), but a typo in a selector is silent else.
                log.info("AuthorizationPolicy %s selects no pod (yet)", f.key)

    def policy_conditions(self, namespace: str, name: str) -> list[StatusCondition]:
        """What a policy's ``status.conditions`` should say."""
        f = self.policies.get(f"{namespace}/{name}")
        if f is None or f.policy is not None:
            return [StatusCondition("Accepted", True, "Accepted", "accepted")]
        kept = f.key in self.in_force.get(namespace, {})
        then = "its last valid version stays in force" if kept else "not applied"
        return [StatusCondition("Accepted", False, "Invalid", f"{f.error}; {then}")]

    def _flush(self) -> Changes:
        changes = Changes()
        if not self.synced:
            return changes
        workloads, self._dirty_workloads = self._dirty_workloads, set()
        services, self._dirty_services = self._dirty_services, set()
        for uid in sorted(workloads):
            w = self.workload(uid)
            if w is None:
                changes.deletes.append((Kind.WORKLOAD, uid))
            else:
                changes.upserts.append(w)
        for key in sorted(services):
            s = self.service(key)
            if s is None:
                changes.deletes.append((Kind.SERVICE, key))
            else:
                changes.upserts.append(s)
        return changes

    def workload(self, uid: str) -> Workload | None:
        """The model of one pod, or None if the mesh has no business with it."""
        pod = self.pods.get(uid)
        # Unscheduled pods have no node to serve them; finished pods' IPs get reused;
        # host-network pods share the node's address, so no per-pod capture or identity.
        if pod is None or not pod.node or pod.terminal or pod.host_network:
            return None
        try:
            identity = SpiffeId.workload(pod.namespace, pod.service_account, self.trust_domain)
        except IdentityError as e:
            log.warning("pod %s/%s left out: %s", pod.namespace, pod.name, e)
            return None
        ns = self.namespaces.get(pod.namespace)
        ns_labels = {CAPTURE_LABEL: ns.capture} if ns is not None and ns.capture else {}
        pod_labels = {CAPTURE_LABEL: pod.capture} if pod.capture is not None else {}
        ns_default = ns.default_policy if ns is not None else None
        default, explicit = workload_default(
            {DEFAULT_POLICY_KEY: pod.default_policy} if pod.default_policy is not None else {},
            {DEFAULT_POLICY_KEY: ns_default} if ns_default is not None else {},
            self.mesh_default,
        )
        in_force = list(self.in_force.get(pod.namespace, {}).values())
        mine = applicable(
            pod.namespace, dict(pod.labels), in_force, self._policy_routes(pod.uid, in_force)
        )
        mode = enforced_inbound_mode(pod.inbound_mode, default, explicit, mine)
        # Only a strict pod has a filter to open (the field is absent otherwise).
        opened = mode is InboundMode.STRICT and open_to_plaintext(pod.inbound_mode, default,
                                                                    explicit)  # fmt: skip
        return Workload(
            uid=pod.uid,
            name=pod.name,
            namespace=pod.namespace,
            node=pod.node,
            ips=pod.ips,
            service_account=pod.service_account,
            identity=identity,
            captured=is_captured(pod_labels, ns_labels),
            inbound_mode=mode,
            ports=pod.ports,
            ready=pod.ready,
            node_ip=pod.node_ip,
            opaque_ports=pod.opaque_ports,
            default_policy=default,
            policies=mine,
            open_to_plaintext=opened,
        )

    def _policy_routes(self, uid: str, policies: Iterable[Policy]) -> set[str]:
        """The routes (``ns/name``) whose backends include pod ``uid``, when a policy of
        its namespace targets one (routes and their backends are in the policy's
        namespace: cross-namespace backends are not supported)."""
        targeted = {r for p in policies for r in p.target_routes}
        if not targeted:
            return set()
        out = set()
        for table in (self.httproutes, self.grpcroutes):
            for key in targeted & table.keys():
                route = table[key].route
                if route is None:
                    continue
                for svc in backend_services(route):
                    for sk in self._slices_by_service.get(svc, ()):
                        if any(e.pod_uid == uid for e in self.slices[sk].endpoints):
                            out.add(key)
        return out

    def _routes_changed(self, namespace: str) -> None:
        """A route or an endpoint slice of ``namespace`` changed: its pods' per-route
        policies may have too."""
        if any(p.target_routes for p in self.in_force.get(namespace, {}).values()):
            self._dirty_workloads |= self._pods_by_ns.get(namespace, set())

    def service(self, key: str) -> Service | None:
        svc = self.services.get(key)
        if svc is None:
            self.traffic.forget(key)  # deleted (a MODIFIED is a remove and a put: kept)
            return None
        if svc.external_name:
            return None  # ExternalName: a DNS alias, nothing for the mesh to balance
        named = [p for p in svc.ports if isinstance(p.target_port, str)]
        by_address: dict[str, Endpoint] = {}
        for slice_key in sorted(self._slices_by_service.get(key, ())):
            sl = self.slices[slice_key]
            if sl.address_type not in ("IPv4", "IPv6"):
                continue  # FQDN slices name hosts, not addresses
            # Named target ports are resolved per slice: the slice's port named like
            # the service port carries the number for the endpoints in it.
            resolved = tuple(
                sorted(
                    (p.name, number)
                    for p in named
                    for name, number, protocol in sl.ports
                    if name == p.name and protocol == p.protocol
                )
            )
            for ep in sl.endpoints:
                new = Endpoint(ep.address, ep.pod_uid, ep.ready, resolved)
                old = by_address.get(ep.address)
                if old is not None:
                    # The same address in two slices (during a slice handover): one
                    # endpoint, ready if either says so.
                    new = Endpoint(
                        ep.address,
                        old.workload_uid or ep.pod_uid,
                        old.ready or ep.ready,
                        tuple(sorted(set(old.target_ports) | set(resolved))),
                    )
                by_address[ep.address] = new
        return Service(
            name=svc.name,
            namespace=svc.namespace,
            vips=svc.vips,
            ports=svc.ports,
            endpoints=tuple(by_address[a] for a in sorted(by_address)),
            opaque_ports=svc.opaque_ports,
            traffic=self.traffic.policy(key, dict(svc.traffic)),
            routes=self._routes_of(key),
        )

    def _routes_of(self, key: str) -> tuple[Route, ...]:
        """Accepted routes with ``key`` among their parents, in a stable order."""
        found = [
            f.route
            for table in (self.httproutes, self.grpcroutes)
            for f in table.values()
            if f.route is not None and key in f.parents
        ]
        return tuple(sorted(found, key=lambda r: (r.kind, r.key)))


def _discard(index: dict[str, set[str]], key: str, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


def _discard_key(index: dict[str, dict[str, T]], key: str, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(member, None)
        if not members:
            del index[key]


# -- talking to the API server (blocking; runs in the per-resource threads) ---------------


@dataclass(frozen=True)
class Resource:
    name: str
    """Plural, as in the URL; also names the watcher's task and thread."""
    kind: str
    list_call: Callable[[k8s.ApiClient], Callable[..., Any]]
    parse: Callable[[JSON], Facts]
    optional: bool = False
    """A CRD that a cluster may not have (the Gateway API's, Weft's own): a 404 (or 403)
    on list means "none", checked again every `OPTIONAL_RECHECK` seconds, and does not
    hold up sync."""
    group_version: str = ""
    """Of a custom resource: ``group/version`` (for its status writes and logs)."""


def _custom(plural: str, kind: str, parse: Callable[[JSON], Facts], group: str,
            version: str) -> Resource:  # fmt: skip
    """A custom resource (optional: its CRD may be absent), listed and watched cluster-wide."""

    def list_call(api: k8s.ApiClient) -> Callable[..., Any]:
        return functools.partial(
            k8s.CustomObjectsApi(api).list_cluster_custom_object, group, version, plural
        )

    return Resource(plural, kind, list_call, parse, optional=True,
                    group_version=f"{group}/{version}")  # fmt: skip


RESOURCES: tuple[Resource, ...] = (
    Resource(
        "namespaces", "Namespace", lambda api: k8s.CoreV1Api(api).list_namespace, parse_namespace
    ),
    Resource(
        "pods",
        "Pod",
        lambda api: k8s.CoreV1Api(api).list_pod_for_all_namespaces,
        parse_pod,
    ),
    Resource(
        "services",
        "Service",
        lambda api: k8s.CoreV1Api(api).list_service_for_all_namespaces,
        parse_service,
    ),
    Resource(
        "endpointslices",
        "EndpointSlice",
        lambda api: k8s.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
        parse_endpoint_slice,
    ),
    _custom("httproutes", "HTTPRoute", parse_httproute, ROUTE_GROUP, "v1"),
    _custom("grpcroutes", "GRPCRoute", parse_grpcroute, ROUTE_GROUP, "v1"),
    _custom(
        "authorizationpolicies",
        POLICY_KIND,
        parse_authorization_policy,
        POLICY_GROUP,
        POLICY_VERSION,
    ),
)
BY_NAME = {r.name: r for r in RESOURCES}
OPTIONAL_RECHECK = 60.0


def list_resource(
    api: k8s.ApiClient,
    resource: Resource,
    page_size: int | None = 500,
    timeout: tuple[float, float] = (10.0, 120.0),
) -> tuple[list[Facts], str]:
    """Every object of ``resource``, parsed, and the list's resourceVersion: in pages of
    ``page_size`` (as client-go's pager), kept as facts page by page (the raw objects of
    a big cluster's full list would be hundreds of MB at once)."""
    call = resource.list_call(api)
    facts: list[Facts] = []
    limit = page_size
    cont: str | None = None
    while True:
        try:
            response = call(limit=limit, _continue=cont, _preload_content=False,
                            _request_timeout=timeout)  # fmt: skip
        except ApiException as e:
            if e.status == 410 and cont is not None:
                # The continue token expired between pages: start over in one piece,
                # as client-go's pager does, so the result is still one consistent list.
                log.info("%s: list continuation expired; listing without pages", resource.name)
                facts, limit, cont = [], None, None
                continue
            raise
        try:
            body = json.loads(response.data)
            meta = body["metadata"]
            rv = str(meta["resourceVersion"])
        except (ValueError, KeyError, TypeError) as e:
            raise WatchError(f"malformed list response ({type(e).__name__}: {e})") from None
        finally:
            _close_response(response)
        for obj in body.get("items") or ():
            f = _parse_one(resource, obj)
            if f is not None:
                facts.append(f)
        cont = meta.get("continue") or None
        if cont is None:
            return facts, rv


def cluster_snapshot(
    api: k8s.ApiClient,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    mesh_default: DefaultPolicy | None = None,
) -> tuple[list[Workload], list[Service], list[str]]:
    """The mesh model of a cluster *now*, from one list of each resource — what the
    control plane's source would hold (`ClusterView`), for one-shot questions such as
    ``weft policy check --kubeconfig``; and notes (a CRD absent or not readable)."""
    view = ClusterView(trust_domain, mesh_default)
    notes: list[str] = []
    changes = Changes()
    for resource in RESOURCES:
        try:
            facts, _ = list_resource(api, resource)
        except ApiException as e:
            if not (resource.optional and e.status in (403, 404)):
                raise
            what = "not installed" if e.status == 404 else "not readable (RBAC)"
            notes.append(f"{resource.name}: {what}; taken as none")
            facts = []
        got = view.replace(resource.name, facts)
        changes.upserts += got.upserts
    workloads = [u for u in changes.upserts if isinstance(u, Workload)]
    services = [u for u in changes.upserts if isinstance(u, Service)]
    return workloads, services, notes


def api_client_from_kubeconfig(path: str | None = None, context: str | None = None) -> Any:
    """An API client as kubectl would make it from a kubeconfig (credential plugins,
    contexts); ``path`` None: ``$KUBECONFIG`` or ``~/.kube/config``."""
    from kubernetes import config as kube_config

    return kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=path, context=context
    )


class Gone(Exception):
    """410: the resourceVersion (or list continuation) is older than the server's history."""


class WatchError(Exception):
    """The watch failed in a way a reconnect may fix (an ERROR event, a stream cut short)."""


RETRYABLE: tuple[type[BaseException], ...] = (
    ApiException,
    WatchError,
    urllib3.exceptions.HTTPError,  # connect failures, read timeouts, truncated chunks
    OSError,
)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str
    resource_version: str | None
    facts: Facts | None
    """None for BOOKMARK and ERROR, and for an object that does not parse."""
    status: JSON | None = None
    """The ``Status`` object of an ERROR event."""


def parse_event(line: bytes | bytearray, resource: Resource) -> WatchEvent:
    event = json.loads(line)
    etype = event["type"]
    obj = event.get("object") or {}
    if etype == "ERROR":
        return WatchEvent(etype, None, None, obj)
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    if etype == "BOOKMARK":
        # A bookmark carries only metadata.resourceVersion; it is not an object.
        return WatchEvent(etype, rv, None)
    return WatchEvent(etype, rv, _parse_one(resource, obj))


def _parse_one(resource: Resource, obj: JSON) -> Facts | None:
    try:
        return resource.parse(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        name = (
            f"{meta.get('namespace', '')}/{meta.get('name', '?')}"
            if isinstance(meta, dict)
            else "?"
        )
        log.warning(
            "%s %s skipped: unexpected shape (%s: %s)", resource.kind, name, type(e).__name__, e
        )
        return None


class _EventReader:
    """Splits a chunked watch response into events, one network read per call."""

    def __init__(self, response: urllib3.BaseHTTPResponse, resource: Resource) -> None:
        self.resource = resource
        self.response = response
        # A generator in practice; typed as an iterator by urllib3.
        self._chunks: Iterator[bytes] = response.stream(amt=None, decode_content=False)
        self._buffer = bytearray()

    def close(self) -> None:
        """Release the stream and its connection.  Must run on the watcher's thread.

        The generator is closed explicitly, here, first: it is suspended inside urllib3's
        error handling, which on finalisation closes and *releases the connection to the
        pool*.  Left to the garbage collector it would run on whichever thread drops the
        last reference (the loop, when an exception's traceback goes), racing this
        close's own release — and a connection released twice is handed to two threads
        at once, each dialling its own socket into it, one of them leaked.
        """
        close = getattr(self._chunks, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        _close_response(self.response)

    def next_events(self) -> list[WatchEvent] | None:
        """The events completed by the next chunk(s); None at the end of the stream."""
        while True:
            chunk = next(self._chunks, None)
            if chunk is None:
                if self._buffer.strip():
                    raise WatchError(f"stream ended inside an event ({len(self._buffer)} bytes)")
                return None
            self._buffer += chunk
            if b"\n" not in chunk:
                continue
            *lines, rest = self._buffer.split(b"\n")
            self._buffer = bytearray(rest)
            try:
                return [parse_event(line, self.resource) for line in lines if line.strip()]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                # Not a watch event: the stream is broken; reconnecting resumes cleanly.
                raise WatchError(f"malformed watch event ({type(e).__name__}: {e})") from None


def _shutdown_socket(response: urllib3.BaseHTTPResponse) -> None:
    """Unblock a thread reading ``response``; safe from any thread (unlike ``close``)."""
    conn = getattr(response, "connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close_response(response: urllib3.BaseHTTPResponse) -> None:
    with contextlib.suppress(Exception):
        response.close()
    with contextlib.suppress(Exception):
        response.release_conn()


# -- the source ---------------------------------------------------------------------------


class Backoff:
    """Exponential backoff with "equal jitter": half fixed, half random."""

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[], float] = random.random
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng
        self.failures = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2.0**self.failures)
        self.failures += 1
        return delay / 2 + delay / 2 * self.rng()

    def reset(self) -> None:
        self.failures = 0


@dataclass
class WatchStats:
    """Per resource, for logs, ``/debug/state`` and tests."""

    resource_version: str | None = None
    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    relists: int = 0
    """Relists forced by 410 Gone."""
    errors: int = 0
    last_error: str | None = None
    absent: bool = False
    """An optional resource the cluster does not serve (its CRD is not installed)."""


class _Watcher:
    """List and watch one resource forever, feeding the view and the store."""

    def __init__(self, source: KubeSource, resource: Resource) -> None:
        self.source = source
        self.resource = resource
        self.config = source.config
        self.stats = source.stats[resource.name]
        self.backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        self.rv: str | None = None
        self._verb = "list"
        """What the watcher is doing (``list``/``watch``): named when it fails."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"weft-kube-{resource.name}"
        )

    async def _in_thread(
        self,
        fn: Callable[..., T],
        *args: Any,
        on_abandon: Callable[[T], object] | None = None,
    ) -> T:
        """Run ``fn`` on this resource's thread.  If we are cancelled while it runs, its
        result (say, an open response) goes to ``on_abandon`` instead of leaking."""
        future = self._executor.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if on_abandon is not None:
                cleanup = on_abandon

                def abandoned(f: concurrent.futures.Future[T]) -> None:
                    if not f.cancelled() and f.exception() is None:
                        cleanup(f.result())

                future.add_done_callback(abandoned)
            raise

    async def run(self) -> None:
        name = self.resource.name
        try:
            while True:
                try:
                    if self.rv is None and not await self._list():
                        await asyncio.sleep(OPTIONAL_RECHECK)
                        continue
                    await self._watch()
                except Gone as e:
                    # Relist at once: waiting would only widen the gap to catch up on.
                    self.stats.relists += 1
                    log.info("%s: %s; relisting", name, e)
                    self.rv = None
                except RETRYABLE as e:
                    delay = self.backoff.next()
                    retry_after = _retry_after(e)
                    if retry_after is not None:
                        # The server said when (429 from API Priority and Fairness, a
                        # 503 while it starts): not sooner, but within reason.
                        delay = max(delay, min(retry_after, 10 * self.config.backoff_max))
                    self.stats.errors += 1
                    self.stats.last_error = _describe(e)
                    log.log(
                        logging.ERROR if _is_auth_error(e) else logging.WARNING,
                        "%s: %s; retrying in %.2fs%s",
                        name,
                        self._explain(e, retry_after),
                        delay,
                        "; agents keep the last state meanwhile" if self.stats.lists else "",
                    )
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("watch of %s failed unexpectedly; stopping discovery", name)
            raise
        finally:
            await self._stop_thread()

    def _explain(self, e: BaseException, retry_after: float | None) -> str:
        """What failed, in words an operator acts on: the verb and resource, the server's
        own message, and for a 403 what RBAC must grant."""
        what = f"{self._verb} {self.resource.name}"
        if not isinstance(e, ApiException):
            return f"{what}: {_describe(e)}"
        detail = _describe(e)
        message = _status_message(e)
        if message:
            detail += f": {message}"
        if retry_after is not None:
            detail += f"; Retry-After {retry_after:g} s"
        if _is_auth_error(e):
            group = self.resource.group_version.split("/")[0] or "core"
            return (
                f"{what} {'forbidden' if e.status == 403 else 'unauthorized'} ({detail}); "
                f"the control plane's ClusterRole needs list and watch on {self.resource.name} "
                f"(API group {group}; see docs/discovery.md)"
            )
        if e.status == 429:
            return f"{what} throttled ({detail})"
        return f"{what}: {detail}"

    async def _list(self) -> bool:
        """List and hold the result; False if an optional resource's API is absent (404:
        its CRD is not installed), which counts as an empty list."""
        self._verb = "list"
        try:
            facts, rv = await self._in_thread(self._list_blocking)
        except ApiException as e:
            if not (self.resource.optional and e.status in (403, 404)):
                raise
            if e.status == 403 and self.stats.lists and not self.stats.absent:
                # Listed before, forbidden now (RBAC changed, or a bad rollout): the
                # objects did not go away — keep them, and retry.  Dropping them would
                # lift every AuthorizationPolicy in force: fail open.
                raise
            if not self.stats.absent:
                why = "CRD not installed"
                if e.status == 403:
                    why = "forbidden: the control plane's ClusterRole needs list/watch on it"
                log.log(logging.INFO if e.status == 404 else logging.WARNING,
                        "%s: not served to us (%s, %s): none; checking again every %.0f s",
                        self.resource.name, self.resource.group_version, why,
                        OPTIONAL_RECHECK)  # fmt: skip
            self.stats.absent = True
            self.source.commit(self.source.view.replace(self.resource.name, []))
            return False
        self.stats.absent = False
        changes = self.source.view.replace(self.resource.name, facts)
        self.rv = self.stats.resource_version = rv
        self.stats.lists += 1
        self.backoff.reset()
        log.info("%s: listed %d at resourceVersion %s", self.resource.name, len(facts), rv)
        self.source.commit(changes)
        self.source.touched(self.resource.name)
        return True

    def _list_blocking(self) -> tuple[list[Facts], str]:
        config = self.config
        return list_resource(self.source.api, self.resource, config.page_size,
                             (config.connect_timeout, config.inactivity_timeout))  # fmt: skip

    def _open_watch(self, rv: str, timeout: int) -> urllib3.BaseHTTPResponse:
        try:
            response: urllib3.BaseHTTPResponse = self.resource.list_call(self.source.api)(
                watch=True,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _preload_content=False,
                _request_timeout=(self.config.connect_timeout, self.config.inactivity_timeout),
            )
        except ApiException as e:
            if e.status == 410:
                raise Gone(f"watch from resourceVersion {rv} refused with 410") from None
            raise
        return response

    async def _watch(self) -> None:
        assert self.rv is not None
        self._verb = "watch"
        # Randomised like client-go, so the watches of many replicas do not end together.
        timeout = max(1, int(self.config.watch_timeout * (1 + random.random())))
        started, events = time.monotonic(), 0
        response = await self._in_thread(
            self._open_watch, self.rv, timeout, on_abandon=_close_response
        )
        self.stats.watches += 1
        reader = _EventReader(response, self.resource)
        reading = False
        try:
            while True:
                reading = True
                batch = await self._in_thread(reader.next_events)
                reading = False
                if batch is None:
                    break  # the server ended it (timeoutSeconds); urllib3 pooled the conn
                self.backoff.reset()
                for event in batch:
                    events += 1
                    self._handle(event)
        finally:
            if reading:
                # Cancelled mid-read: unblock the thread.  Only then — at any other time
                # the thread is idle, and the connection may already be back in the pool
                # serving another resource.
                _shutdown_socket(response)
            # Queued behind the read, on the same thread: never concurrent with it.
            self._executor.submit(reader.close)
        if events == 0 and time.monotonic() - started < _MIN_WATCH_SECONDS:
            raise WatchError("watch ended at once without events")

    def _handle(self, event: WatchEvent) -> None:
        self.stats.events += 1
        if event.type == "ERROR":
            status = event.status or {}
            detail = f"{status.get('reason', '?')}: {status.get('message', '')}"
            if status.get("code") == 410:
                raise Gone(f"watch expired ({detail})")
            raise WatchError(f"ERROR event {status.get('code')} {detail}")
        if event.type == "BOOKMARK":
            self.stats.bookmarks += 1
        elif event.type in ("ADDED", "MODIFIED", "DELETED"):
            if event.facts is not None:
                self.source.commit(
                    self.source.view.apply(self.resource.name, event.type, event.facts)
                )
                self.source.touched(self.resource.name, event.type)
        else:
            log.warning("%s: unknown watch event type %r ignored", self.resource.name, event.type)
        # After applying: should applying fail, resuming re-delivers the event.
        if event.resource_version:
            self.rv = self.stats.resource_version = event.resource_version

    async def _stop_thread(self) -> None:
        """Unblock and retire this resource's thread, so stopping leaves none behind."""
        await _retire(self._executor, f"{self.resource.name}: watcher")


async def _retire(executor: concurrent.futures.ThreadPoolExecutor, what: str) -> None:
    # Queued after any in-flight call: once it runs, the thread is idle.
    done = executor.submit(lambda: None)
    try:
        await asyncio.wait_for(asyncio.wrap_future(done), timeout=5)
        executor.shutdown(wait=True)
    except TimeoutError:
        # A call in flight is not interrupted; it ends at the read timeout at worst.
        log.warning("%s thread still busy after 5s; not waiting", what)
        executor.shutdown(wait=False, cancel_futures=True)


# -- status written back: routes' status.parents, policies' status.conditions -------------


@dataclass
class StatusStats:
    """Status writes, for tests and a debugger (no endpoint shows them yet)."""

    writes: int = 0
    """Patches the API server took."""
    failures: dict[str, int] = field(default_factory=dict)
    """By outcome: forbidden, gone, conflict, error."""


@dataclass(frozen=True)
class _StatusKind:
    """Objects whose status one planner judges (`controlplane.discovery.routestatus`)."""

    name: str
    resources: tuple[str, ...]
    """Plurals; their ``…/status`` is what RBAC must grant."""
    doing: str
    """What works without the status (said when a write is forbidden)."""


_ROUTES = _StatusKind("routes", ("httproutes", "grpcroutes"), "routes still work")
_POLICIES = _StatusKind("policies", ("authorizationpolicies",), "policies are still enforced")


class _StatusWriter:
    """Writes the routes' ``status.parents`` and the AuthorizationPolicies'
    ``status.conditions`` (`controlplane.discovery.routestatus`; one planner per kind).

    Off the watch loop's critical path: the watchers only set an event; this task plans
    from the view as it then is (bursts of events coalesce into one plan) and patches on
    its own thread.  A failed write never reaches discovery: it is logged once per object
    and kind of failure, and retried when the object changes (403, 404, 409) or after a
    delay (connection errors, 5xx).

    No leader election: the control plane runs as one replica (deploy/kubernetes).
    Several would write the same status: each write carries the resourceVersion it was
    computed from, so a replica that lost the race gets 409, sees the winner's write in
    its next event, finds it equal to its own judgement, and writes nothing.
    """

    def __init__(self, source: KubeSource) -> None:
        self.source = source
        self.planners = {
            kind.name: StatusPlanner(retry_after=source.config.backoff_max)
            for kind in (_ROUTES, _POLICIES)
        }
        self.stats = StatusStats()
        self._wake = asyncio.Event()
        self._logged: set[tuple[str, tuple[str, str, str]]] = set()
        self._forbidden_logged: set[str] = set()

    @property
    def planner(self) -> StatusPlanner:
        """The routes' planner."""
        return self.planners[_ROUTES.name]

    def poke(self) -> None:
        self._wake.set()

    def _next_retry(self) -> float | None:
        times = [t for t in (p.next_retry() for p in self.planners.values()) if t is not None]
        return min(times) if times else None

    def _jobs(self, view: ClusterView) -> list[tuple[_StatusKind, list[StatusObject], Judge]]:
        routes = [
            StatusObject(resource, f.namespace, f.name, f.resource_version, f.obj)
            for resource, table in (("httproutes", view.httproutes),
                                    ("grpcroutes", view.grpcroutes))
            for f in table.values()
            if f.obj
        ]  # fmt: skip
        services = view.services.keys()

        def judge_route(r: StatusObject, now: str) -> tuple[JSON, str] | None:
            return route_judgement(r.obj, services, now)

        policies = [
            StatusObject("authorizationpolicies", f.namespace, f.name, f.resource_version, f.obj)
            for f in view.policies.values()
            if f.obj
        ]

        def judge_policy(r: StatusObject, now: str) -> tuple[JSON, str] | None:
            return conditions_judgement(r.obj, view.policy_conditions(r.namespace, r.name), now)

        return [(_ROUTES, routes, judge_route), (_POLICIES, policies, judge_policy)]

    async def run(self) -> None:
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="weft-kube-status"
        )
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._next_retry())
                except TimeoutError:
                    pass
                self._wake.clear()
                view = self.source.view
                if not view.synced:
                    continue  # judging before every Service is known would be wrong
                for kind, objects, judge in self._jobs(view):
                    planner = self.planners[kind.name]
                    for write in planner.plan_with(objects, judge):
                        planner.sent(write)
                        outcome, detail = await asyncio.wrap_future(
                            executor.submit(self._patch_blocking, write)
                        )
                        planner.done(write, outcome)
                        self._report(kind, write, outcome, detail)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("status writer failed unexpectedly; stopping discovery")
            raise
        finally:
            await _retire(executor, "status writer")

    def _patch_blocking(self, write: StatusWrite) -> tuple[WriteOutcome, str]:
        r, config = write.target, self.source.config
        group, version = BY_NAME[r.resource].group_version.split("/")
        try:
            response = k8s.CustomObjectsApi(self.source.api).patch_namespaced_custom_object_status(
                group, version, r.namespace, r.resource, r.name, write.patch,
                # Explicit: older clients pick JSON patch for every body by default.
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=(config.connect_timeout, config.inactivity_timeout),
            )  # fmt: skip
            _close_response(cast(urllib3.BaseHTTPResponse, response))
        except ApiException as e:
            outcomes = {403: WriteOutcome.FORBIDDEN, 404: WriteOutcome.GONE,
                        409: WriteOutcome.CONFLICT}  # fmt: skip
            return outcomes.get(e.status or 0, WriteOutcome.ERROR), _describe(e)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            return WriteOutcome.ERROR, _describe(e)
        return WriteOutcome.OK, ""

    def _report(
        self, kind: _StatusKind, write: StatusWrite, outcome: WriteOutcome, detail: str
    ) -> None:
        r = write.target
        what = f"{r.obj.get('kind', r.resource)} {r.namespace}/{r.name}"
        if outcome is WriteOutcome.OK:
            self.stats.writes += 1
            self._logged = {k for k in self._logged if k[1] != r.key}
            status = write.patch["status"]
            written = [c for e in status.get("parents") or ()
                       if e.get("controllerName") == CONTROLLER_NAME
                       for c in e["conditions"][:2]]  # fmt: skip
            written += status.get("conditions") or ()
            said = "; ".join(f"{c['type']} {c['status']} ({c['reason']})" for c in written)
            log.info("%s: status written: %s", what, said or "no Service parents")
            return
        self.stats.failures[outcome] = self.stats.failures.get(outcome, 0) + 1
        if outcome is WriteOutcome.FORBIDDEN:
            if kind.name not in self._forbidden_logged:
                self._forbidden_logged.add(kind.name)
                log.warning(
                    "%s: status not written (%s): the control plane's ClusterRole needs "
                    "patch on %s (deploy/kubernetes); %s, only their status stays "
                    "unreported",
                    what, detail, " and ".join(f"{p}/status" for p in kind.resources),
                    kind.doing,
                )  # fmt: skip
            return
        if (outcome, r.key) in self._logged:
            return
        self._logged.add((outcome, r.key))
        level = logging.INFO if outcome in (WriteOutcome.GONE, WriteOutcome.CONFLICT) else (
            logging.WARNING)  # fmt: skip
        retry = (f"retried after {self.planners[kind.name].retry_after:.0f} s"
                 if outcome is WriteOutcome.ERROR else "retried when it changes")  # fmt: skip
        log.log(level, "%s: status not written (%s: %s); %s",
                what, outcome, detail, retry)  # fmt: skip


def _is_auth_error(e: BaseException) -> bool:
    return isinstance(e, ApiException) and e.status in (401, 403)


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"API error {e.status} {e.reason}".strip()
    return f"{type(e).__name__}: {e}"


def _status_message(e: ApiException) -> str:
    """The ``message`` of the ``Status`` body the API server answered with ("pods is
    forbidden: User ... cannot watch resource ..."), or ""."""
    try:
        body = json.loads(e.body or "")
    except (TypeError, ValueError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return message[:500] if isinstance(message, str) else ""


MAX_RETRY_AFTER = 3600.0


def _retry_after(e: BaseException) -> float | None:
    """Seconds from a 429 or 503 answer's ``Retry-After`` (delta-seconds, as the API
    server sends it), else None."""
    if not isinstance(e, ApiException) or e.status not in (429, 503) or not e.headers:
        return None
    try:
        value = float(e.headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return min(max(value, 0.0), MAX_RETRY_AFTER) if value == value else None


class KubeSource:
    """Keeps a :class:`DiscoveryStore` equal to what the API server says, until cancelled.

    ``run()`` starts one named task per resource (``kube-watch-pods`` ...) in a task
    group: if one dies of anything but the errors it retries, the others are cancelled
    and ``run()`` raises — the caller's guard decides (the control plane exits).
    """

    def __init__(
        self,
        config: KubeConfig,
        store: DiscoveryStore,
        api: k8s.ApiClient | None = None,
        *,
        mesh_default: DefaultPolicy | None = None,
    ) -> None:
        """``mesh_default``: the control plane's ``--default-inbound-policy`` (None: not
        set; pods and namespaces may still set theirs)."""
        self.config = config
        self.store = store
        self.view = ClusterView(config.trust_domain, mesh_default)
        self.stats = {r.name: WatchStats() for r in RESOURCES}
        self._own_api = api is None
        self.api = api if api is not None else make_api_client(config)
        self.status_writer = _StatusWriter(self)
        self.route_status = self.status_writer
        """The same writer (its name from before it wrote policies' status too)."""
        self._synced = False
        self.namespace_listeners: list[Callable[[], None]] = []
        """Called (on the loop) after Namespaces were listed or one changed: the trust
        bundle publisher (`controlplane.identity.kube.TrustBundlePublisher`) follows
        namespace labels this way without a watch of its own."""

    def commit(self, changes: Changes) -> None:
        if changes:
            self.store.update(changes.upserts, changes.deletes)
        if self.view.synced:
            self.store.mark_synced()
            if not self._synced:
                self._synced = True
                self.status_writer.poke()  # the first complete view: judge everything

    def touched(self, resource: str, event_type: str | None = None) -> None:
        """``resource`` was listed (``event_type`` None) or had a watch event: wake the
        status writer if that can change a status (a route or a policy changed, or a
        Service came or went — its other changes do not matter to ResolvedRefs)."""
        if resource in ("httproutes", "grpcroutes", "authorizationpolicies") or (
            resource == "services" and event_type != "MODIFIED"
        ):
            self.status_writer.poke()
        if resource == "namespaces":
            for listener in self.namespace_listeners:
                listener()

    def resource_version(self, resource: str) -> str | None:
        return self.stats[resource].resource_version

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for resource in RESOURCES:
                    group.create_task(
                        _Watcher(self, resource).run(), name=f"kube-watch-{resource.name}"
                    )
                group.create_task(self.status_writer.run(), name="kube-status")
        finally:
            if self._own_api:
                cast(Any, self.api).close()  # untyped in the client
