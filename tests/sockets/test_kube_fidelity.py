"""The Kubernetes source against what a real kube-apiserver does that a client must cope
with (tests/fakeapi.py): HTTPS with the cluster CA found the in-cluster way, watch events
split across chunks and coalesced into one, periodic bookmarks, 403 from RBAC, 429 from
API Priority and Fairness with ``Retry-After``.

The client is the control plane's real source (the official ``kubernetes`` client,
urllib3 underneath); only the server is fake.  Each test judges outcomes — the store
agents are fed from, the requests the server saw, what was logged — and, through
``running``, that stopping leaves no task or thread behind.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.config.incluster_config import InClusterConfigLoader

from controlplane.discovery.kube import KubeConfig, KubeSource
from controlplane.discovery.model import CAPTURE_LABEL, DiscoveryStore
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI
from tests.sockets.test_kube_source import TOKEN, config, eventually, running, seed, workloads

pytestmark = pytest.mark.sockets


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN) as api:
        yield api


@pytest.fixture
def tls_fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=TOKEN, tls=True) as api:
        yield api


def in_cluster_config(settings: dict[str, str], **extra: str) -> KubeConfig:
    """As the control plane builds it in a pod: no ``server``, the service's address from
    the environment, the service account's token and CA from files."""
    return KubeConfig.from_mapping(
        {**settings, "backoff_initial": "0.02", "backoff_max": "0.2", "page_size": "2", **extra}
    )


# -- TLS with the in-cluster CA ------------------------------------------------------------


async def test_in_cluster_config_over_tls_trusts_the_cluster_ca(
    tls_fake: FakeKubeAPI, tmp_path: Path
) -> None:
    seed(tls_fake)
    cfg = in_cluster_config(tls_fake.in_cluster(tmp_path / "serviceaccount"))
    assert cfg.server == f"https://127.0.0.1:{tls_fake.port}"
    assert cfg.ca_file == tmp_path / "serviceaccount" / "ca.crt"
    store = DiscoveryStore()
    source = KubeSource(cfg, store)
    async with running(source):
        assert set(workloads(store)) == {"web-1", "web-2", "batch", "tool", "plain"}
        # Watches over TLS too: a change arrives without a relist.
        tls_fake.create("pods", fakeapi.pod("web-3", "shop", ip="10.244.1.30"))
        await eventually(lambda: "web-3" in workloads(store))
    assert tls_fake.requests, "nothing reached the server"
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in tls_fake.requests)
    assert source.stats["pods"].relists == 0 and source.stats["pods"].errors == 0


def test_the_official_in_cluster_loader_reads_the_same_files(
    tls_fake: FakeKubeAPI, tmp_path: Path
) -> None:
    """What the fake writes is what ``load_incluster_config`` reads: a pod's files and
    environment are enough for any client, not only ours."""
    settings = tls_fake.in_cluster(tmp_path / "sa")
    tls_fake.create("namespaces", fakeapi.namespace("shop"))
    conf = k8s.Configuration()
    InClusterConfigLoader(
        token_filename=settings["token_file"],
        cert_filename=settings["ca_file"],
        environ={k: v for k, v in settings.items() if k.startswith("KUBERNETES_")},
    ).load_and_set(conf)
    with k8s.ApiClient(conf) as api:
        names = [n.metadata and n.metadata.name for n in k8s.CoreV1Api(api).list_namespace().items]
    assert names == ["shop"]


