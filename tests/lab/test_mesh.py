"""The mesh on the wire: what crosses between nodes is TLS 1.3 with client certificates."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.proxy.tls import sni_for
from tests.lab.conftest import POD_HTTP, LabRunner, Sniffer, running_lab, sample
from weft.identity import SpiffeId
from weft.lab.lab import admin_get
from weft.nsenter import in_netns


@pytest.fixture(scope="module")
def mesh() -> Iterator[LabRunner]:
    with running_lab("wm", "--demo", "--nodes", "2") as runner:
        yield runner


def _status(lab: LabRunner) -> dict:
    return lab.status()


def _pod_ip(status: dict, name: str) -> str:
    return next(p["ip"] for p in status["pods"] if p["name"] == name)


def test_bytes_between_nodes_are_encrypted(mesh: LabRunner):
    status = _status(mesh)
    echo2 = _pod_ip(status, "echo-2")
    secret = f"secret-{uuid.uuid4().hex}"
    plain = f"plain-{uuid.uuid4().hex}"
    sniffer = Sniffer(f"{mesh.name}-fabric", "n1")  # node-1's cable
    try:
        body = json.loads(
            mesh.exec("client-1", "curl", "-sS", "-m", "5", f"http://{echo2}:8080/{secret}").stdout
        )
        assert body["path"] == f"/{secret}"
        # Control: an uncaptured pod's request crosses the same cable in plaintext,
        # which proves the sniffer sees the traffic it should.
        mesh.exec("plain-1", "curl", "-sS", "-m", "5", f"http://{echo2}:8080/{plain}")
    finally:
        wire = sniffer.stop()
    assert plain.encode() in wire
    assert secret.encode() not in wire
    assert 15008 in sniffer.tcp_ports()  # the tunnel carried it
    assert 8080 in sniffer.tcp_ports()  # and the control's plaintext went to the pod


def _tls_client(mesh: LabRunner, node_ip: str, *, max_version: ssl.TLSVersion) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    with in_netns(f"{mesh.name}-node-2"):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(5)
    try:
        raw.connect((node_ip, 15008))
        # A Weft SNI naming a workload the node holds, so the refusal is about the
        # missing client certificate (without SNI it would be "unknown SNI").
        sni = sni_for(SpiffeId.workload("default", "echo"))
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            version = tls.version() or "?"
            # TLS 1.3: the server's verdict on our (missing) certificate arrives after
            # the client considers the handshake done; reading surfaces it.
            if tls.recv(1) == b"":
                return f"refused: closed right after the {version} handshake"
            return f"accepted {version}"
    except (ssl.SSLError, OSError) as e:
        return f"refused: {e}"
    finally:
        raw.close()


def test_tunnel_refuses_clients_without_a_certificate_and_old_tls(mesh: LabRunner):
    node1 = next(n["ip"] for n in _status(mesh)["nodes"] if n["name"] == "node-1")
    no_cert = _tls_client(mesh, node1, max_version=ssl.TLSVersion.TLSv1_3)
    assert no_cert.startswith("refused"), no_cert
    tls12 = _tls_client(mesh, node1, max_version=ssl.TLSVersion.TLSv1_2)
    assert tls12.startswith("refused"), tls12
    answer = admin_get(f"{mesh.name}-node-1", "127.0.0.1", 15020, "/debug/state")
    assert answer is not None
    server = json.loads(answer[1])["tunnel"]["server"]
    assert server["client_cert_missing"] >= 1
    assert server["tls_version"] >= 1
    # ...and the tunnel still serves a proper client afterwards.
    status = _status(mesh)
    body = json.loads(
        mesh.exec(
            "client-2", "curl", "-sS", "-m", "5", f"http://{_pod_ip(status, 'echo-1')}:8080/"
        ).stdout
    )
    assert body["pod"] == "echo-1"


def test_independent_scanner_sees_only_tls13_and_a_required_client_certificate(
    mesh: LabRunner, tmp_path
):
    """sslyze (an independent TLS scanner) against node-1's tunnel port.

    Without a client certificate sslyze cannot complete its connectivity check (the
    server ends the connection when no certificate comes); with a workload certificate
    from the lab's CA it can enumerate versions: only TLS 1.3 is accepted.
    """
    from controlplane.identity.ca import load_ca
    from weft.identity import cert_pem, generate_key, key_pem

    status = _status(mesh)
    node1 = next(n["ip"] for n in status["nodes"] if n["name"] == "node-1")
    issuer = load_ca(Path(status["paths"]["state_dir"]) / "ca")
    key = generate_key()
    leaf = issuer.sign_leaf(key.public_key(), SpiffeId.workload("default", "client"))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    (tmp_path / "chain.pem").write_bytes(cert_pem(leaf) + cert_pem(issuer.cert))
    sni = sni_for(SpiffeId.workload("default", "echo"))

    def sslyze(*extra: str) -> dict:
        out = tmp_path / "scan.json"
        mesh.exec(
            "node-2", sys.executable, "-m", "sslyze", "--sni", sni, *extra,
            "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
            f"--json_out={out}", f"{node1}:15008",
        )  # fmt: skip
        (result,) = json.loads(out.read_text())["server_scan_results"]
        return result

    anonymous = sslyze()
    assert anonymous["connectivity_status"] == "ERROR"
    assert "closed" in anonymous["connectivity_error_trace"] or "closed" in json.dumps(anonymous)

    scan = sslyze("--cert", str(tmp_path / "chain.pem"), "--key", str(tmp_path / "key.pem"))
    assert scan["connectivity_status"] == "COMPLETED"
    assert scan["connectivity_result"]["highest_tls_version_supported"] == "TLS_1_3"
    results = scan["scan_result"]
    for old in ("ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2"):
        assert results[f"{old}_cipher_suites"]["status"] == "COMPLETED", old
        assert results[f"{old}_cipher_suites"]["result"]["accepted_cipher_suites"] == [], old
    assert results["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]


# --------------------------------------------------------------------------- L4 mesh


def _both_replicas_answer(mesh: LabRunner, tries: int = 60) -> bool:
    """Whether requests to the service reach both replicas.  P2C picks at random between
    idle endpoints, so ten requests all land on one with probability 2 x 0.5^10 (0.2 %):
    ask until both have answered, or ``tries`` requests (a chance of 2 x 0.5^60)."""
    seen: set[str] = set()
    for _ in range(tries):
        seen.update(_answered_by(mesh, 1))
        if seen == {"echo-1", "echo-2"}:
            return True
    return False


def _answered_by(mesh: LabRunner, n: int, path: str = "/") -> list[str]:
    pods = []
    for _ in range(n):
        out = mesh.exec("client-1", "curl", "-sS", "-m", "5", f"http://echo{path}").stdout
        pods.append(json.loads(out)["pod"])
    return pods


def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.5)


def test_service_requests_reach_replicas_on_both_nodes(mesh: LabRunner):
    pods = _answered_by(mesh, 20)
    assert set(pods) == {"echo-1", "echo-2"}, pods


def test_metrics_show_http_requests_with_both_identities_on_both_nodes(mesh: LabRunner):
    """curl speaks HTTP/1.1, so each request is counted (request_total, response_total,
    response_latency_ms) by the client's node, per replica it was balanced to, and by
    the server's node, naming the client's verified identity."""
    client = str(SpiffeId.workload("default", "client"))
    echo = str(SpiffeId.workload("default", "echo"))
    labels = {"src_workload": "client-1", "client_id": client, "server_id": echo}
    before = sample(mesh.metrics("node-1"), "request_total", direction="outbound", **labels)
    assert _both_replicas_answer(mesh)  # so node-2 has served some
    text = mesh.metrics("node-1")
    requests = sample(text, "request_total", direction="outbound", tls="true", **labels)
    assert requests - before >= 2
    ok = sample(text, "response_total", direction="outbound", classification="success",
                 status_code="200", **labels)  # fmt: skip
    assert ok >= requests - before
    assert sample(text, "response_latency_ms_count", direction="outbound", **labels) >= 2
    assert sample(text, "request_total", dst_workload="echo-2", **labels) >= 1
    assert sample(text, "weft_protocol_detect_total", result="http1") >= 2
    # The receiving side counts them inbound, naming the client identity it verified.
    inbound = sample(mesh.metrics("node-2"), "request_total", direction="inbound",
                      client_id=client, server_id=echo, dst_workload="echo-2")  # fmt: skip
    assert inbound >= 1


def test_stopped_replica_is_retried_then_ejected(mesh: LabRunner):
    before = sample(mesh.metrics("node-1"), "weft_outbound_endpoint_failures_total")
    mesh.weft("lab", "stop", "echo-2")
    try:
        # Every new connection still succeeds: a refused endpoint is retried elsewhere.
        assert set(_answered_by(mesh, 12)) == {"echo-1"}
        text = mesh.metrics("node-1")
        assert sample(text, "weft_outbound_endpoint_failures_total", service="default/echo") > (
            before
        )
        assert sample(text, "weft_outbound_endpoint_ejections_total", service="default/echo") >= 1
    finally:
        mesh.weft("lab", "start", "echo-2")
    # Probation lets it back in once it answers again.
    _eventually(lambda: "echo-2" in _answered_by(mesh, 4), 60, "echo-2 serves again")


# Runs in client-1: a request on a keep-alive connection, then (once GO exists) another.
KEPT = (
    POD_HTTP
    + r"""
