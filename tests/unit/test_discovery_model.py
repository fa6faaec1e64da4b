"""The discovery model and store: capture inheritance, inbound mode, revisions and deltas."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.discovery.model import (
    CAPTURE_LABEL,
    INBOUND_MODE_KEY,
    Delta,
    DiscoveryStore,
    Endpoint,
    InboundMode,
    Kind,
    Service,
    ServicePort,
    Snapshot,
    Workload,
    inbound_mode,
    is_captured,
)
from weft.identity import SpiffeId


def workload(
    name: str, *, captured: bool = True, ip: str = "10.244.1.2", ns: str = "default"
) -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        node="node-1",
        ips=(ip,),
        service_account="sa",
        identity=SpiffeId.workload(ns, "sa"),
        captured=captured,
        inbound_mode=InboundMode.PERMISSIVE,
    )


def service(name: str, *addresses: str) -> Service:
    return Service(
        name=name,
        namespace="default",
        vips=("10.96.0.10",),
        ports=(ServicePort(80, 8080),),
        endpoints=tuple(Endpoint(a, None) for a in sorted(addresses)),
    )


# -- labels ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "namespace", "captured"),
    [
        (None, None, False),
        ("enabled", None, True),
        (None, "enabled", True),
        ("disabled", "enabled", False),  # the pod opts out of a captured namespace
        ("enabled", "disabled", True),  # the pod opts in whatever its namespace says
        ("bogus", "enabled", True),  # an unknown pod value defers to the namespace
        ("bogus", None, False),
        (None, "disabled", False),
        (None, "bogus", False),
    ],
)
def test_capture_is_inherited_from_the_namespace_unless_the_pod_says(
    pod: str | None, namespace: str | None, captured: bool
) -> None:
    pod_labels = {CAPTURE_LABEL: pod} if pod else {"app": "x"}
    ns_labels = {CAPTURE_LABEL: namespace} if namespace else {}
    assert is_captured(pod_labels, ns_labels) is captured


def test_inbound_mode_annotation_wins_and_unknown_values_fail_closed() -> None:
    assert inbound_mode({}, {}) is InboundMode.PERMISSIVE
    assert inbound_mode({}, {INBOUND_MODE_KEY: "strict"}) is InboundMode.STRICT  # the lab
    assert inbound_mode({INBOUND_MODE_KEY: "strict"}, {}) is InboundMode.STRICT
    assert (
        inbound_mode({INBOUND_MODE_KEY: "permissive"}, {INBOUND_MODE_KEY: "strict"})
        is InboundMode.PERMISSIVE
    )
    assert inbound_mode({INBOUND_MODE_KEY: "Strict"}, {}) is InboundMode.STRICT
    assert inbound_mode({INBOUND_MODE_KEY: ""}, {}) is InboundMode.STRICT


def test_workload_identity_and_key() -> None:
    w = workload("a", ns="shop")
    assert str(w.identity) == "spiffe://cluster.local/ns/shop/sa/sa"
    assert w.key == "uid-a"
    assert not w.strict


def test_service_target_port_numeric_and_named() -> None:
    numeric = ServicePort(80, 8080, name="http")
    named = ServicePort(443, "https", name="tls")
    ep = Endpoint("10.0.0.1", "u", target_ports=(("tls", 8443),))
    other = Endpoint("10.0.0.2", "v")
    svc = Service("s", "default", (), (numeric, named), (ep, other))
    assert svc.target_port(ep, numeric) == 8080
    assert svc.target_port(ep, named) == 8443
    assert svc.target_port(other, named) is None  # does not serve that named port
    assert svc.key == "default/s"


# -- the store ---------------------------------------------------------------------------


def test_every_change_takes_one_revision_in_order() -> None:
    store = DiscoveryStore()
    assert store.revision == 0
    deltas = store.update([workload("a"), workload("b"), service("s", "10.244.1.2")])
    assert [d.revision for d in deltas] == [1, 2, 3]
    assert [(d.kind, d.key) for d in deltas] == [
        (Kind.WORKLOAD, "uid-a"),
        (Kind.WORKLOAD, "uid-b"),
        (Kind.SERVICE, "default/s"),
    ]
    deltas = store.update(deletes=[(Kind.WORKLOAD, "uid-a")])
    assert deltas == [Delta(4, Kind.WORKLOAD, "uid-a", None)]
    assert deltas[0].deleted
    assert store.revision == 4
    assert store.workload("uid-a") is None
    assert store.workload("uid-b") == workload("b")


def test_idempotent_upserts_and_absent_deletes_do_not_bump_the_revision() -> None:
    store = DiscoveryStore()
    store.update([workload("a"), service("s", "10.244.1.2")])
    assert store.update([workload("a"), service("s", "10.244.1.2")]) == []
    assert store.update(deletes=[(Kind.WORKLOAD, "nope"), (Kind.SERVICE, "default/nope")]) == []
    assert store.revision == 2
    # A changed value does take one.
    assert [d.revision for d in store.update([workload("a", captured=False)])] == [3]


def test_deltas_since_resume_and_when_a_snapshot_is_needed() -> None:
    store = DiscoveryStore(history=3, epoch="e1")
    for i in range(5):
        store.update([workload(f"w{i}")])
    assert store.revision == 5
    assert [d.revision for d in store.deltas_since(3) or []] == [4, 5]
    assert store.deltas_since(2, epoch="e1") is not None  # oldest kept is 3
    assert store.deltas_since(5) == []
    assert store.deltas_since(1) is None  # older than the history
    assert store.deltas_since(6) is None  # from the future: another incarnation
    assert store.deltas_since(4, epoch="other") is None  # another replica or a restart
    assert DiscoveryStore().epoch != DiscoveryStore().epoch


def test_snapshot_is_immutable_and_cached_per_revision() -> None:
    store = DiscoveryStore()
    store.update([workload("a")])
    snap = store.snapshot()
    assert store.snapshot() is snap
    with pytest.raises(TypeError):
        snap.workloads["x"] = workload("x")  # type: ignore[index]
    store.update([workload("b")])
    assert set(snap.workloads) == {"uid-a"}  # an old snapshot does not move
    assert set(store.snapshot().workloads) == {"uid-a", "uid-b"}
    assert store.snapshot().revision == 2


def test_replace_diffs_a_full_view() -> None:
    store = DiscoveryStore()
    store.replace([workload("a"), workload("b")], [service("s", "10.244.1.2")])
    deltas = store.replace([workload("b"), workload("c")], [service("s", "10.244.1.3")])
    assert [(d.kind, d.key, d.deleted) for d in deltas] == [
        (Kind.WORKLOAD, "uid-c", False),
        (Kind.SERVICE, "default/s", False),
        (Kind.WORKLOAD, "uid-a", True),
    ]
    assert store.replace([workload("b"), workload("c")], [service("s", "10.244.1.3")]) == []


def test_listeners_get_each_batch_once_and_can_be_removed() -> None:
    store = DiscoveryStore()
    seen: list[Sequence[Delta]] = []
    remove = store.add_listener(seen.append)
    store.update([workload("a"), workload("b")])
    store.update([workload("a")])  # no-op: no call
    remove()
    store.update([workload("c")])
    assert [[d.revision for d in batch] for batch in seen] == [[1, 2]]


def test_a_failing_listener_does_not_starve_the_others_and_is_reported() -> None:
    store = DiscoveryStore()
    seen: list[int] = []

    def broken(batch: Sequence[Delta]) -> None:
        raise RuntimeError("bug")

    store.add_listener(broken)
    store.add_listener(lambda batch: seen.append(len(batch)))
    with pytest.raises(RuntimeError, match="bug"):
        store.update([workload("a")])
    assert seen == [1]
    assert store.revision == 1  # committed all the same


async def test_wait_for_wakes_on_the_next_revision_and_synced_is_explicit() -> None:
    store = DiscoveryStore()
    waiter = asyncio.create_task(store.wait_for(0), name="test: wait_for")
    synced = asyncio.create_task(store.wait_synced(), name="test: wait_synced")
    await asyncio.sleep(0)
    assert not waiter.done()
    store.update([workload("a")])
    assert await asyncio.wait_for(waiter, 1) == 1
    assert [store.synced, synced.done()] == [False, False]
    store.mark_synced()
    await asyncio.wait_for(synced, 1)
    assert store.synced
    assert await asyncio.wait_for(store.wait_for(0), 1) == 1  # already past: no wait


# -- property: snapshot at N + deltas after N == snapshot now ----------------------------

names = st.sampled_from(["a", "b", "c", "d"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("w"), names, st.booleans()),
        st.tuples(st.just("s"), names, st.sets(st.sampled_from(["10.0.0.1", "10.0.0.2"]))),
        st.tuples(st.just("-w"), names),
        st.tuples(st.just("-s"), names),
    ),
    max_size=30,
)


def apply(
    snapshot: Snapshot, deltas: Sequence[Delta]
) -> tuple[dict[str, object], dict[str, object]]:
    workloads: dict[str, object] = dict(snapshot.workloads)
    services: dict[str, object] = dict(snapshot.services)
    for d in deltas:
        table = workloads if d.kind is Kind.WORKLOAD else services
        if d.value is None:
            del table[d.key]
        else:
            table[d.key] = d.value
    return workloads, services


@settings(max_examples=200, deadline=None)
@given(before=operations, after=operations, history=st.integers(1, 40))
def test_snapshot_plus_deltas_reproduces_the_current_state(
    before: list[tuple], after: list[tuple], history: int
) -> None:
    store = DiscoveryStore(history=history)

    def run(ops: list[tuple]) -> None:
        for op in ops:
            if op[0] == "w":
                store.update([workload(op[1], captured=op[2])])
            elif op[0] == "s":
                store.update([service(op[1], *op[2])])
            elif op[0] == "-w":
                store.update(deletes=[(Kind.WORKLOAD, f"uid-{op[1]}")])
            else:
                store.update(deletes=[(Kind.SERVICE, f"default/{op[1]}")])

    run(before)
    old = store.snapshot()
    run(after)
    deltas = store.deltas_since(old.revision, old.epoch)
    now = store.snapshot()
    if deltas is None:
        assert now.revision - old.revision > history  # only when history ran out
        return
    assert [d.revision for d in deltas] == list(range(old.revision + 1, now.revision + 1))
    assert apply(old, deltas) == (dict(now.workloads), dict(now.services))
