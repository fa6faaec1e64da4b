"""Sidecar mode: the node proxy's stages, scoped to one pod and run inside it.

The alternative deployment to the node agent (docs/kubernetes.md "Sidecar mode"). The
same stage objects as `nodeagent.agent` composes — accept, protocol switch, TCP forward,
HTTP/1.1 and HTTP/2 servers, resolve, balance + failover, dial over the pooled mTLS
tunnel, the tunnel server with its HTTP observers, authorization, golden metrics — with
two seams swapped and everything node-wide dropped:

* **capture**: an nftables ``redirect`` in the pod's network namespace (`capture_rules`,
  installed by ``weft sidecar init``, the injected init container) sends the app's TCP
  connects to 127.0.0.1:15001; the sidecar's own uid is exempt, so its upstream
  connections are not looped back.  The original destination comes from
  ``SO_ORIGINAL_DST`` (`nodeagent.proxy.origdst`) instead of the eBPF map.  No bcc, no
  cgroup attachments, no privileges at run time: only the init step needs NET_ADMIN.
* **probes**: strict inbound drops the kubelet's connections to app ports, so
  ``weft inject`` points HTTP, TCP and gRPC probes at ``/app-health/...`` on the admin port
  and the sidecar runs them inside the pod (`nodeagent.probes`).
* **inbound**: the tunnel listens on the pod's own address, :15008, and serves exactly
  this pod (any other target is ``ELSEWHERE``).  The same nftables table accepts new
  inbound TCP only to 15008 and 15020 and from loopback: strict inbound, always.
  Peers know to dial the pod rather than its node because the pod declares the tunnel
  port (`weft.mesh.Workload.sidecar`); the pod's node agent leaves it alone.

Identity: one workload certificate, the pod's.  On Kubernetes (``bootstrap="pod"``, the
default) the sidecar presents its own pod's projected ServiceAccount token with each CSR
(``/v1/pod-certificates``): the control plane TokenReviews it, reads the pod back and
signs only that pod's ``ns/<ns>/sa/<sa>`` — no node certificate, nothing node-wide.  The
discovery stream (the same one the agents read) is then opened with that workload
certificate.  In the lab (``bootstrap="node"``) there is no TokenReview: the sidecar
bootstraps with its node's lab token as an agent does, then asks over mTLS with the
node certificate (docs/kubernetes.md "Sidecar mode").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from nodeagent.admin import AdminServer, Readiness
from nodeagent.authz import Authorizer
from nodeagent.certs import CertConfig, WorkloadCertManager
from nodeagent.cpclient import ControlPlaneClient, ControlPlaneError
from nodeagent.discovery import DiscoveryClient
from nodeagent.httpmetrics import HttpMetrics
from nodeagent.meshstate import MeshState
from nodeagent.metrics import ConnLabels, ConnMeter, TcpMetrics
from nodeagent.probes import AppProbe, AppProber, ProbeTableError, parse_table
from nodeagent.proxy.balance import Balancer, PeakEwma
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover
from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.http.client import Http1Pool
from nodeagent.proxy.http.forward import H2, HTTP1, OutboundHttp
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.inbound import InboundHttp
from nodeagent.proxy.http.server import HttpServerConfig
from nodeagent.proxy.http.stage import HttpForward
from nodeagent.proxy.listener import Listener
from nodeagent.proxy.origdst import so_original_dst
from nodeagent.proxy.outbound import Address, OutboundConfig, OutboundProxy, ProxyStats
from nodeagent.proxy.resolve import workload_name
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
from nodeagent.proxymetrics import admission_metrics, hold_metrics, pool_metrics
from nodeagent.retrymetrics import RetryMetrics
from weft.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from weft.inject import ADMIN_PORT, PROBES_ENV, SIDECAR_UID

log = logging.getLogger("weft.sidecar")

OUTBOUND_PORT = 15001
LISTEN_BACKLOG = 4096
NFT_TABLE = "weft_sidecar"


class SidecarError(RuntimeError):
    """The sidecar cannot start; the message says what to fix."""


def capture_rules(
    uid: int = SIDECAR_UID,
    *,
    outbound_port: int = OUTBOUND_PORT,
    inbound_ports: tuple[int, ...] = (TUNNEL_PORT, ADMIN_PORT),
    skip_ports: tuple[int, ...] = (),
) -> str:
    """The pod's nftables table (``nft -f``): what a sidecar mesh's init container sets up.

    Outbound: every TCP connect but the sidecar's own (by uid) and those to the pod's
    own addresses (``fib daddr type local``: loopback, the pod IP) is redirected to the
    sidecar's outbound listener.  Inbound, strict: new TCP connections are accepted from
    loopback and to the tunnel and admin ports only — a plaintext caller reaches the app
    only through the sidecar.  One ``inet`` table, so IPv6 is judged by the same input
    chain; replacing it is atomic (``destroy``-free: the file deletes then recreates it in
    one transaction) and idempotent.
    """
    skip = (
        [f"    tcp dport {{ {', '.join(str(p) for p in sorted(skip_ports))} }} return"]
        if skip_ports
        else []
    )
    accept = ", ".join(str(p) for p in inbound_ports)
    return (
        "\n".join(
            [
                f"table inet {NFT_TABLE}",
                f"delete table inet {NFT_TABLE}",
                f"table inet {NFT_TABLE} {{",
                "  chain output {",
                "    type nat hook output priority -100; policy accept;",
                f"    meta skuid {uid} return",
                "    fib daddr type local return",
                *skip,
                f"    meta nfproto ipv4 meta l4proto tcp redirect to :{outbound_port}",
                "  }",
                "  chain input {",
                "    type filter hook input priority 0; policy accept;",
                '    iif "lo" accept',
                "    ct state established,related accept",
                f"    tcp dport {{ {accept} }} accept",
                "    meta l4proto tcp drop",
                "  }",
                "}",
            ]
        )
        + "\n"
    )


@dataclass(frozen=True)
class SidecarConfig:
    pod: str
    namespace: str
    service_account: str
    pod_ip: str
    """The pod's address: the tunnel listens here."""
    node: str
    """The pod's node: the name the bootstrap credential is for."""
    controlplane: str
    token_file: Path
    trust_bundle: Path
    cert_dir: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    outbound_port: int = OUTBOUND_PORT
    admin_port: int = ADMIN_PORT
    admin_ip: str = "0.0.0.0"
    """Prometheus scrapes the pod's :15020 (the pod's nftables let it in)."""
    attempt_timeout: float = 1.5
    connect_attempts: int = 3
    ready_wait: float = 15.0
    idle_timeout: float = 3600.0
    tunnel_idle_timeout: float = 60.0
    tunnel_max_streams: int = 100
    max_handshakes: int = 32
    handshake_queue_timeout: float = 30.0
    detect_timeout: float = 1.0
    drain_seconds: float = 5.0
    bootstrap: str = "pod"
    """``pod``: certificates for the pod's own token (Kubernetes); ``node``: bootstrap
    with the node's credential first, as the agent does (the lab, which has no
    TokenReview)."""
    http: bool = True
    app_probes: dict[str, AppProbe] = field(default_factory=dict)
    """The app's kubelet probes that ``weft inject`` pointed at the admin port
    (``$WEFT_APP_PROBES``, `nodeagent.probes`)."""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId.workload(self.namespace, self.service_account, self.trust_domain)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> SidecarConfig:
        """The injected container's environment (``weft inject`` sets each of these from
        the downward API and its mounts; the lab sets the same)."""

        def need(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise SidecarError(f"${name} is not set: `weft inject` sets it")
            return value

        try:
            probes = parse_table(env.get(PROBES_ENV, ""))
        except ProbeTableError as e:
            raise SidecarError(str(e)) from None
        bootstrap = env.get("WEFT_BOOTSTRAP", "pod").strip() or "pod"
        if bootstrap not in ("pod", "node"):
            raise SidecarError(f"$WEFT_BOOTSTRAP is {bootstrap!r}: pod (Kubernetes) or node")
        return cls(
            pod=need("POD_NAME"),
            namespace=need("POD_NAMESPACE"),
            service_account=env.get("POD_SERVICE_ACCOUNT", "").strip() or "default",
            pod_ip=need("POD_IP"),
            node=need("NODE_NAME"),
            controlplane=need("WEFT_CONTROLPLANE"),
            token_file=Path(env.get("WEFT_TOKEN_FILE", "/var/run/secrets/weft/token")),
            trust_bundle=Path(env.get("WEFT_TRUST_BUNDLE", "/etc/weft/trust/ca.crt")),
            cert_dir=Path(env.get("WEFT_CERT_DIR", "/run/weft/certs")),
            trust_domain=env.get("WEFT_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN),
            bootstrap=bootstrap,
            app_probes=probes,
            **overrides,
        )


class _Stats(Collector):
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def collect(self) -> Any:
        s = self.sidecar
        yield from hold_metrics(s.holds)
        yield from admission_metrics(s.tunnel_client.admission.stats)
        yield from pool_metrics(s.tunnel_client, s.tunnel_server)
        if s.switch is not None:
            d = CounterMetricFamily(
                "weft_protocol_detect",
                "Outbound connections by what protocol detection found.",
                labels=["result"],
            )
            for result, n in sorted(s.switch.decisions.items()):
                d.add_metric([result], n)
            yield d
        if s.proxy is not None:
            for name in ("accepted", "refused_unknown", "refused_loop", "upstream_failed"):
                m = CounterMetricFamily(f"weft_outbound_{name}", f"outbound connections {name}")
                m.add_metric([], getattr(s.proxy.stats, name))
                yield m


class _AttemptLog:
    """The sidecar's `FailoverObserver`: one log line per failed attempt."""

    def __init__(self, app: Address, destination: Address, service: str) -> None:
        self.app, self.destination, self.service = app, destination, service

    def failed(
        self, endpoint: Address, error: BaseException, *, retrying: bool, ejected: bool
    ) -> None:
        log.info(
            "outbound %s:%d -> %s:%d%s: endpoint %s:%d failed (%r)%s",
            *self.app, *self.destination, f" ({self.service})" if self.service else "",
            *endpoint, error, "; trying another" if retrying else "",
        )  # fmt: skip


class Sidecar:
    """One pod's proxy: wiring and lifecycle only, as `nodeagent.agent.Agent` is."""

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.identity = cfg.identity
        self.readiness = Readiness("listener", "pods", "certificates")
        self.mesh = MeshState()
        self.registry = CollectorRegistry()
        self.started = time.time()
        self.cp_client = ControlPlaneClient(
            cfg.controlplane,
            cfg.trust_bundle,
            cfg.cert_dir.parent / "node",
            trust_domain=cfg.trust_domain,
        )
        self.cp_bootstrapped = asyncio.Event()
        self.cert_ready = asyncio.Event()
        self.certs = WorkloadCertManager(
            self.cp_client,
            CertConfig(cert_dir=cfg.cert_dir),
            self.registry,
            trust_bundle_pem=cfg.trust_bundle.read_bytes(),
        )
        contexts = TlsContexts(self.certs, trust_domain=cfg.trust_domain)
        self.holds = {k: ReadyHold(k, deadline=cfg.ready_wait) for k in ("outbound", "tunnel")}
        self.retry_budget = RetryBudget()
        attempt = cfg.attempt_timeout
        self.tunnel_client = TunnelClient(
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
        self.dialer = Dialer(tunnel=self.tunnel_client, attempt_timeout=attempt)
        self.balancer: Balancer[Address] = Balancer()
        self.http_balancer: Balancer[Address] = Balancer(latency=PeakEwma())
        self.tcp = TcpMetrics()
        self.http_metrics = HttpMetrics()
        self.retry_metrics = RetryMetrics()
        self.authorizer = Authorizer(self.mesh.workload_at, trust_domain=cfg.trust_domain)
        attempts = max(1, cfg.connect_attempts)
        self.upstreams = MeshUpstreams(
            mesh=self.mesh,
            failover=Failover(attempts=attempts, budget=self.retry_budget, balancer=self.balancer),
            dialer=self.dialer,
            meter=lambda labels: self.tcp.open(labels),
            observer=lambda app, dest, resolved: _AttemptLog(
                app, dest, resolved.service.key if resolved.service else ""
            ),
        )
        self.outbound_http = OutboundHttp(
            mesh=self.mesh,
            failover=Failover(
                attempts=attempts, budget=self.retry_budget, balancer=self.http_balancer
            ),
            dialer=self.dialer,
            pool=Http1Pool(),
            metrics=self.http_metrics,
            observer=_AttemptLog,
            retry_metrics=self.retry_metrics,
            authorize=self.authorizer.outbound,
        )
        self.inbound_http = InboundHttp(
            connect=connect_target_plaintext,
            metrics=self.http_metrics,
            workload_at=self.mesh.workload_at,
            gate=self.authorizer.gate,
        )
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
        self.discovery = DiscoveryClient(self.cp_client, self.mesh, registry=self.registry)
        self.switch: ProtocolSwitch | None = None
        self.proxy: OutboundProxy | None = None
        self.prober = AppProber(cfg.app_probes, cfg.pod_ip) if cfg.app_probes else None
        for collector in (
            _Stats(self),
            self.tcp,
            self.http_metrics,
            self.retry_metrics,
            self.authorizer.metrics,
        ):
            self.registry.register(collector)

    # -- the seams the stages call -------------------------------------------------------

    @staticmethod
    def original_destination(sock: socket.socket) -> tuple[str, int] | None:
        return so_original_dst(sock)

    def is_self(self, ip: str, port: int) -> bool:
        ours = {self.cfg.outbound_port, self.cfg.admin_port, TUNNEL_PORT}
        return (ip == self.cfg.pod_ip or ip.startswith("127.")) and port in ours

    def locate_target(self, target: tuple[str, int]) -> SpiffeId | NotLocal:
        """For the tunnel server: this pod, and nothing else."""
        if target[0] != self.cfg.pod_ip:
            return NotLocal.ELSEWHERE
        w = self.mesh.workload_at(target[0])
        return w.identity if w is not None else self.identity

    def _inbound_meter(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address
    ) -> ConnMeter:
        dst = self.mesh.workload_at(target[0])
        return self.tcp.open(
            ConnLabels(
                "inbound", client.service_account or "unknown", client.namespace or "unknown",
                *workload_name(dst), "true", str(client), str(presented or ""),
            )
        )  # fmt: skip

    async def _inbound_http_stream(
        self,
        client: SpiffeId,
        presented: SpiffeId | None,
        target: Address,
        label: str,
        extensions: Extensions,
    ) -> ServedStream:
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
        return await self.inbound_http.observe_h2(client, presented, target, label)

    def _opaque_destination(self, dest: Address) -> bool:
        target = self.mesh.vip(*dest)
        if target is not None:
            return dest[1] in target.service.opaque_ports
        pod = self.mesh.workload_at(dest[0])
        return pod is not None and dest[1] in pod.opaque_ports

    def state(self) -> dict[str, Any]:
        me = self.mesh.workload_at(self.cfg.pod_ip)
        return {
            "mode": "sidecar",
            "pod": f"{self.cfg.namespace}/{self.cfg.pod}",
            "node": self.cfg.node,
            "identity": str(self.identity),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "ready": self.readiness.ready,
            "waiting_for": sorted(self.readiness.blockers),
            "in_discovery": me is not None,
            "declares_tunnel": me.sidecar if me is not None else None,
            "proxy": {
                "outbound": f"127.0.0.1:{self.cfg.outbound_port}",
                "tunnel": f"{self.cfg.pod_ip}:{TUNNEL_PORT}",
                "stats": vars(self.proxy.stats) if self.proxy else None,
            },
            "certificates": self.certs.snapshot(),
            "discovery": self.discovery.snapshot(),
            "http": {
                "detected": dict(self.switch.decisions) if self.switch else {},
                "outbound_requests": self.outbound_http.requests,
                "inbound_requests": self.inbound_http.requests,
            },
            "tunnel": {
                "server": vars(self.tunnel_server.stats),
                "client": vars(self.tunnel_client.stats),
                "pool": self.tunnel_client.pool_state(),
            },
            "held_until_ready": {kind: vars(h.stats) for kind, h in self.holds.items()},
            "app_probes": self.prober.runs if self.prober else {},
        }

    # -- lifecycle ------------------------------------------------------------------------

    def _listen(self, ip: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            raise SidecarError(f"cannot listen on {ip}:{port}: {e}") from e
        sock.setblocking(False)
        return sock

    async def _bootstrap(self) -> None:
        token_file = self.cfg.token_file
        if self.cfg.bootstrap == "pod":
            # Every CSR carries the pod's token, read anew (the kubelet rotates it); the
            # discovery stream waits for the certificate it is opened with.
            self.cp_client.use_pod_token(
                lambda: token_file.read_text().strip(),
                lambda: self.certs.material(self.identity),
            )
            self.certs.set_identities([self.identity])
            await self.cert_ready.wait()
            log.info("certificate from the control plane at %s for %s's own token",
                     self.cfg.controlplane, self.cfg.pod)  # fmt: skip
            self.cp_bootstrapped.set()
            return
        try:
            await self.cp_client.bootstrap(self.cfg.node, lambda: token_file.read_text().strip())
            log.info("bootstrapped with the control plane at %s", self.cfg.controlplane)
        except ControlPlaneError as e:
            log.warning("bootstrap failed (%s); will retry with the certificate request", e)
        finally:
            # One identity, known from the start (the agent learns its set from
            # discovery); asked for once the client holds the bootstrap credential.
            self.certs.set_identities([self.identity])
            self.cp_bootstrapped.set()

    async def _discover(self) -> None:
        await self.cp_bootstrapped.wait()
        await self.discovery.run()

    async def _mesh_loop(self) -> None:
        """Housekeeping after each discovery change; readiness after the first."""
        seen = 0
        warned = False
        while True:
            seen = await self.mesh.wait_change(seen)
            me = self.mesh.workload_at(self.cfg.pod_ip)
            if not warned and me is not None and (me.identity != self.identity or not me.sidecar):
                warned = True
                log.warning(
                    "discovery says %s runs as %s%s; this sidecar serves %s",
                    self.cfg.pod, me.identity,
                    "" if me.sidecar else " and does not declare the tunnel port 15008 "
                    "(peers will dial its node instead: was the pod injected?)",
                    self.identity,
                )  # fmt: skip
            self.balancer.retain(
                (ep.address, port)
                for svc in self.mesh.services.values()
                for ep in svc.endpoints
                for port in _target_ports(svc, ep)
            )
            self.http_balancer.retain(self.balancer.health)
            self.readiness.done("pods")

    async def _certificates_ready(self) -> None:
        while True:
            if self.certs.material(self.identity) is not None:
                self.readiness.done("certificates")
                self.cert_ready.set()
                return
            await asyncio.sleep(0.1)

    async def _become_ready(self) -> None:
        await self.readiness.wait()
        for hold in self.holds.values():
            hold.open()
        log.info("%s/%s: ready; serving as %s", self.cfg.namespace, self.cfg.pod, self.identity)

    async def run(self) -> int:
        cfg = self.cfg
        # Listen at once: connects the app makes before we are ready wait in the backlog
        # and are then held (never judged against empty discovery), as in the agent.
        outbound_sock = self._listen("127.0.0.1", cfg.outbound_port)
        tunnel_sock = self._listen(cfg.pod_ip, TUNNEL_PORT)
        self.readiness.done("listener")
        outbound_config = OutboundConfig(
            connect_timeout=cfg.handshake_queue_timeout
            + 3 * cfg.attempt_timeout * max(1, cfg.connect_attempts)
            + 1.0,
            idle_timeout=cfg.idle_timeout,
        )
        stats = ProxyStats()
        self.switch = ProtocolSwitch(
            opaque=TcpForward(self.upstreams, outbound_config, stats),
            http1=HttpForward(
                self.outbound_http, HttpServerConfig(idle_timeout=cfg.idle_timeout), stats
            )
            if cfg.http
            else None,
            h2=HttpForward(self.outbound_http, H2Config(idle_timeout=cfg.idle_timeout), stats)
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
        admin = AdminServer(self.readiness, self.state, self.registry, probes=self.prober)
        admin_server = await asyncio.start_server(
            admin.handle, cfg.admin_ip, cfg.admin_port, limit=16 * 1024
        )
        log.info(
            "sidecar of %s/%s (%s): outbound 127.0.0.1:%d, tunnel %s:%d, admin %s:%d",
            cfg.namespace, cfg.pod, self.identity, cfg.outbound_port, cfg.pod_ip, TUNNEL_PORT,
            cfg.admin_ip, cfg.admin_port,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def served(server: Listener, sock: socket.socket, name: str) -> asyncio.Task[None]:
            return asyncio.create_task(server.serve(sock), name=name)

        tasks = {
            served(self.proxy, outbound_sock, "outbound-listener"),
            served(self.tunnel_server, tunnel_sock, "tunnel-listener"),
            self.certs.start(),
            asyncio.create_task(self._discover(), name="discovery"),
            asyncio.create_task(self._mesh_loop(), name="mesh"),
            asyncio.create_task(stop.wait(), name="shutdown-signal"),
        }
        helpers = {
            asyncio.create_task(self._bootstrap(), name="bootstrap"),
            asyncio.create_task(self._certificates_ready(), name="cert-readiness"),
            asyncio.create_task(self._become_ready(), name="readiness"),
        }
        code = 0
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.get_name() == "shutdown-signal":
                    log.info("shutting down: draining for up to %.0fs", cfg.drain_seconds)
                    continue
                exc = t.exception()
                log.error("task %s ended unexpectedly: %r", t.get_name(), exc, exc_info=exc)
                code = 1
        finally:
            admin_server.close()
            await self.proxy.close(cfg.drain_seconds)
            await self.tunnel_server.close(cfg.drain_seconds)
            await self.tunnel_client.close()
            await self.certs.close()
            for t in tasks | helpers:
                t.cancel()
            for t in tasks | helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            outbound_sock.close()
            tunnel_sock.close()
            log.info("sidecar stopped")
        return code


def _target_ports(svc: Any, ep: Any) -> set[int]:
    """The target port numbers ``ep`` serves for ``svc`` (balancer keys)."""
    return {n for p in svc.ports if (n := svc.target_port(ep, p))}


def preload() -> None:
    """Import what the sidecar imports lazily, so it can run after dropping to a uid that
    cannot read the interpreter's directory (the lab's venv may live under /root)."""
    import encodings.idna  # noqa: F401  # socket host names
    import json  # noqa: F401

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401


def run(cfg: SidecarConfig) -> int:
    try:
        import uvloop

        return uvloop.run(Sidecar(cfg).run())
    except ImportError:  # pragma: no cover
        return asyncio.run(Sidecar(cfg).run())
