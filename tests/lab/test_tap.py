"""`weft viz tap` against a real lab: client-1 calls the echo service (its node's proxy
balancing each request to echo-1 on node-1 or echo-2 on node-2, over the mTLS tunnel),
and the tap shows those requests live from both agents — the caller's node (outbound)
and the destination's (inbound) — with both identities and their statuses; then a pod
that asks its node's admin port for the tap itself is refused 403.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from tests.lab.conftest import LabRunner, pod_load, running_lab

pytestmark = pytest.mark.lab

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"

LOAD = r"""
import sys, time, urllib.request

end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        urllib.request.urlopen("http://echo/tap-test", timeout=5).read()
    except OSError:
        pass
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRunner]:
    with (
        running_lab("tp", "--demo", "--nodes", "2", up_timeout=600, down_timeout=300) as runner,
        pod_load(runner, "client-1", LOAD, "600", settle=2),
    ):
        yield runner


def _tap(lab: LabRunner, *args: str) -> list[dict]:
    out = lab.viz("tap", *args, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_tap_shows_live_requests_from_both_directions(lab: LabRunner) -> None:
    seen: list[dict] = []
    for _ in range(5):  # five events are usually both sides of two or three requests
        events = _tap(lab, "deploy/echo", "--max", "5", "-o", "json", "--duration", "30")
        assert len(events) == 5, events
        seen += events
        if {e["direction"] for e in seen} == {"outbound", "inbound"}:
            break
    assert {e["direction"] for e in seen} == {"outbound", "inbound"}, seen
    for e in seen:
        assert (e["method"], e["path"], e["authority"]) == ("GET", "/tap-test", "echo"), e
        assert e["status"] == 200 and e["error"] is None and e["latency_ms"] is not None, e
        assert e["src"]["identity"] == CLIENT and e["dst"]["identity"] == ECHO, e
        assert e["dst"]["pod"] in ("echo-1", "echo-2") and e["tls"] is True, e
        if e["direction"] == "outbound":
            assert e["src"]["pod"] == "client-1" and e["node"] == "node-1", e
            assert e["dst"]["service"] == "default/echo", e
        else:  # the destination knows the caller by the identity the tunnel proved
            assert e["src"]["pod"] is None and e["src"]["service_account"] == "client", e
            assert e["node"] == {"echo-1": "node-1", "echo-2": "node-2"}[e["dst"]["pod"]], e


def test_tap_filters_and_the_table(lab: LabRunner) -> None:
    events = _tap(lab, "deploy/client", "--to", "pod/echo-2", "--max", "3", "-o", "json",
                  "--duration", "30")  # fmt: skip
    assert len(events) == 3 and {e["dst"]["pod"] for e in events} == {"echo-2"}, events
    assert not _tap(lab, "deploy/echo", "--method", "POST", "-o", "json", "--duration", "2")
    assert not _tap(lab, "deploy/echo", "--path", "/other", "-o", "json", "--duration", "2")
    table = lab.viz("tap", "deploy/echo", "--max", "4", "--duration", "30", timeout=120)
    print(table.stdout)
    assert "METHOD" in table.stdout.splitlines()[0] and "CLIENT_ID" in table.stdout
    rows = table.stdout.splitlines()[1:]
    assert len(rows) == 4 and all("/tap-test" in r and " 200 " in r for r in rows), rows
    assert "4 request(s)" in table.stderr


def test_a_pod_asking_its_node_for_the_tap_is_refused(lab: LabRunner) -> None:
    node_ip = next(n["ip"] for n in lab.status()["nodes"] if n["name"] == "node-1")
    script = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        f"    urllib.request.urlopen('http://{node_ip}:15020/tap', timeout=5)\n"
        "    print('200')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    out = lab.exec("client-1", sys.executable, "-c", script).stdout
    assert out.startswith("403 "), out
    assert "only on the node itself" in out and "kubectl port-forward" in out
    # The same port still answers the pod's /metrics and /live (kubelet, Prometheus).
    live = lab.exec("client-1", sys.executable, "-c",
                    f"import urllib.request; print(urllib.request.urlopen("
                    f"'http://{node_ip}:15020/live', timeout=5).status)").stdout  # fmt: skip
    assert live.strip() == "200"
