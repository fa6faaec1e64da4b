"""The agent's copy of discovery (nodeagent.meshstate), in memory.

A snapshot then deltas keep the indexes the data path reads (address → workload,
VIP:port → service port, node → workloads) in step with the items; a message that does
not follow the held position raises :class:`StreamGap` and leaves everything as it was;
watchers wake on every applied change and only then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nodeagent.meshstate import MeshState, StreamGap, VipTarget
from weft.identity import SpiffeId
from weft.mesh import (
    Delta,
    Endpoint,
    InboundMode,
    Kind,
    Service,
    ServicePort,
    Workload,
)
from weft.meshwire import DeltasMsg, HeartbeatMsg, SnapshotMsg


def workload(name: str, *ips: str, node: str = "node-1", ns: str = "shop") -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        node=node,
        ips=ips,
        service_account="default",
        identity=SpiffeId.workload(ns, "default"),
        captured=True,
        inbound_mode=InboundMode.PERMISSIVE,
    )


def service(
    name: str, vips: tuple[str, ...] = ("10.96.0.10",), ports: tuple[int, ...] = (80,),
    *endpoints: str,
) -> Service:  # fmt: skip
    return Service(
        name=name,
        namespace="shop",
        vips=vips,
        ports=tuple(ServicePort(p, 8080) for p in ports),
        endpoints=tuple(Endpoint(a, None) for a in endpoints),
    )


def wdelta(revision: int, key: str, value: Workload | None) -> Delta:
    return Delta(revision, Kind.WORKLOAD, key, value)


def sdelta(revision: int, key: str, value: Service | None) -> Delta:
    return Delta(revision, Kind.SERVICE, key, value)


WEB = workload("web", "10.244.1.2", "fd00::2")
DB = workload("db", "10.244.2.3", node="node-2")
API = service("api", ("10.96.0.10", "fd00:96::10"), (80, 443), "10.244.1.2")


@pytest.fixture
def state() -> MeshState:
    s = MeshState()
    assert s.apply(SnapshotMsg("e1", 10, (WEB, DB), (API,))) == 3
    return s


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    assert not leaked, "tasks leaked: " + ", ".join(sorted(t.get_name() for t in leaked))


def fingerprint(s: MeshState) -> tuple[object, ...]:
    """Everything observable about a state, to check that a refusal changed nothing."""
    ips = ["10.244.1.2", "fd00::2", "10.244.2.3", "10.244.9.9"]
    vips = [(v, p) for v in ("10.96.0.10", "fd00:96::10", "10.96.0.20") for p in (80, 443)]
    return (
        s.epoch,
        s.revision,
        s.version,
        dict(s.workloads),
        dict(s.services),
        [s.workload_at(ip) for ip in ips],
        [s.vip(*v) for v in vips],
    )


# -- snapshot ----------------------------------------------------------------------------


def test_a_fresh_state_is_empty_and_not_synced() -> None:
    s = MeshState()
    assert not s.synced
    assert s.resume_point() == (None, None)
    assert s.version == 0
    assert s.workload_at("10.244.1.2") is None
    assert s.vip("10.96.0.10", 80) is None
    assert s.on_node("node-1") == []


def test_a_snapshot_indexes_everything(state: MeshState) -> None:
    assert state.synced
    assert state.resume_point() == ("e1", 10)
    assert state.version == 1
    assert state.workload_at("10.244.1.2") is WEB
    assert state.workload_at("fd00::2") is WEB
    assert state.workload_at("10.244.2.3") is DB
    assert state.workload_at("10.96.0.10") is None
    for vip in API.vips:
        assert state.vip(vip, 80) == VipTarget(API, API.ports[0])
        assert state.vip(vip, 443) == VipTarget(API, API.ports[1])
        assert state.is_vip(vip)
    assert state.vip("10.96.0.10", 8080) is None  # target ports are not VIP ports
    assert not state.is_vip("10.244.1.2")
    assert state.on_node("node-1") == [WEB]
    assert state.on_node("node-2") == [DB]
    assert state.on_node("node-3") == []
    assert state.workloads == {WEB.key: WEB, DB.key: DB}
    assert state.services == {API.key: API}


def test_a_new_snapshot_replaces_the_state_and_counts_what_changed(state: MeshState) -> None:
    moved = workload("web", "10.244.1.7")
    other = service("other", ("10.96.0.20",), (80,))
    # web changed, db gone, api unchanged, other new: three changes.
    assert state.apply(SnapshotMsg("e2", 3, (moved,), (API, other))) == 3
    assert state.resume_point() == ("e2", 3)  # a snapshot may go back: a new epoch
    assert state.version == 2
    assert state.workload_at("10.244.1.2") is None
    assert state.workload_at("fd00::2") is None
    assert state.workload_at("10.244.2.3") is None
    assert state.workload_at("10.244.1.7") is moved
    assert state.on_node("node-2") == []
    assert state.vip("10.96.0.20", 80) == VipTarget(other, other.ports[0])
    assert state.vip("10.96.0.10", 443) == VipTarget(API, API.ports[1])


def test_the_same_snapshot_again_changes_nothing_but_still_bumps(state: MeshState) -> None:
    assert state.apply(SnapshotMsg("e1", 10, (WEB, DB), (API,))) == 0
    assert state.version == 2
    assert state.workload_at("10.244.1.2") is WEB


def test_a_snapshot_is_accepted_after_forgetting_the_position(state: MeshState) -> None:
    state.forget_position()
    state.apply(SnapshotMsg("e9", 1, (), ()))
    assert state.resume_point() == ("e9", 1)
    assert state.workloads == {}
    assert state.workload_at("10.244.1.2") is None
    assert not state.is_vip("10.96.0.10")


# -- deltas ------------------------------------------------------------------------------


def test_deltas_add_update_and_delete_workloads(state: MeshState) -> None:
    cache = workload("cache", "10.244.1.9")
    assert state.apply(DeltasMsg("e1", (wdelta(11, cache.key, cache),))) == 1
    assert state.resume_point() == ("e1", 11)
    assert state.version == 2
    assert state.workload_at("10.244.1.9") is cache
    assert state.on_node("node-1") == [WEB, cache]

    moved = workload("cache", "10.244.3.4", node="node-2")
    state.apply(DeltasMsg("e1", (wdelta(12, cache.key, moved),)))
    assert state.workload_at("10.244.1.9") is None
    assert state.workload_at("10.244.3.4") is moved
    assert state.on_node("node-1") == [WEB]
    assert state.on_node("node-2") == [DB, moved]

    state.apply(DeltasMsg("e1", (wdelta(13, cache.key, None),)))
    assert state.workload_at("10.244.3.4") is None
    assert cache.key not in state.workloads
    assert state.on_node("node-2") == [DB]
    assert state.resume_point() == ("e1", 13)
    assert state.version == 4


def test_several_deltas_in_one_message(state: MeshState) -> None:
    api2 = service("api", ("10.96.0.10",), (8443,))
    msg = DeltasMsg(
        "e1",
        (
            wdelta(11, WEB.key, None),
            wdelta(12, DB.key, None),
            sdelta(13, API.key, api2),
        ),
    )
    assert state.apply(msg) == 3
    assert state.resume_point() == ("e1", 13)
    assert state.version == 2  # one bump per message
    assert state.workloads == {}
    assert state.workload_at("10.244.1.2") is None
    assert state.workload_at("10.244.2.3") is None
    assert state.vip("10.96.0.10", 80) is None
    assert state.vip("fd00:96::10", 443) is None
    assert not state.is_vip("fd00:96::10")
    assert state.vip("10.96.0.10", 8443) == VipTarget(api2, api2.ports[0])


def test_a_service_update_unindexes_its_old_vips_and_ports(state: MeshState) -> None:
    api2 = service("api", ("10.96.0.30",), (443,))
    state.apply(DeltasMsg("e1", (sdelta(11, API.key, api2),)))
    for vip in API.vips:
        assert state.vip(vip, 80) is None
        assert state.vip(vip, 443) is None
        assert not state.is_vip(vip)
    assert state.vip("10.96.0.30", 443) == VipTarget(api2, api2.ports[0])
    assert state.services == {API.key: api2}


def test_deleting_a_service_unindexes_it(state: MeshState) -> None:
    state.apply(DeltasMsg("e1", (sdelta(11, API.key, None),)))
    assert state.services == {}
    for vip in API.vips:
        assert not state.is_vip(vip)
        assert state.vip(vip, 80) is None


def test_deleting_an_unknown_key_is_harmless(state: MeshState) -> None:
    version, before = state.version, fingerprint(state)[3:]
    state.apply(DeltasMsg("e1", (wdelta(11, "uid-nobody", None), sdelta(12, "shop/x", None))))
    assert fingerprint(state)[3:] == before  # only the position and version moved
    assert state.resume_point() == ("e1", 12)
    assert state.version == version + 1


def test_deleting_an_old_pod_keeps_its_address_for_the_new_pod(state: MeshState) -> None:
    # The replacement pod got web's address before web's deletion arrived.
    new = workload("web-new", "10.244.1.2")
    state.apply(DeltasMsg("e1", (wdelta(11, new.key, new),)))
    assert state.workload_at("10.244.1.2") is new
    state.apply(DeltasMsg("e1", (wdelta(12, WEB.key, None),)))
    assert state.workload_at("10.244.1.2") is new
    assert state.workload_at("fd00::2") is None  # web's other address is gone


def test_deleting_the_indexed_claimant_hands_the_address_to_the_other() -> None:
    old = workload("old", "10.244.1.2")
    new = workload("new", "10.244.1.2", "10.244.1.3")
    s = MeshState()
    s.apply(SnapshotMsg("e1", 1, (new, old), ()))
    assert s.workload_at("10.244.1.2") is old  # the last one in the snapshot wins
    s.apply(DeltasMsg("e1", (wdelta(2, old.key, None),)))
    assert s.workload_at("10.244.1.2") is new
    assert s.workload_at("10.244.1.3") is new
    s.apply(DeltasMsg("e1", (wdelta(3, new.key, None),)))
    assert s.workload_at("10.244.1.2") is None
    assert s.workload_at("10.244.1.3") is None


def test_deleting_a_claimant_that_is_not_indexed_keeps_the_current_one() -> None:
    a, b, c = (workload(n, "10.244.1.2") for n in "abc")
    s = MeshState()
    s.apply(SnapshotMsg("e1", 1, (a, b, c), ()))
    assert s.workload_at("10.244.1.2") is c
    s.apply(DeltasMsg("e1", (wdelta(2, a.key, None),)))
    assert s.workload_at("10.244.1.2") is c  # not handed to b on the way


def test_an_update_that_drops_a_shared_address_hands_it_over() -> None:
    a = workload("a", "10.244.1.2")
    b = workload("b", "10.244.1.2")
    s = MeshState()
    s.apply(SnapshotMsg("e1", 1, (a, b), ()))
    assert s.workload_at("10.244.1.2") is b
    b2 = workload("b", "10.244.1.8")
    s.apply(DeltasMsg("e1", (wdelta(2, b.key, b2),)))
    assert s.workload_at("10.244.1.2") is a
    assert s.workload_at("10.244.1.8") is b2


# -- gaps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        DeltasMsg("e1", (wdelta(1, WEB.key, WEB),)),
        HeartbeatMsg("e1", 0),
    ],
    ids=["deltas", "heartbeat"],
)
def test_nothing_but_a_snapshot_is_accepted_first(msg: DeltasMsg | HeartbeatMsg) -> None:
    s = MeshState()
    with pytest.raises(StreamGap, match="need a snapshot"):
        s.apply(msg)
    assert not s.synced
    assert s.workloads == {}
    assert s.version == 0


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        (DeltasMsg("e2", (wdelta(11, WEB.key, None),)), "epoch e2 while holding e1/10"),
        (HeartbeatMsg("e2", 10), "epoch e2 while holding e1/10"),
        (
            DeltasMsg("e1", (wdelta(12, WEB.key, None),)),
            "deltas start at 12, we are at revision 10",
        ),
        (
            DeltasMsg("e1", (wdelta(10, WEB.key, None),)),
            "deltas start at 10, we are at revision 10",
        ),
        (DeltasMsg("e1", (wdelta(3, WEB.key, None),)), "deltas start at 3, we are at revision 10"),
        (HeartbeatMsg("e1", 9), "heartbeat at revision 9, we are at 10"),
        (HeartbeatMsg("e1", 11), "heartbeat at revision 11, we are at 10"),
    ],
    ids=[
        "deltas-other-epoch",
        "heartbeat-other-epoch",
        "skipped-revision",
        "repeated-revision",
        "old-revision",
        "heartbeat-behind",
        "heartbeat-ahead",
    ],
)
def test_a_message_that_does_not_follow_is_a_gap_and_changes_nothing(
    state: MeshState, msg: DeltasMsg | HeartbeatMsg, error: str
) -> None:
    before = fingerprint(state)
    with pytest.raises(StreamGap, match=error):
        state.apply(msg)
    assert fingerprint(state) == before


def test_a_heartbeat_at_our_revision_changes_nothing(state: MeshState) -> None:
    before = fingerprint(state)
    assert state.apply(HeartbeatMsg("e1", 10)) == 0
    assert fingerprint(state) == before


def test_forget_position_keeps_serving_but_wants_a_snapshot(state: MeshState) -> None:
    state.forget_position()
    assert not state.synced
    assert state.resume_point() == (None, None)
    # The data path keeps the last state it had.
    assert state.workload_at("10.244.1.2") is WEB
    assert state.vip("10.96.0.10", 80) == VipTarget(API, API.ports[0])
    assert state.on_node("node-2") == [DB]
    # Even the deltas that would have followed are now refused.
    with pytest.raises(StreamGap):
        state.apply(DeltasMsg("e1", (wdelta(11, WEB.key, None),)))
    with pytest.raises(StreamGap):
        state.apply(HeartbeatMsg("e1", 10))
    assert state.workload_at("10.244.1.2") is WEB


# -- watchers ----------------------------------------------------------------------------


async def settle() -> None:
    """Let every ready task run (no timers involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_wait_change_returns_at_once_when_already_past(
    state: MeshState, no_leaked_tasks: None
) -> None:
    assert await state.wait_change(0) == 1


async def test_wait_change_wakes_on_the_next_applied_change(
    state: MeshState, no_leaked_tasks: None
) -> None:
    seen = state.version
    waiters = [asyncio.create_task(state.wait_change(seen), name=f"w{i}") for i in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)

    state.apply(HeartbeatMsg("e1", 10))  # not a change
    with pytest.raises(StreamGap):
        state.apply(HeartbeatMsg("e1", 11))  # refused: not a change either
    await settle()
    assert not any(w.done() for w in waiters)

    state.apply(DeltasMsg("e1", (wdelta(11, WEB.key, None),)))
    assert await asyncio.gather(*waiters) == [seen + 1] * 3


async def test_wait_change_wakes_on_a_snapshot(no_leaked_tasks: None) -> None:
    s = MeshState()
    waiter = asyncio.create_task(s.wait_change(0), name="waiter")
    await settle()
    assert not waiter.done()
    s.apply(SnapshotMsg("e1", 0, (), ()))
    assert await waiter == 1


async def test_wait_change_keeps_waiting_for_a_version_past_seen(
    state: MeshState, no_leaked_tasks: None
) -> None:
    waiter = asyncio.create_task(state.wait_change(2), name="waiter")
    await settle()
    state.apply(DeltasMsg("e1", (wdelta(11, WEB.key, None),)))  # version 2: not past 2
    await settle()
    assert not waiter.done()
    state.apply(DeltasMsg("e1", (wdelta(12, DB.key, None),)))
    assert await waiter == 3


async def test_a_watcher_loop_sees_every_change_once_or_coalesced(
    state: MeshState, no_leaked_tasks: None
) -> None:
    seen_versions: list[int] = []

    async def watch() -> None:
        seen = state.version
        while seen < 4:
            seen = await state.wait_change(seen)
            seen_versions.append(seen)

    watcher = asyncio.create_task(watch(), name="watcher")
    await settle()
    state.apply(DeltasMsg("e1", (wdelta(11, WEB.key, None),)))
    await settle()
    state.apply(DeltasMsg("e1", (wdelta(12, DB.key, None),)))
    state.apply(DeltasMsg("e1", (sdelta(13, API.key, None),)))  # two before it runs
    await watcher
    assert seen_versions == [2, 4]
