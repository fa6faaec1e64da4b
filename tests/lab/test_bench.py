"""`weft bench --quick` runs end to end: every setup, scenario and figure is produced.

This proves the harness works on a fresh machine (HAProxy, nftables, both labs, plots);
it asserts no timing — the figures are for docs/benchmarks.md, not for a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from weft.lab import net

SETUPS = {
    "direct", "direct-same-node", "weft", "weft-same-node", "haproxy-sidecars",
    "haproxy-same-node", "haproxy-resumption", "haproxy-http", "haproxy-h2",
}  # fmt: skip
SCENARIOS = {"rate-500", "rate-1000", "saturate", "conn", "bulk", "h2", "grpc"}
H1 = SCENARIOS - {"h2", "grpc"}
ONLY = {
    "haproxy-resumption": {"conn"},
    "direct-same-node": H1,
    "weft-same-node": H1,
    "haproxy-sidecars": H1,
    "haproxy-same-node": H1,
    "haproxy-http": SCENARIOS - {"grpc"},
    "haproxy-h2": {"h2", "grpc"},
}


def test_quick_bench_writes_every_figure(tmp_path: Path):
    out = tmp_path / "bench.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "weft.cli", "bench", "--quick", "--json", str(out)],
            capture_output=True,
            text=True,
            # ~130 s here. Below pytest-timeout's 300 s, so that a hung run ends here and
            # its labs are removed below, not in a pytest kill that leaves them behind.
            timeout=270,
        )
    except subprocess.TimeoutExpired:
        for lab in ("wbench", "wbenchm"):  # the killed bench could not remove them
            subprocess.run(
                [sys.executable, "-m", "weft.cli", "lab", "down"],
                env={**os.environ, "WEFT_LAB": lab}, capture_output=True, timeout=50,
            )  # fmt: skip
        raise
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == SETUPS
    for setup, by in result["summary"].items():
        assert set(by) == ONLY.get(setup, SCENARIOS), setup
        for scenario, figures in by.items():
            assert figures.get("errors", 0) == 0, (setup, scenario, figures)
            rate = figures.get("mb_per_second") if scenario == "bulk" else figures["per_second"]
            assert rate > 0, (setup, scenario, figures)
    # The weft setups really went through the mesh: node-1's agent took the captured
    # client's connections and opened tunnels; node-2's tunnel server established the
    # cross-node ones, node-1's own the same-node ones. Each conn sample alone opens
    # hundreds of connections.
    # Per-request balancing over the two-replica service, all three protocols.
    balance = result["balance"]
    for run in ("http1_split", "h2_split", "grpc_split", "http1_slow", "http1_recovery",
                "grpc_slow"):  # fmt: skip
        assert balance[run]["errors"] == {} and balance[run]["share"] is not None, balance
    assert 0.2 <= balance["http1_split"]["share"] <= 0.8, balance
    tunnels = result["tunnels"]
    assert tunnels["node-1"]["outbound_accepted"] >= 100, tunnels
    assert tunnels["node-1"]["streams_opened"] >= 100, tunnels
    assert tunnels["node-2"]["streams_established"] >= 50, tunnels
    assert tunnels["node-1"]["streams_established"] >= 50, tunnels
    # Over pooled connections: a handful of TLS handshakes for all those streams (the
    # 1,000 idle connections held at once take 10 at 100 streams each, plus same node).
    assert tunnels["node-1"]["tls_connections_made"] <= 16, tunnels
    # CPU per request is charged to the proxies of each setup, during its runs only.
    for setup in ("weft", "haproxy-sidecars"):
        assert result["summary"][setup]["saturate"]["cpu_us_per_request"] > 0, setup
    assert "cpu_us_per_request" not in result["summary"]["direct"]["saturate"]
    load = result["memory_under_load"]
    for setup in ("weft", "haproxy-sidecars"):
        idle = load["idle_connections"][setup]
        assert idle["connections"] == idle["ok"] == 1000, idle
        assert load["saturation_peak"][setup]["rss"] > 0
    assert all(v > 0 for v in load["bpf_map_memlock"].values()), load
    assert result["machine"]["openssl_weft"].startswith("OpenSSL")
    assert result["tls"]["haproxy"]["version"] == "TLSv1.3", result["tls"]
    assert any("TLSv1.3" in t for t in result["tls"]["weft"]), result["tls"]
    # Nothing else used node-2's agent as a client: the direct and sidecar pods are not
    # captured.
    assert tunnels["node-2"]["outbound_accepted"] == 0, tunnels
    mem = result["memory"]
    for k in mem["pods"]:
        assert mem["weft_agent"][str(k)]["rss"] > 0
        assert mem["haproxy"][str(k)]["processes"] == k
    assert set(result["targets"]) == {
        "added_p99_ms_at_1000rps_cross_node",
        "saturation_vs_haproxy",
        "saturation_vs_haproxy_http",
        "h2_saturation_vs_haproxy_http",
        "h2_saturation_vs_haproxy_h2",
        "grpc_saturation_vs_haproxy_h2",
        "keepalive_split_equal_replicas",
        "h2_split_equal_replicas",
        "grpc_split_equal_replicas",
        "slow_replica_share_http1",
        "slow_replica_share_grpc",
        "new_connections_vs_haproxy",
        "bulk_vs_haproxy",
        "agent_memory_vs_sidecars",
    }
    for suffix in ("latency", "throughput", "memory"):
        assert (tmp_path / f"bench-{suffix}.png").stat().st_size > 1000
    # Both labs are gone.
    assert not net.list_netns("wbench-") and not net.list_netns("wbenchm-")
