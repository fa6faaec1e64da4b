"""``weft check`` end to end on this machine: real mounts, real bcc, real kernel.

Runs the CLI in a subprocess, as an operator would, so the exit code, stdout and the
scratch cgroup cleanup are all the real thing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weft.preflight import find_cgroup2_mount, read_mountinfo

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="weft check loads eBPF programs and attaches to cgroups: needs root",
    ),
]

REPO = Path(__file__).resolve().parents[2]


def weft_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft.cli", "check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def cgroup2() -> Path:
    mount = find_cgroup2_mount(read_mountinfo())
    if mount is None:
        pytest.fail("no cgroup2 mount: run `make setup` (weft check would say the same)")
    return Path(mount)


@pytest.fixture(autouse=True)
def no_scratch_cgroup_left(cgroup2):
    before = set(cgroup2.glob("weft-check-*"))
    yield
    left = set(cgroup2.glob("weft-check-*")) - before
    assert not left, f"weft check left scratch cgroups behind: {sorted(left)}"


def test_check_passes_here():
    proc = weft_check("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    failed = [c for c in report["checks"] if c["required"] and not c["ok"]]
    assert failed == []
    names = {c["name"] for c in report["checks"]}
    # The live probes ran, not only the file checks.
    assert {"bcc", "bpf-compile", "cgroup-connect4", "sock-ops", "sk-msg-sockhash"} <= names
    compile_check = next(c for c in report["checks"] if c["name"] == "bpf-compile")
    assert " ms" in compile_check["detail"]


def test_human_output_passes_here():
    proc = weft_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "✘" not in proc.stdout
    assert "✔ cgroup2" in proc.stdout


def test_not_bpffs_fails_with_mount_hint(tmp_path):
    proc = weft_check("--bpffs", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "✘ bpffs" in proc.stdout
    assert f"mount -t bpf bpf {tmp_path}" in proc.stdout


def test_missing_headers_fail_with_hint(tmp_path):
    proc = weft_check("--json", "--modules-dir", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    headers = next(c for c in report["checks"] if c["name"] == "kernel-headers")
    assert not headers["ok"]
    assert headers["required"]
    assert "apt-get install linux-headers-amd64" in headers["hint"]
    assert str(tmp_path) in headers["hint"]
