"""The data path's stages alone (nodeagent/proxy: failover, dial, flow, switch, the
balancer lease), each with fakes for its neighbours; the composition is tested in
tests/unit/test_connect_upstream.py and over sockets in tests/sockets."""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any

import pytest

from nodeagent.proxy.balance import Balancer
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover
from nodeagent.proxy.flow import PEER_BLOCKED, PEER_CONNECTING, FlowControl
from nodeagent.proxy.listener import Address
from nodeagent.proxy.resolve import Hop, NoRoute
from nodeagent.proxy.retry import RetryBudget
from nodeagent.proxy.stage import Accepted
from nodeagent.proxy.switch import OPAQUE, ProtocolSwitch
from nodeagent.proxy.tunnel import TunnelOverloaded
from weft.identity import SpiffeId
from weft.mesh import InboundMode, Workload

EPS: list[Address] = [("10.244.1.2", 8080), ("10.244.1.3", 8080), ("10.244.1.4", 8080)]


class Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[Address, bool, bool]] = []

    def failed(
        self, endpoint: Address, error: BaseException, *, retrying: bool, ejected: bool
    ) -> None:
        self.seen.append((endpoint, retrying, ejected))


def failover(attempts: int = 3, budget: RetryBudget | None = None) -> Failover:
    return Failover(
        attempts=attempts,
        budget=budget or RetryBudget(),
        balancer=Balancer(rng=random.Random(3)),
    )


# --- balance: the lease ----------------------------------------------------------------------


def test_a_lease_counts_the_connection_until_released_once() -> None:
    b: Balancer[str] = Balancer(rng=random.Random(1))
    lease = b.lease(["a"])
    assert lease is not None and b.health["a"].outstanding == 1
    lease.succeed()
    lease.release()
    lease.release()  # idempotent
    assert b.health["a"].outstanding == 0


def test_a_failed_lease_is_released_and_counted() -> None:
    b: Balancer[str] = Balancer(rng=random.Random(1))
    for _ in range(2):
        lease = b.lease(["a"])
        assert lease is not None and not lease.fail()
    lease = b.lease(["a"])
    assert lease is not None and lease.fail()  # the third in a row ejects
    assert b.health["a"].outstanding == 0 and b.state("a") == "ejected"


def test_no_lease_when_every_candidate_is_excluded() -> None:
    assert Balancer[str]().lease(["a"], exclude=["a"]) is None


# --- failover --------------------------------------------------------------------------------


async def test_failover_tries_other_endpoints_and_reports_each_failure() -> None:
    f, seen, tried = failover(), Observer(), []

    async def dial(ep: Address) -> str:
        tried.append(ep)
        if len(tried) < 3:
            raise ConnectionRefusedError("refused")
        return "up"

    got = await f.connect(EPS, dial, balanced=True, observer=seen)
    assert got.value == "up" and got.endpoint == tried[-1] and len(set(tried)) == 3
    assert [(r, e) for _, r, e in seen.seen] == [(True, False), (True, False)]
    assert got.lease is not None
    got.lease.release()
    assert all(h.outstanding == 0 for h in f.balancer.health.values())


async def test_failover_stops_at_the_attempt_limit_with_the_last_error() -> None:
    f, seen = failover(attempts=2), Observer()

    async def dial(ep: Address) -> str:
        raise ConnectionRefusedError(f"refused by {ep[0]}")

    with pytest.raises(ConnectionRefusedError):
        await f.connect(EPS, dial, balanced=True, observer=seen)
    assert [r for _, r, _ in seen.seen] == [True, False]


@pytest.mark.parametrize(
    "error", [NoRoute("strict source"), TunnelOverloaded("this node's queue is full")]
)
async def test_failures_every_endpoint_would_repeat_are_not_retried(error: Exception) -> None:
    f, seen, tried = failover(), Observer(), []

    async def dial(ep: Address) -> str:
        tried.append(ep)
        raise error

    with pytest.raises(type(error)):
        await f.connect(EPS, dial, balanced=True, observer=seen)
    assert len(tried) == 1 and seen.seen == []
    assert all(h.failures == 0 and h.outstanding == 0 for h in f.balancer.health.values())


async def test_a_direct_address_gets_one_attempt_and_no_health_entry() -> None:
    f, tried = failover(), []

    async def dial(ep: Address) -> str:
        tried.append(ep)
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        await f.connect([("203.0.113.5", 443)], dial, balanced=False, observer=Observer())
    assert tried == [("203.0.113.5", 443)] and f.balancer.health == {}


async def test_retries_stop_when_the_budget_is_spent() -> None:
    f = failover(budget=RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10))  # 1 retry

    async def dial(ep: Address) -> str:
        raise ConnectionRefusedError("refused")

    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            await f.connect(EPS, dial, balanced=True, observer=Observer())
    assert f.budget.skipped == 2  # first connect: 1 retry then none; second: none


