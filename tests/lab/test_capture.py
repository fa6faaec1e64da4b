"""eBPF capture end to end: real programs in the kernel, real agents, real pods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner, running_lab
from weft.lab.lab import agent_state as lab_agent_state

WEFT_PROGS = {"weft_connect4", "weft_connect6", "weft_sockops", "weft_ingress"}


@pytest.fixture(scope="module")
def mesh() -> Iterator[LabRunner]:
    with running_lab("wc", "--demo", "--nodes", "2") as runner:
        yield runner


def _status(lab: LabRunner) -> dict:
    return lab.status()


def _pod(status: dict, name: str) -> dict:
    return next(p for p in status["pods"] if p["name"] == name)


def _node(status: dict, name: str) -> dict:
    return next(n for n in status["nodes"] if n["name"] == name)


def agent_state(lab: LabRunner, node: str) -> dict:
    return lab_agent_state(lab.name, node)


def curl_json(lab: LabRunner, pod: str, url: str) -> dict:
    return json.loads(lab.exec(pod, "curl", "-sS", "-m", "5", url).stdout)


def cgroup_programs(cgroup: str) -> set[str]:
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True, text=True, check=True
    ).stdout
    return {p.get("name", "") for p in json.loads(out.strip() or "[]")}


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_captured_pod_cgroups_list_connect4_and_sockops(mesh: LabRunner):
    status = _status(mesh)
    for pod in status["pods"]:
        progs = cgroup_programs(pod["cgroup"])
        if pod["captured"]:
            assert {"weft_connect4", "weft_connect6", "weft_sockops"} <= progs, pod["name"]
        else:
            assert not progs & WEFT_PROGS, pod["name"]


def test_cross_node_connection_goes_through_the_node_proxy(mesh: LabRunner):
    status = _status(mesh)
    echo2 = _pod(status, "echo-2")
    before = agent_state(mesh, "node-1")["ebpf"]["stats"]
    body = curl_json(mesh, "client-1", f"http://{echo2['ip']}:8080/via-proxy")
    assert body["pod"] == "echo-2"
    assert body["path"] == "/via-proxy"
    # node-1's proxy tunnelled it to node-2's, which delivered it over node-2's cni0.
    assert body["peer"].split(":")[0] == _node(status, "node-2")["gateway"]
    after = agent_state(mesh, "node-1")
    assert after["ebpf"]["stats"]["redirected"] > before["redirected"]
    assert after["proxy"]["stats"]["accepted"] >= 1
    assert after["tunnel"]["client"]["opened"] >= 1


def test_same_node_connection_goes_through_the_node_proxy(mesh: LabRunner):
    status = _status(mesh)
    echo1 = _pod(status, "echo-1")
    body = curl_json(mesh, "client-1", f"http://{echo1['ip']}:8080/")
    assert body["pod"] == "echo-1"
    node1 = _node(status, "node-1")
    # Same node: the proxy reaches the pod over cni0, from the node's pod-side address.
    assert body["peer"].split(":")[0] in {node1["ip"], node1["gateway"]}
    stats = agent_state(mesh, "node-1")["ebpf"]["stats"]
    assert stats["msg_redirected"] > 0, "the sk_msg shortcut never carried a message"


def test_dual_stack_socket_to_ipv4_mapped_address_is_captured(mesh: LabRunner):
    """AF_INET6 sockets reaching IPv4 peers (Java, Node) must not bypass the mesh."""
    status = _status(mesh)
    target = _pod(status, "echo-2")["ip"]
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n"
        f"s.connect(('::ffff:{target}', 8080))\n"
        "s.sendall(b'GET /v6 HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(65536): data += chunk\n"
        "print(data.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
    )
    body = json.loads(mesh.exec("client-1", sys.executable, "-c", script).stdout)
    assert body["pod"] == "echo-2"
    assert body["peer"].split(":")[0] == _node(status, "node-2")["gateway"]


def test_uncaptured_pod_connects_directly(mesh: LabRunner):
    status = _status(mesh)
    before = agent_state(mesh, "node-1")["ebpf"]["stats"]["redirected"]
    body = curl_json(mesh, "plain-1", f"http://{_pod(status, 'echo-2')['ip']}:8080/")
    assert body["peer"].split(":")[0] == _pod(status, "plain-1")["ip"]
    assert agent_state(mesh, "node-1")["ebpf"]["stats"]["redirected"] == before


def test_proxy_own_connections_are_not_redirected(mesh: LabRunner):
    status = _status(mesh)
    state = agent_state(mesh, "node-1")
    agent_cgroup = state["proxy"]["cgroup"]
    # The agent's cgroup has sock_ops (for the sockmap shortcut) but never connect4.
    assert "weft_connect4" not in cgroup_programs(agent_cgroup)
    assert not any(
        Path(agent_cgroup).resolve() == Path(p["cgroup"]).resolve()
        or Path(p["cgroup"]).resolve() in Path(agent_cgroup).resolve().parents
        for p in status["pods"]
    )
    before = state["proxy"]["stats"]
    body = curl_json(mesh, "client-2", f"http://{_pod(status, 'echo-1')['ip']}:8080/")
    assert body["pod"] == "echo-1"
    after = agent_state(mesh, "node-2")["proxy"]["stats"]
    assert after["refused_loop"] == 0
    # node-1's proxy accepted nothing for that request: node-2's upstream was not captured.
    assert agent_state(mesh, "node-1")["proxy"]["stats"]["accepted"] == before["accepted"]


def test_no_original_destination_entries_leak(mesh: LabRunner):
    status = _status(mesh)
    target = _pod(status, "echo-2")["ip"]
    script = (
        "import socket\n"
        "for i in range(1000):\n"
        f"    s = socket.create_connection(('{target}', 8080), timeout=5)\n"
        "    s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "    while s.recv(65536): pass\n"
        "    s.close()\n"
    )
    before = agent_state(mesh, "node-1")["ebpf"]["stats"]
    mesh.exec("client-1", "python3", "-c", script)
    state = agent_state(mesh, "node-1")
    assert state["ebpf"]["stats"]["recorded"] - before["recorded"] == 1000
    wait_for(
        lambda: agent_state(mesh, "node-1")["ebpf"]["orig_dst_entries"] == 0,
        "original-destination entries to be cleaned",
    )
    assert agent_state(mesh, "node-1")["ebpf"]["cookie_entries"] == 0


def test_removing_capture_restores_the_direct_path(mesh: LabRunner):
    status = _status(mesh)
    pod = _pod(status, "client-2")
    echo = _pod(status, "echo-1")
    mesh.weft("lab", "label", "client-2", "weft.io/capture-")
    try:
        wait_for(
            lambda: "default/client-2" not in agent_state(mesh, "node-2")["capture"]["captured"],
            "the agent to release client-2",
        )
        assert not cgroup_programs(pod["cgroup"]) & WEFT_PROGS
        body = curl_json(mesh, "client-2", f"http://{echo['ip']}:8080/")
        assert body["peer"].split(":")[0] == pod["ip"]
    finally:
        mesh.weft("lab", "label", "client-2", "weft.io/capture=enabled")
    wait_for(
        lambda: "default/client-2" in agent_state(mesh, "node-2")["capture"]["captured"],
        "the agent to capture client-2 again",
    )
    body = curl_json(mesh, "client-2", f"http://{echo['ip']}:8080/")
    assert body["peer"].split(":")[0] != pod["ip"]


def test_agent_restart_keeps_capture_and_serves_new_connections(mesh: LabRunner, tmp_path: Path):
    status = _status(mesh)
    client = _pod(status, "client-1")
    netns_inode = os.stat(f"/run/netns/{client['netns']}").st_ino
    old_ids = agent_state(mesh, "node-1")["ebpf"]["program_ids"]
    target = _pod(status, "echo-2")["ip"]
    # A captured pod keeps connecting while its agent is replaced (make-before-break):
    # none of those connections may fail.  The loop runs until told to stop, after the
    # new agent has served connections of its own, so the swap happens inside it.
    stop_file = tmp_path / "stop"
    env = {**os.environ, "WEFT_LAB": mesh.name}
    clients = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "exec", "client-1", "--",
         sys.executable, "-m", "weft.bench.connloop", target, "8080", "restart",
         str(stop_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: agent_state(mesh, "node-1")["proxy"]["stats"]["accepted"] >= 10,
                 "the loop's connections through the old agent", 30)  # fmt: skip
        mesh.weft("lab", "restart-agent", "node-1")
        wait_for(lambda: agent_state(mesh, "node-1")["proxy"]["stats"]["accepted"] >= 10,
                 "the loop's connections through the new agent", 30)  # fmt: skip
    finally:
        stop_file.touch()
        out, err = clients.communicate(timeout=60)
    assert clients.returncode == 0, err
    result = json.loads(out)
    assert result["failed"] == 0, result
    assert result["ok"] > 0
    new_state = agent_state(mesh, "node-1")
    assert new_state["ebpf"]["program_ids"] != old_ids
    progs = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", client["cgroup"]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    ids = {p["id"] for p in json.loads(progs)}
    # The new instance replaced the old programs; exactly one of each is attached.
    assert new_state["ebpf"]["program_ids"]["cgroup_inet4_connect"] in ids
    assert old_ids["cgroup_inet4_connect"] not in ids
    body = curl_json(mesh, "client-1", f"http://{_pod(status, 'echo-2')['ip']}:8080/")
    assert body["peer"].split(":")[0] == _node(status, "node-2")["gateway"]
    assert os.stat(f"/run/netns/{client['netns']}").st_ino == netns_inode


def test_strict_inbound_refuses_direct_connections_but_not_the_node(mesh: LabRunner):
    status = _status(mesh)
    echo = _pod(status, "echo-1")
    mesh.weft("lab", "label", "echo-1", "weft.io/inbound-mode=strict")
    try:
        wait_for(
            lambda: "weft_ingress" in cgroup_programs(echo["cgroup"]),
            "the strict ingress program on echo-1",
        )
        direct = mesh.exec(
            "plain-1", "curl", "-sS", "-m", "2", f"http://{echo['ip']}:8080/", check=False
        )
        assert direct.returncode != 0, direct.stdout
        from_node = curl_json(mesh, "node-1", f"http://{echo['ip']}:8080/")
        assert from_node["pod"] == "echo-1"
        via_proxy = curl_json(mesh, "client-1", f"http://{echo['ip']}:8080/")
        assert via_proxy["pod"] == "echo-1"
        assert agent_state(mesh, "node-1")["ebpf"]["stats"]["strict_dropped"] > 0
    finally:
        mesh.weft("lab", "label", "echo-1", "weft.io/inbound-mode-")
    wait_for(
        lambda: "weft_ingress" not in cgroup_programs(echo["cgroup"]),
        "the strict ingress program to go",
    )
    body = curl_json(mesh, "plain-1", f"http://{echo['ip']}:8080/")
    assert body["peer"].split(":")[0] == _pod(status, "plain-1")["ip"]


def test_strict_pods_accept_an_address_the_node_gains(mesh: LabRunner):
    """A CNI may give the node a new address (its gateway's, with the first pod): the
    agent reads the node's local addresses every few seconds and strict pods accept new
    connections from it, and stop when it is gone (issue #16)."""
    status = _status(mesh)
    echo = _pod(status, "echo-1")
    extra = "10.240.0.211"
    url = f"http://{echo['ip']}:8080/"

    def from_extra() -> bool:
        got = mesh.exec("node-1", "curl", "-s", "-m", "2", "--interface", extra, url,
                        check=False)  # fmt: skip
        return got.returncode == 0

    def in_map() -> list[str]:
        return agent_state(mesh, "node-1")["ebpf"]["node_addrs"]

    mesh.weft("lab", "label", "echo-1", "weft.io/inbound-mode=strict")
    try:
        wait_for(lambda: "weft_ingress" in cgroup_programs(echo["cgroup"]),
                 "the strict ingress program on echo-1")  # fmt: skip
        assert _node(status, "node-1")["ip"] in in_map()
        mesh.exec("node-1", "ip", "addr", "add", f"{extra}/32", "dev", "lo")
        try:
            wait_for(from_extra, "a connection from the node's new address", timeout=30)
            assert extra in in_map()
        finally:
            mesh.exec("node-1", "ip", "addr", "del", f"{extra}/32", "dev", "lo", check=False)
        wait_for(lambda: extra not in in_map(), "the address to leave the map", timeout=30)
    finally:
        mesh.weft("lab", "label", "echo-1", "weft.io/inbound-mode-")
    wait_for(lambda: "weft_ingress" not in cgroup_programs(echo["cgroup"]),
             "the strict ingress program to go")  # fmt: skip


LISTEN6 = """
import socket, sys, time
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 9911)); s.listen(16); s.settimeout(1.0)
print("listening", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        c, peer = s.accept()
    except TimeoutError:
        continue
    c.sendall(b"hello"); c.close()
"""

CONNECT6 = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 9911), timeout=3)
    print(c.recv(5).decode())
