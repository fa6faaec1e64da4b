"""The Kubernetes source against a fake API server over real HTTP (tests/fakeapi.py).

The client under test is the official ``kubernetes`` client, unmodified; only the server
is fake.  Each test checks outcomes in the store (what agents would get) and, where the
point is *how* the source got there (resume vs relist), the requests the fake recorded.
Every test also checks that stopping the source leaves no task and no thread behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from controlplane.discovery.kube import (
    Backoff,
    ClusterView,
    KubeConfig,
    KubeConfigError,
    KubeSource,
    parse_endpoint_slice,
    parse_namespace,
    parse_pod,
    parse_service,
)
from controlplane.discovery.model import (
    CAPTURE_LABEL,
    INBOUND_MODE_KEY,
    Delta,
    DiscoveryStore,
    Endpoint,
    InboundMode,
    Kind,
    ServicePort,
    Workload,
    WorkloadPort,
)
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI

sockets = pytest.mark.sockets
TOKEN = "s3cr3t-token"
WAIT = 10.0


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN) as api:
        yield api


def config(fake: FakeKubeAPI, **overrides: Any) -> KubeConfig:
    settings: dict[str, Any] = {
        "server": fake.url,
        "token": TOKEN,
        "page_size": 2,  # every list of more than two objects is paged
        "backoff_initial": 0.02,
        "backoff_max": 0.2,
        "inactivity_timeout": 5.0,
        "watch_timeout": 60.0,
        **overrides,
    }
    return KubeConfig(**settings)


def kube_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("weft-kube-")]


@contextlib.asynccontextmanager
async def running(source: KubeSource, sync: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """Run the source as the control plane would: a named task; stop it; check cleanup."""
    task = asyncio.create_task(source.run(), name="kube-source")
    try:
        if sync:
            await asyncio.wait_for(source.store.wait_synced(), WAIT)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        leaked = [t for t in asyncio.all_tasks() if t.get_name().startswith("kube-")]
        assert not leaked, f"tasks left running: {leaked}"
        assert not kube_threads(), f"threads left running: {kube_threads()}"


async def eventually(check: Callable[[], object], within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if check():
                return
        except (AssertionError, KeyError):
            pass
        if time.monotonic() > deadline:
            assert check(), "condition not reached in time"
        await asyncio.sleep(0.01)


def workloads(store: DiscoveryStore) -> dict[str, Workload]:
    return {w.name: w for w in store.snapshot().workloads.values()}


def seed(fake: FakeKubeAPI) -> dict[str, dict[str, Any]]:
    """A small cluster: a captured namespace, an uncaptured one, a service with slices."""
    fake.create("namespaces", fakeapi.namespace("shop", {CAPTURE_LABEL: "enabled"}))
    fake.create("namespaces", fakeapi.namespace("default"))
    pods = {
        "web-1": fake.create(
            "pods",
            fakeapi.pod(
                "web-1",
                "shop",
                node="node-1",
                ips=["10.244.1.10", "fd00::10"],
                service_account="web",
                labels={"app": "web"},
                ports=[(8080, "http")],
            ),
        ),
        "web-2": fake.create(
            "pods",
            fakeapi.pod(
                "web-2",
                "shop",
                node="node-2",
                ip="10.244.2.10",
                service_account="web",
                labels={"app": "web"},
                annotations={INBOUND_MODE_KEY: "strict"},
                ready=False,
            ),
        ),
        "batch": fake.create(
            "pods",
            fakeapi.pod("batch", "shop", ip="10.244.1.11", labels={CAPTURE_LABEL: "disabled"}),
        ),
        "tool": fake.create(
            "pods",
            fakeapi.pod("tool", "default", ip="10.244.1.12", labels={CAPTURE_LABEL: "enabled"}),
        ),
        "plain": fake.create("pods", fakeapi.pod("plain", "default", ip="10.244.2.12")),
    }
    # Not workloads: unscheduled, finished (its IP may be reused), host network.
    fake.create("pods", fakeapi.pod("pending", "shop", node=None, ip=None))
    fake.create("pods", fakeapi.pod("job", "shop", ip="10.244.1.13", phase="Succeeded"))
    fake.create("pods", fakeapi.pod("hostnet", "default", ip="10.240.0.11", host_network=True))
    fake.create(
        "services",
        fakeapi.service("web", "shop", cluster_ip="10.96.0.20", ports=[(80, "http", "http")]),
    )
    fake.create(
        "endpointslices",
        fakeapi.endpoint_slice(
            "web-abcde",
            "shop",
            service="web",
            endpoints=[("10.244.1.10", pods["web-1"], True), ("10.244.2.10", pods["web-2"], False)],
            ports=[("http", 8080)],
        ),
    )
    fake.create("services", fakeapi.service("db", "default", type="ExternalName"))
    return pods


# -- the initial list --------------------------------------------------------------------


@sockets
async def test_initial_list_builds_the_model(fake: FakeKubeAPI) -> None:
    pods = seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake, trust_domain="corp.example"), store)
    async with running(source):
        ws = workloads(store)
        assert set(ws) == {"web-1", "web-2", "batch", "tool", "plain"}
        web1 = ws["web-1"]
        assert web1.uid == pods["web-1"]["metadata"]["uid"]
        assert (web1.node, web1.ips) == ("node-1", ("10.244.1.10", "fd00::10"))
        assert str(web1.identity) == "spiffe://corp.example/ns/shop/sa/web"
        assert web1.ports == (WorkloadPort(8080, "TCP", "http"),)
        assert web1.ready and not ws["web-2"].ready
        assert web1.inbound_mode is InboundMode.PERMISSIVE
        assert ws["web-2"].inbound_mode is InboundMode.STRICT
        # capture: inherited from "shop", opted out by "batch", opted in by "tool".
        assert {n for n, w in ws.items() if w.captured} == {"web-1", "web-2", "tool"}

        services = store.snapshot().services
        assert set(services) == {"shop/web"}  # ExternalName is not the mesh's business
        web = services["shop/web"]
        assert web.vips == ("10.96.0.20",)
        assert web.ports == (ServicePort(80, "http", "TCP", "http"),)
        assert web.endpoints == (
            Endpoint("10.244.1.10", web1.uid, True, (("http", 8080),)),
            Endpoint("10.244.2.10", ws["web-2"].uid, False, (("http", 8080),)),
        )
        assert web.target_port(web.endpoints[0], web.ports[0]) == 8080
        # One consistent first state: every object in one go, then synced.
        assert store.revision == 6

        pod_lists = fake.list_requests("pods")
        assert [r.query.get("limit") for r in pod_lists] == ["2"] * 4  # 8 pods, paged
        assert all("continue" in r.query for r in pod_lists[1:])
        assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake.requests)
        await eventually(lambda: fake.watch_requests("pods"))
        watch = fake.watch_requests("pods")[0]
        assert watch.query["allowWatchBookmarks"] == "true"
        assert watch.query["resourceVersion"] == source.resource_version("pods")
        assert 60 <= int(watch.query["timeoutSeconds"]) <= 120
        assert not source.stats["pods"].errors


# -- watching ----------------------------------------------------------------------------


@sockets
async def test_watch_added_modified_deleted(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        new = fake.create(
            "pods", fakeapi.pod("web-3", "shop", ip="10.244.2.11", labels={"app": "web"})
        )
        await eventually(lambda: workloads(store)["web-3"].captured)

        changed = fakeapi.pod("web-3", "shop", ip="10.244.2.11", labels={CAPTURE_LABEL: "disabled"})
        fake.update("pods", changed)
        await eventually(lambda: not workloads(store)["web-3"].captured)

        fake.update(
            "endpointslices",
            fakeapi.endpoint_slice(
                "web-abcde",
                "shop",
                service="web",
                endpoints=[("10.244.2.11", new, None)],  # unset ready: "interpret as true"
                ports=[("http", 8081)],
            ),
        )
        await eventually(
            lambda: (
                store.snapshot().services["shop/web"].endpoints
                == (Endpoint("10.244.2.11", new["metadata"]["uid"], True, (("http", 8081),)),)
            )
        )

        fake.delete("pods", "web-3", "shop")
        await eventually(lambda: "web-3" not in workloads(store))
        fake.delete("services", "web", "shop")
        await eventually(lambda: not store.snapshot().services)
        assert source.stats["pods"].relists == 0


@sockets
async def test_unchanged_objects_cost_no_revision(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        rev = store.revision
        pod = fake.get("pods", "web-1", "shop")
        assert pod is not None
        pod["metadata"]["annotations"] = {"unrelated": "x"}  # nothing Weft reads
        fake.update("pods", pod)
        await eventually(lambda: source.resource_version("pods") == fake.resource_version)
        assert store.revision == rev


@sockets
async def test_namespace_label_change_flips_capture_of_its_pods(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    batches: list[Sequence[Delta]] = []
    store.add_listener(batches.append)
    source = KubeSource(config(fake), store)
    async with running(source):
        batches.clear()
        fake.update("namespaces", fakeapi.namespace("shop"))  # label removed
        await eventually(lambda: not workloads(store)["web-1"].captured)
        ws = workloads(store)
        assert not ws["web-2"].captured and not ws["batch"].captured
        # One event, one batch: agents see the namespace flip at once.
        assert [sorted(d.value.name for d in b if d.value) for b in batches] == [["web-1", "web-2"]]

        fake.update("namespaces", fakeapi.namespace("default", {CAPTURE_LABEL: "enabled"}))
        await eventually(lambda: workloads(store)["plain"].captured)
        assert workloads(store)["tool"].captured  # its own label said so all along


@sockets
async def test_bookmarks_advance_the_resource_version_without_changes(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        await eventually(lambda: fake.watch_requests("pods"))
        # Changes elsewhere move the cluster's version past the pods' last one ...
        fake.create("namespaces", fakeapi.namespace("other"))
        fake.update("namespaces", fakeapi.namespace("other", {"team": "x"}))
        before = source.resource_version("pods")
        rev = store.revision
        bookmark = fake.bookmark()
        assert int(bookmark) > int(before or 0)
        # ... and the bookmark brings the pods watch there, with nothing to apply.
        await eventually(lambda: source.resource_version("pods") == bookmark)
        assert source.stats["pods"].bookmarks == 1
        assert store.revision == rev

        # The point of it: a reconnect resumes from the bookmark, not from before it.
        fake.drop_watches()
        await eventually(lambda: len(fake.watch_requests("pods")) >= 2)
        assert fake.watch_requests("pods")[-1].query["resourceVersion"] == bookmark
        assert len(fake.list_requests("pods")) == 4  # no relist


@sockets
async def test_dropped_connection_resumes_without_relisting(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        watched = len(fakeapi.RESOURCES)  # the four built-in kinds and the two routes
        await eventually(lambda: fake.open_watches() == watched)
        lists = len(fake.list_requests("pods"))
        last = source.resource_version("pods")
        assert fake.drop_watches() == watched
        # Made while the client may be reconnecting: the resumed watch replays it.
        fake.create("pods", fakeapi.pod("late", "shop", ip="10.244.1.99"))
        await eventually(lambda: "late" in workloads(store))
        assert len(fake.list_requests("pods")) == lists
        assert fake.watch_requests("pods")[1].query["resourceVersion"] == last
        assert source.stats["pods"].errors >= 1
        assert source.stats["pods"].relists == 0


async def relisted_and_converged(
    fake: FakeKubeAPI, store: DiscoveryStore, source: KubeSource, pods: dict[str, Any]
) -> None:
    """After a gap the watch could not bridge: everything made in it is there, nothing
    deleted in it is, and the store holds exactly what the API server has."""
    await eventually(lambda: source.stats["pods"].relists >= 1)
    await eventually(lambda: "fresh" in workloads(store))
    await eventually(lambda: store.snapshot().services["shop/web"].endpoints[0].ready is False)
    # Each resource relists on its own: the namespaces' may land after the pods'.
    await eventually(lambda: workloads(store)["plain"].captured)  # labelled during the gap
    ws = workloads(store)
    assert "web-1" not in ws  # no phantom
    assert set(ws) == {"web-2", "batch", "tool", "plain", "fresh"}
    assert store.snapshot().services["shop/web"].endpoints == (
        Endpoint("10.244.2.10", pods["web-2"]["metadata"]["uid"], False, (("http", 8080),)),
    )


def make_gap_changes(fake: FakeKubeAPI, pods: dict[str, Any]) -> None:
    fake.delete("pods", "web-1", "shop")
    fake.create("pods", fakeapi.pod("fresh", "shop", ip="10.244.1.50"))
    fake.update("namespaces", fakeapi.namespace("default", {CAPTURE_LABEL: "enabled"}))
    fake.update(
        "endpointslices",
        fakeapi.endpoint_slice(
            "web-abcde",
            "shop",
            service="web",
            endpoints=[("10.244.2.10", pods["web-2"], False)],
            ports=[("http", 8080)],
        ),
    )


@sockets
async def test_410_in_the_stream_relists_and_converges(fake: FakeKubeAPI) -> None:
    pods = seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        await eventually(lambda: all(fake.watch_requests(r) for r in ClusterView.RESOURCES))
        with fake.unobserved():  # events the watches never get; then ERROR 410
            make_gap_changes(fake, pods)
        await relisted_and_converged(fake, store, source, pods)
        await eventually(lambda: all(source.stats[r].relists == 1 for r in ClusterView.RESOURCES))
        assert len(fake.list_requests("pods")) == 8  # twice four pages


@sockets
@pytest.mark.parametrize("gone_as_status", [False, True], ids=["error-event", "http-410"])
async def test_410_on_resume_after_a_partition_relists_and_converges(
    fake: FakeKubeAPI, gone_as_status: bool
) -> None:
    pods = seed(fake)
    fake.gone_as_status = gone_as_status
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        await eventually(lambda: all(fake.watch_requests(r) for r in ClusterView.RESOURCES))
        old = source.resource_version("pods")
        seen = len(fake.requests)
        with fake.partition():
            make_gap_changes(fake, pods)
            fake.expire()  # history of the gap compacted away before the client is back
            await asyncio.sleep(0.1)  # let it fail to reconnect a few times
        await relisted_and_converged(fake, store, source, pods)
        after = [r for r in fake.requests[seen:] if r.resource == "pods"]
        # It tried to resume from where it was, was told 410, relisted, watched anew.
        tried = [i for i, r in enumerate(after) if r.watch and r.query["resourceVersion"] == old]
        relist = [i for i, r in enumerate(after) if not r.watch]
        assert tried and relist and tried[0] < relist[0]
        await eventually(lambda: fake.watch_requests("pods")[-1].query["resourceVersion"] != old)


@sockets
async def test_list_continuation_expiring_between_pages_restarts_the_list_whole(
    fake: FakeKubeAPI,
) -> None:
    seed(fake)
    expired: list[str] = []

    def expire_once(resource: str) -> None:
        if resource == "pods" and not expired:
            expired.append(resource)
            fake.expire()

    fake.after_list_page = expire_once
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        assert len(workloads(store)) == 5
        limits = [r.query.get("limit") for r in fake.list_requests("pods")]
        # page 1, page 2 refused (410 Expired), then one unpaged list, as client-go's pager.
        assert limits == ["2", "2", None]
        assert source.stats["pods"].errors == 0


@sockets
async def test_inactivity_timeout_reconnects_a_silent_watch(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake, inactivity_timeout=0.3), store)
    async with running(source):
        await eventually(lambda: len(fake.watch_requests("pods")) >= 3, within=5)
        assert source.stats["pods"].errors >= 2
        assert "Read timed out" in (source.stats["pods"].last_error or "")
        assert source.stats["pods"].relists == 0
        fake.create("pods", fakeapi.pod("late", "shop", ip="10.244.1.99"))
        await eventually(lambda: "late" in workloads(store))


@sockets
async def test_server_side_timeout_ends_the_watch_cleanly_and_it_is_renewed(
    fake: FakeKubeAPI,
) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake, watch_timeout=1.0), store)
    async with running(source):
        await eventually(lambda: len(fake.watch_requests("pods")) >= 2, within=5)
        assert source.stats["pods"].errors == 0
        assert len(fake.list_requests("pods")) == 4
        fake.create("pods", fakeapi.pod("late", "shop", ip="10.244.1.99"))
        await eventually(lambda: "late" in workloads(store))


@sockets
async def test_token_file_is_reread_so_a_rotated_token_recovers(
    fake: FakeKubeAPI, tmp_path: Path
) -> None:
    seed(fake)
    token_file = tmp_path / "token"
    token_file.write_text("expired\n")
    store = DiscoveryStore()
    source = KubeSource(config(fake, token=None, token_file=token_file), store)
    async with running(source, sync=False):
        await eventually(lambda: source.stats["pods"].errors >= 2)
        assert "401" in (source.stats["pods"].last_error or "")
        assert not store.synced  # nothing served on a failed start
        token_file.write_text(TOKEN + "\n")
        await asyncio.wait_for(store.wait_synced(), WAIT)
        assert len(workloads(store)) == 5


@sockets
async def test_an_unexpected_error_stops_the_source_loudly(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)

    def broken(*args: object) -> None:
        raise RuntimeError("bug in the translation")

    task = asyncio.create_task(source.run(), name="kube-source")
    await asyncio.wait_for(store.wait_synced(), WAIT)
    source.view.apply = broken  # type: ignore[method-assign,assignment]
    fake.create("pods", fakeapi.pod("late", "shop", ip="10.244.1.99"))
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(task, WAIT)
    assert raised.group_contains(RuntimeError, match="bug in the translation")
    assert not kube_threads()


# -- pieces, without sockets -------------------------------------------------------------


def test_config_from_mapping_in_cluster_and_errors() -> None:
    cfg = KubeConfig.from_mapping(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert cfg.server == "https://10.96.0.1:443"
    assert cfg.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert cfg.ca_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    cfg = KubeConfig.from_mapping(
        {"server": "http://127.0.0.1:8001", "watch_timeout": "30", "verify_tls": "false"}
    )
    assert (cfg.token_file, cfg.watch_timeout, cfg.verify_tls) == (None, 30.0, False)
    with pytest.raises(KubeConfigError, match="unknown setting"):
        KubeConfig.from_mapping({"server": "http://x", "watch_timout": "3"})
    with pytest.raises(KubeConfigError, match="no API server"):
        KubeConfig.from_mapping({})
    with pytest.raises(KubeConfigError, match="inactivity_timeout"):
        KubeConfig(server="http://x", inactivity_timeout=0)


def test_backoff_doubles_to_a_cap_with_jitter_and_resets() -> None:
    b = Backoff(0.5, 4.0, rng=lambda: 1.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5
    low = Backoff(0.5, 4.0, rng=lambda: 0.0)
    assert low.next() == 0.25  # never less than half


def test_view_emits_nothing_until_every_resource_is_listed() -> None:
    view = ClusterView()
    pod = fakeapi.pod("a", "shop", uid="u1")
    assert not view.replace("pods", [parse_pod(pod)])
    assert not view.replace("services", [])
    assert not view.replace("endpointslices", [])
    assert not view.replace("httproutes", [])
    assert not view.replace("grpcroutes", [])
    assert not view.replace("authorizationpolicies", [])
    changes = view.replace(
        "namespaces", [parse_namespace(fakeapi.namespace("shop", {CAPTURE_LABEL: "enabled"}))]
    )
    assert view.synced
    assert [w.captured for w in changes.upserts if isinstance(w, Workload)] == [True]


def test_view_merges_slices_of_one_service_and_dedupes_addresses() -> None:
    view = ClusterView()
    a = fakeapi.pod("a", uid="ua", ip="10.0.0.1")
    b = fakeapi.pod("b", uid="ub", ip="10.0.0.2")
    for r in ("pods", "namespaces", "httproutes", "grpcroutes", "authorizationpolicies"):
        view.replace(r, [])
    view.replace("services", [parse_service(fakeapi.service("s", ports=[(80, 8080)]))])
    slices = [
        fakeapi.endpoint_slice("s-1", service="s", endpoints=[("10.0.0.1", a, False)]),
        # During a handover the same address can be in two slices: ready if either says.
        fakeapi.endpoint_slice(
            "s-2", service="s", endpoints=[("10.0.0.1", a, True), ("10.0.0.2", b, True)]
        ),
        fakeapi.endpoint_slice(
            "s-3", service="s", endpoints=[("fd00::1", None, True)], address_type="IPv6"
        ),
        fakeapi.endpoint_slice(
            "s-4", service="s", endpoints=[("db.example", None, True)], address_type="FQDN"
        ),
        fakeapi.endpoint_slice("other", service="t", endpoints=[("10.0.0.9", None, True)]),
    ]
    changes = view.replace("endpointslices", [parse_endpoint_slice(s) for s in slices])
    (svc,) = changes.upserts
    assert svc.endpoints == (  # type: ignore[union-attr]
        Endpoint("10.0.0.1", "ua", True),
        Endpoint("10.0.0.2", "ub", True),
        Endpoint("fd00::1", None, True),
    )
    # Removing a slice recomputes its service only.
    changes = view.apply("endpointslices", "DELETED", parse_endpoint_slice(slices[1]))
    (svc,) = changes.upserts
    assert svc.endpoints == (Endpoint("10.0.0.1", "ua", False), Endpoint("fd00::1", None, True))  # type: ignore[union-attr]
    assert changes.deletes == []
    changes = view.apply("services", "DELETED", parse_service(fakeapi.service("s")))
    assert changes.deletes == [(Kind.SERVICE, "default/s")]


def test_pod_without_pod_ips_falls_back_to_pod_ip_and_bad_names_are_left_out() -> None:
    obj = fakeapi.pod("a", uid="u", ip="10.0.0.7")
    del obj["status"]["podIPs"]
    assert parse_pod(obj).ips == ("10.0.0.7",)
    view = ClusterView()
    for r in ("services", "endpointslices", "namespaces", "httproutes", "grpcroutes",
              "authorizationpolicies"):  # fmt: skip
        view.replace(r, [])
    bad = fakeapi.pod("b", uid="ub", service_account="Not_A_Name")
    changes = view.replace("pods", [parse_pod(obj), parse_pod(bad)])
    assert [w.uid for w in changes.upserts] == ["u"]  # type: ignore[union-attr]


# -- Gateway API routes --------------------------------------------------------------------


def _httproute(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": rules},
    }  # fmt: skip


@sockets
async def test_routes_are_watched_and_attached_to_their_service(fake: FakeKubeAPI) -> None:
    seed(fake)
    split = _httproute("split", [{"backendRefs": [{"name": "web", "port": 80, "weight": 9}]}])
    fake.create("httproutes", split)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        web = store.snapshot().services["shop/web"]
        assert [r.name for r in web.routes] == ["split"]
        assert web.routes[0].rules[0].backends[0].weight == 9
        # A route Weft cannot apply is left out (logged), the others stay.
        bad = _httproute("bad", [{"filters": [{"type": "RequestMirror"}]}])
        fake.create("httproutes", bad)
        grpc = {**_httproute("calls", [{"backendRefs": [{"name": "web", "port": 80}]}]),
                "kind": "GRPCRoute"}  # fmt: skip
        fake.create("grpcroutes", grpc)
        await eventually(lambda: len(store.snapshot().services["shop/web"].routes) == 2)
        names = [r.name for r in store.snapshot().services["shop/web"].routes]
        assert names == ["calls", "split"]  # GRPCRoute sorts first, by kind
        fake.delete("httproutes", "split", "shop")
        await eventually(
            lambda: [r.name for r in store.snapshot().services["shop/web"].routes] == ["calls"]
        )
        assert not source.stats["httproutes"].errors


@sockets
async def test_a_cluster_without_the_gateway_api_still_syncs(fake: FakeKubeAPI) -> None:
    seed(fake)
    fake.gateway_api = False
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        assert store.snapshot().services["shop/web"].routes == ()
        await eventually(lambda: source.stats["httproutes"].absent)
        assert source.stats["grpcroutes"].absent
        assert not source.stats["httproutes"].errors  # a 404 here is "none", not a fault
