"""The lab registry source: the lab's state file → workloads and services → deltas."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from controlplane.discovery.lab import LabSource, lab_model, lab_uid
from controlplane.discovery.model import (
    CAPTURE_LABEL,
    INBOUND_MODE_KEY,
    DiscoveryStore,
    Endpoint,
    InboundMode,
    Kind,
    ServicePort,
    WorkloadPort,
)
from weft.lab.plan import plan_lab
from weft.lab.state import LabPaths, LabState


def make_state(tmp_path: Path, nodes: int = 2, per_node: int = 1) -> LabState:
    paths = LabPaths(state_dir=tmp_path, cgroup_root=None, bpffs_dir=tmp_path / "pins")
    state = LabState(
        plan=plan_lab("t", nodes=nodes, pods_per_node=per_node, demo=True),
        phase="ready",
        paths=paths,
    )
    state.save()
    return state


def set_labels(state: LabState, pod: str, changes: dict[str, str | None]) -> None:
    """What ``weft lab label`` does: change one pod's labels, save the file atomically."""
    old = state.pod(pod)
    labels = dict(old.labels)
    for k, v in changes.items():
        if v is None:
            labels.pop(k, None)
        else:
            labels[k] = v
    new = dataclasses.replace(old, labels=labels)
    state.plan = dataclasses.replace(
        state.plan, pods=tuple(new if p.name == pod else p for p in state.plan.pods)
    )
    state.save()