# --- dial ------------------------------------------------------------------------------------


def workload(name: str, *, captured: bool, strict: bool = False) -> Workload:
    return Workload(
        uid=name, name=name, namespace="shop", node="n1", node_ip="192.0.2.1",
        ips=("10.244.1.9",), service_account=name, identity=SpiffeId.workload("shop", name),
        captured=captured,
        inbound_mode=InboundMode.STRICT if strict else InboundMode.PERMISSIVE,
    )  # fmt: skip


class FakeTunnel:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def connect(self, *args: Any) -> asyncio.BaseTransport:
        self.calls.append(args[:4])
        return asyncio.Transport()


async def test_a_captured_destination_goes_through_the_tunnel_as_the_source() -> None:
    tunnel = FakeTunnel()
    dialer = Dialer(tunnel=tunnel, attempt_timeout=1.0)  # type: ignore[arg-type]
    src, dst = workload("web", captured=True), workload("api", captured=True)
    dialed = await dialer.dial(src, Hop(("10.244.2.7", 8080), dst), asyncio.Protocol)
    assert tunnel.calls == [(src.identity, ("192.0.2.1", 15008), ("10.244.2.7", 8080),
                             dst.identity)]  # fmt: skip
    assert dialed.labels.tls == "true" and dialed.labels.server_id == str(dst.identity)


async def test_a_strict_source_is_refused_plaintext() -> None:
    dialer = Dialer(tunnel=FakeTunnel(), attempt_timeout=1.0)  # type: ignore[arg-type]
    src = workload("web", captured=True, strict=True)
    with pytest.raises(NoRoute, match="strict: refusing plaintext"):
        await dialer.dial(src, Hop(("203.0.113.5", 443), None), asyncio.Protocol)


async def test_an_unknown_source_cannot_use_the_tunnel() -> None:
    dialer = Dialer(tunnel=FakeTunnel(), attempt_timeout=1.0)  # type: ignore[arg-type]
    dst = workload("api", captured=True)
    with pytest.raises(NoRoute, match="not in discovery yet"):
        await dialer.dial(None, Hop(("10.244.2.7", 8080), dst), asyncio.Protocol)


async def test_an_uncaptured_destination_is_plaintext_within_the_attempt_timeout() -> None:
    seen: list[Address] = []

    async def plaintext(app: Address, destination: Address, factory: Any) -> Any:
        seen.append(destination)
        return asyncio.Transport()

    dialer = Dialer(tunnel=FakeTunnel(), attempt_timeout=1.0, plaintext=plaintext)  # type: ignore[arg-type]
    dialed = await dialer.dial(
        workload("web", captured=True), Hop(("10.244.2.8", 80), None), asyncio.Protocol
    )
    assert seen == [("10.244.2.8", 80)] and dialed.labels.tls == "false"

    async def hangs(app: Address, destination: Address, factory: Any) -> Any:
        await asyncio.sleep(10)

    slow = Dialer(tunnel=None, attempt_timeout=0.05, plaintext=hangs)
    with pytest.raises(TimeoutError):
        await slow.dial(None, Hop(("10.244.2.8", 80), None), asyncio.Protocol)


# --- flow control ----------------------------------------------------------------------------


class Reading(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.closing = False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing


def test_reading_resumes_only_when_every_hold_is_released() -> None:
    t = Reading()
    flow = FlowControl(t)
    flow.hold(PEER_CONNECTING)
    flow.hold(PEER_BLOCKED)
    flow.release(PEER_CONNECTING)
    assert [flow.reading, t.calls] == [False, ["pause", "pause", "pause"]]
    flow.release(PEER_BLOCKED)
    assert [flow.reading, t.calls[-1]] == [True, "resume"]


def test_a_finished_transport_is_never_touched_again() -> None:
    t = Reading()
    flow = FlowControl(t)
    flow.finish()
    flow.hold(PEER_BLOCKED)
    flow.release(PEER_BLOCKED)
    assert t.calls == [] and not flow.reading
    closing = Reading()
    closing.closing = True
    FlowControl(closing).hold(PEER_BLOCKED)
    assert closing.calls == []


# --- the protocol switch ---------------------------------------------------------------------


async def test_the_switch_serves_opaque_tcp_today_and_counts_it() -> None:
    served: list[Accepted] = []

    async def opaque(accepted: Accepted) -> None:
        served.append(accepted)

    switch = ProtocolSwitch(opaque=opaque)
    a, b = socket.socketpair()
    try:
        accepted = Accepted(a, ("10.244.1.9", 5000), ("10.96.0.10", 80), "x -> y")
        await switch(accepted)
        assert served == [accepted] and switch.decisions == {OPAQUE: 1}
    finally:
        a.close()
        b.close()
