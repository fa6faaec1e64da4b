"""The node agent: eBPF capture of local pods plus the node proxy, in one process.

Start-up order matters for the restart window, and the agent fails closed through it.
Pods captured by the previous instance stay captured while no agent runs (attachments
outlive processes), so their new connects are refused until a listener is back on 15001.

* After a crash (nobody listens on 15001), the agent listens first: connects made while
  bcc compiles wait in the listen backlog.  Once accepting, connections are *held*
  (`nodeagent.proxy.hold.ReadyHold`) until the agent is ready — eBPF loaded, the first
  discovery snapshot applied and capture reconciled, a certificate for every local
  captured identity — and only then judged.  A connection judged against empty
  discovery would take a captured pod for one outside the mesh and go out in plaintext.
* In a make-before-break restart (the old agent still listens), the new agent compiles,
  syncs and gets its certificates while the old one serves everything, and joins the
  ``SO_REUSEPORT`` groups of 15001 and 15008 only once ready.

`/ready` turns 200 once all of that is done and the listeners are open.

Shutdown (SIGTERM/SIGINT) stops accepting, lets relays finish for ``drain_seconds`` and
leaves every attachment and pin in place, so pods stay captured across a restart.
``uninstall`` is the explicit way to release everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeagent.admin import AdminServer, Readiness
from nodeagent.authz import Authorizer
from nodeagent.capture import CaptureManager, LocalPod
from nodeagent.certs import CertConfig, WorkloadCertManager
from nodeagent.certtypes import CertSource
from nodeagent.cgroups import CgroupError, find_pod_cgroup, own_cgroup
from nodeagent.cpclient import ControlPlaneClient, ControlPlaneError
from nodeagent.discovery import DiscoveryClient
from nodeagent.ebpf import bpfsys
from nodeagent.ebpf.loader import (
    DEFAULT_MAP_ENTRIES,
    CaptureConfig,
    CaptureError,
    CapturePrograms,
    detach_all,
    remove_pins,
)
from nodeagent.hostaddrs import NodeAddresses
from nodeagent.httpmetrics import HttpMetrics
from nodeagent.labadapter import LabPodSource, LabUnavailable, lab_pod_cgroups, lab_settings
from nodeagent.meshstate import MeshState
from nodeagent.metrics import ConnLabels, ConnMeter, TcpMetrics
from nodeagent.prereqs import node_prerequisites
from nodeagent.proxy.balance import Balancer, PeakEwma
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover, FailoverObserver
from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.http.client import Http1Pool
from nodeagent.proxy.http.forward import H2, HTTP1, OutboundHttp
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.inbound import InboundHttp
from nodeagent.proxy.http.server import HttpServerConfig
from nodeagent.proxy.http.stage import HttpForward
from nodeagent.proxy.http.tenancy import RequestShares
from nodeagent.proxy.listener import Listener
from nodeagent.proxy.outbound import (
    Address,
    OutboundConfig,
    OutboundProxy,
    ProxyStats,
)
from nodeagent.proxy.resolve import Resolved, workload_name
from nodeagent.proxy.retry import RetryBudget
from nodeagent.proxy.switch import ProtocolSwitch
from nodeagent.proxy.tcp import TcpForward
from nodeagent.proxy.tls import TlsContexts
from nodeagent.proxy.tunnel import (
    TUNNEL_PORT,
    NotLocal,
    TunnelClient,
    TunnelClientConfig,
    TunnelServer,
    connect_target_plaintext,
)
from nodeagent.proxy.tunnel.hooks import ServedStream
from nodeagent.proxy.tunnel.wire import Extensions, carries_routes
from nodeagent.proxy.upstream import MeshUpstreams
from nodeagent.proxymetrics import admission_metrics as _admission_metrics
from nodeagent.proxymetrics import hold_metrics as _hold_metrics
from nodeagent.proxymetrics import pool_metrics as _pool_metrics
from nodeagent.retrymetrics import RetryMetrics
from nodeagent.tap import TapHub
from nodeagent.tracing import TraceExporter
from nodeagent.workers.supervisor import WorkerSupervisor, enable_accept_queue_migration
from weft.files import write_json_atomic
from weft.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from weft.mesh import Workload
from weft.meshwire import encode_traffic
from weft.preflight import find_bpffs_mount, find_cgroup2_mount
from weft.tracing import Resource, Tracer, TracingConfig
from weft.traffic import DEFAULT as DEFAULT_TRAFFIC

log = logging.getLogger("weft.agent")

LISTEN_BACKLOG = 4096
"""Connections the kernel queues per listener while the agent is busy or starting."""
MAX_WORKERS = 64
"""Proxy worker processes at most (``--workers``)."""
NODE_ADDR_INTERVAL = 5.0
"""Seconds between reads of the node's addresses (`nodeagent.hostaddrs`)."""


class AgentError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