async def test_a_server_not_signed_by_the_cluster_ca_is_refused(
    tls_fake: FakeKubeAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA file of another cluster: TLS verification fails, nothing is synced, the error
    says so and the source keeps retrying (the right CA may be mounted later)."""
    settings = tls_fake.in_cluster(tmp_path / "sa")
    with FakeKubeAPI(token=TOKEN, tls=True) as other:
        assert other.certs is not None
        foreign = tmp_path / "other-ca.crt"
        foreign.write_bytes(other.certs.ca_pem)
        settings["ca_file"] = str(foreign)
    store = DiscoveryStore()
    source = KubeSource(in_cluster_config(settings), store)
    with caplog.at_level(logging.WARNING, "weft.discovery.kube"):
        async with running(source, sync=False):
            await eventually(lambda: source.stats["pods"].errors >= 2)
            assert not store.snapshot().workloads
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "CERTIFICATE_VERIFY_FAILED" in said or "certificate verify failed" in said, said


# -- watch streams as they arrive -------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_bytes", "coalesce"),
    [(7, False), (None, True), (13, True), (1, True)],
    ids=["split", "coalesced", "coalesced-and-split", "byte-by-byte"],
)
async def test_events_split_across_chunks_and_coalesced_in_one(
    fake: FakeKubeAPI, chunk_bytes: int | None, coalesce: bool
) -> None:
    fake.chunk_bytes = chunk_bytes
    fake.coalesce_events = coalesce
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        # Several changes at once (coalesced into one chunk when asked), one of them an
        # object far larger than any chunk.
        big = {f"label-{i}": "x" * 60 for i in range(200)}
        fake.create("pods", fakeapi.pod("web-3", "shop", ip="10.244.1.30", labels=big))
        fake.create("pods", fakeapi.pod("web-4", "shop", ip="10.244.1.31"))
        fake.delete("pods", "plain", "default")
        fake.update("namespaces", fakeapi.namespace("default", {CAPTURE_LABEL: "enabled"}))
        await eventually(
            lambda: (
                {"web-3", "web-4"} <= set(workloads(store))
                and "plain" not in workloads(store)
                and workloads(store)["tool"].captured
            )
        )
        assert workloads(store)["web-3"].ips == ("10.244.1.30",)
    # Every event parsed where it was cut: no stream was given up as malformed.
    for name in ("pods", "namespaces"):
        stats = source.stats[name]
        assert (stats.errors, stats.relists, stats.watches) == (0, 0, 1), (name, stats)


# -- bookmarks ------------------------------------------------------------------------------


async def test_periodic_bookmarks_keep_a_quiet_watch_alive_and_move_its_version(
    fake: FakeKubeAPI,
) -> None:
    """A watch whose resource does not change still hears from the server (bookmarks
    every 0.2 s here, about a minute on a real one): no inactivity timeout, no reconnect,
    and its resourceVersion follows the cluster's — so after a compaction it resumes from
    the bookmark instead of relisting."""
    fake.bookmark_interval = 0.2
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake, inactivity_timeout=1.0), store)
    async with running(source):
        # Other resources change; pods do not. Quiet for three inactivity timeouts.
        for i in range(3):
            fake.create("namespaces", fakeapi.namespace(f"quiet-{i}"))
        now = fake.resource_version
        await eventually(lambda: source.resource_version("pods") == now)
        await eventually(lambda: source.stats["pods"].bookmarks >= 10, within=15)
        assert len(fake.watch_requests("pods")) == 1
        assert source.stats["pods"].errors == 0
        assert all(r.query.get("allowWatchBookmarks") == "true" for r in fake.requests
                   if r.watch)  # fmt: skip

        # Compacted past the pods' last own change, then the stream is cut: the watch
        # resumes from the bookmark's version, which the server still has.
        fake.compact()
        lists = len(fake.list_requests("pods"))
        fake.drop_watches()
        await eventually(lambda: len(fake.watch_requests("pods")) == 2)
        assert fake.watch_requests("pods")[1].query["resourceVersion"] == now
        fake.create("pods", fakeapi.pod("web-3", "shop", ip="10.244.1.30"))
        await eventually(lambda: "web-3" in workloads(store))
        assert source.stats["pods"].relists == 0
        assert len(fake.list_requests("pods")) == lists


async def test_without_bookmarks_a_quiet_watch_is_taken_for_dead(fake: FakeKubeAPI) -> None:
    """The counterpart: the same quiet watch, a server that sends no bookmarks — the
    inactivity timeout fires and the source reconnects (safe, but the reason the
    bookmarks matter)."""
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake, inactivity_timeout=0.5), store)
    async with running(source):
        await eventually(lambda: len(fake.watch_requests("pods")) >= 2, within=15)
        assert workloads(store)  # the state is kept across reconnects


# -- 403 Forbidden --------------------------------------------------------------------------


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def test_forbidden_list_is_logged_naming_the_resource_and_the_verb(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    seed(fake)
    fake.forbidden.add("pods")
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.WARNING, "weft.discovery.kube"):
        async with running(source, sync=False):
            await eventually(lambda: source.stats["pods"].errors >= 2)
            assert not store.synced
            fake.forbidden.clear()  # RBAC fixed: the next retry lists
            await store.wait_synced()
            assert "web-1" in workloads(store)
    said = [m for m in messages(caplog, logging.ERROR) if m.startswith("pods:")]
    assert said, messages(caplog)
    assert "list pods forbidden" in said[0], said[0]
    # The server's own words (which user, which verb, which API group) are kept...
    assert 'cannot list resource "pods" in API group ""' in said[0], said[0]
    # ... and what to do.
    assert "ClusterRole" in said[0] and "list and watch" in said[0], said[0]


async def test_forbidden_watch_keeps_the_last_good_state(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """RBAC loses ``watch`` while the control plane runs: the stream it had is cut, every
    new one is refused.  Agents keep getting the last state (nothing is deleted), the log
    names the verb, and once RBAC is fixed the watch resumes where it stopped."""
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.WARNING, "weft.discovery.kube"):
        async with running(source):
            before = workloads(store)
            fake.forbidden_watch.add("pods")
            fake.drop_watches()
            await eventually(lambda: source.stats["pods"].errors >= 2)
            fake.create("pods", fakeapi.pod("web-3", "shop", ip="10.244.1.30"))
            assert workloads(store) == before
            fake.forbidden_watch.clear()
            await eventually(lambda: "web-3" in workloads(store))
            assert source.stats["pods"].relists == 0
    said = [m for m in messages(caplog, logging.ERROR) if m.startswith("pods:")]
    assert said and "watch pods forbidden" in said[0], messages(caplog)
    assert 'cannot watch resource "pods"' in said[0]


async def test_an_optional_resource_forbidden_after_it_was_listed_keeps_its_objects(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """AuthorizationPolicies listed, then RBAC on them is lost and a relist is forced
    (410): the policies in force must stay — dropping them would open what they deny.
    (A 403 *before* the first list still means "none": tests/sockets/test_kube_policies.py.)"""
    seed(fake)
    deny = {
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/x/sa/y"]}}]}],
    }
    fake.create(
        "authorizationpolicies",
        {
            "apiVersion": "weft.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-y", "namespace": "shop"},
            "spec": deny,
        },
    )
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.WARNING, "weft.discovery.kube"):
        async with running(source):
            await eventually(lambda: workloads(store)["web-1"].policies)
            fake.forbidden.add("authorizationpolicies")
            fake.expire()  # every watch relists: the policies' list is refused
            await eventually(lambda: source.stats["authorizationpolicies"].errors >= 2)
            assert [p.name for p in workloads(store)["web-1"].policies] == ["deny-y"]
            assert not source.stats["authorizationpolicies"].absent
            fake.forbidden.clear()
            # The relist waits for the watcher's backoff after its 403s, and the fake
            # server shares this loaded machine: a generous bound.
            await eventually(lambda: source.stats["authorizationpolicies"].lists >= 2, within=45)
            assert [p.name for p in workloads(store)["web-1"].policies] == ["deny-y"]
    said = [m for m in messages(caplog, logging.ERROR) if m.startswith("authorizationpolicies:")]
    assert said and "list authorizationpolicies forbidden" in said[0], messages(caplog)
    assert "agents keep the last state meanwhile" in said[0], said[0]


# -- 429 Too Many Requests ------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_429_on_list_waits_for_retry_after(
    fake: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """Retry-After (1 s) is honoured although the source's own backoff is 0.02-0.2 s, and
    it reaches the source (logged, counted) rather than being slept away unseen inside
    urllib3 on the watcher's thread."""
    seed(fake)
    fake.throttle(times=2, retry_after=1, resource="pods")
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    with caplog.at_level(logging.WARNING, "weft.discovery.kube"):
        async with running(source, sync=False):
            await store.wait_synced()
    lists = [r.at for r in fake.list_requests("pods")]
    assert len(lists) >= 3, lists
    assert all(g >= 0.95 for g in gaps(lists[:3])), gaps(lists)
    assert source.stats["pods"].errors == 2
    said = [m for m in messages(caplog) if m.startswith("pods:")]
    assert len(said) == 2 and "429" in said[0] and "Retry-After 1" in said[0], said
    # The others were not held up.
    assert len(fake.list_requests("namespaces")) == 1


async def test_429_on_watch_waits_for_retry_after_and_resumes(fake: FakeKubeAPI) -> None:
    seed(fake)
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source):
        await eventually(lambda: fake.open_watches("pods") == 1)
        fake.throttle(times=1, retry_after=2, resource="pods")
        fake.drop_watches()
        fake.create("pods", fakeapi.pod("web-3", "shop", ip="10.244.1.30"))
        await eventually(lambda: "web-3" in workloads(store), within=15)
    watches = [r.at for r in fake.watch_requests("pods")]
    # The first watch, the throttled one, then one 2 s later that resumed (no relist).
    assert len(watches) == 3, watches
    assert gaps(watches)[1] >= 1.95, gaps(watches)
    assert source.stats["pods"].relists == 0


async def test_an_absurd_retry_after_is_capped(fake: FakeKubeAPI) -> None:
    """A Retry-After of a day is not obeyed to the letter: the wait is capped (here by
    the test's backoff_max x 10 = 2 s), so one bad header cannot stall discovery."""
    seed(fake)
    fake.throttle(times=1, retry_after=86400, resource="services")
    store = DiscoveryStore()
    source = KubeSource(config(fake), store)
    async with running(source, sync=False):
        await store.wait_synced()
    lists = [r.at for r in fake.list_requests("services")]
    assert len(lists) == 2 and 1.0 <= gaps(lists)[0] <= 5.0, gaps(lists)
