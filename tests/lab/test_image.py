"""The Weft image (``make image``): built here without an image registry — a Debian 12
base bootstrapped by mmdebstrap, daemonset/Dockerfile built on it — then run, first as
a command (``weft --version``, ``weft agent --help``), then as a lab node's agent
(scripts/image-smoke.sh: the lab's agent for node-1 is replaced by the same command run
from the image, and the mesh smoke test must pass through it).

The base tarball is cached under /var/cache/weft and the engine caches layers, so on a
warm cache the build takes seconds; a cold one (bootstrap, bcc, PyPI) a few minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "weft:latest"


def engine() -> str:
    for name in ("podman", "docker"):
        if shutil.which(name):
            return name
    pytest.fail("no container engine: apt-get install podman runc (make host installs them)")


def run(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap not found: apt-get install mmdebstrap (make host installs it)")
    proc = run("make", "image", timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"==> image: {IMAGE} ready" in proc.stdout, proc.stdout
    return IMAGE


def in_image(*args: str) -> subprocess.CompletedProcess[str]:
    """``weft ARGS`` inside the image (scripts/image.sh run: --rm, the host's flags)."""
    return run(str(ROOT / "scripts" / "image.sh"), "run", *args, timeout=120)


@pytest.mark.timeout(1600)
def test_make_image_builds_an_image_that_runs_weft(image: str) -> None:
    proc = run(engine(), "image", "inspect", "--format", "{{.Size}}", image, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) > 50_000_000  # Python, bcc and LLVM: not an empty image

    version = in_image("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("weft, version "), version.stdout
    helptext = in_image("agent", "--help")
    assert helptext.returncode == 0, helptext.stderr
    assert "Usage: weft agent" in helptext.stdout and "--lab" in helptext.stdout
    # (That Debian's bcc imports in the image's venv is checked by the build itself: the
    # Dockerfile's last step imports bcc, weft.cli and nodeagent.agent.)


@pytest.mark.timeout(1800)
def test_the_image_serves_the_mesh_as_a_lab_nodes_agent(
    image: str, lab_factory: Callable[[str], LabRunner]
) -> None:
    lab = lab_factory("wim")
    container = f"weft-agent-{lab.name}-node-1"
    lab.weft("lab", "up", "--demo", "--nodes", "2", "--replace", timeout=600)
    try:
        proc = run(str(ROOT / "scripts" / "image-smoke.sh"), lab.name, "node-1", timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "==> smoke: PASSED" in proc.stdout, out
        assert f"PASSED: {image} served the mesh as agent-node-1" in proc.stdout, out
        # The agent that answered was the container's (matched by PID before the smoke
        # test ran), and it measured the requests: outbound from client-1 on node-1.
        assert "ready, pid" in proc.stdout and "/node-1/weft-agent" in proc.stdout, out
        metrics = proc.stdout.split("metrics of the containerised agent-node-1", 1)[1]
        assert 'direction="outbound"' in metrics and 'tls="true"' in metrics, out
        # Afterwards the lab's own agent serves node-1 again, and no container is left.
        agents = [p for p in lab.status()["processes"] if p["name"] == "agent-node-1"]
        assert [p["alive"] for p in agents] == [True], agents
    finally:
        subprocess.run([engine(), "rm", "-f", container], capture_output=True, timeout=60)
    left = run(engine(), "ps", "-a", "--format", "{{.Names}}", timeout=30).stdout.split()
    assert container not in left
