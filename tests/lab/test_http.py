"""HTTP in the node proxy, end to end in the lab: per-request balancing of one HTTP/1.1
keep-alive connection, one h2c connection's streams and one gRPC channel (grpcio) over
both echo replicas (one per node), a slow replica avoided, golden metrics with both
identities on both nodes, and a server-first protocol not stalled by detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.lab.conftest import POD_HTTP, LabRunner, running_lab, sample
from weft.identity import SpiffeId

# In client-1: N requests on one kept connection to the echo service; prints the pods.
SPREAD = (
    POD_HTTP
    + r"""
import json, socket, sys
sock = socket.create_connection(("echo", 80), timeout=10)
pods = [request(sock, sys.argv[2]) for _ in range(int(sys.argv[1]))]
print(json.dumps(pods))
"""
)

# In echo-2: a server-first "SMTP" greeting on PORT, until killed.
GREETER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(b"220 echo-2 ESMTP ready\r\n")
    if conn.recv(100).startswith(b"QUIT"):
        conn.sendall(b"221 bye\r\n")
    conn.close()
"""

# In client-1: connect, wait for the greeting without sending; prints the seconds it took.
GREETED = r"""
import json, socket, sys, time
t = time.monotonic()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
greeting = s.recv(100)
waited = time.monotonic() - t
s.sendall(b"QUIT\r\n")
bye = s.recv(100)
print(json.dumps({"greeting": greeting.decode(), "bye": bye.decode(), "seconds": waited}))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    with running_lab("wh", "--demo", "--nodes", "2") as runner:
        yield runner


def _spread(lab: LabRunner, n: int, path: str = "/") -> list[str]:
    out = lab.exec("client-1", sys.executable, "-c", SPREAD, str(n), path).stdout
    return list(json.loads(out))


def test_one_keep_alive_connection_is_balanced_per_request(lab: LabRunner):
    pods = _spread(lab, 400)
    share = pods.count("echo-2") / len(pods)
    print(f"400 requests on one connection: echo-1 {pods.count('echo-1')}, "
          f"echo-2 {pods.count('echo-2')}")  # fmt: skip
    assert 0.30 <= share <= 0.70, share


def test_a_slower_replica_gets_few_requests(lab: LabRunner):
    pods = _spread(lab, 300, "/?delay_ms=echo-2:20")
    print(f"echo-2 20 ms slower: echo-1 {pods.count('echo-1')}, echo-2 {pods.count('echo-2')}")
    assert pods.count("echo-2") / len(pods) < 0.10


def _echoclient(lab: LabRunner, *args: str) -> dict:
    """Its JSON; it exits 1 when some requests failed (the failure drills want that)."""
    proc = lab.exec("client-1", sys.executable, "-m", "weft.lab.echoclient", *args, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return dict(json.loads(proc.stdout))


def test_one_h2c_connection_is_balanced_per_stream(lab: LabRunner):
    got = _echoclient(lab, "h2", "echo:80", "-n", "400", "--concurrency", "8")
    print(f"400 streams on one h2c connection: {got}")
    assert got["errors"] == {}
    pods = got["pods"]
    assert sum(pods.values()) == 400
    assert 0.30 <= pods.get("echo-2", 0) / 400 <= 0.70, pods


def test_one_grpc_channel_is_balanced_per_call(lab: LabRunner):
    """The calls of one channel go to both replicas (a channel pinned to one replica
    would give the other none).  Not an equal split: peak-EWMA follows latency, and
    single calls to one replica sometimes stall (CI rehearsals saw 42/258, and 24/276
    with one call to echo-1 taking 10 s: a stall under investigation, see the stop's
    note); the equal-replicas split is a benchmark figure (`weft bench balance`:
    0.45-0.52 in three rounds), not a test bound."""
    got = _echoclient(lab, "grpc", "echo:9090", "-n", "300")
    print(f"300 calls on one gRPC channel: {got}")
    assert got["errors"] == {}
    pods = got["pods"]
    assert sum(pods.values()) == 300
    assert min(pods.get("echo-1", 0), pods.get("echo-2", 0)) >= 15, got  # >= 5 % each


def test_a_websocket_upgrade_becomes_an_opaque_connection(lab: LabRunner):
    """The request is balanced like any other; after 101 the connection is opaque bytes
    between client-1 and the pod that accepted it, through both nodes' proxies."""
    seen = set()
    for _ in range(6):
        got = _echoclient(lab, "websocket", "echo:80", "-n", "20")
        assert got["errors"] == {}, got
        ((pod, count),) = got["pods"].items()
        assert count == 20
        seen.add(pod)
    assert seen <= {"echo-1", "echo-2"}