import os, socket, sys, time
kept = socket.create_connection(("echo", 80), timeout=10)
print(request(kept), flush=True)
deadline = time.time() + 60
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.1)
print(request(kept), flush=True)
"""
)


def test_controlplane_outage_keeps_traffic_and_agents_resync(mesh: LabRunner, tmp_path: Path):
    go = tmp_path / "go"
    env = {**os.environ, "WEFT_LAB": mesh.name}
    kept = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "exec", "client-1", "--",
         sys.executable, "-c", KEPT, str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert kept.stdout is not None
        first = kept.stdout.readline().strip()
        assert first in ("echo-1", "echo-2"), kept.stderr.read() if kept.stderr else ""
        mesh.weft("lab", "stop", "controlplane")
        # The connection opened before the outage keeps working through it ...
        go.touch()
        out, err = kept.communicate(timeout=30)
        # (Each request of the kept connection is balanced on its own: either replica.)
        assert out.strip() in ("echo-1", "echo-2"), err
    finally:
        if kept.poll() is None:
            kept.kill()
    restarted = False
    try:
        # ... and new connections keep working on the agents' last state.
        assert _both_replicas_answer(mesh)
        # A change made while the control plane is away ...
        mesh.weft("lab", "label", "echo-2", "app-")
        mesh.weft("lab", "start", "controlplane")
        restarted = True
        # ... reaches the agents once it is back: echo-2 leaves the service.
        _eventually(
            lambda: set(_answered_by(mesh, 6)) == {"echo-1"}, 40, "agents resync the change"
        )
    finally:
        if not restarted:
            mesh.weft("lab", "start", "controlplane", check=False)
        mesh.weft("lab", "label", "echo-2", "app=echo", check=False)
    _eventually(lambda: "echo-2" in _answered_by(mesh, 6), 40, "echo-2 back in the service")