def test_lab_state_becomes_workloads_and_services(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    workloads, services = lab_model(state, trust_domain="lab.test")
    by_name = {w.name: w for w in workloads}
    assert set(by_name) == {"echo-1", "echo-2", "client-1", "client-2", "plain-1"}
    echo1 = by_name["echo-1"]
    pod = state.pod("echo-1")
    assert echo1.uid == lab_uid("t", "default", "echo-1") == "lab/t/default/echo-1"
    assert (echo1.node, echo1.ips, echo1.namespace) == (pod.node, (pod.ip,), "default")
    assert str(echo1.identity) == "spiffe://lab.test/ns/default/sa/echo"
    assert echo1.captured and not by_name["plain-1"].captured
    assert echo1.inbound_mode is InboundMode.PERMISSIVE
    assert echo1.ports == (WorkloadPort(8080), WorkloadPort(9090))
    assert echo1.ready

    (echo,) = services
    assert (echo.key, echo.vips) == ("default/echo", ("10.96.0.10",))
    assert echo.ports == (
        ServicePort(port=80, target_port=8080, protocol="TCP", name="http"),
        ServicePort(port=9090, target_port=9090, protocol="TCP", name="grpc"),
    )
    assert echo.endpoints == tuple(
        sorted(
            (Endpoint(state.pod(n).ip, by_name[n].uid) for n in ("echo-1", "echo-2")),
            key=lambda e: e.address,
        )
    )


def test_capture_is_inherited_from_lab_namespaces_and_strict_is_a_label(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    state.plan = dataclasses.replace(state.plan, namespaces={"default": {CAPTURE_LABEL: "enabled"}})
    set_labels(state, "client-1", {CAPTURE_LABEL: "disabled"})
    set_labels(state, "echo-1", {INBOUND_MODE_KEY: "strict"})
    workloads, _ = lab_model(state)
    by_name = {w.name: w for w in workloads}
    assert by_name["plain-1"].captured  # no label of its own: inherits the namespace's
    assert not by_name["client-1"].captured  # opts out
    assert by_name["echo-1"].inbound_mode is InboundMode.STRICT
    assert state.pod("echo-1").labels[INBOUND_MODE_KEY] == "strict"


async def test_source_syncs_and_a_label_change_is_one_delta(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    store = DiscoveryStore()
    source = LabSource(state.paths.state_file, store, interval=0.01)
    assert await source.poll()
    assert store.synced
    first = store.revision
    assert first == 6  # five workloads and one service
    assert not await source.poll()  # nothing changed: not even re-read

    set_labels(state, "plain-1", {CAPTURE_LABEL: "enabled"})
    assert await source.poll()
    deltas = store.deltas_since(first)
    assert deltas is not None and len(deltas) == 1
    (delta,) = deltas
    assert (delta.kind, delta.key, delta.revision) == (
        Kind.WORKLOAD,
        lab_uid("t", "default", "plain-1"),
        first + 1,
    )
    assert delta.value is not None and delta.value.captured  # type: ignore[union-attr]

    state.save()  # rewritten, same content: re-read, but nothing to tell agents
    assert await source.poll()
    assert store.revision == first + 1


async def test_running_source_follows_the_file_and_keeps_state_when_it_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_file = tmp_path / "state.json"
    store = DiscoveryStore()
    source = LabSource(state_file, store, interval=0.01)
    task = asyncio.create_task(source.run(), name="test: lab source")
    try:
        await asyncio.sleep(0.05)
        assert not store.synced  # no file yet: waiting, and serving nothing
        state = make_state(tmp_path)
        await asyncio.wait_for(store.wait_synced(), 5)
        rev = store.revision

        set_labels(state, "echo-2", {CAPTURE_LABEL: None})
        await asyncio.wait_for(store.wait_for(rev), 5)
        w = store.workload(lab_uid("t", "default", "echo-2"))
        assert w is not None and not w.captured

        with caplog.at_level(logging.WARNING, "weft.discovery.lab"):
            state_file.write_text("{torn")
            async with asyncio.timeout(5):
                while "unreadable" not in caplog.text:  # noqa: ASYNC110 (polling a log)
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # ten more polls of the same torn file
        assert "unreadable" in caplog.text
        assert caplog.text.count("unreadable") == 1  # once per change, not once per poll
        assert store.workload(lab_uid("t", "default", "echo-2")) == w  # last state kept
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_poll_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        LabSource(tmp_path / "s.json", DiscoveryStore(), interval=0)


def test_policies_and_defaults_reach_the_workloads_they_select(tmp_path: Path) -> None:
    from weft.lab import apply as lab_apply
    from weft.mesh import InboundMode
    from weft.policy import DefaultPolicy

    state = make_state(tmp_path)
    docs = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "default",
                      "annotations": {"weft.io/default-inbound-policy": "cluster-authenticated"}}},
        {"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "echo-from-client", "namespace": "default"},
         "spec": {"selector": {"matchLabels": {"app": "echo"}},
                  "rules": [{"from": [{"source": {"serviceAccounts": ["client"]}}]}]}},
        {"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "elsewhere", "namespace": "other"}, "spec": {"rules": [{}]}},
    ]  # fmt: skip
    plan, objects, _ = lab_apply.apply(state.plan, [], docs)
    state.plan, state.policies = plan, objects
    by_name = {w.name: w for w in lab_model(state)[0]}
    assert [p.name for p in by_name["echo-1"].policies] == ["echo-from-client"]
    assert by_name["client-1"].policies == ()  # not selected; "elsewhere" is another ns
    assert by_name["echo-1"].default_policy is DefaultPolicy.CLUSTER_AUTHENTICATED
    assert by_name["plain-1"].inbound_mode is InboundMode.STRICT  # explicit, refuses plaintext
    # The implicit mesh default changes nothing: permissive pods stay permissive.
    state.plan = dataclasses.replace(state.plan, namespace_annotations={})
    by_name = {w.name: w for w in lab_model(state)[0]}
    assert by_name["plain-1"].inbound_mode is InboundMode.PERMISSIVE
    assert by_name["plain-1"].default_policy is DefaultPolicy.ALL_AUTHENTICATED
    # A mesh-wide default set on the control plane counts as explicit.
    by_name = {w.name: w for w in lab_model(state, mesh_default=DefaultPolicy.DENY)[0]}
    assert by_name["plain-1"].inbound_mode is InboundMode.STRICT
    audit = {w.name: w for w in lab_model(state, mesh_default=DefaultPolicy.AUDIT)[0]}
    assert audit["plain-1"].inbound_mode is InboundMode.PERMISSIVE  # audit lets plaintext in