def test_grpc_status_is_counted_on_both_nodes_with_both_identities(lab: LabRunner):
    """gRPC failures are HTTP 200s: the classification comes from ``grpc-status`` (here
    UNAVAILABLE, injected on echo-2), counted by the client's node and by echo-2's node,
    which names the client identity it verified."""
    got = _echoclient(lab, "grpc", "echo:9090", "-n", "60", "--metadata", "status=echo-2:503")
    assert got["errors"].get("UNAVAILABLE", 0) >= 5 and got["pods"].get("echo-1", 0) >= 5, got
    client = str(SpiffeId.workload("default", "client"))
    echo = str(SpiffeId.workload("default", "echo"))
    ids = {"client_id": client, "server_id": echo}
    out = lab.metrics("node-1")
    assert sample(out, "response_total", direction="outbound", classification="failure",
                   grpc_status="14", dst_workload="echo-2", **ids) >= 5  # fmt: skip
    assert sample(out, "response_total", direction="outbound", classification="success",
                   grpc_status="0", dst_workload="echo-1", **ids) >= 5  # fmt: skip
    assert sample(out, "weft_protocol_detect_total", result="h2") >= 1
    inbound = lab.metrics("node-2")
    assert sample(inbound, "response_total", direction="inbound", classification="failure",
                   grpc_status="14", dst_workload="echo-2", **ids) >= 5  # fmt: skip


def test_a_slower_replica_gets_few_grpc_calls(lab: LabRunner):
    got = _echoclient(lab, "grpc", "echo:9090", "-n", "300", "--metadata", "delay_ms=echo-2:20")
    print(f"echo-2 20 ms slower, one gRPC channel: {got}")
    assert got["errors"] == {}
    assert got["pods"].get("echo-2", 0) / 300 < 0.10, got


@pytest.mark.parametrize(("port", "fast"), [(25, True), (2525, False), (2526, True)])
def test_a_server_first_protocol_is_not_stalled(lab: LabRunner, port: int, fast: bool):
    """Port 25 is opaque by default: no wait at all. 2525 is not: detection waits for the
    client's first bytes until its deadline (1 s), then relays, and the greeting (and
    every byte after it) arrives intact. 2526 is marked opaque on the pod
    (``weft.io/opaque-ports``, a label in the lab): no wait either."""
    echo2 = next(p["ip"] for p in lab.status()["pods"] if p["name"] == "echo-2")
    if port == 2526:
        lab.weft("lab", "label", "echo-2", "weft.io/opaque-ports=2526")
        time.sleep(2.0)  # discovery reaches node-1's agent
    server = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "exec", "echo-2", "--",
         sys.executable, "-c", GREETER, str(port)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "WEFT_LAB": lab.name},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        out = lab.exec("client-1", sys.executable, "-c", GREETED, echo2, str(port))
        got = json.loads(out.stdout)
        print(f"port {port}: greeting after {got['seconds']:.3f}s")
        assert got["greeting"] == "220 echo-2 ESMTP ready\r\n" and got["bye"] == "221 bye\r\n"
        assert got["seconds"] < (0.5 if fast else 3.0)
        if not fast:
            assert got["seconds"] >= 0.5  # it did wait for the detection deadline
    finally:
        if port == 2526:
            lab.weft("lab", "label", "echo-2", "weft.io/opaque-ports-", check=False)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()
        time.sleep(0.2)