except OSError as e:
    print(type(e).__name__)
"""


def test_strict_inbound_judges_ipv6_too(mesh: LabRunner):
    """The node proxy reaches pods over IPv4: over IPv6 a strict pod accepts new
    connections only from itself (and loopback), never from an uncaptured neighbour —
    IPv6 is not a way around the filter (issue #16)."""
    status = _status(mesh)
    echo = _pod(status, "echo-1")
    assert _pod(status, "plain-1")["node"] == echo["node"]  # one bridge: IPv6 link-local
    mesh.exec("echo-1", "ip", "-6", "addr", "add", "fd77::11/64", "dev", "eth0", "nodad")
    mesh.exec("plain-1", "ip", "-6", "addr", "add", "fd77::12/64", "dev", "eth0", "nodad")
    listener = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "exec", "echo-1", "--", sys.executable, "-c",
         LISTEN6],
        env={**os.environ, "WEFT_LAB": mesh.name}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"

        def connect(pod: str) -> str:
            return mesh.exec(pod, sys.executable, "-c", CONNECT6, "fd77::11").stdout.strip()

        assert connect("plain-1") == "hello"  # permissive: IPv6 reaches the pod
        mesh.weft("lab", "label", "echo-1", "weft.io/inbound-mode=strict")
        try:
            wait_for(lambda: "weft_ingress" in cgroup_programs(echo["cgroup"]),
                     "the strict ingress program on echo-1")  # fmt: skip
            before = agent_state(mesh, "node-1")["ebpf"]["stats"]["strict_dropped"]
            assert connect("plain-1") in ("TimeoutError", "timeout")
            assert agent_state(mesh, "node-1")["ebpf"]["stats"]["strict_dropped"] > before
            assert connect("echo-1") == "hello"  # the pod itself
        finally:
            mesh.weft("lab", "label", "echo-1", "weft.io/inbound-mode-")
    finally:
        listener.kill()
        listener.wait()
        assert listener.stdout is not None
        listener.stdout.close()


