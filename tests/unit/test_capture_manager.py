"""The capture manager's reconciliation, against a fake attacher (no eBPF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeagent.agent import tcp_port_listening
from nodeagent.capture import CaptureManager, LocalPod


class FakeAttacher:
    def __init__(self) -> None:
        self.attached: dict[Path, bool] = {}  # cgroup -> strict
        self.calls: list[tuple[str, Path]] = []
        self.fail: set[Path] = set()

    def attach_pod(self, cgroup: Path, strict: bool) -> list[str]:
        self.calls.append(("attach", cgroup))
        if cgroup in self.fail:
            raise OSError(2, "No such file or directory")
        changed = self.attached.get(cgroup) != strict
        self.attached[cgroup] = strict
        return ["attached"] if changed else []

    def detach_pod(self, cgroup: Path) -> list[str]:
        self.calls.append(("detach", cgroup))
        return ["detached"] if self.attached.pop(cgroup, None) is not None else []

    plaintext: dict[str, object]
    writes = 0

    def set_plaintext(self, pod_ip: str, table: object) -> bool:
        if not hasattr(self, "plaintext"):
            self.plaintext = {}
        self.writes += 1
        if table is None:
            self.plaintext.pop(pod_ip, None)
        else:
            self.plaintext[pod_ip] = table
        return True


def pod(name: str, tmp: Path, captured: bool = True, strict: bool = False) -> LocalPod:
    cg = tmp / "cg" / name
    cg.mkdir(parents=True, exist_ok=True)
    return LocalPod(name, "default", "10.0.0.1", "sa", cg, captured, strict)


@pytest.fixture
def env(tmp_path: Path):
    fake = FakeAttacher()
    agent_cg = tmp_path / "cg" / "weft-agent"
    agent_cg.mkdir(parents=True)
    mgr = CaptureManager(fake, tmp_path / "attached.json", protected=[agent_cg])
    return fake, mgr, tmp_path


def test_add_keep_delete(env):
    fake, mgr, tmp = env
    a, b = pod("a", tmp), pod("b", tmp)
    mgr.apply([a, b])
    assert set(fake.attached) == {a.cgroup, b.cgroup}
    mgr.apply([a, b])  # keep: idempotent
    assert set(fake.attached) == {a.cgroup, b.cgroup}
    mgr.apply([a])  # b left the node
    assert set(fake.attached) == {a.cgroup}
    assert set(mgr.captured) == {"default/a"}


def test_label_removed_detaches_and_strict_toggles(env):
    fake, mgr, tmp = env
    mgr.apply([pod("a", tmp)])
    mgr.apply([pod("a", tmp, strict=True)])
    assert fake.attached[tmp / "cg" / "a"] is True
    mgr.apply([pod("a", tmp, captured=False)])
    assert fake.attached == {}
    assert mgr.captured == {}


def test_restart_converges_and_releases_what_an_earlier_instance_attached(env):
    fake, mgr, tmp = env
    gone = tmp / "cg" / "gone"
    gone.mkdir(parents=True)
    fake.attached[gone] = False  # attached by the previous agent; the pod then left
    (tmp / "attached.json").write_text(json.dumps({"cgroups": [str(gone)]}))
    uncaptured = pod("u", tmp, captured=False)
    fake.attached[uncaptured.cgroup] = False  # label removed while the agent was down
    mgr.apply([pod("a", tmp), uncaptured])
    assert set(fake.attached) == {tmp / "cg" / "a"}
    assert json.loads((tmp / "attached.json").read_text()) == {"cgroups": [str(tmp / "cg" / "a")]}


def test_one_failing_pod_does_not_stop_the_others_and_is_retried(env):
    fake, mgr, tmp = env
    a, b = pod("a", tmp), pod("b", tmp)
    fake.fail.add(a.cgroup)
    mgr.apply([a, b])
    assert set(fake.attached) == {b.cgroup}
    assert "attach to" in mgr.errors["default/a"]
    fake.fail.clear()
    mgr.apply([a, b])
    assert set(fake.attached) == {a.cgroup, b.cgroup}
    assert mgr.errors == {}


def test_the_proxys_own_cgroup_is_never_captured(env):
    fake, mgr, tmp = env
    inside = LocalPod("x", "default", "10.0.0.9", "sa", tmp / "cg" / "weft-agent", True, False)
    mgr.apply([inside])
    assert fake.attached == {}
    assert "loop" in mgr.errors["default/x"]


def test_tcp_port_listening_parses_proc_net_tcp(tmp_path: Path):
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   1: 0B01F40A:9C40 0201F40A:1F90 01 00000000:00000000 00:00000000 00000000     0\n"
    )
    f = tmp_path / "tcp"
    f.write_text(text)
    assert tcp_port_listening(15001, f)
    assert not tcp_port_listening(40000, f)  # established, not listening
    assert not tcp_port_listening(15020, f)
    assert not tcp_port_listening(15001, tmp_path / "missing")


def test_a_strict_pods_plaintext_verdicts_are_written_when_they_change(tmp_path: Path) -> None:
    import ipaddress

    from weft.policy.plaintext import Entry

    cg = tmp_path / "p"
    cg.mkdir()
    attacher = FakeAttacher()
    mgr = CaptureManager(attacher, tmp_path / "attached.json")
    table = (Entry(0, ipaddress.IPv4Network("0.0.0.0/0"), False),
             Entry(0, ipaddress.IPv4Network("10.1.0.0/16"), True))  # fmt: skip
    pod = LocalPod("p", "shop", "10.244.1.5", "sa", cg, True, True, table)
    mgr.apply([pod])
    assert attacher.plaintext == {"10.244.1.5": table} and attacher.writes == 1
    mgr.apply([pod])
    assert attacher.writes == 1  # unchanged: not written again
    mgr.apply([LocalPod("p", "shop", "10.244.1.5", "sa", cg, True, True, table[:1])])
    assert attacher.plaintext == {"10.244.1.5": table[:1]}
    mgr.apply([LocalPod("p", "shop", "10.244.1.5", "sa", cg, True, False, table)])
    assert attacher.plaintext == {}  # permissive: no filter, no table
    mgr.apply([pod])
    mgr.apply([])
    assert attacher.plaintext == {}  # released
