"""The Grafana dashboards' PromQL against a real Prometheus (Debian's) scraping a lab.

Prometheus runs inside node-1's network namespace (the agents' admin ports are only
reachable there, over the lab's fabric) with a generated config naming both agents'
:15020/metrics, storage in a tmp dir, listening on loopback of that namespace; the test
queries it from inside that namespace too. Traffic: echo from client-1 (split 90/10 by
docs/examples/canary.yaml's route, so the route panels have figures), and the policy
example's callers of payments (allowed and denied; web-1's until each replica has had
both verdicts, so that no figure depends on the balancer's choices). Every panel's and
variable's query is then run through /api/v1/query with the variables set as a user would
set them; each must parse and evaluate, and the panels that matter must show plausible
figures.

The traffic comes after Prometheus has scraped once: a counter whose series appears
between two scrapes shows no increase in ``rate()``, so the series are created by a
warm-up first. The queries are evaluated at the second scrape of each agent that began
after the traffic, as Prometheus reports it (a loaded machine delays scrapes by seconds):
a figure evaluated before the scrape that holds the last requests misses them.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests import dashboards
from tests.lab.conftest import LabRunner, sample, unique_name
from weft.nsenter import in_netns

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "docs" / "examples" / "policy.yaml"
CANARY = ROOT / "docs" / "examples" / "canary.yaml"
PAYMENTS = ("payments-1", "payments-2")
PROM_PORT = 19090
SCRAPE_SECONDS = 2
AGENT_ADMIN_PORT = 15020
VERDICT_ROUNDS = 30

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus is not installed (sudo make host installs it)",
)

# In client-1: N requests to the echo service, ten per connection, a tenth of them sent
# to the canary by header; then N/10 connections that are not HTTP (the proxy relays them
# as bytes: the TCP series), each answered by echo's 400 and closed.
TRAFFIC = r"""
import http.client, json, socket, sys
n = int(sys.argv[1])
statuses = {}
conn = None
for i in range(n):
    if i % 10 == 0:
        if conn:
            conn.close()
        conn = http.client.HTTPConnection("echo", 80, timeout=10)
    conn.request("GET", "/grafana", headers={"x-canary": "always"} if i % 10 == 5 else {})
    r = conn.getresponse()
    r.read()
    statuses[r.status] = statuses.get(r.status, 0) + 1
conn.close()
answered = 0
for _ in range(n // 10):
    with socket.create_connection(("echo", 80), timeout=10) as s:
        s.sendall(b"HELLO weft\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answered += data.startswith(b"HTTP/1.1 400")
print(json.dumps({"statuses": statuses, "opaque": answered}))
"""


class Prometheus:
    """The HTTP API of a Prometheus listening in a network namespace."""

    def __init__(self, netns: str, port: int) -> None:
        self.netns, self.port = netns, port
        self.at: float | None = None
        """Evaluate queries at this time (None: now), so that a slow run sees the same
        rate windows as a fast one."""

    def get(self, path: str, **params: str | list[str]) -> Any:
        with in_netns(self.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(30)
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.sock = sock
        try:
            conn.request("GET", f"{path}?{urllib.parse.urlencode(params, doseq=True)}")
            answer = conn.getresponse()
            body = json.loads(answer.read())
        finally:
            conn.close()
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector; AssertionError naming the expression if Prometheus
        refuses it."""
        params = {"query": expr} if self.at is None else {"query": expr, "time": f"{self.at:.3f}"}
        body = self.get("/api/v1/query", **params)
        assert body.get("status") == "success", f"{expr}\n→ {body}"
        assert body["data"]["resultType"] in ("vector", "scalar"), body
        result = body["data"]["result"]
        return result if body["data"]["resultType"] == "vector" else [{"value": result}]

    def label_values(self, label: str, selector: str) -> list[str]:
        body = self.get(f"/api/v1/label/{label}/values", **{"match[]": [selector]})
        assert body.get("status") == "success", f"{label} of {selector}\n→ {body}"
        return list(body["data"])

    def samples(self, selector: str, window: str = "5m") -> str:
        """The raw samples of ``selector``'s series in the ``window`` before the evaluation
        time, one line a series: what a failed figure was computed from."""
        params = {"query": f"{selector}[{window}]"}
        if self.at is not None:
            params["time"] = f"{self.at:.3f}"
        body = self.get("/api/v1/query", **params)
        if body.get("status") != "success":
            return f"{selector}: {body}"
        lines = [f"{selector}: {len(body['data']['result'])} series"]
        for s in body["data"]["result"]:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s["metric"].items()))
            values = " ".join(f"{float(t) - (self.at or 0):+.1f}s:{v}" for t, v in s["values"])
            lines.append(f"  {{{labels}}} {values}")
        return "\n".join(lines)

    def last_scrapes(self) -> dict[str, float]:
        """The time of each target's latest scrape, by instance, if it succeeded.

        ``timestamp()`` of a selector, then the filter: ``timestamp(up == 1)`` is the
        evaluation time (the comparison makes new samples), so every target would look
        scraped just now."""
        return {r["metric"]["instance"]: float(r["value"][1])
                for r in self.query("timestamp(up) and up == 1")}  # fmt: skip


