import dataclasses
import ipaddress

import pytest

from weft.lab.plan import (
    CAPTURE_LABEL,
    PlanError,
    endpoints,
    hosts_file,
    node_plan,
    plan_lab,
    validate_lab_name,
)
from weft.lab.state import LabState, lab_paths


def test_node_addresses_follow_the_documented_plan():
    n1, n2 = node_plan(1), node_plan(2)
    assert (n1.ip, n1.pod_cidr, n1.gateway) == ("10.240.0.11", "10.244.1.0/24", "10.244.1.1")
    assert (n2.ip, n2.pod_cidr, n2.gateway) == ("10.240.0.12", "10.244.2.0/24", "10.244.2.1")


def test_demo_has_an_echo_replica_and_a_client_on_every_node():
    plan = plan_lab("weft", nodes=3, demo=True)
    echo_nodes = {p.node for p in plan.pods if p.app == "echo"}
    assert echo_nodes == {"node-1", "node-2", "node-3"}
    assert [p.name for p in plan.pods if p.name.startswith("client")] == [
        "client-1",
        "client-2",
        "client-3",
    ]
    assert all(plan.captured(p) for p in plan.pods if p.name != "plain-1")
    assert [
        (p.name, p.node, plan.captured(p)) for p in plan.pods if p.labels["app"] == "plain"
    ] == [("plain-1", "node-1", False)]
    (svc,) = plan.services
    assert (svc.name, svc.vip, svc.ports[0].port, svc.ports[0].target_port) == (
        "echo",
        "10.96.0.10",
        80,
        8080,
    )
    assert [p.name for p in endpoints(plan.pods, svc)] == ["echo-1", "echo-2", "echo-3"]


def test_pod_addresses_are_unique_and_inside_their_node_subnet():
    plan = plan_lab("weft", nodes=4, pods_per_node=20, demo=True)
    ips = [p.ip for p in plan.pods]
    assert len(ips) == len(set(ips)) == 4 * 21 + 1
    for pod in plan.pods:
        node = plan.node(pod.node)
        assert ipaddress.IPv4Address(pod.ip) in ipaddress.IPv4Network(node.pod_cidr)
        assert pod.ip != node.gateway


def test_bare_lab_has_idle_uncaptured_pods():
    plan = plan_lab("weft", nodes=2, pods_per_node=2)
    assert [p.name for p in plan.pods] == ["pod-1", "pod-2", "pod-3", "pod-4"]
    assert not any(plan.captured(p) for p in plan.pods)
    assert plan.services == ()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"nodes": 201}, "--nodes"),
        ({"pods_per_node": -1}, "--pods-per-node"),
        ({"pods_per_node": 250, "demo": True}, "exceed"),
    ],
)
def test_impossible_shapes_are_refused_with_the_flag_named(kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan_lab("weft", **kwargs)


@pytest.mark.parametrize("name", ["", "Weft", "we-ft", "1lab", "averyverylongname"])
def test_lab_names_that_would_make_prefixes_ambiguous_are_refused(name):
    with pytest.raises(PlanError):
        validate_lab_name(name)


def test_namespaces_are_prefixed_by_lab_name():
    plan = plan_lab("lab2", nodes=1, demo=True)
    assert plan.netns("node-1") == "lab2-node-1"


def test_hosts_file_resolves_services_pods_and_nodes():
    plan = plan_lab("weft", nodes=2, demo=True)
    client = next(p for p in plan.pods if p.name == "client-1")
    text = hosts_file(plan, client)
    lines = {line.split("\t")[0]: line.split("\t")[1] for line in text.splitlines() if "\t" in line}
    assert lines["10.96.0.10"].split() == [
        "echo",
        "echo.default",
        "echo.default.svc",
        "echo.default.svc.cluster.local",
    ]
    assert lines[client.ip] == "client-1"
    assert lines["10.244.2.2"] == "echo-2"
    assert lines["10.240.0.12"] == "node-2"


def test_state_round_trips_through_json(tmp_path):
    plan = plan_lab("weft", nodes=2, pods_per_node=2, demo=True)
    paths = lab_paths("weft", "/sys/fs/cgroup/unified")
    state = LabState(plan=plan, phase="ready", paths=paths, created_at=123.0)
    again = LabState.from_json(state.to_json())
    assert again.plan == plan
    assert again.to_json() == state.to_json()
    pod = again.pod("echo-1")
    assert pod.labels[CAPTURE_LABEL] == "enabled"
    assert str(again.pod_cgroup(pod)) == "/sys/fs/cgroup/unified/weft-lab-weft/node-1/echo-1"


@pytest.mark.parametrize(
    ("value", "strict"),
    [
        (None, False),
        ("permissive", False),
        ("strict", True),
        ("stritc", True),  # a typo fails closed, in the status as in the mesh
        ("Strict", True),
        ("", True),
    ],
)
def test_lab_status_reports_the_inbound_mode_the_mesh_enforces(value, strict):
    from controlplane.discovery.lab import lab_model
    from weft.lab.plan import INBOUND_MODE_LABEL

    plan = plan_lab("weft", nodes=1, pods_per_node=1)
    (pod,) = plan.pods
    labels = {**pod.labels} if value is None else {**pod.labels, INBOUND_MODE_LABEL: value}
    pod = dataclasses.replace(pod, labels=labels)
    plan = dataclasses.replace(plan, pods=(pod,))
    state = LabState(plan=plan, phase="ready", paths=lab_paths("weft", None))
    (shown,) = state.to_json()["pods"]
    workloads, _ = lab_model(state)
    assert shown["strict"] is strict
    assert workloads[0].strict is strict  # what discovery sends to the enforcing agents


@pytest.mark.parametrize(
    ("pod_label", "ns_label", "captured"),
    [
        (None, None, False),
        ("enabled", None, True),
        (None, "enabled", True),
        ("disabled", "enabled", False),
        ("enabeld", "enabled", True),  # not a pod decision: the namespace's counts
        ("enabeld", None, False),
    ],
)
def test_lab_status_reports_the_capture_the_mesh_applies(pod_label, ns_label, captured):
    from controlplane.discovery.lab import lab_model

    plan = plan_lab("weft", nodes=1, pods_per_node=1)
    (pod,) = plan.pods
    labels = {k: v for k, v in pod.labels.items() if k != CAPTURE_LABEL}
    if pod_label is not None:
        labels[CAPTURE_LABEL] = pod_label
    ns = {} if ns_label is None else {CAPTURE_LABEL: ns_label}
    pod = dataclasses.replace(pod, labels=labels)
    plan = dataclasses.replace(plan, pods=(pod,), namespaces={pod.namespace: ns})
    state = LabState(plan=plan, phase="ready", paths=lab_paths("weft", None))
    (shown,) = state.to_json()["pods"]
    workloads, _ = lab_model(state)
    assert shown["captured"] is captured
    assert workloads[0].captured is captured
