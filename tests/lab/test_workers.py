"""Proxy workers (issue #18): a lab whose agents run two worker processes each.

Requests are served by both workers (the kernel's ``SO_REUSEPORT`` spread, seen in the
per-worker counters); the node's ``/metrics`` is the sum of the workers' counts; a
worker killed with SIGKILL is replaced while the other worker's connections carry on
without one failed request; and a make-before-break restart of an agent with workers
refuses nothing and never sends plaintext (the single-process agent's guarantee).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import POD_HTTP, LabRunner, pod_load, running_lab, sample
from tests.lab.test_failclosed import ClientLoop, _assert_never_plaintext
from weft.bench.resilience import wait_accepted
from weft.lab.lab import agent_state

WORKERS = 2


@pytest.fixture(scope="module")
def mesh() -> Iterator[LabRunner]:
    with running_lab("ww", "--demo", "--nodes", "2", f"--agent-arg=--workers={WORKERS}") as lab:
        yield lab


def _pod(lab: LabRunner, name: str) -> dict:
    return next(p for p in lab.status()["pods"] if p["name"] == name)


def _workers(lab: LabRunner, node: str = "node-1") -> list[dict]:
    return agent_state(lab.name, node)["workers"]


def _eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.2)


def _new_connections(lab: LabRunner, target: str, port: int, n: int) -> list[str]:
    """``n`` requests, each on its own connection, from client-1; the answering pods."""
    script = POD_HTTP + (
        "import socket\n"
        "pods = []\n"
        f"for _ in range({n}):\n"
        f"    s = socket.create_connection(('{target}', {port}), timeout=10)\n"
        "    pods.append(request(s))\n"
        "    s.close()\n"
        "print(json.dumps(pods))\n"
    )
    return json.loads(lab.exec("client-1", sys.executable, "-c", script).stdout)


def test_agent_runs_workers_and_reports_them(mesh: LabRunner):
    state = agent_state(mesh.name, "node-1")
    workers = state["workers"]
    assert len(workers) == WORKERS
    assert all(w["listening"] for w in workers), workers
    pids = {w["pid"] for w in workers}
    assert len(pids) == WORKERS and state["pid"] not in pids
    # Each worker is a child of the agent, in the agent's cgroup (not a pod's).
    for pid in pids:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == state["pid"]
        assert (
            Path(f"/proc/{pid}/cgroup").read_text()
            == Path(f"/proc/{state['pid']}/cgroup").read_text()
        )


def test_requests_are_served_by_every_worker_and_metrics_are_the_sum(mesh: LabRunner):
    echo2 = _pod(mesh, "echo-2")["ip"]
    before = mesh.metrics("node-1")
    n = 60
    pods = _new_connections(mesh, echo2, 8080, n)
    assert pods == ["echo-2"] * n
    # Workers report their counters every second: wait until the reports cover the run.
    accepted_before = _accepted(before)

    def settled() -> str | None:
        text = mesh.metrics("node-1")
        per_worker = [
            sample(text, "weft_worker_connections_accepted_total", worker=str(i))
            for i in range(WORKERS)
        ]
        if _accepted(text) - accepted_before >= n and sum(per_worker) == _accepted(text):
            return text
        return None

    text = _eventually(settled, 20, "per-worker counts to add up to the node's")
    per_worker_before = [
        sample(before, "weft_worker_connections_accepted_total", worker=str(i))
        for i in range(WORKERS)
    ]
    per_worker = [
        sample(text, "weft_worker_connections_accepted_total", worker=str(i))
        for i in range(WORKERS)
    ]
    served = [a - b for a, b in zip(per_worker, per_worker_before, strict=True)]
    print(f"{n} connections spread over the workers: {served}")
    # The kernel hashes each connection to one listener: both served some (all 60 on
    # one worker has a chance of 2^-59).
    assert all(s > 0 for s in served), served
    assert _accepted(text) - accepted_before == n
    # HTTP golden metrics: the node's request_total counts every request once, whichever
    # worker served it.
    out = sample(text, "request_total", direction="outbound", dst_workload="echo-2")
    out_before = sample(before, "request_total", direction="outbound", dst_workload="echo-2")
    assert out - out_before == n


def _accepted(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("weft_outbound_accepted_total "):
            return float(line.split()[1])
    return 0.0


KEEPALIVE = (
    POD_HTTP
    + r"""
