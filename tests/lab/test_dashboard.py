"""`weft viz dashboard` in a real browser against a real lab (with its OTLP receiver).

The dashboard runs on the host (its sources scrape each agent inside its node's network
namespace, as `weft viz` does, and read their tap there as `weft viz tap` does) and
listens on 127.0.0.1; Debian's headless Chromium, driven over its DevTools protocol
(`_Browser`), loads the page there while client-1 sends requests to echo (echo-2 failing
a fifth of them), and the DOM after the page's scripts ran must show what cytoscape drew
— the client and echo workloads and an mTLS edge between them (the graph's
``data-nodes``/``data-edges``, read from cytoscape's own elements) — the edges table, a
success rate for echo, trace rows, and the live tap's rows: echo's requests with their
status and both identities, narrowed by the filter box, at most 200 kept, and the
agents' tap streams closed when the page goes. A screenshot is taken of the tapping page;
with ``WEFT_DASHBOARD_SCREENSHOT=docs/dashboard.png`` it is kept there (the one in docs/).

Every process started here is stopped by its PID, and the lab is torn down by the
fixture, whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import html.parser
import json
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import LabRunner, unique_name

pytestmark = pytest.mark.lab

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"

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


def _stop(proc: subprocess.Popen[Any], group: bool = False) -> None:
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


class _Browser:
    """Debian's headless Chromium, driven over its DevTools protocol on a pipe
    (``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4; no port,
    no websocket library). Real time, not ``--virtual-time-budget``: virtual time stands
    still while a fetch is pending, and the tap panel's event stream always is."""

    def __init__(self, width: int = 1500, height: int = 1300) -> None:
        assert CHROMIUM is not None
        self.profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"weft-chromium-{os.getpid()}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        theirs_in, to_browser = os.pipe()  # it reads commands on its fd 3
        from_browser, theirs_out = os.pipe()  # and writes answers on its fd 4

        def fds() -> None:  # copies first: either end may already be fd 3 or 4
            a, b = os.dup(theirs_in), os.dup(theirs_out)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self._log,  # a file: a pipe could fill
            pass_fds=(3, 4), preexec_fn=fds, start_new_session=True,  # kept past fds()
        )  # fmt: skip
        os.close(theirs_in)
        os.close(theirs_out)
        self._out, self._in = to_browser, from_browser
        self._buf = b""
        self._id = 0
        try:
            self._open_page(width, height)
        except BaseException:
            self.close()
            raise

    def _open_page(self, width: int, height: int) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  page=True)  # fmt: skip

    def call(self, method: str, params: dict | None = None, *, page: bool = False,
             timeout: float = 60) -> dict:  # fmt: skip
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise AssertionError(f"chromium did not answer {method} in {timeout} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise AssertionError(f"chromium exited: {self._stderr()}")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == self._id:  # anything else is an event: not asked for
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                result: dict = answer["result"]
                return result

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, page=True)

    def js(self, expression: str) -> object:
        """The value of ``expression`` in the page (JSON-able)."""
        got = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                        page=True)  # fmt: skip
        if "exceptionDetails" in got:
            raise AssertionError(f"{expression}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, expression: str, what: str, within: float = 90) -> object:
        """Until ``expression`` is truthy in the page (polled in real time; throwing, as
        before the page drew what it names, is not yet)."""
        deadline = time.monotonic() + within
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while time.monotonic() < deadline:
            value = self.js(guarded)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {within} s; the page: {self.dom()[:3000]}")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                      "button": "left", "clickCount": 1}, page=True)  # fmt: skip

    def dom(self) -> str:
        return str(self.js("document.documentElement.outerHTML"))

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"},
                                          page=True)["data"])  # fmt: skip

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, OSError):
                self.call("Browser.close", timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        _stop(self.proc, group=True)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[_Browser]:
    b = _Browser()
    try:
        yield b
    finally:
        b.close()


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


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (sudo make host)"
)

TAP_ROWS = "document.querySelectorAll('#tap tbody tr.tap-row')"
FILTER = (
    "{ const f = document.querySelector('#tap-filter'); f.value = '%s'; "
    "f.dispatchEvent(new Event('input')); }"
)  # typing in the filter box


def _tap_rows(dom: _Dom) -> list[dict[str, str | None]]:
    return [r for r in dom.rows if "tap-row" in (r.get("class") or "").split()]


