"""`weft viz` against a real lab: a drill where one of two echo replicas fails half its
requests, read back through every command (stat, edges, routes, top, JSON), and an agent
that cannot be reached, named while the other is still shown.

The load runs inside client-1 for the whole module (keep-alive requests to the echo
service, ~100/s, each balanced to a replica by client-1's node proxy), so every window the
commands take has traffic in it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import POD_HTTP, LabRunner, pod_load, running_lab

pytestmark = pytest.mark.lab

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"

LOAD = (
    POD_HTTP
    + r"""
import socket, sys, time

def connect():
    return socket.create_connection(("echo", 80), timeout=5)

sock, end, sent = connect(), time.time() + float(sys.argv[1]), 0
while time.time() < end:
    try:
        sock.sendall(b"GET /?fail=echo-2:0.5 HTTP/1.1\r\nHost: echo\r\n\r\n")
        response(sock)
        sent += 1
    except (OSError, IndexError, ValueError):
        sock.close()
        time.sleep(0.05)
        sock = connect()
    time.sleep(0.01)
print(sent)
"""
)


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    with (
        running_lab("vz", "--demo", "--nodes", "2", up_timeout=600, down_timeout=300) as runner,
        pod_load(runner, "client-1", LOAD, "600", settle=3),  # first requests through
    ):
        yield runner


def test_stat_shows_the_failing_replica_at_half(lab: LabRunner) -> None:
    out = lab.viz("stat", "pod", "--window", "8", "-o", "json")
    assert "scraping again in 8 s" not in out.stderr  # -o json keeps stderr for warnings
    doc = json.loads(out.stdout)
    assert doc["unreachable"] == []
    rows = {r["name"]: r for r in doc["rows"]}
    one, two = rows["echo-1"], rows["echo-2"]
    assert one["requests"] >= 100 and two["requests"] >= 100, rows
    assert one["success_rate"] > 0.98, one
    assert abs(two["success_rate"] - 0.5) < 0.1, two
    assert two["rps"] > 5 and two["latency_ms_p50"] is not None
    assert rows["client-1"]["requests"] == 0  # it sends; stat is the destinations' view
    # The table, and its deploy view: both replicas together, about 75 %.
    table = lab.viz("stat", "deploy", "--window", "4")
    assert "scraping again in 4 s" in table.stderr
    echo = next(line for line in table.stdout.splitlines() if line.startswith("echo "))
    assert "2/2" in echo
    success = float(next(c for c in echo.split() if c.endswith("%")).rstrip("%"))
    assert 60 < success < 90, table.stdout
    # --from: the client's side names the same split.
    frm = json.loads(
        lab.viz("stat", "pod", "--from", "deploy/client", "--window", "4", "-o", "json").stdout
    )
    split = {r["name"]: r["success_rate"] for r in frm["rows"]}
    assert set(split) == {"echo-1", "echo-2"} and abs(split["echo-2"] - 0.5) < 0.15


def test_edges_show_mtls_and_both_identities(lab: LabRunner) -> None:
    doc = json.loads(lab.viz("edges", "deploy", "-o", "json").stdout)
    [edge] = [e for e in doc["edges"] if (e["src"], e["dst"]) == ("client", "echo")]
    assert edge["mtls"] and edge["secured"] == "yes"
    assert edge["client_id"] == [CLIENT] and edge["server_id"] == [ECHO]
    table = lab.viz("edges", "pod").stdout
    line = next(li for li in table.splitlines() if li.startswith("client-1") and "echo-2" in li)
    assert CLIENT in line and ECHO in line and "mTLS" in line


def test_routes_and_top(lab: LabRunner) -> None:
    routes = lab.viz("routes", "svc/echo", "--window", "3")
    row = next(li for li in routes.stdout.splitlines() if li.startswith("[default]"))
    assert "%" in row and "rps" in row
    doc = json.loads(lab.viz("routes", "svc/echo", "--window", "3", "-o", "json").stdout)
    [default] = doc["routes"]
    # One replica of two fails half its requests: about 0.75, but the balancer may send it
    # less than half (failure accrual), so only "clearly some failures, not most".
    assert default["route"] == "[default]" and 0.55 < default["success_rate"] < 0.985

    top = lab.viz("top", "--once", "--window", "3")
    assert "no request path" in top.stdout  # the agents' series carry none: authority
    lines = [li for li in top.stdout.splitlines() if li.startswith("default/client-1")]
    assert any("default/echo-2" in li and " echo " in li for li in lines), top.stdout
    rows = json.loads(lab.viz("top", "-o", "json", "--window", "2").stdout)["rows"]
    assert {r["dst"] for r in rows} >= {"echo-1", "echo-2"} and rows[0]["count"] > 0


def test_an_unreachable_agent_is_named_and_the_others_shown(lab: LabRunner) -> None:
    lab.weft("lab", "stop", "agent-node-2")
    try:
        out = lab.viz("stat", "pod", "--window", "0")
        assert "could not read the agent of node-2" in out.stderr, out.stderr
        assert "10.240.0.12:15020" in out.stderr and "connection refused" in out.stderr
        echo1 = next(li for li in out.stdout.splitlines() if li.startswith("echo-1"))
        assert "%" in echo1  # node-1's agent still answers
        echo2 = next(li for li in out.stdout.splitlines() if li.startswith("echo-2"))
        assert "agent of node-2 unreachable" in echo2
        doc = json.loads(lab.viz("edges", "pod", "-o", "json").stdout)
        assert [u["source"] for u in doc["unreachable"]] == ["node-2"]
        assert any(e["src"] == "client-1" for e in doc["edges"])
    finally:
        lab.weft("lab", "start", "agent-node-2", check=False, timeout=180)


PROMETHEUS_CONFIG = """
global: {scrape_interval: 1s, scrape_timeout: 1s}
scrape_configs:
  - job_name: weft
    static_configs: [{targets: ["10.240.0.11:15020", "10.240.0.12:15020"]}]
