"""Route status written back: the Kubernetes source against the fake API server's status
subresource (tests/fakeapi.py, the real wire format), and the fake's subresource itself
checked with the official client, so the fake stays honest."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.discovery.kube import KubeSource, make_api_client
from controlplane.discovery.model import DiscoveryStore
from controlplane.discovery.routestatus import CONTROLLER_NAME
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI
from tests.sockets.test_kube_source import TOKEN, config, eventually, running, seed

pytestmark = pytest.mark.sockets
GROUP = "gateway.networking.k8s.io"
GATEWAY_ENTRY: dict[str, Any] = {
    "parentRef": {"group": GROUP, "kind": "Gateway", "name": "edge"},
    "controllerName": "example.com/gateway-controller",
    "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                    "lastTransitionTime": "2024-01-01T00:00:00Z", "observedGeneration": 1}],
}  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN) as api:
        yield api


def route(name: str, backend: str, *, parents: list[dict[str, Any]] | None = None) -> dict:
    return {
        "apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": parents or [{"group": "", "kind": "Service", "name": "web",
                                            "port": 80}],
                 "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]},
    }  # fmt: skip


def ours(fake: FakeKubeAPI, name: str, resource: str = "httproutes") -> list[dict]:
    obj = fake.get(resource, name, "shop") or {}
    parents = (obj.get("status") or {}).get("parents") or []
    return [p for p in parents if p["controllerName"] == CONTROLLER_NAME]


def conds(entry: dict) -> dict[str, dict]:
    return {c["type"]: c for c in entry["conditions"]}


def patches(fake: FakeKubeAPI) -> list[fakeapi.Request]:
    return [r for r in fake.requests if r.method == "PATCH"]


async def test_status_is_written_for_accepted_and_unresolved_routes(fake: FakeKubeAPI) -> None:
    seed(fake)
    fake.create("httproutes", route("good", "web"))
    fake.create("httproutes", route("dangling", "nope"))
    grpc = {**route("calls", "web"), "kind": "GRPCRoute"}
    fake.create("grpcroutes", grpc)
    source = KubeSource(config(fake), DiscoveryStore())
    async with running(source):
        await eventually(lambda: ours(fake, "good") and ours(fake, "dangling"))
        await eventually(lambda: ours(fake, "calls", "grpcroutes"))
        (good,) = ours(fake, "good")
        assert good["parentRef"] == {"group": "", "kind": "Service", "name": "web", "port": 80}
        c = conds(good)
        assert (c["Accepted"]["status"], c["Accepted"]["reason"]) == ("True", "Accepted")
        assert (c["ResolvedRefs"]["status"], c["ResolvedRefs"]["reason"]) == (
            "True", "ResolvedRefs")  # fmt: skip
        assert c["Accepted"]["observedGeneration"] == 1
        assert c["Accepted"]["lastTransitionTime"].endswith("Z")
        (dangling,) = ours(fake, "dangling")
        c = conds(dangling)
        assert c["Accepted"]["status"] == "True"
        assert (c["ResolvedRefs"]["status"], c["ResolvedRefs"]["reason"]) == (
            "False", "BackendNotFound")  # fmt: skip
        assert "shop/nope" in c["ResolvedRefs"]["message"]
        # Merge patches of the status subresource, each with its resourceVersion.
        sent = patches(fake)
        assert len(sent) == 3
        assert {r.headers["content-type"] for r in sent} == {"application/merge-patch+json"}
        assert all(r.path.endswith("/status") and r.body["metadata"]["resourceVersion"]
                   for r in sent)  # fmt: skip

        # Our writes came back as MODIFIED events: they compare equal, nothing more is
        # written.  A Service that changes no judgement wakes the writer: still nothing.
        await asyncio.sleep(0.3)
        fake.create("services", fakeapi.service("other", "shop", cluster_ip="10.96.0.77"))
        await eventually(lambda: "shop/other" in source.view.services)
        await asyncio.sleep(0.3)
        assert len(patches(fake)) == 3
        assert source.route_status.stats.writes == 3

        # The missing backend appears: ResolvedRefs turns True with a new transition
        # time; Accepted, unchanged, keeps its own.
        accepted_since = conds(dangling)["Accepted"]["lastTransitionTime"]
        fake.create("services", fakeapi.service("nope", "shop", cluster_ip="10.96.0.78"))
        await eventually(lambda: conds(ours(fake, "dangling")[0])["ResolvedRefs"]["status"]
                         == "True")  # fmt: skip
        c = conds(ours(fake, "dangling")[0])
        assert c["Accepted"]["lastTransitionTime"] == accepted_since
        assert c["ResolvedRefs"]["reason"] == "ResolvedRefs"

        # A spec change is a new generation: observedGeneration follows.
        changed = route("good", "web")
        changed["spec"]["rules"][0]["backendRefs"][0]["weight"] = 5
        fake.update("httproutes", changed)
        await eventually(
            lambda: conds(ours(fake, "good")[0])["Accepted"]["observedGeneration"] == 2
        )
        assert not source.stats["httproutes"].errors


async def test_a_route_weft_cannot_apply_is_not_accepted(fake: FakeKubeAPI) -> None:
    seed(fake)
    bad = route("bad", "web")
    bad["metadata"]["annotations"] = {"weft.io/retry-limit": "lots"}  # judged as parsed
    fake.create("httproutes", bad)
    mirror = route("mirror", "web")
    mirror["spec"]["rules"][0]["filters"] = [{"type": "RequestMirror"}]
    fake.create("httproutes", mirror)
    source = KubeSource(config(fake), DiscoveryStore())
    async with running(source):
        await eventually(lambda: ours(fake, "bad") and ours(fake, "mirror"))
        for name, text in (("bad", "weft.io/retry-limit"), ("mirror", "RequestMirror")):
            accepted = conds(ours(fake, name)[0])["Accepted"]
            assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedValue")
            assert text in accepted["message"]
        assert source.store.snapshot().services["shop/web"].routes == ()


async def test_other_controllers_entries_are_kept(fake: FakeKubeAPI) -> None:
    seed(fake)
    parents = [{"group": GROUP, "kind": "Gateway", "name": "edge"},
               {"group": "", "kind": "Service", "name": "web"}]  # fmt: skip
    obj = fake.create("httproutes", route("shared", "web", parents=parents))
    fake.update_status("httproutes", {**obj, "status": {"parents": [GATEWAY_ENTRY]}})
    source = KubeSource(config(fake), DiscoveryStore())
    async with running(source):
        await eventually(lambda: ours(fake, "shared"))
        stored = fake.get("httproutes", "shared", "shop")
        assert stored is not None
        entries = stored["status"]["parents"]
        assert entries[0] == GATEWAY_ENTRY
        assert [e["parentRef"]["kind"] for e in entries] == ["Gateway", "Service"]
        # The Gateway controller writes again meanwhile: our next write must not undo it.
        other = {**GATEWAY_ENTRY, "conditions": [{**GATEWAY_ENTRY["conditions"][0],
                                                  "observedGeneration": 2}]}  # fmt: skip
        current = fake.get("httproutes", "shared", "shop")
        assert current is not None
        fake.update_status("httproutes", {**current, "status": {"parents": [
            other, *ours(fake, "shared")]}})  # fmt: skip
        fake.create("services", fakeapi.service("x", "shop", cluster_ip="10.96.0.79"))
        await asyncio.sleep(0.3)
        stored = fake.get("httproutes", "shared", "shop")
        assert stored is not None
        assert stored["status"]["parents"][0] == other
        assert len(ours(fake, "shared")) == 1


async def test_a_route_with_only_gateway_parents_is_left_alone(fake: FakeKubeAPI) -> None:
    seed(fake)
    gateway = [{"group": GROUP, "kind": "Gateway", "name": "edge"}]
    fake.create("httproutes", route("edge-only", "web", parents=gateway))
    source = KubeSource(config(fake), DiscoveryStore())
    async with running(source):
        await asyncio.sleep(0.3)
        assert not patches(fake)


async def test_status_write_failures_never_break_discovery(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    seed(fake)
    fake.create("httproutes", route("good", "web"))
    fake.status_failure = 403
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.INFO, "weft.discovery.kube"):
        async with running(source):
            await eventually(lambda: source.route_status.stats.failures.get("forbidden"))
            assert [r.name for r in store.snapshot().services["shop/web"].routes] == ["good"]
            # Route edits retry; the 403 is logged once.
            changed = route("good", "web")
            changed["spec"]["rules"][0]["backendRefs"][0]["weight"] = 3
            fake.update("httproutes", changed)
            await eventually(lambda: source.route_status.stats.failures["forbidden"] == 2)
            # RBAC granted: the next change writes.
            fake.status_failure = None
            changed["spec"]["rules"][0]["backendRefs"][0]["weight"] = 4
            fake.update("httproutes", changed)
            await eventually(lambda: ours(fake, "good"))
            assert not source.stats["httproutes"].errors
    said = [r.getMessage() for r in caplog.records if "status not written" in r.getMessage()]
    assert len(said) == 1 and "httproutes/status" in said[0]


async def test_a_stale_write_is_a_conflict_and_retried_on_the_next_event(
    fake: FakeKubeAPI,
) -> None:
    seed(fake)
    fake.create("httproutes", route("good", "web"))
    fake.status_failure = 409
    source = KubeSource(config(fake), DiscoveryStore())
    async with running(source):
        await eventually(lambda: source.route_status.stats.failures.get("conflict") == 1)
        await asyncio.sleep(0.3)
        assert source.route_status.stats.failures["conflict"] == 1  # no retry loop
        fake.status_failure = None
        fake.update("httproutes", route("good", "web"))  # a new version: retried
        await eventually(lambda: ours(fake, "good"))


# -- the fake's status subresource, as the official client sees it ------------------------


class StatusClient:
    """The official client's status calls on the fake (its results typed for the test)."""

    def __init__(self, api: k8s.CustomObjectsApi) -> None:
        self.api = api

    def patch(self, name: str, body: Any, **kwargs: Any) -> dict[str, Any]:
        got = self.api.patch_namespaced_custom_object_status(
            GROUP, "v1", "shop", "httproutes", name, body, **kwargs
        )
        assert isinstance(got, dict)
        return got

    def get(self, name: str) -> dict[str, Any]:
        got = self.api.get_namespaced_custom_object_status(GROUP, "v1", "shop", "httproutes", name)
        assert isinstance(got, dict)
        return got