@needs_chromium
def test_the_page_renders_the_graph_and_figures(dashboard: str, browser: _Browser) -> None:
    doc = _wait_for_figures(dashboard)
    [edge] = [e for e in doc["edges"] if e["id"] == "default/client->default/echo"]
    assert edge["mtls"] and edge["secured"] == "yes" and edge["rps"] > 1, edge
    # echo-2 fails a fifth of its requests: the workload about 90 % (two replicas).
    [echo] = [n for n in doc["nodes"] if n["id"] == "default/echo"]
    assert 0.7 < echo["success_rate"] < 0.99, echo
    traces = _wait_for_traces(dashboard)
    assert any(h["dst"].startswith("echo-") for t in traces for h in t["hops"] or []), traces

    browser.goto(dashboard)
    drawn = (
        "document.querySelector('#graph').dataset.rendered === 'true' && "
        "document.querySelector('#graph').dataset.edges.includes('|mtls') && "
        "document.querySelector('#stat tbody tr[data-workload=\"default/echo\"] td.success')"
        ".textContent.includes('%') && "
        "document.querySelector('#traces tbody tr[data-trace]') !== null && "
        f"{TAP_ROWS}.length >= 4"
    )
    browser.wait_for(drawn, "the graph, figures, traces and tap rows")
    dom = _Dom()
    dom.feed(browser.dom())
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
    # The live tap of every workload: client-1's requests to echo, from both nodes' agents.
    assert "Live tap" in text and "Not in this version" not in text
    rows = _tap_rows(dom)
    assert len(rows) >= 4, rows
    assert {r.get("data-direction") for r in rows} <= {"out", "in"}, rows
    assert any(
        r.get("data-client-id") == CLIENT
        and r.get("data-server-id") == ECHO
        and (r.get("data-dst") or "").startswith("default/echo-")
        for r in rows
    ), rows
    assert "tapping every workload on 2 of 2 agents" in text, text

    # Clicking echo in the graph taps echo alone (what ?tap=default/echo opens: below).
    at = browser.js(
        "(() => { const box = document.querySelector('#graph').getBoundingClientRect(); "
        "const at = cy.getElementById('default/echo').renderedPosition(); "
        "return [box.left + at.x, box.top + at.y]; })()"
    )
    assert isinstance(at, list), at
    browser.click(*at)
    browser.wait_for(
        "document.querySelector('#tap-panel').dataset.workload === 'default/echo' && "
        "document.querySelector('#tap-status').textContent.includes("
        "'tapping default/echo on 2 of 2 agents') && "
        f"{TAP_ROWS}.length >= 2",
        "echo tapped after the click",
    )
    assert browser.js("document.querySelector('#tap-workload').value") == "default/echo"


@needs_chromium
def test_the_tap_panel_streams_the_selected_workloads_requests(
    dashboard: str, browser: _Browser, lab: LabRunner
) -> None:
    """``?tap=default/echo``: what clicking echo in the graph does. Rows arrive live, with
    the status and both ends' identities; the filter box narrows them; the page keeps 200;
    closing the page closes the agents' tap streams."""
    _wait_for_figures(dashboard)
    browser.goto(dashboard + "?tap=default/echo")
    browser.wait_for(f"{TAP_ROWS}.length >= 20", "20 tap rows for echo")
    dom = _Dom()
    dom.feed(browser.dom())
    rows = _tap_rows(dom)
    assert dom.by_id["tap-panel"].get("data-workload") == "default/echo"
    assert dom.by_id["tap-workload"] is not None
    for r in rows:
        # Every row is a request to echo: client-1's, from its node (out) or echo's (in).
        assert (r.get("data-dst") or "").startswith("default/echo-"), r
        assert r.get("data-client-id") == CLIENT and r.get("data-server-id") == ECHO, r
        assert r.get("data-src") == {"out": "default/client-1", "in": "default/sa:client"}[
            r.get("data-direction") or ""], r  # fmt: skip
        assert r.get("data-status") in ("200", "503"), r  # echo-2 fails a fifth with 503
        assert re.search(r"\|GET\|echo\|/", r["cells"] or ""), r
    assert {r.get("data-direction") for r in rows} == {"out", "in"}, rows
    assert any(r.get("data-status") == "200" for r in rows), rows
    status = browser.js("document.querySelector('#tap-status').textContent")
    assert "tapping default/echo on 2 of 2 agents" in str(status), status

    # The filter box: only echo-2's rows stay shown, and new rows are filtered as they come.
    browser.js(FILTER % "echo-2")
    shown = browser.wait_for(
        f"(() => {{ const v = Array.from({TAP_ROWS}).filter((r) => !r.hidden); "
        "return v.length >= 3 && v.map((r) => r.dataset.dst); })()",
        "echo-2's rows",
    )
    assert isinstance(shown, list) and set(shown) == {"default/echo-2"}, shown
    # Exactly the rows that are not echo-2's are hidden (read in one go: rows keep
    # coming). There may be none: the balancer may have sent this window all to echo-2.
    counts = browser.js(
        f"(() => {{ const a = Array.from({TAP_ROWS}); return [a.filter((r) => r.hidden).length, "
        "a.filter((r) => r.dataset.dst !== 'default/echo-2').length]; })()"
    )
    assert isinstance(counts, list) and counts[0] == counts[1], counts
    browser.js(FILTER % "")

    # Bounded: more requests came than the page keeps.
    received = browser.wait_for(
        "(() => { const n = Number(document.querySelector('#tap-panel').dataset.requests); "
        "return n > 220 && n; })()",
        "over 220 requests",
        within=120,
    )
    kept = browser.js(f"{TAP_ROWS}.length")
    assert kept == 200, (kept, received)

    browser.wait_for("document.querySelector('#traces tbody tr[data-trace]') !== null", "traces")
    time.sleep(2)  # the graph's next poll and a few more rows: the screenshot shows them live
    data = browser.screenshot()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    keep = os.environ.get("WEFT_DASHBOARD_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(data)

    # The page goes away: the dashboard closes its streams from both agents.
    from weft.lab.lab import agent_state

    assert all(agent_state(lab.name, n)["tap"]["subscribers"] >= 1 for n in ("node-1", "node-2"))
    browser.goto("about:blank")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        subs = [agent_state(lab.name, n)["tap"]["subscribers"] for n in ("node-1", "node-2")]
        if subs == [0, 0]:
            break
        time.sleep(0.5)
    assert subs == [0, 0], f"the agents still have tap subscribers: {subs}"


def test_only_loopback_hosts_are_answered(dashboard: str) -> None:
    port = int(dashboard.rsplit(":", 1)[1].strip("/"))
    req = urllib.request.Request(dashboard + "api/graph", headers={"Host": f"evil.example:{port}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403
    e.value.close()
    assert _get(f"http://localhost:{port}/api/stat?kind=pod")["kind"] == "pod"
