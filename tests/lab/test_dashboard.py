"""`weft viz dashboard` in a real browser against a real lab (with its OTLP receiver).

The dashboard runs on the host (its sources scrape each agent inside its node's network
namespace, as `weft viz` does) and listens on 127.0.0.1; Debian's headless Chromium loads
the page there while client-1 sends requests to echo (echo-2 failing a fifth of them),
and the DOM after the page's scripts ran (``--dump-dom`` with ``--virtual-time-budget``)
must show what cytoscape drew — the client and echo workloads and an mTLS edge between
them (the graph's ``data-nodes``/``data-edges``, read from cytoscape's own elements) —
the edges table and a success rate for echo. A screenshot is taken the same way; with
``WEFT_DASHBOARD_SCREENSHOT=docs/dashboard.png`` it is kept there (the one in docs/).

Every process started here is stopped by its PID, and the lab is torn down by the
fixture, whatever happens.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import LabRunner, unique_name

pytestmark = pytest.mark.lab

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

LOAD = r"""
import socket, sys, time
end, sent = time.time() + float(sys.argv[1]), 0
while time.time() < end:
    try:
        with socket.create_connection(("echo", 80), timeout=5) as s:
            for _ in range(20):
                s.sendall(b"GET /?fail=echo-2:0.2 HTTP/1.1\r\nHost: echo\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise OSError("closed")
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                              if l.lower().startswith(b"content-length")][0])
                while len(body) < length:
                    body += s.recv(65536)
                sent += 1
                time.sleep(0.03)
    except (OSError, IndexError, ValueError):
        time.sleep(0.1)
print(sent)
"""


def _stop(proc: subprocess.Popen[str], group: bool = False) -> None:
    """Stop a process this test started, by its PID (its process group, for Chromium's
    helpers, when it was started as a group leader)."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    runner = LabRunner(unique_name("db"))
    load: subprocess.Popen[str] | None = None
    try:
        runner.weft("lab", "up", "--demo", "--nodes", "2", "--traces", timeout=600)
        load = subprocess.Popen(
            [sys.executable, "-m", "weft.cli", "lab", "--lab", runner.name, "exec", "client-1",
             "--", sys.executable, "-c", LOAD, "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(2)
        assert load.poll() is None, load.communicate()
        yield runner
    finally:
        if load is not None:
            _stop(load)
        runner.weft("lab", "down", check=False, timeout=300)


@pytest.fixture
def dashboard(lab: LabRunner) -> Iterator[str]:
    """The dashboard's URL; the process is stopped (SIGTERM, by PID) afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft.cli", "viz", "--lab", lab.name, "dashboard",
         "--listen", "127.0.0.1:0", "--interval", "1", "--window", "4"],
        stdout=subprocess.PIPE, text=True,  # stderr: pytest's, shown when the test fails
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = proc.stdout.readline() if sel.select(30) else ""
        if not line:
            _stop(proc)
            pytest.fail("the dashboard printed no URL (its stderr is above)")
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, line
        yield match.group(0)
        assert proc.poll() is None, "the dashboard exited while the test ran"
    finally:
        _stop(proc)
    assert proc.returncode == 0, f"SIGTERM should stop it cleanly, got {proc.returncode}"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _wait_for_figures(url: str, within: float = 60) -> dict:
    """/api/graph once the client → echo edge carries traffic and echo has a success rate."""
    deadline = time.monotonic() + within
    doc: dict = {}
    while time.monotonic() < deadline:
        doc = _get(url + "api/graph")
        edge = next((e for e in doc.get("edges", []) if e["id"] == "default/client->default/echo"),
                    None)  # fmt: skip
        echo = next((n for n in doc.get("nodes", []) if n["id"] == "default/echo"), None)
        if edge and edge["active"] and echo and echo["success_rate"] is not None:
            return doc
        time.sleep(1)
    raise AssertionError(f"no figures for client -> echo within {within} s: {doc}")


def _wait_for_traces(url: str, within: float = 60) -> list[dict]:
    """/api/traces once the lab's receiver holds traces with their hops."""
    deadline = time.monotonic() + within
    doc: dict = {}
    while time.monotonic() < deadline:
        doc = _get(url + "api/traces")
        assert doc["enabled"], doc  # the lab runs a receiver (--traces): found in its state
        if doc["traces"] and doc["traces"][0]["hops"]:
            return doc["traces"]
        time.sleep(1)
    raise AssertionError(f"no traces within {within} s: {doc}")


def _chromium(*args: str, timeout: float = 120) -> str:
    assert CHROMIUM is not None
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"weft-chromium-{os.getpid()}"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, group=True)
        raise AssertionError(f"chromium {' '.join(args)} did not finish in {timeout} s") from None
    finally:
        if proc.poll() is None:
            _stop(proc, group=True)
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


class _Dom(html.parser.HTMLParser):
    """Elements by id, rows by their data attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.rows: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self._row: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if ident := a.get("id"):
            self.by_id[ident] = a
        if tag == "tr":
            self._row = {**a, "cells": ""}
            self.rows.append(self._row)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None:
            self._row["cells"] = (self._row["cells"] or "") + data + "|"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (sudo make host)")
def test_the_page_renders_the_graph_and_figures(dashboard: str, tmp_path: Path) -> None:
    doc = _wait_for_figures(dashboard)
    [edge] = [e for e in doc["edges"] if e["id"] == "default/client->default/echo"]
    assert edge["mtls"] and edge["secured"] == "yes" and edge["rps"] > 1, edge
    # echo-2 fails a fifth of its requests: the workload about 90 % (two replicas).
    [echo] = [n for n in doc["nodes"] if n["id"] == "default/echo"]
    assert 0.7 < echo["success_rate"] < 0.99, echo
    traces = _wait_for_traces(dashboard)
    assert any(h["dst"].startswith("echo-") for t in traces for h in t["hops"] or []), traces

    dom_text = _chromium("--virtual-time-budget=10000", "--dump-dom", dashboard)
    dom = _Dom()
    dom.feed(dom_text)
    graph = dom.by_id["graph"]
    assert graph.get("data-rendered") == "true", graph
    nodes = (graph.get("data-nodes") or "").split()
    assert {"default/client", "default/echo"} <= set(nodes), graph
    assert "default/client->default/echo|mtls" in (graph.get("data-edges") or "").split(), graph
    [row] = [r for r in dom.rows if r.get("data-edge") == "default/client->default/echo"]
    assert row.get("data-secured") == "yes" and "mTLS" in (row["cells"] or ""), row
    [echo] = [r for r in dom.rows if r.get("data-workload") == "default/echo"]
    assert re.search(r"\|\d{1,3}\.\d\d%\|", echo["cells"] or ""), echo  # the success rate
    assert re.search(r"\|\d+\.\drps\|", echo["cells"] or ""), echo
    text = " ".join(dom.text)
    assert "tracing not enabled" not in text
    assert any(r.get("data-trace") for r in dom.rows), "no trace rows"
    assert "Live tap" in text and "Not in this version" in text

    shot = tmp_path / "dashboard.png"
    _chromium("--virtual-time-budget=10000", "--window-size=1500,1000",
              f"--screenshot={shot}", dashboard)  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    keep = os.environ.get("WEFT_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_only_loopback_hosts_are_answered(dashboard: str) -> None:
    port = int(dashboard.rsplit(":", 1)[1].strip("/"))
    req = urllib.request.Request(dashboard + "api/graph", headers={"Host": f"evil.example:{port}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403
    e.value.close()
    assert _get(f"http://localhost:{port}/api/stat?kind=pod")["kind"] == "pod"
