"""``weft agent``: run the node agent (eBPF capture + node proxy) for one node."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

log = logging.getLogger("weft.agent")


def _ports(value: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of ports: {value!r}") from None
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        raise click.BadParameter(f"ports out of range: {bad}")
    return ports


def _workers(value: str, kubernetes: bool) -> int:
    if value == "auto":
        from nodeagent.workers import auto_workers

        return auto_workers() if kubernetes else 1
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"--workers: a number or auto, not {value!r}") from None
    if n < 1:
        raise click.BadParameter(f"--workers: at least 1, got {n}")
    return n


@click.command()
@click.option("--node", help="The node this agent serves (lab: e.g. node-1).")
@click.option(
    "--lab",
    "lab_name",
    envvar="WEFT_LAB",
    help="Serve a node of this lab ($WEFT_LAB).",
)
@click.option(
    "--kubernetes",
    is_flag=True,
    help="Run as the DaemonSet's agent: node, addresses and mounts from the environment "
    "(NODE_NAME, NODE_IP, POD_UID, WEFT_CONTROLPLANE; see daemonset/weft.yaml).",
)
@click.option("--outbound-port", default=15001, show_default=True)
@click.option("--admin-port", default=15020, show_default=True)
@click.option(
    "--exclude-ports",
    default="",
    help="Comma-separated destination ports never captured (e.g. 6443).",
)
@click.option(
    "--sockmap/--no-sockmap",
    default=True,
    show_default=True,
    help="Shortcut same-node pod<->proxy bytes with sk_msg.",
)
@click.option(
    "--ebpf-map-entries",
    type=click.IntRange(1_024, 1 << 20),
    default=16_384,
    show_default=True,
    help="Captured connections the kernel maps are sized for: connects waiting for the "
    "proxy's accept, and same-node sk_msg shortcut pairs (twice as many sockets). Past "
    "it, new connections still work, without the shortcut. About 370 bytes of kernel "
    "memory each; a change applies once the node's pins are removed (docs/ebpf.md).",
)
@click.option(
    "--connect-timeout",
    default=1.5,
    show_default=True,
    help="Seconds each stage of one connect attempt may take (TCP connect, TLS handshake, "
    "the tunnel's answer; then another endpoint is tried). Time spent waiting for a "
    "handshake slot does not count.",
)
@click.option(
    "--connect-attempts",
    default=3,
    show_default=True,
    help="Endpoints tried for one connection to a service before the app's is reset.",
)
@click.option(
    "--idle-timeout",
    default=3600.0,
    show_default=True,
    help="Seconds without a byte either way after which a connection is closed.",
)
@click.option(
    "--tunnel-idle-timeout",
    default=60.0,
    show_default=True,
    help="Seconds a pooled tunnel connection to another node stays open without a stream.",
)
@click.option(
    "--max-connections-per-pod",
    default=8192,
    show_default=True,
    help="Open connections one pod may hold through the proxy; its next are refused "
    "(weft_outbound_refused_busy_total), the other pods' are not.",
)
@click.option(
    "--max-requests-per-pod",
    default=2048,
    show_default=True,
    help="HTTP requests one pod may have in flight or waiting through the proxy; its next "
    "are answered 503 overloaded / RESOURCE_EXHAUSTED, the other pods' are not. While the "
    "proxy's event loop runs late, each pod's requests in flight are capped lower (down "
    "to 8) and the busiest pod's next ones wait their turn.",
)
@click.option(
    "--tunnel-max-streams",
    default=100,
    show_default=True,
    help="Connections multiplexed on one tunnel connection at most; past it another opens.",
)
@click.option(
    "--http/--no-http",
    default=True,
    show_default=True,
    help="Detect HTTP/1.1 and serve it per request (balancing each request, HTTP golden "
    "metrics); --no-http serves every connection as opaque TCP.",
)
@click.option(
    "--detect-timeout",
    default=1.0,
    show_default=True,
    help="Seconds protocol detection waits for a client's first bytes before serving the "
    "connection as opaque TCP (server-first protocols on ports not known to be opaque).",
)
@click.option(
    "--ready-wait",
    default=15.0,
    show_default=True,
    help="Seconds a captured connection that arrives before the agent is ready "
    "(certificates, discovery) waits for it before it is reset; it is never served "
    "before.",
)
@click.option(
    "--max-handshakes",
    default=32,
    show_default=True,
    help="Tunnel TLS handshakes in progress at once; more wait their turn.",
)
@click.option(
    "--handshake-queue-timeout",
    default=30.0,
    show_default=True,
    help="Seconds a connection may wait for a handshake slot before it is reset.",
)
@click.option(
    "--trace-collector",
    envvar="WEFT_TRACE_COLLECTOR",
    metavar="HOST:PORT",
    default=None,
    help="OTLP collector (OpenTelemetry Collector, Jaeger, Tempo) to send the spans of "
    "sampled requests to; unset: no tracing, trace headers pass untouched "
    "($WEFT_TRACE_COLLECTOR; $WEFT_TRACE_PROTOCOL and the exporter's other settings: "
    "docs/tracing.md).",
)
@click.option(
    "--trace-sample-rate",
    envvar="WEFT_TRACE_SAMPLE_RATE",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Share of requests without a sampling decision of their own that start a trace; "
    "0, as Linkerd: only requests the caller sampled are traced ($WEFT_TRACE_SAMPLE_RATE).",
)
@click.option(
    "--workers",
    envvar="WEFT_WORKERS",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Proxy worker processes sharing the ports (SO_REUSEPORT), each on its own core; "
    "the agent process keeps capture, certificates and discovery. 1: the agent serves in "
    "its own process. auto: the CPUs the agent may use (affinity and cgroup CPU limit, "
    "at most 8) with --kubernetes; 1 in the lab, whose nodes share this machine's cores "
    "(docs/architecture.md, Workers; $WEFT_WORKERS).",
)
@click.option("--drain", default=5.0, show_default=True, help="Seconds to drain on shutdown.")
@click.option(
    "--uninstall",
    "do_uninstall",
    is_flag=True,
    help="Detach every Weft program of this node and remove its pinned maps, then exit.",
)
def agent(
    node: str | None,
    lab_name: str | None,
    kubernetes: bool,
    outbound_port: int,
    admin_port: int,
    exclude_ports: str,
    sockmap: bool,
    ebpf_map_entries: int,
    connect_timeout: float,
    connect_attempts: int,
    idle_timeout: float,
    tunnel_idle_timeout: float,
    tunnel_max_streams: int,
    max_connections_per_pod: int,
    max_requests_per_pod: int,
    http: bool,
    detect_timeout: float,
    ready_wait: float,
    max_handshakes: int,
    handshake_queue_timeout: float,
    trace_collector: str | None,
    trace_sample_rate: float,
    workers: str,
    drain: float,
    do_uninstall: bool,
) -> None:
    """Run the node agent: capture local pods with eBPF and proxy their connections.

    Run it inside the node's network namespace (the lab does this for you). Stopping it
    leaves pods captured; `--uninstall` releases them.
    """
    # Imported here so that other commands (and --help) do not load bcc.
    from nodeagent.agent import AgentConfig, AgentError, run, uninstall
    from weft.tracing import TracingConfig, TracingConfigError

    if kubernetes == (lab_name is not None):
        raise click.UsageError("give exactly one of --lab NAME (with --node) or --kubernetes")
    if lab_name is not None and not node:
        raise click.UsageError("--node is required with --lab")
    try:
        tracing = TracingConfig.from_mapping(
            {
                **os.environ,
                "WEFT_TRACE_COLLECTOR": trace_collector or "",
                "WEFT_TRACE_SAMPLE_RATE": repr(trace_sample_rate),
            }
        )
    except TracingConfigError as e:
        raise click.UsageError(f"--trace-collector / $WEFT_TRACE_*: {e}") from None
    try:
        settings: dict[str, Any] = dict(
            outbound_port=outbound_port,
            admin_port=admin_port,
            skip_ports=_ports(exclude_ports),
            sockmap=sockmap,
            ebpf_map_entries=ebpf_map_entries,
            attempt_timeout=connect_timeout,
            connect_attempts=connect_attempts,
            idle_timeout=idle_timeout,
            tunnel_idle_timeout=tunnel_idle_timeout,
            tunnel_max_streams=tunnel_max_streams,
            max_connections_per_pod=max_connections_per_pod,
            max_requests_per_pod=max_requests_per_pod,
            http=http,
            detect_timeout=detect_timeout,
            ready_wait=ready_wait,
            max_handshakes=max_handshakes,
            handshake_queue_timeout=handshake_queue_timeout,
            drain_seconds=drain,
            tracing=tracing,
            workers=_workers(workers, kubernetes),
        )
        if kubernetes:
            cfg = AgentConfig.for_kubernetes(os.environ, **settings)
        else:
            assert lab_name is not None and node is not None
            cfg = AgentConfig.for_lab(lab_name, node, **settings)
        if do_uninstall:
            for line in uninstall(cfg) or ["nothing of Weft was attached"]:
                click.echo(line)
            return
        log.info("starting agent with %s", cfg)
        sys.exit(run(cfg))
    except AgentError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