"""


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary (Debian's)")
def test_the_same_figures_through_a_prometheus(lab: LabRunner, tmp_path: Path) -> None:
    # A real Prometheus inside node-1's namespace (it reaches both agents there), and
    # `weft viz --prometheus` run in the same namespace.
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_CONFIG)
    netns = ["ip", "netns", "exec", f"{lab.name}-node-1"]
    log = tmp_path / "prometheus.log"
    log_file = log.open("w")
    prom = subprocess.Popen(
        [*netns, "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", "--web.listen-address=127.0.0.1:19090"],
        stdout=subprocess.DEVNULL, stderr=log_file,
    )  # fmt: skip
    try:
        argv = [*netns, sys.executable, "-m", "weft.cli", "viz", "--lab", lab.name,
                "--prometheus", "http://127.0.0.1:19090"]  # fmt: skip
        deadline = time.monotonic() + 90
        while True:  # until Prometheus holds a whole window of both agents
            time.sleep(3)
            assert prom.poll() is None, log.read_text()[-2000:]
            out = subprocess.run(
                [*argv, "stat", "pod", "--window", "6", "-o", "json"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if out.returncode == 0:
                doc = json.loads(out.stdout)
                if doc["unreachable"] == [] or time.monotonic() > deadline:
                    break
            assert time.monotonic() < deadline, out.stderr
        assert doc["unreachable"] == [] and "Prometheus" in doc["source"], doc["unreachable"]
        rows = {r["name"]: r for r in doc["rows"]}
        assert rows["echo-1"]["success_rate"] > 0.98, rows["echo-1"]
        assert abs(rows["echo-2"]["success_rate"] - 0.5) < 0.12, rows["echo-2"]
        assert rows["echo-2"]["rps"] > 5
        edges = subprocess.run([*argv, "edges", "deploy", "-o", "json"], capture_output=True,
                               text=True, timeout=120)  # fmt: skip
        assert edges.returncode == 0, edges.stderr
        [edge] = [e for e in json.loads(edges.stdout)["edges"] if e["dst"] == "echo"]
        assert edge["mtls"] and edge["client_id"] == [CLIENT]
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log_file.close()
