"""When the agent starts serving captured connections (nodeagent.agent._become_ready):
never before discovery and capture; after a crash, certificates get a grace period and
then what is held is served; in make-before-break, everything is waited for."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from nodeagent.agent import Agent, AgentConfig
from tests.agentenv import kube_env
from weft.identity import SpiffeId

ECHO = SpiffeId.workload("default", "echo")


class NoCerts:
    identities = frozenset({ECHO})

    def material(self, identity: SpiffeId) -> None:
        return None


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    env = kube_env(tmp_path)
    a = Agent(AgentConfig.for_kubernetes(env, ready_wait=0.4))
    a.certs = NoCerts()  # type: ignore[assignment]
    return a


async def test_nothing_is_served_before_discovery_and_capture(agent: Agent):
    agent.readiness.done("listener")
    agent.readiness.done("certificates")
    task = asyncio.create_task(agent._become_ready([], asyncio.Event(), listen_early=True))
    await asyncio.sleep(0.3)
    assert not any(h.is_open for h in agent.holds.values())  # "ebpf" and "pods" pending
    agent.readiness.done("ebpf")
    agent.readiness.done("pods")
    await asyncio.wait_for(task, 5)
    assert all(h.is_open for h in agent.holds.values())


async def test_after_a_crash_a_missing_certificate_delays_serving_only_for_a_while(
    agent: Agent, caplog: pytest.LogCaptureFixture
):
    for name in ("listener", "ebpf", "pods"):
        agent.readiness.done(name)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(agent._become_ready([], asyncio.Event(), listen_early=True), 5)
    assert loop.time() - started >= 0.2 - 0.01  # half of ready_wait
    assert all(h.is_open for h in agent.holds.values())
    assert "no certificate yet for spiffe://cluster.local/ns/default/sa/echo" in caplog.text
    assert not agent.readiness.ready  # /ready still says so


async def test_make_before_break_waits_for_certificates_too(agent: Agent):
    for name in ("ebpf", "pods"):
        agent.readiness.done(name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    listening = asyncio.Event()
    task = asyncio.create_task(agent._become_ready([sock], listening, listen_early=False))
    try:
        await asyncio.sleep(0.6)  # past any grace: the old agent is still serving
        assert not listening.is_set() and not any(h.is_open for h in agent.holds.values())
        agent.readiness.done("certificates")
        await asyncio.wait_for(task, 5)
        assert listening.is_set() and agent.readiness.ready
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)  # listening now
        client.close()
    finally:
        sock.close()


def test_the_readiness_marker_is_written_when_ready_and_removed_at_start(tmp_path: Path):
    """``WEFT_READY_FILE``: what the DaemonSet's exec readiness probe tests (the admin
    port is shared with the previous agent during a rollout)."""
    marker = tmp_path / "ready"
    marker.write_text("{}")  # a previous container's, in the same pod's volume
    env = {**kube_env(tmp_path), "WEFT_READY_FILE": str(marker)}
    a = Agent(AgentConfig.for_kubernetes(env))
    assert not marker.exists()
    for name in sorted(a.readiness.blockers):
        a.readiness.done(name)
    assert marker.exists() and '"pid"' in marker.read_text()
    a._unmark_ready()
    assert not marker.exists()
