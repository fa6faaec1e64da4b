"""AuthorizationPolicies from Kubernetes: the source watches them (tests/fakeapi.py, the
real wire format), gives each workload its default inbound policy and the policies that
select it, keeps a policy's last valid version in force while it is invalid, and writes
the verdict into ``status.conditions``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.discovery.kube import KubeSource
from controlplane.discovery.model import CAPTURE_LABEL, DiscoveryStore, InboundMode
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI
from tests.sockets.test_kube_source import TOKEN, config, eventually, running, seed, workloads
from weft.policy import DEFAULT_POLICY_KEY, MESH_DEFAULT, Action, DefaultPolicy

pytestmark = pytest.mark.sockets
RESOURCE = "authorizationpolicies"


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN) as api:
        yield api


def policy(name: str, spec: dict[str, Any], namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip


def from_web(action: str = "ALLOW", **selector: str) -> dict[str, Any]:
    web = {"source": {"principals": ["spiffe://cluster.local/ns/shop/sa/web"]}}
    spec: dict[str, Any] = {"action": action, "rules": [{"from": [web]}]}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return spec


def names(store: DiscoveryStore, pod: str) -> list[str]:
    return [p.name for p in workloads(store)[pod].policies]


def accepted(fake: FakeKubeAPI, name: str) -> dict[str, Any]:
    obj = fake.get(RESOURCE, name, "shop") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    found = [c for c in conditions if c["type"] == "Accepted"]
    assert len(found) <= 1, conditions
    return dict(found[0]) if found else {}


async def test_a_policy_applies_to_the_workloads_its_selector_picks(fake: FakeKubeAPI) -> None:
    seed(fake)  # shop: web-1, web-2 (app=web), batch; default: tool, plain
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        assert names(store, "web-1") == [] and workloads(store)["web-1"].default_policy == (
            MESH_DEFAULT)  # fmt: skip
        fake.create(RESOURCE, policy("web-only", from_web(app="web")))
        fake.create(RESOURCE, policy("no-one", {"action": "DENY"}))  # the whole namespace
        await eventually(lambda: names(store, "web-1") == ["no-one", "web-only"])
        assert names(store, "web-2") == ["no-one", "web-only"]
        assert names(store, "batch") == ["no-one"]  # not app=web
        assert names(store, "tool") == [] and names(store, "plain") == []  # other namespace
        (web_only,) = [p for p in workloads(store)["web-1"].policies if p.name == "web-only"]
        assert web_only.action is Action.ALLOW and web_only.selector == {"app": "web"}
        # A policy's change reaches its workloads; its deletion removes it.
        fake.update(RESOURCE, policy("web-only", from_web("AUDIT", app="web")))
        await eventually(lambda: {p.name: p.action for p in workloads(store)["web-1"].policies}
                         == {"no-one": Action.DENY, "web-only": Action.AUDIT})  # fmt: skip
        fake.delete(RESOURCE, "no-one", "shop")
        await eventually(lambda: names(store, "batch") == [])
        # A pod that comes later gets the policies already there.
        fake.create("pods", fakeapi.pod("web-3", "shop", ip="10.244.1.30", labels={"app": "web"}))
        await eventually(lambda: names(store, "web-3") == ["web-only"])
        await eventually(lambda: accepted(fake, "web-only").get("status") == "True")
        cond = accepted(fake, "web-only")
        assert cond["reason"] == "Accepted" and cond["observedGeneration"] == 2
        assert not source.stats[RESOURCE].errors


async def test_an_invalid_policy_is_not_applied_and_its_last_valid_version_stays(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    seed(fake)
    fake.create(RESOURCE, policy("web-only", from_web(app="web")))
    fake.create(RESOURCE, policy("bad-from-start", {"action": "allow"}))
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.WARNING, "weft.discovery.kube"):
        async with running(source):
            assert names(store, "web-1") == ["web-only"]  # the bad one is not applied
            await eventually(lambda: accepted(fake, "bad-from-start").get("status") == "False")
            cond = accepted(fake, "bad-from-start")
            assert cond["reason"] == "Invalid" and "spec.action" in cond["message"]
            assert cond["message"].endswith("not applied")
            # Broken by an edit: the last valid version stays in force, the status says why.
            broken = from_web(app="web")
            broken["rules"][0]["from"][0]["source"]["principals"] = ["not a spiffe id"]
            fake.update(RESOURCE, policy("web-only", broken))
            await eventually(lambda: accepted(fake, "web-only").get("status") == "False")
            cond = accepted(fake, "web-only")
            assert "spec.rules[0].from[0].source.principals[0]" in cond["message"]
            assert cond["message"].endswith("its last valid version stays in force")
            assert cond["observedGeneration"] == 2
            (kept,) = workloads(store)["web-1"].policies
            assert [str(p.text) for p in kept.rules[0].sources[0].principals] == [
                "spiffe://cluster.local/ns/shop/sa/web"]  # fmt: skip
            # Fixed: in force again, and Accepted turns True.
            fake.update(RESOURCE, policy("web-only", from_web("DENY", app="web")))
            await eventually(lambda: accepted(fake, "web-only").get("status") == "True")
            await eventually(lambda: workloads(store)["web-1"].policies[0].action is Action.DENY)
            assert names(store, "web-1") == ["web-only"]
            writes = source.status_writer.stats.writes
    said = [r.getMessage() for r in caplog.records if "not accepted" in r.getMessage()]
    # Once per reason, although our own status writes came back as events.
    assert len(said) == 2, said
    # bad-from-start False, web-only False, web-only True; web-only's first True may be
    # folded into a later write when the edit comes before it is flushed.
    assert writes >= 3


async def test_a_per_route_policy_reaches_the_workloads_behind_the_route(
    fake: FakeKubeAPI,
) -> None:
    """A policy targeting an HTTPRoute is sent with the workloads its backends hold (the
    route's rule names the service ``web``: web-1, web-2), and follows the route: gone
    from them when the route stops naming that backend, back when it does again."""
    seed(fake)
    routed = {"action": "ALLOW", "targetRefs": [{"group": "gateway.networking.k8s.io",
                                                 "kind": "HTTPRoute", "name": "admin"}],
              "rules": [{"from": [{"source": {"principals": [
                  "spiffe://cluster.local/ns/shop/sa/ops"]}}]}]}  # fmt: skip
    fake.create(RESOURCE, policy("admin-ops", routed))
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        # No such route yet: the policy applies to no workload (and is accepted).
        await eventually(lambda: accepted(fake, "admin-ops").get("status") == "True")
        assert names(store, "web-1") == [] and names(store, "batch") == []

        def route(backend: str) -> dict[str, Any]:
            rule = {"matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                    "backendRefs": [{"name": backend, "port": 80}]}  # fmt: skip
            return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": "admin", "namespace": "shop"},
                    "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                             "rules": [rule]}}  # fmt: skip

        fake.create("httproutes", route("web"))
        await eventually(lambda: names(store, "web-1") == ["admin-ops"])
        assert names(store, "web-2") == ["admin-ops"]  # behind the backend, not ready yet
        assert names(store, "batch") == [] and names(store, "tool") == []
        (p,) = workloads(store)["web-1"].policies
        assert p.target_routes == frozenset({"shop/admin"}) and p.selector is None
        # The route now sends elsewhere: web's workloads are no longer behind it.
        fake.update("httproutes", route("elsewhere"))
        await eventually(lambda: names(store, "web-1") == [])
        fake.update("httproutes", route("web"))
        await eventually(lambda: names(store, "web-1") == ["admin-ops"])
        fake.delete("httproutes", "admin", "shop")
        await eventually(lambda: names(store, "web-1") == [])
        assert not source.stats[RESOURCE].errors


async def test_a_namespace_default_makes_its_workloads_strict(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        assert workloads(store)["web-1"].inbound_mode is InboundMode.PERMISSIVE
        shop = fakeapi.namespace("shop", {CAPTURE_LABEL: "enabled"})
        shop["metadata"]["annotations"] = {DEFAULT_POLICY_KEY: "cluster-authenticated"}
        fake.update("namespaces", shop)
        await eventually(
            lambda: workloads(store)["web-1"].default_policy is DefaultPolicy.CLUSTER_AUTHENTICATED
        )
        for name in ("web-1", "web-2", "batch"):
            w = workloads(store)[name]
            assert w.default_policy is DefaultPolicy.CLUSTER_AUTHENTICATED, name
            assert w.inbound_mode is InboundMode.STRICT, name
        assert workloads(store)["tool"].inbound_mode is InboundMode.PERMISSIVE  # other ns
        # A pod's own annotation wins; one that lets plaintext in leaves the mode alone.
        opened = {DEFAULT_POLICY_KEY: "all-unauthenticated"}
        fake.create("pods", fakeapi.pod("open", "shop", ip="10.244.1.40", annotations=opened))
        await eventually(lambda: "open" in workloads(store))
        assert workloads(store)["open"].default_policy is DefaultPolicy.ALL_UNAUTHENTICATED
        assert workloads(store)["open"].inbound_mode is InboundMode.PERMISSIVE


async def test_the_mesh_default_applies_where_nothing_else_is_set(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store, mesh_default=DefaultPolicy.DENY)
    async with running(source):
        plain = workloads(store)["plain"]
        assert plain.default_policy is DefaultPolicy.DENY
        assert plain.inbound_mode is InboundMode.STRICT  # set explicitly, by the operator


@pytest.mark.parametrize("absence", ["no CRD", "no RBAC"])
async def test_a_cluster_without_policies_still_syncs(fake: FakeKubeAPI, absence: str) -> None:
    seed(fake)
    if absence == "no CRD":
        fake.weft_crds = False
    else:
        fake.forbidden.add(RESOURCE)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        assert names(store, "web-1") == []
        assert "shop/web" in store.snapshot().services
        await eventually(lambda: source.stats[RESOURCE].absent)
        assert not source.stats[RESOURCE].errors  # "none", not a fault
        assert not source.stats["httproutes"].absent  # the routes' CRDs are there


def test_fake_serves_policies_as_custom_objects(fake: FakeKubeAPI) -> None:
    """List items keep kind/apiVersion; generation and status as for any custom resource."""
    created = fake.create(RESOURCE, {**policy("p", {"action": "DENY"}), "status": {"x": 1}})
    assert created["metadata"]["generation"] == 1 and "status" not in created
    updated = fake.update(RESOURCE, policy("p", {"action": "AUDIT"}))
    assert updated["metadata"]["generation"] == 2
    relabelled = policy("p", {"action": "AUDIT"})
    relabelled["metadata"]["labels"] = {"team": "a"}
    assert fake.update(RESOURCE, relabelled)["metadata"]["generation"] == 2


async def test_a_policy_selecting_no_pod_is_accepted_and_logged(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.INFO, "weft.discovery.kube"):
        async with running(source):
            fake.create(RESOURCE, policy("typo", from_web(app="wbe")))
            await eventually(lambda: accepted(fake, "typo").get("status") == "True")
            assert names(store, "web-1") == []
    said = [r.getMessage() for r in caplog.records if "selects no pod" in r.getMessage()]
    assert said == ["AuthorizationPolicy shop/typo selects no pod (yet)"]
