"""The noisy-neighbour drill (issue #18), short: `weft bench noisy` with 5 s phases, a
lower rate and smaller floods, Weft only.

It asserts what must hold on any machine, not a timing ratio (that is a benchmark
figure, in docs/benchmarks.md): B's requests all succeed while A floods the node proxy
three ways; each flood is answered to A (A's HTTP requests beyond its share get 503
overloaded, its connections beyond its share are reset, its rapid resets end in GOAWAY
ENHANCE_YOUR_CALM), and node-1's agent counts those refusals for A and never for B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from weft.lab import net

LAB = "wnzt"
SECONDS = 5
RATE = 200
REQUEST_TIMEOUT = 15
"""Seconds before one of B's requests counts as failed: generous, since this is not a
latency test (the bench's 2 s is; on a loaded 2-vCPU machine a flood can push B's
requests past that without failing any)."""


def test_noisy_neighbour_drill(tmp_path: Path):
    out = tmp_path / "noisy.json"
    argv = [sys.executable, "-m", "weft.cli", "bench", "noisy", "--no-haproxy",
            "--lab-name", LAB, "--seconds", str(SECONDS), "--rate", str(RATE),
            "--http-connections", "96", "--tcp-concurrency", "384", "--h2-connections", "4",
            "--max-requests-per-pod", "32", "--max-connections-per-pod", "128",
            "--request-timeout", str(REQUEST_TIMEOUT),
            "--json", str(out)]  # fmt: skip
    try:
        # ~60 s here; below pytest-timeout's 300 s, so that a hung run ends here and its
        # lab is removed below rather than left behind by a pytest kill.
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=270)
    except subprocess.TimeoutExpired:
        env = {**os.environ, "WEFT_LAB": LAB}
        down = [sys.executable, "-m", "weft.cli", "lab", "down"]
        subprocess.run(down, env=env, capture_output=True, timeout=50)
        raise
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    weft = result["setups"]["weft"]
    phases = {p["flood"]: p for p in weft["phases"][1:-1]}
    assert set(phases) == {"http", "tcp", "h2reset"}
    for p in weft["phases"]:
        b = p["b"]
        # Every one of B's requests answered 200, flood or not (a reset, a close or no
        # answer within REQUEST_TIMEOUT would be counted in errors).
        assert b["errors"] == 0 and b["warmup_errors"] == 0, (p["flood"], b)
        assert b["count"] == RATE * SECONDS, (p["flood"], b)
        # Whatever the agent refused, it refused to A only.
        for by_workload in p["refusals"].values():
            assert set(by_workload) <= {"nz-a"}, (p["flood"], p["refusals"])
    for alone in (weft["phases"][0], weft["phases"][-1]):
        assert not any(alone["refusals"].values()), alone["refusals"]
    http, tcp, h2 = phases["http"], phases["tcp"], phases["h2reset"]
    # A was served (its share) and refused (beyond it), and the agent counted it for A.
    assert http["a"]["ok"] > 0 and http["a"]["overloaded"] > 0, http["a"]
    assert http["refusals"]["weft_outbound_http_refused_busy_total"]["nz-a"] > 0, http
    assert tcp["a"]["ok"] > 0 and tcp["a"]["refused"] > 0, tcp["a"]
    assert tcp["refusals"]["weft_outbound_refused_busy_total"]["nz-a"] > 0, tcp
    # Rapid reset: the agent ended A's connections (and only A's, B has no errors).
    assert h2["a"]["streams_reset"] > 0, h2["a"]
    assert h2["a"].get("goaway_ENHANCE_YOUR_CALM", 0) > 0, h2["a"]
    assert set(result["targets"]) == {"b_p99_with_flood_over_alone", "b_errors"}
    assert result["targets"]["b_errors"]["met"], result["targets"]
    assert not net.list_netns(f"{LAB}-")
