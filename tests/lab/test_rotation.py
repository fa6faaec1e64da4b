"""Certificate rotation end to end, with 30-second workload certificates.

One keep-alive connection from client-1 to echo-2 (node-1 -> node-2 through the mTLS
tunnel) is held open across the renewal of both ends' certificates and past the expiry
of the certificates it was opened with: it keeps working.  A new connection made after
that expiry can only have been accepted with the renewed certificates on both sides.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from tests.lab.conftest import POD_HTTP, LabRunner, unique_name
from weft.identity import SpiffeId
from weft.lab.lab import admin_get

LIFETIME = 30.0
ECHO = str(SpiffeId.workload("default", "echo"))
CLIENT = str(SpiffeId.workload("default", "client"))

# Runs inside client-1: one request, wait, one more on the same connection, one on a new one.
SCRIPT = (
    POD_HTTP
    + r"""
import json, socket, sys, time
target, wait = (sys.argv[1], 8080), float(sys.argv[2])
kept = socket.create_connection(target, timeout=10)
out = {"first": request(kept), "first_at": time.time()}
time.sleep(wait)
out["kept"] = request(kept)
fresh = socket.create_connection(target, timeout=10)
out["fresh"] = request(fresh)
out["fresh_at"] = time.time()
print(json.dumps(out))
"""
)


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    runner = LabRunner(unique_name("wr"))
    try:
        runner.weft("lab", "up", "--demo", "--nodes", "2", "--leaf-lifetime", f"{LIFETIME:g}s")
        yield runner
    finally:
        runner.weft("lab", "down", check=False)


def _certs(lab: LabRunner, node: str) -> dict:
    ip = next(n["ip"] for n in lab.status()["nodes"] if n["name"] == node)
    answer = admin_get(f"{lab.name}-{node}", ip, 15020, "/debug/state")
    assert answer is not None and answer[0] == 200
    return json.loads(answer[1])["certificates"]["identities"]


def test_connections_survive_rotation_and_new_ones_use_new_certificates(lab: LabRunner):
    echo_before = _certs(lab, "node-2")[ECHO]
    client_before = _certs(lab, "node-1")[CLIENT]
    expires = min(echo_before["not_after"], client_before["not_after"])
    later = max(echo_before["not_after"], client_before["not_after"])
    # Hold the connection until both original certificates have expired.
    wait = max(0.0, later - time.time()) + 2.0
    assert wait < LIFETIME + 5, "certificates live longer than asked for"
    echo2 = next(p["ip"] for p in lab.status()["pods"] if p["name"] == "echo-2")
    result = json.loads(
        lab.exec("client-1", sys.executable, "-c", SCRIPT, echo2, f"{wait:.1f}").stdout
    )
    assert result == result | {"first": "echo-2", "kept": "echo-2", "fresh": "echo-2"}
    assert result["first_at"] < expires <= later < result["fresh_at"]
    echo_after = _certs(lab, "node-2")[ECHO]
    client_after = _certs(lab, "node-1")[CLIENT]
    assert echo_after["generation"] > echo_before["generation"]
    assert client_after["generation"] > client_before["generation"]
    assert echo_after["valid"] and client_after["valid"]