def wait(what: str, done: Any, timeout: float, explain: Any = str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s {explain()}"
        time.sleep(0.5)


def _traffic(lab: LabRunner, n: int) -> None:
    out = lab.exec("client-1", sys.executable, "-c", TRAFFIC, str(n)).stdout
    assert json.loads(out) == {"statuses": {"200": n}, "opaque": n // 10}, out
    # web-1's requests, allowed and denied, until each replica has had some of both
    # (the balancer chooses per request, and may keep to one replica for a while): every
    # replica's series of both verdicts are there from the warm-up on, and both verdicts
    # are in each replica's figures.
    before = _verdicts(lab)
    urls = [arg for _ in range(5) for path in ("/public/prices", "/admin/users")
            for arg in ("-o", "/dev/null", f"http://payments.shop{path}")]  # fmt: skip
    for _ in range(VERDICT_ROUNDS):
        got = lab.exec("web-1", "curl", "-s", "-w", "%{http_code}\\n", "-m", "10", *urls,
                       check=False).stdout.split()  # fmt: skip
        assert got == ["200", "403"] * 5, got
        now = _verdicts(lab)
        if all(now[k] > before[k] for k in now):
            break
    else:
        raise AssertionError(f"{VERDICT_ROUNDS} rounds and a replica lacks a verdict: {now}")
    urls = ["-o", "/dev/null", "http://payments.shop/public/prices"] * 5
    got = lab.exec("batch-1", "curl", "-s", "-w", "%{http_code}\\n", "-m", "10", *urls,
                   check=False).stdout.split()  # fmt: skip
    assert got == ["403"] * 5, got


def _verdicts(lab: LabRunner) -> dict[tuple[str, str], float]:
    """The HTTP decisions for each payments replica so far, by (replica, verdict), as the
    agents count them."""
    text = "\n".join(lab.metrics(n["name"]) for n in lab.status()["nodes"])
    return {(r, v): sample(text, f"inbound_http_authz_{v}_total", workload=f"shop/{r}")
            for r in PAYMENTS for v in ("allow", "deny")}  # fmt: skip


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A lab with traffic before and between Prometheus's scrapes, and that Prometheus."""
    lab = LabRunner(unique_name("wg"))
    proc: subprocess.Popen[bytes] | None = None
    log = None
    try:
        lab.weft("lab", "up", "--demo", "--nodes", "2", timeout=300)
        lab.weft("lab", "apply", "-f", str(POLICY), timeout=300)
        lab.weft("lab", "label", "echo-1", "track=stable")
        lab.weft("lab", "label", "echo-2", "track=canary")
        lab.weft("lab", "apply", "-f", str(CANARY), timeout=120)
        nodes = {n["name"]: n["ip"] for n in lab.status()["nodes"]}
        tmp = tmp_path_factory.mktemp("prometheus")
        config = tmp / "prometheus.yml"
        targets = ", ".join(f'"{ip}:{AGENT_ADMIN_PORT}"' for ip in sorted(nodes.values()))
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_SECONDS}s\n  scrape_timeout: {SCRAPE_SECONDS}s\n"
            f"scrape_configs:\n  - job_name: weft-agent\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        if shutil.which("promtool"):
            subprocess.run(["promtool", "check", "config", str(config)], check=True,
                           capture_output=True, timeout=60)  # fmt: skip
        # The warm-up: every series the panels read exists before the first scrape.
        wait("the canary route in force", lambda: _canary_seen(lab), 60)
        _traffic(lab, 20)
        log = (tmp / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{lab.name}-node-1", "prometheus",
             f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        p = Prometheus(f"{lab.name}-node-1", PROM_PORT)

        def scraped_all() -> bool:
            assert proc is not None and proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                return len(p.last_scrapes()) == len(nodes)
            except OSError:
                return False  # not listening yet

        def scraped_since(t: float) -> bool:
            scrapes = p.last_scrapes()
            return len(scrapes) == len(nodes) and min(scrapes.values()) > t

        wait("Prometheus scraping both agents", scraped_all, 120)
        _traffic(lab, 200)
        # Two scrapes of each agent begun after the traffic (the second for what is
        # counted as a connection closes): rate() sees all of it. A loaded machine
        # delays the scrapes, hence the deadline.
        after = time.time()
        explain = lambda: f"after {after}: {p.last_scrapes()}"  # noqa: E731
        wait("a scrape after the traffic", lambda: scraped_since(after), 120, explain)
        first = max(p.last_scrapes().values())
        wait("a second scrape after the traffic", lambda: scraped_since(first), 120, explain)
        p.at = max(p.last_scrapes().values()) + 0.1
        yield p
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if log is not None:
            log.close()
        lab.weft("lab", "down", check=False, timeout=300)


def _canary_seen(lab: LabRunner) -> bool:
    out = lab.exec("client-1", "curl", "-s", "-m", "5", "-H", "x-canary: always",
                   "http://echo/", check=False).stdout  # fmt: skip
    return '"pod": "echo-2"' in out


# The variables as a user sets them: each dashboard is evaluated once per set.
VALUES: dict[str, list[dict[str, str]]] = {
    "weft-mesh": [{"namespace": ".*"}, {"namespace": "default"}],
    "weft-workload": [
        {"namespace": "default", "workload": "echo-1"},
        {"namespace": "default", "workload": "client-1"},
        {"namespace": "shop", "workload": "payments-1"},
    ],
    "weft-authz": [{"namespace": "shop"}, {"namespace": ".*"}],
    "weft-resilience": [{"service": "default/echo"}, {"service": ".*"}],
}


# A PromQL selector: the metric's name (or none, for {__name__=~...}) and its matchers.
_SELECTOR = re.compile(r"(?:[A-Za-z_:][\w:]*)?\{[^{}]*\}")


class Figures(dict[str, list]):
    """A dashboard's queries evaluated: "panel title/refId" → its series."""

    def __init__(self, prom: Prometheus, exprs: Mapping[str, str]) -> None:
        super().__init__((key, prom.query(expr)) for key, expr in exprs.items())
        self.prom, self.exprs = prom, dict(exprs)

    def why(self, key: str) -> str:
        """What the figure was computed from: its query, the scrapes and the raw samples
        of every series it reads (a failed assertion's message)."""
        p, expr = self.prom, self.exprs[key]
        scrapes = {i: f"{t - (p.at or time.time()):+.1f}s" for i, t in p.last_scrapes().items()}
        return "\n".join([
            f"{key} = {self[key]}", expr, f"evaluated at {p.at}; latest scrapes {scrapes}",
            *(p.samples(s) for s in dict.fromkeys(_SELECTOR.findall(expr))),
        ])  # fmt: skip


def _results(prom: Prometheus, values: Mapping[str, str], board: dict) -> Figures:
    """Every query of ``board`` evaluated with ``values``."""
    exprs = {f"{q.panel}/{q.ref}": dashboards.substitute(q.expr, values)
             for q in dashboards.queries(board)}  # fmt: skip
    return Figures(prom, exprs)


def _value(series: dict) -> float:
    return float(series["value"][1])


def _one(results: Figures, key: str) -> float:
    series = results[key]
    assert len(series) == 1, results.why(key)
    return _value(series[0])


def _by(results: dict[str, list], key: str, label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): _value(s) for s in results[key]}


@pytest.mark.timeout(1200)
def test_every_query_parses_and_evaluates(prom: Prometheus) -> None:
    boards = {b["uid"]: b for b in dashboards.boards().values()}
    assert set(boards) == set(VALUES)
    counted = 0
    for uid, sets in VALUES.items():
        for values in sets:
            counted += len(_results(prom, values, boards[uid]))
        for var in dashboards.variables(boards[uid]):
            # A variable's query may use the variables before it (workload: $namespace).
            query = dashboards.substitute(dashboards.variable_query(var), sets[0])
            parsed = dashboards.parse_variable_query(query)
            if isinstance(parsed, dashboards.LabelValues):
                assert prom.label_values(parsed.label, parsed.selector), query
            else:
                assert prom.query(parsed.expr), query
    print(f"{counted} panel queries evaluated")


def _variable_values(prom: Prometheus, board: dict, name: str, values: dict) -> set[str]:
    var = next(v for v in dashboards.variables(board) if v["name"] == name)
    query = dashboards.substitute(dashboards.variable_query(var), values)
    parsed = dashboards.parse_variable_query(query)
    if isinstance(parsed, dashboards.LabelValues):
        raw = prom.label_values(parsed.label, parsed.selector)
    else:  # Grafana prints each series as {labels} value timestamp
        raw = [
            "{" + ",".join(f'{k}="{v}"' for k, v in s["metric"].items()) + "} "
            + f"{s['value'][1]} {s['value'][0]}" for s in prom.query(parsed.expr)
        ]  # fmt: skip
    regex = dashboards.variable_regex(var)
    if regex is None:
        return set(raw)
    return {m[1] for r in raw if (m := regex.search(r))}


@pytest.mark.timeout(600)
def test_variables_offer_the_labs_namespaces_workloads_and_services(prom: Prometheus) -> None:
    b = {b["uid"]: b for b in dashboards.boards().values()}
    assert {"default", "shop"} <= _variable_values(prom, b["weft-mesh"], "namespace", {})
    assert {"default", "shop"} <= _variable_values(prom, b["weft-workload"], "namespace", {})
    workloads = _variable_values(prom, b["weft-workload"], "workload", {"namespace": "default"})
    assert {"echo-1", "echo-2", "client-1"} <= workloads, workloads
    assert "shop" in _variable_values(prom, b["weft-authz"], "namespace", {})
    assert "default/echo" in _variable_values(prom, b["weft-resilience"], "service", {})


def _board(uid: str) -> dict:
    return next(b for b in dashboards.boards().values() if b["uid"] == uid)


@pytest.mark.timeout(600)
def test_mesh_overview_figures(prom: Prometheus) -> None:
    r = _results(prom, {"namespace": ".*"}, _board("weft-mesh"))
    # 220 echo requests and 15 or more to payments in the last minute: a fraction of a request
    # per second to a few per second, whatever the scrapes' timing.
    assert 0.1 < _one(r, "Mesh request rate/A") < 100, r["Mesh request rate/A"]
    assert _one(r, "Mesh success rate/A") == 1.0  # 403 is not a failure; nothing failed
    assert 0 < _one(r, "Mesh p99 latency/A") < 5000
    assert _one(r, "Open TCP connections/A") >= 0
    assert _one(r, "TCP connections per second/A") > 0
    assert _one(r, "mTLS share/A") == 1.0  # every captured pod's traffic stays in the mesh
    assert _one(r, "Denied by policy/A") > 0, r.why("Denied by policy/A")  # web-1's /admin
    assert _one(r, "Overflowed/A") == 0
    rps = _by(r, "Requests per second by workload/A", "dst_workload")
    assert {"echo-1", "echo-2", "payments-1", "payments-2"} <= set(rps), rps
    assert rps["echo-1"] > rps["echo-2"] > 0  # the canary split: 90/10 plus the header's tenth
    success = _by(r, "Success rate by workload/A", "dst_workload")
    assert success["echo-1"] == success["echo-2"] == 1.0, success
    p50, p95, p99 = (_by(r, f"Latency p{q}/A", "dst_workload") for q in (50, 95, 99))
    for w in ("echo-1", "echo-2"):
        assert 0 < p50[w] <= p95[w] <= p99[w] < 5000, (w, p50, p95, p99)
    assert _by(r, "Workloads/B", "dst_workload")["echo-1"] == 1.0  # its success column
    assert _by(r, "Workloads/E", "dst_workload")["echo-1"] == p99["echo-1"]
    assert set(_by(r, "Open connections/A", "dst_workload")) >= {"echo-1", "echo-2"}
    # The connections that are not HTTP are balanced per connection (mostly to the
    # nearer replica).
    opened = _by(r, "Connections opened/A", "dst_workload")
    busy = max(opened, key=lambda w: opened[w])
    assert opened[busy] > 0, opened
    read, written = (_by(r, f"Bytes/{ref}", "dst_workload") for ref in "AB")
    assert 0 < read[busy] < written[busy], (read, written)  # a 147-byte 400 each
    # A request the caller's node refused itself has no destination ("").
    edges = {(e["metric"]["src_workload"], e["metric"].get("dst_workload", "")): e["metric"]
             for ref in "AC" for e in r[f"Edges/{ref}"] if _value(e) > 0}  # fmt: skip
    assert edges[("batch-1", "")]["tls"] == "false", r.why("Edges/C")  # the last requests
    payments = next(d for s, d in edges if s == "web-1" and d.startswith("payments-"))
    for src, dst in (("client-1", "echo-1"), ("client-1", "echo-2"), ("web-1", payments)):
        edge = edges[(src, dst)]
        assert edge["tls"] == "true", edge
        assert edge["client_id"].startswith("spiffe://cluster.local/ns/"), edge
        assert edge["server_id"].startswith("spiffe://cluster.local/ns/"), edge
    tcp_edges = {(e["metric"]["src_workload"], e["metric"]["dst_workload"]) for e in r["Edges/A"]}
    assert ("client-1", busy) in tcp_edges  # the connections that are not HTTP
    assert r["Plaintext traffic/A"] == r["Plaintext traffic/B"] == []
    detected = _by(r, "Protocol detection/A", "result")
    assert detected["http1"] > 0 and detected["opaque"] > 0, detected


@pytest.mark.timeout(600)
def test_workload_dashboard_inbound_and_outbound(prom: Prometheus) -> None:
    board = _board("weft-workload")
    served = _results(prom, {"namespace": "default", "workload": "echo-1"}, board)
    assert _one(served, "Request rate/A") > 0
    assert _one(served, "Success rate/A") == 1.0
    clients = _by(served, "Requests per second by client/A", "src_workload")
    assert set(clients) == {"client"}, clients  # inbound names the caller's service account
    p50, p95, p99 = (_one(served, f"Latency/{ref}") for ref in "ABC")
    assert 0 < p50 <= p95 <= p99 < 5000
    assert set(_by(served, "Responses by status/A", "status_code")) == {"200"}
    # The connections that are not HTTP went to either replica, or both (balanced per
    # connection): bytes for at least one; no series at all for one that never had any.
    other = _results(prom, {"namespace": "default", "workload": "echo-2"}, board)
    read = [_value(s) for f in (served, other) for s in f["Bytes/A"]]
    assert max(read, default=0) > 0, (served.why("Bytes/A"), other.why("Bytes/A"))
    calls = _results(prom, {"namespace": "default", "workload": "client-1"}, board)
    assert _one(calls, "Calls per second/A") > 0
    assert _one(calls, "Call success rate/A") == 1.0
    assert _one(calls, "mTLS share/A") == 1.0
    assert set(_by(calls, "Requests per second by authority/A", "authority")) == {"echo"}
    endpoints = _by(calls, "Requests per second by endpoint/A", "dst_workload")
    assert set(endpoints) == {"echo-1", "echo-2"}, endpoints
    assert calls["Proxy errors/A"] == []
    routes = {(s["metric"]["route"], s["metric"]["backend"]): _value(s)
              for s in calls["Requests by route and backend/A"]}  # fmt: skip
    assert routes[("default/echo-split", "default/echo-canary")] > 0, routes
    assert routes[("default/echo-split", "default/echo-stable")] > 0, routes
    # web-1's requests went to either replica, or both (balanced by latency).
    guarded = [_results(prom, {"namespace": "shop", "workload": f"payments-{i}"}, board)
               for i in (1, 2)]  # fmt: skip
    allowed = {s["metric"]["policy"] for g in guarded for k in ("A", "B")
               for s in g[f"Authorization: allowed/{k}"] if _value(s) > 0}  # fmt: skip
    assert allowed == {"shop/payments-from-web"}, allowed


@pytest.mark.timeout(600)
def test_authorization_dashboard(prom: Prometheus) -> None:
    r = _results(prom, {"namespace": "shop"}, _board("weft-authz"))
    assert _one(r, "TCP allowed/A") > 0, r.why("TCP allowed/A")
    assert _one(r, "HTTP allowed/A") > 0, r.why("HTTP allowed/A")
    assert _one(r, "HTTP denied/A") > 0, r.why("HTTP denied/A")
    shares = _by(r, "HTTP denied share by workload/A", "workload")
    why = r.why("HTTP denied share by workload/A")
    assert set(shares) == {"shop/payments-1", "shop/payments-2"}, why
    # Half of web-1's requests are on /admin, and each replica had some of both.
    assert all(0 < x < 1 for x in shares.values()), why
    denied = {s["metric"]["policy"] for s in r["HTTP denied by policy/A"] if _value(s) > 0}
    assert denied == {"shop/no-admin"}, r.why("HTTP denied by policy/A")
    # batch-1 is refused at the tunnel: payments-from-web names no other caller. Its node
    # remembers the refusal, so only the warm-up's first request reached payments: the
    # series is there, its rate may well be 0.
    refused = {s["metric"]["policy"] for s in r["TCP denied by policy/A"]}
    assert refused == {"shop/payments-from-web"}, r.why("TCP denied by policy/A")
    seen = {(s["metric"]["layer"], s["metric"]["verdict"], s["metric"]["policy"])
            for s in r["Decisions by policy and rule/A"]}  # fmt: skip
    assert {
        ("inbound_tcp", "allow", "shop/payments-from-web"),
        ("inbound_http", "allow", "shop/payments-from-web"),
        ("inbound_http", "deny", "shop/no-admin"),  # web-1 on /admin
        ("inbound_tcp", "deny", "shop/payments-from-web"),  # batch-1
    } <= seen, r.why("Decisions by policy and rule/A")
    assert r["HTTP audit/A"] == r["TCP audit/A"] == []


@pytest.mark.timeout(600)
def test_resilience_dashboard(prom: Prometheus) -> None:
    r = _results(prom, {"service": "default/echo"}, _board("weft-resilience"))
    backends = _by(r, "Requests by route and backend/A", "backend")
    assert backends["default/echo-stable"] > backends["default/echo-canary"] > 0, backends
    # Healthy echo: nothing retried, timed out or ejected; the stats answer with no series
    # (or 0), never an error.
    for key in ("Retries/A", "Retries skipped/A", "Timeouts/A", "Ejections/A",
                "Proxy timeouts answered/A", "No endpoints/A"):  # fmt: skip
        assert all(_value(s) == 0 for s in r[key]), (key, r[key])