class DestinationLookup(Protocol):
    def original_destination(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        """Where the captured connection from (peer_ip, peer_port) was headed."""
        ...


@dataclass(frozen=True)
class AgentConfig:
    node: str
    """Name of the node this agent serves."""
    state_file: Path | None
    """Lab state file (capture-only mode reads pods from it); None on Kubernetes."""
    proxy_ip: str
    """Address captured connects are rewritten to (the node as pods see it)."""
    node_addrs: tuple[str, ...]
    """All addresses of this node: never captured; accepted by strict pods."""
    pin_dir: Path
    """bpffs directory of this agent's pinned maps."""
    state_dir: Path
    """Small files of this agent (which cgroups it attached)."""
    cgroup2: Path
    """Where cgroup v2 is mounted."""
    outbound_port: int = 15001
    admin_port: int = 15020
    listen_ip: str = "0.0.0.0"
    skip_ports: tuple[int, ...] = ()
    """Destination ports never captured."""
    sockmap: bool = True
    """Shortcut same-node pod<->proxy bytes with sk_msg."""
    ebpf_map_entries: int = DEFAULT_MAP_ENTRIES
    """Captured connections the per-connection eBPF maps are sized for."""
    drain_seconds: float = 5.0
    """On shutdown, how long active connections may finish before they are closed."""
    controlplane: str | None = None
    """Control plane address for certificates (None: capture only, no mTLS)."""
    token_file: Path | None = None
    """This node's bootstrap credential (lab: a token the lab wrote, mode 0600)."""
    trust_bundle: Path | None = None
    """PEM trust anchors to trust the control plane with before the first response."""
    cert_dir: Path | None = None
    """Where workload keys and certificates live (tmpfs, 0700)."""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cgroup_root: Path | None = None
    """Lab: where pod cgroups live (``<root>/<node>/<pod>``); None on Kubernetes."""
    connect_attempts: int = 3
    """Endpoints tried for one connection to a service before the app is reset (retries
    beyond the first are also bounded by a retry budget: +20 % of first attempts, plus
    10 per second)."""
    attempt_timeout: float = 1.5
    """Seconds each stage of one attempt may take: the TCP connect, the TLS handshake and
    the tunnel's answer.  Counted only while the attempt runs, not while it waits for a
    handshake slot, so a queue on this node is never taken for a slow endpoint."""
    ready_wait: float = 15.0
    """Seconds a captured connection that arrives before the agent is ready (no
    certificates or no discovery snapshot yet) is held waiting for it; then it is
    reset.  It is never judged, let alone sent in plaintext, before that."""
    max_handshakes: int = 32
    """Fresh tunnel handshakes in progress at once; more wait their turn."""
    handshake_queue_timeout: float = 30.0
    """Seconds a connection may wait for a handshake slot before it is reset."""
    idle_timeout: float = 3600.0
    """Seconds without a byte either way after which a proxied connection is closed."""
    tunnel_idle_timeout: float = 60.0
    """Seconds a pooled tunnel connection to another node stays open without a stream."""
    tunnel_max_streams: int = 100
    """Proxied connections multiplexed on one tunnel connection at most; past it another
    connection to the same (source, node, destination identity) opens."""
    max_connections_per_pod: int = 8192
    """Open connections one local pod may hold through the proxy (``OutboundConfig``):
    its next are refused, the other pods' are not."""
    max_requests_per_pod: int = 2048
    """HTTP requests one local pod may have in flight through the proxy: its next are
    answered 503 overloaded / gRPC RESOURCE_EXHAUSTED (`nodeagent.proxy.http.tenancy`)."""
    http: bool = True
    """Detect HTTP/1.1 and serve it per request (balancing, golden metrics); off: every
    connection is opaque TCP, as before."""
    detect_timeout: float = 1.0
    """Seconds protocol detection waits for the client's first bytes before serving the
    connection as opaque TCP (server-first protocols on ports not marked opaque)."""
    pod_uid: str | None = None
    ready_file: Path | None = None
    """Written once ready, removed on stop (``WEFT_READY_FILE``): what the DaemonSet's
    readiness probe tests (`Agent._mark_ready`)."""
    """Kubernetes: the agent's own pod UID, to find its cgroup (the container's
    /proc/self/cgroup is namespaced and says only "/")."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Distributed tracing: the OTLP collector (none: off) and the sample rate for
    requests that bring no decision (``--trace-collector``, ``--trace-sample-rate``)."""
    workers: int = 1
    """Proxy processes (`nodeagent.workers`): 1 serves in the agent's own process; N > 1
    runs N worker processes sharing the listening ports (``SO_REUSEPORT``) while this
    process keeps capture, certificates and discovery (``--workers``)."""

    def __post_init__(self) -> None:
        if self.connect_attempts < 1:
            raise AgentError(f"connect attempts must be at least 1, got {self.connect_attempts}")
        if self.max_handshakes < 1:
            raise AgentError(f"max handshakes must be at least 1, got {self.max_handshakes}")
        for name in (
            "attempt_timeout",
            "idle_timeout",
            "drain_seconds",
            "ready_wait",
            "handshake_queue_timeout",
            "tunnel_idle_timeout",
        ):
            if getattr(self, name) <= 0:
                raise AgentError(f"{name.replace('_', ' ')} must be positive")
        if self.detect_timeout <= 0:
            raise AgentError(f"detect timeout must be positive, got {self.detect_timeout}")
        if self.max_requests_per_pod < 1:
            raise AgentError(f"max requests per pod must be >= 1, got {self.max_requests_per_pod}")
        if self.max_connections_per_pod < 1:
            raise AgentError(
                f"max connections per pod must be >= 1, got {self.max_connections_per_pod}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise AgentError(f"workers must be 1..{MAX_WORKERS}, got {self.workers}")
        if self.workers > 1 and not self.controlplane:
            raise AgentError(
                "--workers above 1 needs the mesh (a control plane): capture-only mode "
                "serves in the agent's process"
            )
        if not 1 <= self.tunnel_max_streams <= 65_536:
            raise AgentError(f"tunnel max streams must be 1..65536, got {self.tunnel_max_streams}")

    @classmethod
    def for_lab(cls, lab: str, node: str, **overrides: Any) -> AgentConfig:
        try:
            settings = lab_settings(lab, node, _cgroup2())
        except LabUnavailable as e:
            raise AgentError(str(e)) from None
        # Explicit overrides win over what the lab says.
        return cls(**(settings | overrides))

    @classmethod
    def for_kubernetes(cls, env: Mapping[str, str], **overrides: Any) -> AgentConfig:
        """The DaemonSet's agent, configured from its environment (see
        daemonset/weft.yaml, which sets each of these).

        ``NODE_NAME``, ``NODE_IP`` (``status.hostIP``) and ``POD_UID`` come from the
        downward API; ``WEFT_CONTROLPLANE`` names the control plane's service.  Paths
        default to the manifest's mounts: the host's cgroup2 at ``/host/cgroup``, bpffs at
        ``/sys/fs/bpf``, the projected token, the trust bundle ConfigMap, a memory-backed
        certificate directory and a host directory for the agent's small state.
        """

        def need(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise AgentError(
                    f"${name} is not set: the DaemonSet sets it (see daemonset/weft.yaml)"
                )
            return value

        node, node_ip = need("NODE_NAME"), need("NODE_IP")
        cgroup2 = Path(env.get("WEFT_CGROUP2", "/host/cgroup"))
        bpffs = Path(env.get("WEFT_BPFFS", "/sys/fs/bpf"))
        for path, what in ((cgroup2, "cgroup v2 (host)"), (bpffs, "bpffs")):
            if not path.is_dir():
                raise AgentError(f"{what} is not mounted at {path}: see daemonset/weft.yaml")
        extra = tuple(a.strip() for a in env.get("WEFT_NODE_ADDRS", "").split(",") if a.strip())
        return cls(
            node=node,
            state_file=None,
            proxy_ip=node_ip,
            node_addrs=(node_ip, *extra),
            pin_dir=bpffs / "weft" / node,
            state_dir=Path(env.get("WEFT_STATE_DIR", "/var/run/weft/agent")),
            cgroup2=cgroup2,
            controlplane=need("WEFT_CONTROLPLANE"),
            token_file=Path(env.get("WEFT_TOKEN_FILE", "/var/run/secrets/weft/token")),
            trust_bundle=Path(env.get("WEFT_TRUST_BUNDLE", "/etc/weft/trust/ca.crt")),
            cert_dir=Path(env.get("WEFT_CERT_DIR", "/run/weft/certs")),
            trust_domain=env.get("WEFT_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN),
            pod_uid=need("POD_UID"),
            ready_file=Path(env["WEFT_READY_FILE"]) if env.get("WEFT_READY_FILE") else None,
            **overrides,
        )


def _cgroup2() -> Path:
    mountinfo = Path("/proc/self/mountinfo").read_text()
    mount = find_cgroup2_mount(mountinfo)
    if mount is None:
        raise AgentError("cgroup v2 is not mounted: run `make setup` (see `weft check`)")
    if find_bpffs_mount(mountinfo) is None:
        raise AgentError(
            "bpffs is not mounted: `mount -t bpf bpf /sys/fs/bpf` or `make setup` "
            "(see `weft check`)"
        )
    return Path(mount)


class _StatsCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Any:
        progs = self.agent.progs
        if progs is not None:
            c = CounterMetricFamily(
                "weft_capture_events", "eBPF capture events by kind", labels=["event"]
            )
            for name, value in progs.stats().items():
                c.add_metric([name], value)
            yield c
        g = GaugeMetricFamily("weft_captured_pods", "Local pods captured by this agent")
        g.add_metric([], len(self.agent.manager.captured) if self.agent.manager else 0)
        yield g
        yield from _hold_metrics(self.agent.holds)
        client = self.agent.tunnel_client
        if client is not None:
            yield from _admission_metrics(client.admission.stats)
        yield from _pool_metrics(client, self.agent.tunnel_server)
        r = CounterMetricFamily(
            "weft_outbound_retries_skipped",
            "Failovers to another endpoint not tried because the retry budget was spent.",
        )
        r.add_metric([], self.agent.retry_budget.skipped)
        yield r
        switch = self.agent.switch
        if switch is not None:
            d = CounterMetricFamily(
                "weft_protocol_detect",
                "Outbound connections by what protocol detection found (http1, h2, tls, "
                "opaque, opaque_port, timeout, closed).",
                labels=["result"],
            )
            for result, n in sorted(switch.decisions.items()):
                d.add_metric([result], n)
            yield d
        if self.agent.proxy is not None:
            s = self.agent.proxy.stats
            for name in ("accepted", "refused_unknown", "refused_loop", "upstream_failed"):
                m = CounterMetricFamily(f"weft_outbound_{name}", f"outbound connections {name}")
                m.add_metric([], getattr(s, name))
                yield m
            yield self._by_source(
                "weft_outbound_refused_busy",
                "Outbound connections refused because their source pod already held its "
                "share of the node proxy (--max-connections-per-pod), by source: the noisy "
                "pod is refused, nobody else.",
                s.refused_busy_by_source,
            )
        shares = self.agent.request_shares
        yield self._by_source(
            "weft_outbound_http_refused_busy",
            "HTTP requests answered 503 overloaded (gRPC RESOURCE_EXHAUSTED) because their "
            "source pod already had --max-requests-per-pod in flight, by source.",
            shares.refused,
        )
        yield self._by_source(
            "weft_outbound_http_waited",
            "HTTP requests that waited for their source pod's share while the node proxy's "
            "event loop ran late (the contention cap binds only heavy pods), by source.",
            shares.waited,
        )

    def _by_source(self, name: str, doc: str, counts: Mapping[str, int]) -> CounterMetricFamily:
        """A counter by source pod from counts keyed by its address (``[other]``: the
        overflow bucket)."""
        family = CounterMetricFamily(name, doc, labels=["src_workload", "src_namespace"])
        for ip, n in sorted(counts.items()):
            w = self.agent.mesh.workload_at(ip) if ip != "[other]" else None
            family.add_metric([w.name, w.namespace] if w else [ip, ""], n)
        return family


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        blockers = ["ebpf", "listener", "pods"]
        if cfg.controlplane:
            blockers.append("certificates")
        self.readiness = Readiness(*blockers)
        self._unmark_ready()  # a restarted container's marker says nothing of this one
        self.readiness.on_ready = self._mark_ready
        self.progs: CapturePrograms | None = None
        self.destinations: DestinationLookup | None = None
        """Where captured connections were headed: the loaded programs' map, or in a
        worker process the pinned map opened by path."""
        self.supervisor: WorkerSupervisor | None = None
        """With ``workers`` > 1: the proxy worker processes (this process serves none)."""
        self.node_addresses = NodeAddresses((*cfg.node_addrs, cfg.proxy_ip))
        """The node's own addresses, which strict pods accept (kept in step with the
        kernel's: `nodeagent.hostaddrs`)."""
        self.manager: CaptureManager | None = None
        self.proxy: OutboundProxy | None = None
        self.proxy_cgroup: Path | None = None
        self.certs: WorkloadCertManager | None = None
        self.cp_client: ControlPlaneClient | None = None
        self.mesh = MeshState()
        self._cgroups: dict[str, Path] = {}
        self._cgroup_misses: dict[str, tuple[int, float]] = {}
        self.cp_client_bootstrapped = asyncio.Event()
        self.discovery: DiscoveryClient | None = None
        self.balancer: Balancer[Address] = Balancer()
        self.tunnel_server: TunnelServer | None = None
        self.tunnel_client: TunnelClient | None = None
        # Captured connections wait here until the agent is ready (fail closed).
        self.holds = {
            kind: ReadyHold(kind, deadline=cfg.ready_wait) for kind in ("outbound", "tunnel")
        }
        self.retry_budget = RetryBudget()
        # The outbound data path, stage by stage: accept (OutboundProxy) -> protocol
        # switch -> TCP forward -> resolve -> balance + failover -> dial (MeshUpstreams).
        self.dialer = Dialer(tunnel=None, attempt_timeout=cfg.attempt_timeout)
        self.upstreams = MeshUpstreams(
            mesh=self.mesh,
            failover=Failover(
                attempts=max(1, cfg.connect_attempts),
                budget=self.retry_budget,
                balancer=self.balancer,
            ),
            dialer=self.dialer,
            meter=lambda labels: self.tcp.open(labels),
            observer=self._failure_observer,
        )
        # Requests (HTTP/1.1, HTTP/2 streams): the same stages per request, with a
        # latency-aware balancer (P2C over peak EWMA x outstanding) and pooled upstream
        # connections.
        self.http_balancer: Balancer[Address] = Balancer(latency=PeakEwma())
        self.http_metrics = HttpMetrics()
        self.retry_metrics = RetryMetrics()
        # Authorization: every tunnel stream and every inbound HTTP/1.1 request against
        # the local pod's policies (from discovery), on this node as the destination;
        # every HTTP/2 request against its endpoint's policies, on this node as the caller's.
        self.authorizer = Authorizer(self.mesh.workload_at, trust_domain=cfg.trust_domain)
        self.request_shares = RequestShares(cfg.max_requests_per_pod, name=self._pod_name)
        """Each local pod's share of in-flight HTTP requests (issue #18)."""
        # Tracing: spans of sampled requests, exported off the hot path (none without a
        # collector: the data path then forwards trace headers untouched).
        self.tracer = Tracer.for_config(cfg.tracing)
        self.trace_exporter = (
            TraceExporter(cfg.tracing, Resource(node=cfg.node)) if cfg.tracing.enabled else None
        )
        # Live tap (`weft viz tap`): the admin port's loopback clients subscribe; the data
        # path publishes only while one does.
        self.tap = TapHub(cfg.node)
        self.outbound_http = OutboundHttp(
            mesh=self.mesh,
            failover=Failover(
                attempts=max(1, cfg.connect_attempts),
                budget=self.retry_budget,
                balancer=self.http_balancer,
            ),
            dialer=self.dialer,
            pool=Http1Pool(),
            metrics=self.http_metrics,
            observer=lambda app, dest, service: _AttemptLog(self, app, dest, service),
            retry_metrics=self.retry_metrics,
            authorize=self.authorizer.outbound,
            tracer=self.tracer if self.trace_exporter is not None else None,
            record_span=self.trace_exporter.record if self.trace_exporter is not None else None,
            tap=self.tap,
        )
        self.inbound_http = InboundHttp(
            connect=connect_target_plaintext,
            metrics=self.http_metrics,
            workload_at=self.mesh.workload_at,
            gate=self.authorizer.gate,
            # The SERVER span of requests whose client node reserved one (tracestate).
            tracer=self.tracer if self.trace_exporter is not None else None,
            record_span=self.trace_exporter.record if self.trace_exporter is not None else None,
            tap=self.tap,
        )
        self.switch: ProtocolSwitch | None = None
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(self))
        self.tcp = TcpMetrics()
        self.registry.register(self.tcp)
        self.registry.register(self.http_metrics)
        self.registry.register(self.retry_metrics)
        self.registry.register(self.authorizer.metrics)
        if self.trace_exporter is not None:
            self.registry.register(self.trace_exporter.metrics)
        self.m_connect_failures = Counter(
            "weft_outbound_endpoint_failures",
            "Outbound connect attempts that failed, by service (empty: a direct address) "
            "and whether another endpoint was tried.",
            ["service", "retried"],
            registry=self.registry,
        )
        self.m_ejections = Counter(
            "weft_outbound_endpoint_ejections",
            "Endpoints ejected after consecutive connect failures, by service.",
            ["service"],
            registry=self.registry,
        )

    def original_destination(self, sock: socket.socket) -> tuple[str, int] | None:
        assert self.destinations is not None
        peer = sock.getpeername()
        return self.destinations.original_destination(peer[0], peer[1])

    def is_self(self, ip: str, port: int) -> bool:
        ours = {self.cfg.outbound_port, self.cfg.admin_port}
        local = ip in self.node_addresses or ip == self.cfg.proxy_ip or ip.startswith("127.")
        return local and port in ours

    def state(self) -> dict[str, Any]:
        """``/debug/state``: the node's part, and the data path's — this process's, or
        with workers each worker's as it last reported it."""
        node = self.node_state()
        if self.supervisor is None:
            return node | self.data_path_state()
        return node | {
            "proxy": self._proxy_state(self.supervisor.proxy_totals()),
            "workers": self.supervisor.state(),
        }

    def _proxy_state(self, stats: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "outbound": f"{self.cfg.listen_ip}:{self.cfg.outbound_port}",
            "redirect_target": f"{self.cfg.proxy_ip}:{self.cfg.outbound_port}",
            "cgroup": str(self.proxy_cgroup) if self.proxy_cgroup else None,
            "stats": stats,
        }

    def node_state(self) -> dict[str, Any]:
        progs = self.progs
        return {
            "node": self.cfg.node,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "ready": self.readiness.ready,
            "waiting_for": sorted(self.readiness.blockers),
            "ebpf": {
                "pin_dir": str(self.cfg.pin_dir),
                "compile_seconds": round(progs.compile_seconds, 3) if progs else None,
                "program_ids": {bpfsys.ATTACH_TYPE_NAMES[h]: i for h, i in progs.ids.items()}
                if progs
                else None,
                "sockmap": self.cfg.sockmap,
                "node_addrs": sorted(progs.node_addrs()) if progs else None,
                "stats": progs.stats() if progs else None,
                "orig_dst_entries": progs.map_entries("weft_orig_dst") if progs else None,
                "cookie_entries": progs.map_entries("weft_cookie_dst") if progs else None,
                "maps": progs.maps() if progs else None,
                "notes": list(progs.notes) if progs else [],
            },
            "capture": self.manager.snapshot() if self.manager else None,
            "tap": self.tap.state(),
            "certificates": self.certs.snapshot() if self.certs else None,
            "discovery": self.discovery.snapshot() if self.discovery else None,
        }

    def data_path_state(self) -> dict[str, Any]:
        return {
            "proxy": self._proxy_state(vars(self.proxy.stats) if self.proxy else None),
            "http": {
                "enabled": self.cfg.http,
                "detected": dict(self.switch.decisions) if self.switch else {},
                "outbound_requests": self.outbound_http.requests,
                "replayed": self.outbound_http.replayed,
                "inbound_requests": self.inbound_http.requests,
                "inbound_h1_streams": self.inbound_http.streams,
                "inbound_h2_streams": self.inbound_http.h2_streams,
                "pools": {
                    "outbound": {
                        "idle": self.outbound_http.pool.idle,
                        "opened": self.outbound_http.pool.opened,
                        "reused": self.outbound_http.pool.reused,
                    },
                },
                "h2_pools": {
                    side: {
                        "connections": pool.connections,
                        "idle": pool.idle,
                        "opened": pool.opened,
                        "reused": pool.reused,
                    }
                    for side, pool in (("outbound", self.outbound_http.h2_pool),)
                },
                # Services with retries, timeouts or failure accrual (docs/resilience.md).
                "policies": {
                    key: encode_traffic(svc.traffic)
                    for key, svc in sorted(self.mesh.services.items())
                    if svc.traffic != DEFAULT_TRAFFIC
                },
                "endpoints": {
                    f"{a[0]}:{a[1]}": {
                        "state": self.http_balancer.state(a),
                        "outstanding": h.outstanding,
                        "failed_responses_in_a_row": h.failed_responses,
                        "ejections": h.ejections,
                    }
                    for a, h in sorted(self.http_balancer.health.items())
                },
            },
            "endpoints": {
                f"{a[0]}:{a[1]}": {
                    "state": self.balancer.state(a),
                    "outstanding": h.outstanding,
                    "failures": h.failures,
                    "ejections": h.ejections,
                }
                for a, h in sorted(self.balancer.health.items())
            },
            "metrics_series": self.tcp.series,
            "tunnel": {
                "server": vars(self.tunnel_server.stats) if self.tunnel_server else None,
                "client": vars(self.tunnel_client.stats) if self.tunnel_client else None,
                "connections": self.tunnel_client.connections if self.tunnel_client else None,
                "streams": self.tunnel_client.open_streams if self.tunnel_client else None,
                "pool": self.tunnel_client.pool_state() if self.tunnel_client else None,
                "handshakes": vars(self.tunnel_client.admission.stats)
                if self.tunnel_client
                else None,
            },
            "held_until_ready": {kind: vars(h.stats) for kind, h in self.holds.items()},
            "retries_skipped": self.retry_budget.skipped,
        }

    def _own_cgroup(self) -> Path:
        cfg = self.cfg
        found = agent_cgroup(cfg)
        if found is None:
            raise AgentError(
                f"cannot find the agent's own pod cgroup (pod {cfg.pod_uid}) under "
                f"{cfg.cgroup2}: is the host's cgroup2 mounted there?"
            )
        return found

    def _load_ebpf(self) -> None:
        cfg = self.cfg
        self.proxy_cgroup = self._own_cgroup()
        sockmap = cfg.sockmap
        if sockmap and self.proxy_cgroup.resolve() == cfg.cgroup2.resolve():
            log.warning(
                "the agent runs in the root cgroup (%s): not attaching sock_ops there, so the "
                "same-node sk_msg shortcut is off; run the agent in its own cgroup",
                cfg.cgroup2,
            )
            sockmap = False
        if cfg.ebpf_map_entries < 2 * LISTEN_BACKLOG:
            log.warning(
                "--ebpf-map-entries %d is below twice the listen backlog (%d): a burst of "
                "connects waiting for the proxy's accept can evict original destinations "
                "the proxy still needs, and those connections are refused",
                cfg.ebpf_map_entries,
                LISTEN_BACKLOG,
            )
        self.progs = self.destinations = CapturePrograms.load(
            CaptureConfig(
                pin_dir=cfg.pin_dir,
                proxy_ip=cfg.proxy_ip,
                proxy_port=cfg.outbound_port,
                node_addrs=cfg.node_addrs,
                skip_ports=cfg.skip_ports,
                sockmap=sockmap,
                map_entries=cfg.ebpf_map_entries,
            )
        )
        log.info(
            "eBPF capture programs compiled in %.2fs and loaded (ids %s), maps pinned at %s",
            self.progs.compile_seconds,
            {bpfsys.ATTACH_TYPE_NAMES[h]: i for h, i in self.progs.ids.items()},
            cfg.pin_dir,
        )
        self._refresh_node_addrs()
        if sockmap:
            self.progs.attach_proxy(self.proxy_cgroup)
        else:
            self.progs.detach_proxy(self.proxy_cgroup)
        self.manager = CaptureManager(
            self.progs, cfg.state_dir / "attached.json", protected=[self.proxy_cgroup]
        )
        self.readiness.done("ebpf")

    def _mark_ready(self) -> None:
        """The readiness marker file (``WEFT_READY_FILE``) kubelet's exec probe tests: the
        admin port is shared with the previous agent during a make-before-break rollout,
        so an HTTP probe could be answered by it; a file in this container's own
        filesystem cannot."""
        marker = self.cfg.ready_file
        if marker is not None:
            write_json_atomic(marker, {"pid": os.getpid(), "node": self.cfg.node})

    def _unmark_ready(self) -> None:
        marker = self.cfg.ready_file
        if marker is not None:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()  # the pod's own volume: no other agent writes it

    def _pod_name(self, ip: str) -> str:
        w = self.mesh.workload_at(ip)
        return f"pod {w.namespace}/{w.name} ({ip})" if w is not None else f"pod {ip}"

    def _refresh_node_addrs(self) -> None:
        """Make ``weft_node_addr`` the node's current addresses (a CNI may add its
        gateway's when the first pod arrives)."""
        assert self.progs is not None
        wanted = self.node_addresses.wanted()
        added, removed = self.progs.set_node_addrs(wanted)
        self.node_addresses.current = wanted
        if added or removed:
            log.info("strict pods accept new connections from the node's addresses %s%s%s",
                     ", ".join(sorted(wanted)),
                     f" (new: {', '.join(sorted(added))})" if added else "",
                     f" (gone: {', '.join(sorted(removed))})" if removed else "")  # fmt: skip

    async def _node_addr_loop(self) -> None:
        while True:
            await asyncio.sleep(NODE_ADDR_INTERVAL)
            if self.progs is None:
                continue  # no eBPF (yet): nothing to keep in step
            try:
                self._refresh_node_addrs()
            except OSError as e:  # BpfError too
                log.warning("updating the node's addresses for strict pods failed: %s", e)

    async def _capture_loop(self) -> None:
        """Capture-only mode (no control plane): the local pods from the lab state file."""
        assert self.manager is not None and self.cfg.state_file is not None
        source = LabPodSource(self.cfg.state_file, self.cfg.node)
        async for pods in source.snapshots():
            self.manager.apply(pods)
            self.readiness.done("pods")

    def pod_cgroup(self, w: Workload) -> Path | None:
        """The pod's cgroup: the lab's layout, or kubelet's found by pod UID (cached;
        None until kubelet has made it)."""
        root = self.cfg.cgroup_root
        if root is not None:
            return root / w.node / w.name
        cached = self._cgroups.get(w.uid)
        if cached is not None and cached.is_dir():
            return cached
        misses, retry_at = self._cgroup_misses.get(w.uid, (0, 0.0))
        now = time.monotonic()
        if now < retry_at:
            return None
        try:
            found = find_pod_cgroup(self.cfg.cgroup2, w.uid)
        except (ValueError, CgroupError) as e:
            log.warning("pod %s/%s (uid %s): no cgroup: %s", w.namespace, w.name, w.uid, e)
            found = None
        if found is None:
            # The walk visits much of the cgroup tree: back off per pod, 1 s doubling to
            # 30 s, so one pod kubelet never set up does not cost a walk every second.
            self._cgroup_misses[w.uid] = (misses + 1, now + min(30.0, 2.0**misses))
            return None
        self._cgroup_misses.pop(w.uid, None)
        self._cgroups[w.uid] = found
        return found

    def local_pod(self, w: Workload) -> LocalPod:
        return LocalPod(
            name=w.name,
            namespace=w.namespace,
            ip=w.ips[0] if w.ips else "",
            service_account=w.service_account,
            cgroup=self.pod_cgroup(w),
            # A sidecar-mode pod's own proxy captures it (nftables in its netns).
            captured=w.captured and not w.sidecar,
            strict=w.strict,
            plaintext=self.authorizer.plaintext(w),
        )

    async def _mesh_loop(self) -> None:
        """Mesh mode: capture, certificates and housekeeping follow the discovery state."""
        assert self.manager is not None and self.certs is not None
        seen = 0
        pending = False
        while True:
            try:
                # A captured pod whose cgroup kubelet has not made yet is looked for again
                # every second, not only at the next discovery change.
                async with asyncio.timeout(1.0 if pending else None):
                    seen = await self.mesh.wait_change(seen)
            except TimeoutError:
                pass
            local = self.mesh.on_node(self.cfg.node)
            pods = [self.local_pod(w) for w in local]
            pending = any(p.captured and p.cgroup is None for p in pods)
            self.manager.apply(pods)
            known = self.mesh.workloads
            self._cgroups = {uid: path for uid, path in self._cgroups.items() if uid in known}
            self._cgroup_misses = {
                uid: miss for uid, miss in self._cgroup_misses.items() if uid in known
            }
            # One workload identity per service account with a captured pod here; the
            # first call carries the whole set (it prunes stale key directories).
            self.certs.set_identities(w.identity for w in local if w.captured and not w.sidecar)
            self.prune_data_path()
            self.readiness.done("pods")

    def prune_data_path(self) -> None:
        """After a discovery change: forget endpoints and metric series of what left."""
        self.balancer.retain(
            (ep.address, port)
            for svc in self.mesh.services.values()
            for ep in svc.endpoints
            for port in {p for p in (_numeric(svc, ep)) if p}
        )
        known_pods = _known_in({(w.namespace, w.name) for w in self.mesh.workloads.values()})
        self.tcp.prune(known_pods)
        self.http_metrics.prune(known_pods)
        self.http_balancer.retain(self.balancer.health)  # what discovery still has

    def _open_tunnel(self, outbound: socket.socket, *, listen: bool) -> socket.socket:
        """Certificates, discovery, the tunnel's stages and its listener on the node
        address."""
        assert self.certs is None
        certs = self._open_control()
        self.open_tunnel_path(certs)
        try:
            return self.bind_tunnel(listen=listen)
        except AgentError:
            outbound.close()
            raise

    def _open_control(self) -> WorkloadCertManager:
        """The control-plane client, the certificate manager and the discovery client:
        what the agent keeps, whoever serves the data path."""
        cfg = self.cfg
        assert cfg.controlplane and cfg.trust_bundle and cfg.cert_dir and cfg.token_file
        self.cp_client = ControlPlaneClient(
            cfg.controlplane,
            cfg.trust_bundle,
            cfg.cert_dir.parent / "node",
            trust_domain=cfg.trust_domain,
        )
        self.certs = WorkloadCertManager(
            self.cp_client,
            CertConfig(cert_dir=cfg.cert_dir),
            self.registry,
            trust_bundle_pem=cfg.trust_bundle.read_bytes(),
        )
        self.discovery = DiscoveryClient(self.cp_client, self.mesh, registry=self.registry)
        return self.certs

    def open_tunnel_path(self, certs: CertSource) -> None:
        """The tunnel's server (inbound from other nodes) and client (the dial stage's
        pooled mTLS connections), on the workload certificates of ``certs``."""
        cfg = self.cfg
        contexts = TlsContexts(certs, trust_domain=cfg.trust_domain)
        self.tunnel_server = TunnelServer(
            contexts=contexts,
            locate_target=self.locate_target,
            authorize=self.authorizer.stream,
            meter=self._inbound_meter,
            hold=self.holds["tunnel"],
            protocols={HTTP1: self._inbound_http_stream, H2: self._inbound_h2_stream}
            if cfg.http
            else None,
        )
        attempt = cfg.attempt_timeout
        self.tunnel_client = self.dialer.tunnel = TunnelClient(
            contexts,
            config=TunnelClientConfig(
                idle_timeout=cfg.tunnel_idle_timeout,
                max_streams=cfg.tunnel_max_streams,
                connect_timeout=attempt,
                handshake_timeout=attempt,
                answer_timeout=attempt,
                max_handshakes=cfg.max_handshakes,
                handshake_queue_timeout=cfg.handshake_queue_timeout,
            ),
        )

    def bind_outbound(self) -> socket.socket:
        """The outbound listening socket (15001), bound, not listening yet."""
        cfg = self.cfg
        return _reuseport_socket(
            (cfg.listen_ip, cfg.outbound_port),
            "(another program holds the port without SO_REUSEPORT)",
        )

    def bind_tunnel(self, *, listen: bool) -> socket.socket:
        """The tunnel's listening socket on the node address (15008)."""
        node_ip = self.cfg.node_addrs[0]
        sock = _reuseport_socket((node_ip, TUNNEL_PORT), "for tunnels")
        if listen:
            sock.listen(LISTEN_BACKLOG)
        log.info("tunnel: mTLS (TLS 1.3) on %s:%d", node_ip, TUNNEL_PORT)
        return sock

    def _start_certificates(self) -> asyncio.Task[None]:
        assert self.certs is not None
        return self.certs.start()

    # -- the mesh data path (tunnel) ------------------------------------------------------

    def locate_target(self, target: tuple[str, int]) -> SpiffeId | NotLocal:
        """For the tunnel server: the identity of the local pod at ``target``."""
        w = self.mesh.workload_at(target[0])
        if w is None:
            return NotLocal.UNKNOWN
        if w.node != self.cfg.node or w.sidecar:
            return NotLocal.ELSEWHERE  # a sidecar-mode pod serves its own tunnel
        return w.identity

    async def _inbound_http_stream(
        self,
        client: SpiffeId,
        presented: SpiffeId | None,
        target: Address,
        label: str,
        extensions: Extensions,
    ) -> ServedStream:
        """One tunnel stream whose client node detected HTTP/1.1: relayed to the pod
        and observed, with the connection to the pod made (or the OSError that refuses
        the stream)."""
        return await self.inbound_http.observe(
            client, presented, target, label, routed=carries_routes(extensions)
        )

    async def _inbound_h2_stream(
        self,
        client: SpiffeId,
        presented: SpiffeId | None,
        target: Address,
        label: str,
        extensions: Extensions,
    ) -> ServedStream:
        """One tunnel stream whose client node detected h2: relayed to one h2c
        connection to the pod and observed frame by frame."""
        return await self.inbound_http.observe_h2(client, presented, target, label)

    def _opaque_destination(self, dest: Address) -> bool:
        """Whether ``weft.io/opaque-ports`` marks the destination opaque: a service
        port (for a VIP) or a pod port (for a pod address)."""
        target = self.mesh.vip(*dest)
        if target is not None:
            return dest[1] in target.service.opaque_ports
        pod = self.mesh.workload_at(dest[0])
        return pod is not None and dest[1] in pod.opaque_ports

    def _inbound_meter(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address
    ) -> ConnMeter:
        dst = self.mesh.workload_at(target[0])
        src_ns = client.namespace or "unknown"
        return self.tcp.open(
            ConnLabels(
                "inbound", client.service_account or "unknown", src_ns,
                *workload_name(dst), "true", str(client), str(presented or ""),
            )
        )  # fmt: skip

    def _failure_observer(
        self, app: Address, destination: Address, resolved: Resolved
    ) -> FailoverObserver:
        """Metrics and a log line for each failed attempt of one outbound connect."""
        return _AttemptLog(self, app, destination, resolved.service.key if resolved.service else "")

    async def _bootstrap(self) -> None:
        """Get the node certificate; until it works, certificate requests retry it."""
        cfg = self.cfg
        assert self.cp_client is not None and cfg.token_file is not None
        token_file = cfg.token_file
        try:
            await self.cp_client.bootstrap(cfg.node, lambda: token_file.read_text().strip())
            log.info("node %s bootstrapped with the control plane at %s", cfg.node,
                     cfg.controlplane)  # fmt: skip
        except ControlPlaneError as e:
            log.warning("bootstrap with %s failed (%s); will retry with the first certificate "
                        "request", cfg.controlplane, e)  # fmt: skip
        finally:
            self.cp_client_bootstrapped.set()

    async def _discover(self) -> None:
        """The discovery stream, once the bootstrap has been tried (it needs the node
        certificate; open_stream bootstraps again by itself when that failed)."""
        assert self.discovery is not None
        await self.cp_client_bootstrapped.wait()
        await self.discovery.run()

    async def _certificates_ready(self) -> None:
        """Readiness: every identity of a captured local pod has a certificate."""
        assert self.certs is not None
        while True:
            # Only once the first pod snapshot has said which identities are needed.
            if "pods" not in self.readiness.blockers:
                ids = self.certs.identities
                if all(self.certs.material(i) is not None for i in ids):
                    self.readiness.done("certificates")
                    return
            await asyncio.sleep(0.1)

    def _load_ebpf_or_fail(self) -> None:
        missing = node_prerequisites(self.cfg.pin_dir.parent.parent)
        if missing:
            raise AgentError("; ".join(missing) + " (docs/kubernetes.md: node prerequisites)")
        try:
            self._load_ebpf()
        except (CaptureError, OSError) as e:
            raise AgentError(str(e)) from e

    async def _become_ready(
        self, sockets: list[socket.socket], listening: asyncio.Event, listen_early: bool
    ) -> None:
        """Once certificates, discovery and capture are in place: serve what was held
        (crash restart) or join the listening groups (make-before-break).

        After a crash nobody else serves the node, and one identity whose certificate
        cannot be had (the control plane refuses it, say) must not keep every pod's
        connections held until they are reset.  So once discovery and capture are in
        place, certificates get half of ``ready_wait``; then the held connections are
        served with the certificates there are: a connection whose source has none is
        refused by the tunnel, still never sent in plaintext.  In make-before-break the
        old agent serves meanwhile, so the new one waits for everything."""
        await self._wait_for_state(listen_early)
        for hold in self.holds.values():
            hold.open()
        if not listen_early:
            for sock in sockets:
                sock.listen(LISTEN_BACKLOG)
            listening.set()
            self.readiness.done("listener")
        log.info("node %s: ready; serving captured connections", self.cfg.node)

    async def _wait_for_state(self, listen_early: bool) -> None:
        """Until everything but the listener is ready (see `_become_ready`)."""
        if listen_early and self.certs is not None:
            await self.readiness.wait("listener", "certificates")
            try:
                async with asyncio.timeout(self.cfg.ready_wait / 2):
                    await self.readiness.wait("listener")
            except TimeoutError:
                missing = sorted(
                    str(i) for i in self.certs.identities if self.certs.material(i) is None
                )
                log.warning(
                    "node %s: no certificate yet for %s after %gs; serving held connections "
                    "with the certificates there are (connections of those identities are "
                    "refused until theirs arrive)",
                    self.cfg.node, ", ".join(missing) or "?", self.cfg.ready_wait / 2,
                )  # fmt: skip
        else:
            await self.readiness.wait("listener")

    async def _start_workers(self, placeholders: list[socket.socket], listen_early: bool) -> None:
        """Once the node's state is in place, the workers; then the placeholders go (their
        queued connects move to the workers' queues) and the agent is ready."""
        assert self.supervisor is not None
        await self._wait_for_state(listen_early)
        await self.supervisor.start()
        for sock in placeholders:
            sock.close()
        self.readiness.done("listener")
        log.info("node %s: ready; %d workers serve captured connections", self.cfg.node,
                 self.cfg.workers)  # fmt: skip
        await self.supervisor.watch()

    async def _node_metrics(self) -> bytes:
        assert self.supervisor is not None
        return await self.supervisor.metrics(generate_latest(self.registry))

    async def _run_supervisor(self) -> int:
        """``workers`` > 1: this process keeps capture, certificates and discovery, and
        serves none of the data path; N worker processes do (`nodeagent.workers`).

        The fail-closed start is the single process's: after a crash the agent listens
        before compiling — on placeholder sockets that never accept, so connects wait in
        the kernel's queue — and starts the workers only once discovery, capture and the
        certificates are in place; when the workers listen, the placeholders close and
        their queues move to the workers (``tcp_migrate_req``).  In make-before-break the
        new agent's workers join the groups once ready, as a new agent would."""
        cfg = self.cfg
        why = enable_accept_queue_migration()
        if why is not None:
            log.warning("cannot turn on accept-queue migration (%s): connections queued at a "
                        "worker that dies are reset instead of served by another", why)  # fmt: skip
        listen_early = not tcp_port_listening(cfg.outbound_port)
        if not listen_early:
            log.info("another agent serves :%d; taking over once ready", cfg.outbound_port)
            self._load_ebpf_or_fail()
        placeholders = [self.bind_outbound()]
        try:
            if listen_early:
                placeholders[0].listen(LISTEN_BACKLOG)
                self._load_ebpf_or_fail()
            certs = self._open_control()
            placeholders.append(self.bind_tunnel(listen=listen_early))
        except AgentError:
            for sock in placeholders:
                sock.close()
            raise
        n = cfg.workers
        self.supervisor = WorkerSupervisor(
            # Per-pod shares are node-wide: the kernel spreads a pod's connections over
            # the workers like everyone's, so each worker holds 1/N of the share.
            dataclasses.replace(
                cfg,
                workers=1,
                ready_file=None,
                max_connections_per_pod=-(-cfg.max_connections_per_pod // n),
                max_requests_per_pod=-(-cfg.max_requests_per_pod // n),
            ),
            cfg.workers,
            mesh=self.mesh,
            certs=certs,
            addresses=lambda: set(self.node_addresses.current),
            tap=self.tap,
            drain_seconds=cfg.drain_seconds,
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        )
        assert self.discovery is not None
        self.discovery.on_applied = self.supervisor.forward_mesh
        self.registry.register(self.supervisor.collector())
        admin = AdminServer(
            self.readiness, self.state, self.registry, tap=self.tap, metrics=self._node_metrics
        )
        admin_server = await asyncio.start_server(
            admin.handle, cfg.listen_ip, cfg.admin_port, limit=16 * 1024, reuse_port=True
        )
        log.info("node %s: %d proxy workers on %s:%d, admin on %s:%d", cfg.node, cfg.workers,
                 cfg.listen_ip, cfg.outbound_port, cfg.listen_ip, cfg.admin_port)  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = {
            asyncio.create_task(self._mesh_loop(), name="capture-manager"),
            asyncio.create_task(stop.wait(), name="shutdown-signal"),
            asyncio.create_task(self._start_workers(placeholders, listen_early), name="workers"),
            self._start_certificates(),
            asyncio.create_task(self._discover(), name="discovery"),
        }
        helpers = {
            asyncio.create_task(self._node_addr_loop(), name="node-addresses"),
            asyncio.create_task(self._bootstrap(), name="bootstrap"),
            asyncio.create_task(self._certificates_ready(), name="cert-readiness"),
        }
        code = 0
        try:
            code = await self._until_stopped(tasks)
        finally:
            self._unmark_ready()
            for t in tasks:
                if t.get_name() in ("capture-manager", "discovery"):
                    t.cancel()
            admin_server.close()
            self.tap.close()
            await self.supervisor.drain()
            if self.certs is not None:
                await self.certs.close()
            await self._finish(tasks | helpers, placeholders)
        return code

    async def _finish(self, tasks: set[asyncio.Task[Any]], sockets: list[socket.socket]) -> None:
        """The end of a stop: every task cancelled and awaited, the listening sockets
        closed (still ours if the agent stopped before it was ready), the programs'
        descriptors closed — attachments and pins stay for the next agent."""
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for sock in sockets:
            sock.close()
        if self.progs is not None:
            self.progs.close()
        log.info("agent stopped; eBPF attachments and pins left in place for the next start")

    async def _until_stopped(self, tasks: set[asyncio.Task[Any]]) -> int:
        """Wait for the shutdown signal (0) or a task that should never end (1)."""
        code = 0
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t.get_name() == "shutdown-signal":
                log.info("shutting down: draining for up to %.0fs", self.cfg.drain_seconds)
                continue
            # Every other task runs forever; if one ends, the agent is broken: exit so
            # the supervisor (DaemonSet, the lab) restarts it rather than limp on.
            exc = t.exception()
            log.error("task %s ended unexpectedly: %r", t.get_name(), exc, exc_info=exc)
            code = 1
        return code

    @staticmethod
    async def _serve(server: Listener, sock: socket.socket, listening: asyncio.Event) -> None:
        await listening.wait()
        await server.serve(sock)

    async def _export_traces(self) -> None:
        """The exporter's task, guarded: tracing is not worth the agent.  If the exporter
        dies, it is logged and tracing stops on this node (the tracer is switched off, so
        requests are no longer traced for spans nobody would send); requests go on."""
        assert self.trace_exporter is not None
        try:
            await self.trace_exporter.start()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.tracer.enabled = False
            log.exception(
                "tracing: the span exporter to %s failed; tracing is off on this node "
                "until the agent restarts",
                self.trace_exporter.sender.address,
            )

    def build_outbound(self) -> OutboundProxy:
        """The outbound data path's stages: accept -> protocol switch -> forward."""
        cfg = self.cfg
        outbound_config = OutboundConfig(
            # A safety net: every stage of every attempt has its own timeout, and the
            # wait for a handshake slot its own bound.
            connect_timeout=cfg.handshake_queue_timeout
            + 3 * cfg.attempt_timeout * max(1, cfg.connect_attempts)
            + 1.0,
            idle_timeout=cfg.idle_timeout,
            max_connections_per_source=cfg.max_connections_per_pod,
        )
        stats = ProxyStats()
        self.switch = ProtocolSwitch(
            opaque=TcpForward(self.upstreams, outbound_config, stats),
            http1=HttpForward(
                self.outbound_http,
                HttpServerConfig(idle_timeout=cfg.idle_timeout),
                stats,
                self.request_shares,
            )
            if cfg.http
            else None,
            h2=HttpForward(
                self.outbound_http,
                H2Config(idle_timeout=cfg.idle_timeout),
                stats,
                self.request_shares,
            )
            if cfg.http
            else None,
            detect_timeout=cfg.detect_timeout,
            opaque_ports=self._opaque_destination,
        )
        self.proxy = OutboundProxy(
            original_destination=self.original_destination,
            is_self=self.is_self,
            config=outbound_config,
            stats=stats,
            hold=self.holds["outbound"],
            serve=self.switch,
        )
        return self.proxy

    async def run(self) -> int:
        if self.cfg.workers > 1:
            return await self._run_supervisor()
        cfg = self.cfg
        # Nobody listening (first start, or the previous agent died): listen before
        # compiling, so connects made while bcc compiles (~1-2 s) wait in the backlog
        # instead of being refused; they are then held (see ReadyHold) until this agent
        # has its certificates and discovery, never judged against empty state.  A
        # previous agent still serving (make-before-break): compile first and join the
        # SO_REUSEPORT groups only once ready, so the old agent serves everything meanwhile.
        listen_early = not tcp_port_listening(cfg.outbound_port)
        if not listen_early:
            log.info("another agent serves :%d; taking over once ready", cfg.outbound_port)
            self._load_ebpf_or_fail()
        listener = self.bind_outbound()
        if listen_early:
            listener.listen(LISTEN_BACKLOG)
            try:
                self._load_ebpf_or_fail()
            except AgentError:
                listener.close()
                raise
        tunnel_listener_sock: socket.socket | None = None
        if cfg.controlplane:
            tunnel_listener_sock = self._open_tunnel(listener, listen=listen_early)
        self.build_outbound()
        assert self.proxy is not None
        admin = AdminServer(self.readiness, self.state, self.registry, tap=self.tap)
        admin_server = await asyncio.start_server(
            admin.handle, cfg.listen_ip, cfg.admin_port, limit=16 * 1024, reuse_port=True
        )
        sockets = [s for s in (listener, tunnel_listener_sock) if s is not None]
        listening = asyncio.Event()
        if listen_early:
            listening.set()
            self.readiness.done("listener")
        log.info(
            "node %s: outbound on %s:%d (captured connects go to %s), admin on %s:%d%s",
            cfg.node, cfg.listen_ip, cfg.outbound_port, cfg.proxy_ip, cfg.listen_ip,
            cfg.admin_port, "" if listen_early else "; listening once ready",
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = {
            asyncio.create_task(
                self._serve(self.proxy, listener, listening), name="outbound-listener"
            ),
            asyncio.create_task(
                self._mesh_loop() if cfg.controlplane else self._capture_loop(),
                name="capture-manager",
            ),
            asyncio.create_task(stop.wait(), name="shutdown-signal"),
        }
        helpers: set[asyncio.Task[None]] = {
            asyncio.create_task(
                self._become_ready(sockets, listening, listen_early), name="readiness"
            ),
            asyncio.create_task(self._node_addr_loop(), name="node-addresses"),
        }
        if cfg.controlplane:
            assert self.tunnel_server is not None and tunnel_listener_sock is not None
            tasks.add(
                asyncio.create_task(
                    self._serve(self.tunnel_server, tunnel_listener_sock, listening),
                    name="tunnel-listener",
                )
            )
            tasks.add(self._start_certificates())
            assert self.discovery is not None
            tasks.add(asyncio.create_task(self._discover(), name="discovery"))
            helpers.add(asyncio.create_task(self._bootstrap(), name="bootstrap"))
            helpers.add(asyncio.create_task(self._certificates_ready(), name="cert-readiness"))
        if self.trace_exporter is not None:
            helpers.add(asyncio.create_task(self._export_traces(), name="trace-export-guard"))
        code = 0
        try:
            code = await self._until_stopped(tasks)
        finally:
            self._unmark_ready()  # leaving: kubelet must not count this pod ready
            # Stop reconciling first: during a make-before-break restart the new agent
            # already owns the pods' attachments, and this one must not put its own
            # programs back while it drains.
            for t in tasks:
                if t.get_name() in ("capture-manager", "discovery"):
                    t.cancel()
            admin_server.close()
            self.tap.close()  # tap streams end (their clients see the stream finish)
            await self.proxy.close(cfg.drain_seconds)
            if self.tunnel_server is not None:
                await self.tunnel_server.close(cfg.drain_seconds)
            if self.tunnel_client is not None:
                await self.tunnel_client.close()
            if self.certs is not None:
                await self.certs.close()
            if self.trace_exporter is not None:
                # After the drain, so the last requests' spans go out (bounded by the
                # exporter's shutdown timeout); never a reason for the stop to fail.
                with contextlib.suppress(Exception):
                    await self.trace_exporter.close()
            await self._finish(tasks | helpers, sockets)
        return code


def _reuseport_socket(address: tuple[str, int], why: str) -> socket.socket:
    """A bound, non-blocking TCP socket in the port's ``SO_REUSEPORT`` group: shared with
    the previous agent in a make-before-break restart, and with the other workers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise AgentError(f"cannot listen on {address[0]}:{address[1]} {why}: {e}") from e
    sock.setblocking(False)
    return sock


def _numeric(svc: Any, ep: Any) -> set[int]:
    """The target port numbers ``ep`` serves for ``svc`` (balancer keys)."""
    return {n for p in svc.ports if (n := svc.target_port(ep, p)) is not None}


def _known_in(names: set[tuple[str, str]]) -> Callable[[str, str], bool]:
    return lambda ns, name: (ns, name) in names or name == "unknown"


class _AttemptLog:
    """The agent's `FailoverObserver` for one connect: counts, ejections, a log line."""

    def __init__(self, agent: Agent, app: Address, destination: Address, service: str) -> None:
        self.agent = agent
        self.app = app
        self.destination = destination
        self.service = service

    def failed(
        self, endpoint: Address, error: BaseException, *, retrying: bool, ejected: bool
    ) -> None:
        self.agent.m_connect_failures.labels(self.service, "true" if retrying else "false").inc()
        if ejected:
            self.agent.m_ejections.labels(self.service).inc()
        log.info(
            "outbound %s:%d -> %s:%d%s: endpoint %s:%d failed (%s)%s",
            *self.app, *self.destination, f" ({self.service})" if self.service else "",
            *endpoint, _why(error), "; trying another" if retrying else "",
        )  # fmt: skip


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def agent_cgroup(cfg: AgentConfig) -> Path | None:
    """The agent's own cgroup: from /proc/self/cgroup (lab), or by its pod UID on
    Kubernetes, where the container's view is namespaced (None if not found)."""
    if cfg.pod_uid is None:
        return own_cgroup(Path("/proc/self/cgroup").read_text(), cfg.cgroup2)
    return find_pod_cgroup(cfg.cgroup2, cfg.pod_uid)


def tcp_port_listening(port: int, proc_net_tcp: Path = Path("/proc/net/tcp")) -> bool:
    """Whether a TCP socket listens on ``port`` in this network namespace."""
    try:
        lines = proc_net_tcp.read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            return True
    return False


def uninstall(cfg: AgentConfig) -> list[str]:
    """Detach Weft programs from every pod of this node and the agent's cgroup, unpin maps."""
    done: list[str] = []
    cgroups: set[Path] = set()
    if cfg.state_file is not None:
        try:
            cgroups |= lab_pod_cgroups(cfg.state_file, cfg.node)
        except LabUnavailable as e:
            log.warning("cannot read pods (%s); detaching only recorded cgroups", e)
    record = cfg.state_dir / "attached.json"
    if record.exists():
        cgroups |= {Path(c) for c in json.loads(record.read_text()).get("cgroups", [])}
    own = agent_cgroup(cfg)
    if own is not None:
        cgroups.add(own)
    for cg in sorted(cgroups):
        done.extend(detach_all(cg))
    if remove_pins(cfg.pin_dir):
        done.append(f"removed pins {cfg.pin_dir}")
    record.unlink(missing_ok=True)
    return done


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one: every proxied connection costs
    the node proxy two descriptors (more with the tunnel), and the common soft default
    of 1,024 would cap a whole node at ~500 connections.  Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, e)
    return soft


def run(cfg: AgentConfig) -> int:
    log.info("descriptor limit: %d", raise_fd_limit())
    try:
        import uvloop

        return uvloop.run(Agent(cfg).run())
    except ImportError:  # pragma: no cover
        return asyncio.run(Agent(cfg).run())
