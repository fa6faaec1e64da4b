"""`weft lab` end to end: real namespaces, links, cgroups and processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner


def _pod(status: dict, name: str) -> dict:
    return next(p for p in status["pods"] if p["name"] == name)


def test_client_reaches_echo_on_the_other_node_by_pod_ip(demo_lab: LabRunner):
    status = demo_lab.status()
    echo = next(p for p in status["pods"] if p["app"] == "echo" and p["node"] == "node-2")
    client = _pod(status, "client-1")
    assert client["node"] == "node-1"
    out = demo_lab.exec("client-1", "curl", "-s", "-m", "5", f"http://{echo['ip']}:8080/hello")
    body = json.loads(out.stdout)
    assert body["pod"] == echo["name"]
    assert body["node"] == "node-2"
    assert body["path"] == "/hello"
    assert body["peer"].split(":")[0] == client["ip"]  # no mesh yet: the client itself


def test_service_and_pod_names_resolve_inside_pods(demo_lab: LabRunner):
    out = demo_lab.exec("client-1", "getent", "hosts", "echo.default.svc.cluster.local")
    assert out.stdout.split()[0] == "10.96.0.10"
    body = json.loads(
        demo_lab.exec("client-2", "curl", "-s", "-m", "5", "http://echo-1:8080/").stdout
    )
    assert body["pod"] == "echo-1"


def test_exec_runs_in_the_pods_cgroup_and_netns(demo_lab: LabRunner):
    status = demo_lab.status()
    pod = _pod(status, "client-2")
    out = demo_lab.exec("client-2", "sh", "-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net")
    lines = out.stdout.split()
    cgroup_line = next(x for x in lines if x.startswith("0::"))
    cgroup_root = Path(status["paths"]["cgroup_root"])
    mount = cgroup_root.parent
    assert mount / cgroup_line[3:].lstrip("/") == Path(pod["cgroup"])
    netns_inode = os.stat(f"/run/netns/{pod['netns']}").st_ino
    assert lines[-1] == f"net:[{netns_inode}]"
    addrs = demo_lab.exec("client-2", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"{pod['ip']}/24" in addrs


def test_exec_passes_the_exit_code_through(demo_lab: LabRunner):
    assert demo_lab.exec("client-1", "sh", "-c", "exit 7", check=False).returncode == 7
    missing = demo_lab.exec("client-1", "no-such-command-here", check=False)
    assert missing.returncode == 127
    assert "not found" in missing.stderr


def test_exec_into_unknown_pod_names_the_known_pods(demo_lab: LabRunner):
    out = demo_lab.exec("nope", "true", check=False)
    assert out.returncode == 1
    assert "client-1" in out.stderr


def test_status_lists_everything_the_issue_asks_for(demo_lab: LabRunner):
    status = demo_lab.status()
    assert status["phase"] == "ready"
    assert [n["name"] for n in status["nodes"]] == ["node-1", "node-2"]
    for pod in status["pods"]:
        assert {"name", "node", "ip", "namespace", "service_account", "captured", "cgroup"} <= set(
            pod
        )
        assert Path(pod["cgroup"]).is_dir()
    (svc,) = status["services"]
    assert svc["vip"] == "10.96.0.10"
    assert {e["pod"] for e in svc["endpoints"]} == {"echo-1", "echo-2"}
    assert all(p["alive"] for p in status["processes"])
    human = demo_lab.weft("lab", "status").stdout
    assert "echo-1" in human and "10.96.0.10" in human


def test_logs_of_a_lab_process(demo_lab: LabRunner):
    assert "listening on 0.0.0.0:8080" in demo_lab.weft("lab", "logs", "echo-1").stdout
    assert demo_lab.weft("lab", "logs", "nope", check=False).returncode == 1


def test_up_on_an_existing_lab_says_so(demo_lab: LabRunner):
    again = demo_lab.weft("lab", "up", "--demo", check=False)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert demo_lab.status()["phase"] == "ready"  # and nothing was harmed


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _assert_nothing_left(lab: LabRunner, cgroup_root: str | None, links_before: set[str]) -> None:
    assert lab.netns() == []
    if cgroup_root:
        assert not Path(cgroup_root).exists()
    assert not Path(f"/run/weft/lab/{lab.name}").exists()
    assert not Path(f"/sys/fs/bpf/weft-lab-{lab.name}").exists()
    assert _host_links() <= links_before
    leftover = subprocess.run(
        ["pgrep", "-f", "weft.lab.echo .*--pod"], capture_output=True, text=True
    ).stdout.split()
    for pid in leftover:
        environ = Path(f"/proc/{pid}/cgroup").read_text() if Path(f"/proc/{pid}").exists() else ""
        assert f"weft-lab-{lab.name}/" not in environ


def test_down_leaves_no_namespace_link_cgroup_or_process(lab_factory):
    lab = lab_factory("wd")
    links_before = _host_links()
    lab.weft("lab", "up", "--demo", "--nodes", "2", "--pods-per-node", "2")
    status = lab.status()
    pids = [p["pid"] for p in status["processes"]]
    assert len(lab.netns()) == 1 + 1 + 2 + 7  # fabric, control plane, nodes, pods
    out = lab.weft("lab", "down")
    assert "removed" in out.stderr
    _assert_nothing_left(lab, status["paths"]["cgroup_root"], links_before)
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
    assert "nothing to do" in lab.weft("lab", "down").stderr


def _start_up_and_interrupt(lab: LabRunner, sig: int) -> subprocess.Popen[str]:
    """Start a big `up` and signal it once it is halfway (some pods, not all)."""
    env = {**os.environ, "WEFT_LAB": lab.name}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "up", "--demo", "--nodes", "3",
         "--pods-per-node", "30"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(n.startswith(f"{lab.name}-echo-") for n in lab.netns()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"up never got to the pods (rc {proc.returncode}):\n{err}")
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=60)  # type: ignore[attr-defined]
    return proc


def test_down_cleans_up_after_up_was_killed_halfway(lab_factory):
    lab = lab_factory("wk")
    links_before = _host_links()
    proc = _start_up_and_interrupt(lab, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    made = lab.netns()
    assert made, "up was killed before it made anything: the test did not test a half-up"
    assert len(made) < 1 + 3 + 94, "up finished before it was killed"
    cgroup_root = json.loads(Path(f"/run/weft/lab/{lab.name}/state.json").read_text())["paths"][
        "cgroup_root"
    ]
    lab.weft("lab", "down")
    _assert_nothing_left(lab, cgroup_root, links_before)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_up_removes_what_it_made(lab_factory, sig):
    lab = lab_factory(f"wi{sig}")
    links_before = _host_links()
    proc = _start_up_and_interrupt(lab, sig)
    assert proc.returncode == 1, proc.stderr_text  # type: ignore[attr-defined]
    assert "removing what was made" in proc.stderr_text  # type: ignore[attr-defined]
    _assert_nothing_left(lab, None, links_before)
