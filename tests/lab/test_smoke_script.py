"""The smoke test that vagrant/ and kind/ run (scripts/smoke.sh), run here against a
real lab — the only place it can run on this machine (no hypervisor, no kube-apiserver).

It passes against a lab with agents (requests through the mesh, both identities in the
agents' metrics), and fails — with the step named — against one without: its requests
to the service VIP find no proxy, and requests straight to a pod are not measured by any
agent.  A smoke test that cannot fail would prove nothing about vagrant/ and kind/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner

pytestmark = pytest.mark.lab

SMOKE = Path(__file__).resolve().parents[2] / "scripts" / "smoke.sh"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/echo"


def smoke(lab: LabRunner, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {
        **os.environ,
        "WEFT_LAB": lab.name,
        "SMOKE_TARGET": "lab",
        "SMOKE_WEFT": f"{sys.executable} -m weft.cli",
        **env,
    }
    return subprocess.run(
        ["bash", str(SMOKE)], env=settings, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(900)
def test_smoke_script_passes_against_a_lab_with_the_mesh(
    lab_factory: Callable[[str], LabRunner],
) -> None:
    lab = lab_factory("wsm")
    lab.weft("lab", "up", "--demo", "--nodes", "2", "--replace", timeout=600)
    proc = smoke(lab, timeout=400, SMOKE_TIMEOUT="150")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "==> smoke: PASSED" in proc.stdout
    assert f"client_id={CLIENT_ID} server_id={SERVER_ID}" in proc.stdout
    # Requests were answered by the echo replicas (the JSON the demo's echo server sends).
    answered = next(line for line in proc.stdout.splitlines() if "answered by:" in line)
    assert "echo-" in answered, out


@pytest.mark.timeout(600)
def test_smoke_script_fails_without_the_mesh(demo_lab: LabRunner) -> None:
    # The service VIP is answered only by a node proxy: no agents, no answer.
    proc = smoke(demo_lab, timeout=200, SMOKE_TIMEOUT="10")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "requests from client-1 to http://echo/ did not succeed" in proc.stderr
    assert "PASSED" not in proc.stdout

    # Straight to a pod the requests succeed, but no agent measured them.
    proc = smoke(demo_lab, timeout=200, SMOKE_TIMEOUT="10", SMOKE_URL="http://echo-1:8080/")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "answered by: echo-1" in proc.stdout
    assert "no metrics from agent(s) node-1 node-2" in proc.stderr
    assert "PASSED" not in proc.stdout
