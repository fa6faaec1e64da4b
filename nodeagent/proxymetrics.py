"""Prometheus families of the proxy stages' own counters (ready holds, the tunnel pool,
handshake admission), shared by the node agent and the sidecar, which compose the same
stages (`nodeagent.agent`, `nodeagent.sidecar`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodeagent.proxy.admission import AdmissionStats
from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.tunnel import TunnelClient, TunnelServer


def hold_metrics(holds: Mapping[str, ReadyHold]) -> Any:
    g = GaugeMetricFamily(
        "weft_proxy_held_connections",
        "Connections accepted before the agent was ready, waiting for it, by listener.",
        labels=["listener"],
    )
    c = CounterMetricFamily(
        "weft_proxy_held",
        "Connections that arrived before the agent was ready, by listener and outcome "
        "(served once ready; reset at the deadline, when full, or at shutdown).",
        labels=["listener", "outcome"],
    )
    w = CounterMetricFamily(
        "weft_proxy_held_wait_seconds",
        "Time held connections waited for readiness before being served.",
        labels=["listener"],
    )
    for kind, hold in holds.items():
        st = hold.stats
        g.add_metric([kind], st.held)
        w.add_metric([kind], st.wait_seconds)
        for outcome, n in (
            ("served", st.served),
            ("deadline", st.refused_deadline),
            ("full", st.refused_full),
            ("shutdown", st.refused_shutdown),
        ):
            c.add_metric([kind, outcome], n)
    yield from (g, c, w)


def pool_metrics(client: TunnelClient | None, server: TunnelServer | None) -> Any:
    """Pooled tunnel connections and the streams on them, both directions."""
    conns = GaugeMetricFamily(
        "weft_tunnel_connections",
        "Tunnel (mTLS) connections open now: outbound = this node's pool to other nodes, "
        "inbound = other nodes' connections to this one.",
        labels=["direction"],
    )
    streams = GaugeMetricFamily(
        "weft_tunnel_streams",
        "Proxied connections multiplexed on tunnel connections now, by direction.",
        labels=["direction"],
    )
    if client is not None:
        conns.add_metric(["outbound"], client.connections)
        streams.add_metric(["outbound"], client.open_streams)
    if server is not None:
        conns.add_metric(["inbound"], server.stats.sessions_active)
        streams.add_metric(["inbound"], server.stats.streams_active)
    yield conns
    yield streams
    if client is not None:
        made = CounterMetricFamily(
            "weft_tunnel_connections_opened",
            "Tunnel connections this node made (each one TLS handshake).",
        )
        made.add_metric([], client.stats.connections)
        yield made


def admission_metrics(st: AdmissionStats) -> Any:
    g = GaugeMetricFamily(
        "weft_tunnel_handshakes", "Fresh tunnel handshakes now, by state.", labels=["state"]
    )
    g.add_metric(["in_flight"], st.in_flight)
    g.add_metric(["queued"], st.queued)
    c = CounterMetricFamily(
        "weft_tunnel_handshake_admissions",
        "Fresh tunnel handshakes by admission outcome (admitted at once, after a wait, or "
        "refused because this node was overloaded).",
        labels=["outcome"],
    )
    c.add_metric(["immediate"], st.admitted - st.waited)
    c.add_metric(["waited"], st.waited)
    c.add_metric(["refused_full"], st.refused_full)
    c.add_metric(["refused_timeout"], st.refused_timeout)
    w = CounterMetricFamily(
        "weft_tunnel_handshake_wait_seconds",
        "Time fresh tunnels waited for a handshake slot on this node.",
    )
    w.add_metric([], st.wait_seconds)
    r = CounterMetricFamily(
        "weft_tunnel_handshake_refused",
        "Fresh tunnel handshakes refused because this node was overloaded, by the source "
        "that asked (a workload's identity on the client side, a peer address on the "
        "server side): turns are fair between sources, so the noisy one is refused first.",
        labels=["source"],
    )
    for source, n in sorted(st.refused_by_key.items()):
        r.add_metric([source], n)
    yield from (g, c, w, r)