def test_uninstall_detaches_everything_and_removes_pins(lab_factory):
    lab = lab_factory("wu")
    lab.weft("lab", "up", "--demo", "--nodes", "1")
    status = lab.status()
    pin_dir = Path(status["paths"]["bpffs_dir"]) / "node-1"
    assert pin_dir.is_dir()
    agent = next(p for p in status["processes"] if p["name"] == "agent-node-1")
    os.kill(agent["pid"], 15)
    wait_for(
        lambda: (
            not Path(f"/proc/{agent['pid']}").exists()
            or "Z" in Path(f"/proc/{agent['pid']}/stat").read_text().split()[2]
        ),
        "agent to stop",
    )
    # Stopped, not uninstalled: pods stay captured.
    assert "weft_connect4" in cgroup_programs(_pod(status, "client-1")["cgroup"])
    out = lab.exec("node-1", sys.executable, "-m", "weft.cli", "agent", "--lab", lab.name,
                   "--node", "node-1", "--uninstall")  # fmt: skip
    assert "detached" in out.stdout
    for pod in status["pods"]:
        assert not cgroup_programs(pod["cgroup"]) & WEFT_PROGS
    assert not pin_dir.exists()
    body = curl_json(lab, "client-1", f"http://{_pod(status, 'echo-1')['ip']}:8080/")
    assert body["peer"].split(":")[0] == _pod(status, "client-1")["ip"]