import socket, sys, time
n, seconds, target, port = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
socks = [socket.create_connection((target, port), timeout=10) for _ in range(n)]
ok = [0] * n
failed_at = [None] * n
print("open", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for i, s in enumerate(socks):
        if failed_at[i] is not None:
            continue
        try:
            request(s)
            ok[i] += 1
        except Exception as e:
            failed_at[i] = repr(e)
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed_at}))
"""
)


def test_a_killed_worker_is_replaced_and_the_others_connections_carry_on(mesh: LabRunner):
    echo2 = _pod(mesh, "echo-2")["ip"]
    before = {w["index"]: w for w in _workers(mesh)}
    env = {**os.environ, "WEFT_LAB": mesh.name}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "exec", "client-1", "--", sys.executable,
         "-c", KEEPALIVE, "16", "12", echo2, "8080"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
        time.sleep(2)
        victim = before[0]["pid"]
        os.kill(victim, signal.SIGKILL)  # a worker of the lab agent this test started
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    result = json.loads(out.strip().splitlines()[-1])
    survivors = [i for i, f in enumerate(result["failed"]) if f is None]
    print(f"keep-alive connections: {len(survivors)}/16 carried on; lost with the worker: "
          f"{[f for f in result['failed'] if f]}")  # fmt: skip
    # The connections of the surviving worker never saw an error; the killed worker's
    # were reset (a process's sockets die with it), never hung.
    assert survivors, result
    assert all(result["ok"][i] > 50 for i in survivors), result

    def replaced() -> dict | None:
        w = {w["index"]: w for w in _workers(mesh)}[0]
        return w if w["listening"] and w["pid"] != victim else None

    w0 = _eventually(replaced, 60, "worker 0 replaced")
    assert w0["restarts"] == before[0]["restarts"] + 1
    assert {w["index"]: w for w in _workers(mesh)}[1]["pid"] == before[1]["pid"]
    assert (
        f"worker 0 (pid {victim}) exited with signal SIGKILL"
        in mesh.weft("lab", "logs", "agent-node-1").stdout
    )
    # New connections are all served again, by both workers.
    assert _new_connections(mesh, echo2, 8080, 20) == ["echo-2"] * 20


def test_make_before_break_restart_with_workers_refuses_nothing(mesh: LabRunner, tmp_path: Path):
    status = mesh.status()
    echo2 = _pod(mesh, "echo-2")["ip"]
    old_workers = {w["pid"] for w in _workers(mesh)}
    loop = ClientLoop(mesh, echo2, 8080, tmp_path)
    try:
        wait_accepted(mesh.name, "node-1", 20)
        mesh.weft("lab", "restart-agent", "node-1")
        wait_accepted(mesh.name, "node-1", 20)
    finally:
        result, wire, ports = loop.finish()
    assert result["failed"] == 0, result
    gateway = next(n for n in status["nodes"] if n["name"] == "node-2")["gateway"]
    _assert_never_plaintext(result, wire, ports, loop.marker, gateway)
    new_workers = {w["pid"] for w in _workers(mesh)}
    assert len(new_workers) == WORKERS and not new_workers & old_workers
    for pid in old_workers:  # the old agent's workers drained and exited with it
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


TAP_LOAD = r"""
import sys, time, urllib.request

while True:
    try:
        urllib.request.urlopen("http://echo/workers-tap", timeout=5).read()
    except OSError:
        pass
    time.sleep(0.05)
"""


def test_tap_shows_requests_whichever_worker_serves_them(mesh: LabRunner):
    with pod_load(mesh, "client-1", TAP_LOAD, settle=1):
        out = mesh.viz("tap", "deploy/echo", "--max", "6", "-o", "json", "--duration", "45",
                       timeout=120).stdout  # fmt: skip
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(events) == 6, out
    assert all(e["path"] == "/workers-tap" and e["status"] == 200 for e in events), events