@pytest.fixture
def api(fake: FakeKubeAPI) -> Iterator[StatusClient]:
    client = make_api_client(config(fake))
    try:
        yield StatusClient(k8s.CustomObjectsApi(client))
    finally:
        client.close()


def test_fake_status_subresource(fake: FakeKubeAPI, api: StatusClient) -> None:
    created = fake.create("httproutes", {**route("r", "web"), "status": {"parents": ["x"]}})
    assert created["metadata"]["generation"] == 1 and "status" not in created  # create: no
    rv = created["metadata"]["resourceVersion"]
    status = {"parents": [GATEWAY_ENTRY]}
    # The client's default content type for this call (merge patch); spec changes ignored.
    body = {"metadata": {"resourceVersion": rv}, "status": status, "spec": {"parentRefs": []}}
    got = api.patch("r", body)
    assert fake.requests[-1].headers["content-type"] == "application/merge-patch+json"
    assert got["status"] == status and got["spec"] == created["spec"]
    assert got["metadata"]["generation"] == 1
    assert int(got["metadata"]["resourceVersion"]) > int(rv)
    # A stale resourceVersion: 409.  A no-op: same version, no event.
    with pytest.raises(ApiException) as e:
        api.patch("r", {"metadata": {"resourceVersion": rv}, "status": {}})
    assert e.value.status == 409
    before = fake.resource_version
    same = api.patch("r", {"status": status})
    assert same["metadata"]["resourceVersion"] == got["metadata"]["resourceVersion"]
    assert fake.resource_version == before
    # JSON patch, with a test op as the precondition; a failed op is 422.
    current = got["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": current},
        {"op": "add", "path": "/status/parents/-", "value": {"controllerName": "b"}},
    ]
    json_patch = "application/json-patch+json"
    patched = api.patch("r", ops, _content_type=json_patch)
    controllers = [p["controllerName"] for p in patched["status"]["parents"]]
    assert controllers == [GATEWAY_ENTRY["controllerName"], "b"]
    with pytest.raises(ApiException) as e:
        api.patch("r", ops, _content_type=json_patch)
    assert e.value.status == 422
    # The client turns a JSON patch type with an object body into a strategic merge
    # patch, which custom resources do not have: 415, as from kube-apiserver.
    with pytest.raises(ApiException) as e:
        api.patch("r", {"status": {}}, _content_type=json_patch)
    assert e.value.status == 415
    assert fake.requests[-1].headers["content-type"] == "application/strategic-merge-patch+json"
    # GET of the subresource; 404 for an unknown object.
    assert api.get("r") == fake.get("httproutes", "r", "shop")
    with pytest.raises(ApiException) as e:
        api.patch("nope", {"status": {}})
    assert e.value.status == 404
    # Spec updates bump the generation and keep the status; metadata-only ones do not.
    updated = fake.update("httproutes", {**route("r", "other"), "status": {"parents": []}})
    assert updated["metadata"]["generation"] == 2
    assert updated["status"] == patched["status"]
    labelled = route("r", "other")
    labelled["metadata"]["labels"] = {"team": "shop"}
    assert fake.update("httproutes", labelled)["metadata"]["generation"] == 2
