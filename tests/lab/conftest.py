"""Lab tier: real network namespaces, cgroups and processes. Needs root.

Each lab gets a unique name, so these tests never touch a lab a developer has running
(`make lab` uses the name ``weft``), and every fixture tears its lab down even when the
test fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from weft.nsenter import in_netns

NETNS_DIR = Path("/run/netns")
ETH_P_ALL = 0x0003


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="lab tier needs root (run as root)"))


@dataclass
class LabRunner:
    name: str
    env: dict[str, str] = field(default_factory=dict)

    def weft(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "WEFT_LAB": self.name, **self.env}
        proc = subprocess.run(
            [sys.executable, "-m", "weft.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"weft {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def exec(self, pod: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.weft("lab", "exec", pod, "--", *cmd, check=check)

    def viz(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """``weft viz ARGS`` against this lab (its windows take seconds: a longer timeout)."""
        return self.weft("viz", *args, check=check, timeout=timeout)

    def http_code(self, pod: str, *curl: str) -> int:
        """The HTTP status curl gets from inside ``pod`` (``curl ARGS``); 0 when it got
        none (refused, reset, timed out after 10 s)."""
        out = self.exec(pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10",
                        *curl, check=False)  # fmt: skip
        return int(out.stdout or 0)

    def status(self) -> dict:
        return json.loads(self.weft("lab", "status", "--json").stdout)

    def metrics(self, node: str) -> str:
        """The Prometheus text of ``node``'s agent (its admin port, inside the node)."""
        from weft.lab.lab import admin_get

        ip = next(n["ip"] for n in self.status()["nodes"] if n["name"] == node)
        answer = admin_get(f"{self.name}-{node}", ip, 15020, "/metrics")
        assert answer is not None and answer[0] == 200
        return answer[1]

    def netns(self) -> list[str]:
        if not NETNS_DIR.exists():
            return []
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(f"{self.name}-"))


def sample(metrics: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def unique_name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}"


@contextmanager
def running_lab(
    prefix: str, *up: str, up_timeout: float = 120, down_timeout: float = 120
) -> Iterator[LabRunner]:
    """A lab of its own (``weft lab up UP``, a unique name), torn down whatever happens."""
    runner = LabRunner(unique_name(prefix))
    try:
        runner.weft("lab", "up", *up, timeout=up_timeout)
        yield runner
    finally:
        runner.weft("lab", "down", check=False, timeout=down_timeout)


@contextmanager
def pod_load(
    lab: LabRunner, pod: str, script: str, *argv: str, settle: float
) -> Iterator[subprocess.Popen[str]]:
    """``python -c SCRIPT ARGV`` inside ``pod`` while the block runs (traffic for a
    module's tests): it must still be running ``settle`` seconds after it started, and
    is killed (by its PID) when the block ends."""
    load = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod,
         "--", sys.executable, "-c", script, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(settle)
        assert load.poll() is None, load.communicate()
        yield load
    finally:
        load.kill()
        load.communicate()


@pytest.fixture
def lab_factory() -> Iterator[Callable[[str], LabRunner]]:
    made: list[LabRunner] = []

    def make(prefix: str) -> LabRunner:
        runner = LabRunner(unique_name(prefix))
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.weft("lab", "down", check=False)


@pytest.fixture(scope="module")
def demo_lab() -> Iterator[LabRunner]:
    """A two-node demo lab without agents (plain networking), shared by a module's tests."""
    with running_lab("wt", "--demo", "--nodes", "2", "--no-agents") as runner:
        yield runner


POD_HTTP = r"""
import json

def _more(sock):
    chunk = sock.recv(65536)
    if not chunk:
        raise OSError("closed")
    return chunk

def response(sock):
    # One HTTP/1.1 response read off a kept socket: (head, body); OSError if it closes.
    data = b""
    while b"\r\n\r\n" not in data:
        data += _more(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += _more(sock)
    return head, body

def request(sock, path="/"):
    # One HTTP/1.1 request on a kept socket; returns the echo pod that answered.
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: echo\r\n\r\n")
    return json.loads(response(sock)[1])["pod"]
"""
"""Python source for scripts run inside a pod (``python -c``): ``response(sock)`` reads
an HTTP/1.1 response off a keep-alive connection, ``request(sock)`` asks an echo server
on one which pod it is."""


class Sniffer:
    """Raw frames on one fabric port (the wire between a node and the switch)."""

    def __init__(self, netns: str, ifname: str) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return b"".join(self.frames)

    def tcp_ports(self) -> set[int]:
        """Source and destination ports of the IPv4 TCP segments captured, read from
        their headers (not searched for in the payload, where any two bytes turn up by
        chance)."""
        ports: set[int] = set()
        for frame in self.frames:
            if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue  # not IPv4, or not TCP
            tcp = 14 + (frame[14] & 0x0F) * 4
            if len(frame) >= tcp + 4:
                ports.add(int.from_bytes(frame[tcp : tcp + 2], "big"))
                ports.add(int.from_bytes(frame[tcp + 2 : tcp + 4], "big"))
        return ports
