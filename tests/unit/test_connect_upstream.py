"""The outbound connect as the agent composes it (`MeshUpstreams`: resolve -> balance +
failover -> dial): endpoint choice, retry on connect failure, ejection, the retry
budget and health bookkeeping — with the dial stage faked (no sockets)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from nodeagent.agent import Agent, AgentConfig
from nodeagent.metrics import ConnLabels
from nodeagent.proxy.dial import Dialed
from nodeagent.proxy.outbound import Upstream
from nodeagent.proxy.resolve import Hop, NoRoute
from nodeagent.proxy.retry import RetryBudget
from nodeagent.proxy.tunnel import TunnelOverloaded
from tests.agentenv import kube_env
from weft.identity import SpiffeId
from weft.mesh import Endpoint, InboundMode, Service, ServicePort, Workload
from weft.meshwire import SnapshotMsg

VIP = ("10.96.0.10", 80)


def _workload(i: int) -> Workload:
    return Workload(
        uid=f"uid-{i}", name=f"echo-{i}", namespace="default", node="worker-1",
        node_ip="192.0.2.1", ips=(f"10.244.1.{i}",), service_account="echo",
        identity=SpiffeId.workload("default", "echo"), captured=True,
        inbound_mode=InboundMode.PERMISSIVE,
    )  # fmt: skip


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    env = kube_env(tmp_path)
    a = Agent(AgentConfig.for_kubernetes(env))
    pods = [_workload(i) for i in (2, 3, 4)]
    svc = Service(
        name="echo", namespace="default", vips=(VIP[0],), ports=(ServicePort(80, 8080),),
        endpoints=tuple(Endpoint(p.ips[0], p.uid, True) for p in pods),
    )  # fmt: skip
    a.mesh.apply(SnapshotMsg("e", 1, tuple(pods), (svc,)))
    return a


class FakeTransport(asyncio.Transport):
    pass


def _fake_hops(agent: Agent, down: set[str], calls: list[str]) -> None:
    async def dial(source, hop: Hop, factory):
        calls.append(hop.address[0])
        if hop.address[0] in down:
            raise ConnectionRefusedError("refused")
        labels = ConnLabels("outbound", "c", "default", "e", "default", "true", "a", "b")
        return Dialed(FakeTransport(), labels)

    agent.dialer.dial = dial  # type: ignore[method-assign,assignment]


def _failures(agent: Agent, service: str) -> float:
    value = agent.registry.get_sample_value(
        "weft_outbound_endpoint_failures_total", {"service": service, "retried": "true"}
    )
    return value or 0.0


async def test_a_refused_endpoint_is_retried_on_another_then_ejected(agent: Agent):
    agent.balancer.rng = random.Random(7)
    calls: list[str] = []
    down = {"10.244.1.2", "10.244.1.3"}
    _fake_hops(agent, down, calls)
    for _ in range(20):  # every connection succeeds, on the one healthy endpoint
        up = await agent.upstreams(("10.244.1.9", 5000), VIP, asyncio.Protocol)
        assert isinstance(up, Upstream) and up.done is not None
        up.done()
    assert calls.count("10.244.1.4") == 20
    for ip in down:
        # Tried until three consecutive failures ejected it, then left alone (the fake
        # clock does not advance past the 1 s ejection in this test).
        assert calls.count(ip) <= 3
        if calls.count(ip) == 3:
            assert agent.balancer.state((ip, 8080)) == "ejected"
    assert _failures(agent, "default/echo") == sum(calls.count(ip) for ip in down)
    assert all(h.outstanding == 0 for h in agent.balancer.health.values())


async def test_all_endpoints_down_fails_after_bounded_attempts(agent: Agent):
    calls: list[str] = []
    _fake_hops(agent, {"10.244.1.2", "10.244.1.3", "10.244.1.4"}, calls)
    with pytest.raises(ConnectionRefusedError):
        await agent.upstreams(("10.244.1.9", 5000), VIP, asyncio.Protocol)
    assert len(calls) == 3 and len(set(calls)) == 3  # each endpoint once, no more
    assert all(h.outstanding == 0 for h in agent.balancer.health.values())


async def test_direct_destinations_are_tried_once_and_not_tracked(agent: Agent):
    calls: list[str] = []
    _fake_hops(agent, {"203.0.113.5"}, calls)
    with pytest.raises(ConnectionRefusedError):
        await agent.upstreams(("10.244.1.9", 5000), ("203.0.113.5", 443), asyncio.Protocol)
    assert calls == ["203.0.113.5"]
    assert agent.balancer.health == {}  # no entry per address an app dials


async def test_a_policy_refusal_is_not_retried_and_holds_no_probation_slot(agent: Agent):
    calls: list[str] = []

    async def refuse(source, hop, factory, **_):
        calls.append(hop.address[0])
        raise NoRoute("strict source")

    agent.dialer.dial = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(NoRoute):
        await agent.upstreams(("10.244.1.9", 5000), VIP, asyncio.Protocol)
    assert len(calls) == 1
    assert all(not h.probing and h.outstanding == 0 for h in agent.balancer.health.values())


async def test_local_overload_is_neither_retried_nor_held_against_the_endpoint(agent: Agent):
    calls: list[str] = []

    async def overloaded(source, hop, factory, **_):
        calls.append(hop.address[0])
        raise TunnelOverloaded("waited 30s for one of 32 handshake slots on this node")

    agent.dialer.dial = overloaded  # type: ignore[method-assign,assignment]
    for _ in range(5):  # more than the ejection threshold
        with pytest.raises(TunnelOverloaded):
            await agent.upstreams(("10.244.1.9", 5000), VIP, asyncio.Protocol)
    assert len(calls) == 5  # one attempt each: another endpoint would queue the same
    assert all(h.failures == 0 and h.ejections == 0 for h in agent.balancer.health.values())
    assert all(h.outstanding == 0 for h in agent.balancer.health.values())
    assert _failures(agent, "default/echo") == 0


async def test_failovers_stop_when_the_retry_budget_is_spent(agent: Agent):
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, ttl=10)  # 2 retries
    agent.retry_budget = agent.upstreams.failover.budget = budget
    calls: list[str] = []
    _fake_hops(agent, {"10.244.1.2", "10.244.1.3", "10.244.1.4"}, calls)
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            await agent.upstreams(("10.244.1.9", 5000), VIP, asyncio.Protocol)
    # The first connection fails over twice (the whole budget); the next two get their
    # first attempt only: 5 attempts, not 3 x 3.
    assert len(calls) == 5
    assert agent.retry_budget.skipped == 2
    assert all(h.outstanding == 0 for h in agent.balancer.health.values())
