"""Certificate rotation end to end, with 30-second workload certificates.

One keep-alive HTTP/1.1 connection from client-1 to echo-2 (node-1 -> node-2; its
requests go over pooled upstream connections, streams on a pooled mTLS connection) is
held open across the renewal of both ends' certificates: it keeps working, and requests
after the renewal go over a new TLS connection made with the new certificates (the old
one is retired: draining, and closed when its streams end). Past the original
certificates' expiry both the held connection and a new one still work: no request
waits for, or flows over, a connection made with the expired certificates. (The reset
of a relayed opaque stream at expiry is tested in tests/sockets/test_tunnel.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.lab.conftest import POD_HTTP, LabRunner, running_lab
from weft.identity import SpiffeId
from weft.lab.lab import admin_get

LIFETIME = 30.0
ECHO = str(SpiffeId.workload("default", "echo"))
CLIENT = str(SpiffeId.workload("default", "client"))

# Runs inside client-1: one request on a kept connection, then, for each command read
# from stdin, one more on it ("kept") or one on a new connection ("fresh").
SCRIPT = (
    POD_HTTP
    + r"""
import json, socket, sys
target = (sys.argv[1], 8080)
kept = socket.create_connection(target, timeout=10)
print(json.dumps({"first": request(kept)}), flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "kept":
            out = {"kept": request(kept)}
        else:
            with socket.create_connection(target, timeout=10) as fresh:
                out = {"fresh": request(fresh)}
    except Exception as e:
        out = {"error": type(e).__name__}
    print(json.dumps(out), flush=True)
"""
)


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    with running_lab("wr", "--demo", "--nodes", "2", "--leaf-lifetime", f"{LIFETIME:g}s") as runner:
        yield runner


def _certs(lab: LabRunner, node: str) -> dict:
    # /debug/state answers only on the node itself (loopback).
    answer = admin_get(f"{lab.name}-{node}", "127.0.0.1", 15020, "/debug/state")
    assert answer is not None and answer[0] == 200
    return json.loads(answer[1])["certificates"]["identities"]


def _generation(lab: LabRunner, node: str, identity: str) -> int:
    return int(_certs(lab, node)[identity]["generation"])


def test_connections_survive_rotation_until_the_old_certificates_expire(lab: LabRunner):
    echo_before = _certs(lab, "node-2")[ECHO]
    client_before = _certs(lab, "node-1")[CLIENT]
    expires = min(echo_before["not_after"], client_before["not_after"])
    later = max(echo_before["not_after"], client_before["not_after"])
    assert later - time.time() < LIFETIME + 5, "certificates live longer than asked for"
    echo2 = next(p["ip"] for p in lab.status()["pods"] if p["name"] == "echo-2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "exec", "client-1", "--",
         sys.executable, "-c", SCRIPT, echo2],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "WEFT_LAB": lab.name},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    def ask(command: str) -> dict:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    try:
        assert json.loads(proc.stdout.readline()) == {"first": "echo-2"}
        # Both ends renew (at ~70 % of the lifetime, jittered) before the old ones expire.
        deadline = time.monotonic() + LIFETIME
        while (
            _generation(lab, "node-2", ECHO) <= echo_before["generation"]
            or _generation(lab, "node-1", CLIENT) <= client_before["generation"]
        ):
            assert time.monotonic() < deadline, "no renewal within a lifetime"
            time.sleep(0.5)
        assert time.time() < expires - 1.0, "renewed too late to test the window before expiry"
        assert ask("kept") == {"kept": "echo-2"}  # the held connection survives renewal
        assert ask("fresh") == {"fresh": "echo-2"}
        pool = _state(lab, "node-1")["tunnel"]
        # The TLS connection made with the old certificates was retired (drained) when a
        # request next needed it, and a new one was made with the new certificates.
        assert pool["client"]["drained"] >= 1 and pool["client"]["opened"] >= 2, pool
        # Past the original certificates' expiry the old TLS connection is gone. The
        # app's connection is not tied to it (HTTP/1.1: its requests go over pooled
        # upstream connections, and those of the retired TLS connection are not reused),
        # so it goes on working; a byte under an expired certificate never flows (the
        # socket tests check the reset at expiry for a relayed stream).
        time.sleep(max(0.0, later - time.time()) + 1.5)
        assert ask("kept") == {"kept": "echo-2"}
        assert ask("fresh") == {"fresh": "echo-2"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert _certs(lab, "node-2")[ECHO]["valid"] and _certs(lab, "node-1")[CLIENT]["valid"]


def _state(lab: LabRunner, node: str) -> dict:
    answer = admin_get(f"{lab.name}-{node}", "127.0.0.1", 15020, "/debug/state")
    assert answer is not None and answer[0] == 200
    return json.loads(answer[1])
