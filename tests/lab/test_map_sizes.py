"""The per-connection eBPF maps at a chosen size (``weft agent --ebpf-map-entries``).

The claim behind the small default (docs/ebpf.md "Map sizes"): ``weft_orig_dst`` is read
once, when the proxy accepts, so LRU eviction of a live, accepted connection's entry
costs nothing; and a full sockhash only means the next connections take the stack
instead of the sk_msg shortcut.  What the size must cover is the connects waiting for
the proxy's accept at once (at most the listen backlog, 4,096).  This lab gives its
agent maps of 1,024 entries and holds 1,500 captured connections open at once, each
answered when it opens and again when all are open.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.lab.conftest import LabRunner, running_lab
from weft.lab.lab import agent_state

ENTRIES = 1024
HELD = 1500

HOLD_MANY = r"""
import json, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
target, count = sys.argv[1], int(sys.argv[2])
def get(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.startswith(b"HTTP/1.1 200")
socks, ok = [], 0
# Each connection answered before the next opens (so accepted: its entry was read), and
# all of them kept open: at the end every one is live, and asked again.
for _ in range(count):
    socks.append(socket.create_connection((target, 8080), timeout=20))
    ok += get(socks[-1])
again = sum(get(s) for s in socks)
for s in socks:
    s.close()
print(json.dumps({"ok": ok, "again": again}))
"""


@pytest.fixture(scope="module")
def small() -> Iterator[LabRunner]:
    with running_lab(
        "wm", "--demo", "--nodes", "1", f"--agent-arg=--ebpf-map-entries={ENTRIES}"
    ) as runner:
        yield runner


def _ebpf(lab: LabRunner) -> dict:
    return agent_state(lab.name, "node-1")["ebpf"]


def test_maps_have_the_configured_size_and_are_charged_to_the_agent(small: LabRunner):
    ebpf = _ebpf(small)
    sizes = {name: m["max_entries"] for name, m in ebpf["maps"].items()}
    assert sizes["weft_orig_dst"] == sizes["weft_cookie_dst"] == ENTRIES
    assert sizes["weft_socks"] == sizes["weft_sock_keys"] == 2 * ENTRIES
    assert ebpf["notes"] == []
    total = sum(m["kernel_bytes"] for m in ebpf["maps"].values())
    # 1,024 entries: a few hundred KB in all (16,384 by default: about 6 MB).
    assert 0 < total < 1_000_000, ebpf["maps"]


def test_more_open_connections_than_entries_are_all_served(small: LabRunner):
    status = small.status()
    echo = next(p for p in status["pods"] if p["name"] == "echo-1")
    before = _ebpf(small)["stats"]
    out = small.weft(
        "lab", "exec", "client-1", "--", "python3", "-c", HOLD_MANY, echo["ip"], str(HELD),
        timeout=240,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ok": HELD, "again": HELD}
    after = _ebpf(small)["stats"]
    recorded = after["recorded"] - before["recorded"]
    cleaned = after["cleaned"] - before["cleaned"]
    assert recorded == HELD
    # Entries of live, already accepted connections were evicted to make room (their
    # close found nothing to delete), and that cost none of them anything.
    assert cleaned < HELD, (recorded, cleaned)
    # The sockhash holds 2,048 sockets: not every pair got the shortcut, all worked.
    assert after["socks_added"] - before["socks_added"] <= 2 * ENTRIES


def test_a_changed_size_keeps_the_pinned_maps_and_says_so(small: LabRunner):
    small.weft("lab", "restart-agent", "node-1", "--", "--ebpf-map-entries", "4096")
    ebpf = _ebpf(small)
    assert ebpf["maps"]["weft_orig_dst"]["max_entries"] == ENTRIES
    assert any(
        "weft_orig_dst is pinned with 1,024 entries, not the 4,096 configured" in n
        for n in ebpf["notes"]
    ), ebpf["notes"]
    out = small.weft("lab", "exec", "client-1", "--", "curl", "-sS", "-m", "5", "http://echo/")
    assert json.loads(out.stdout)["pod"] == "echo-1"
