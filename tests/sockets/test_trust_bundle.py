"""The trust bundle per namespace (issue #16): the control plane keeps a ConfigMap
``weft-trust-bundle`` (``ca.crt``) in every labelled namespace, against the fake API
server's real wire format (list with label and field selectors, create, replace with the
resourceVersion precondition, 403/409) — and a sidecar trusts the control plane with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane.discovery.kube import KubeConfig, KubeSource, make_api_client
from controlplane.discovery.model import DiscoveryStore
from controlplane.identity.binding import StoreNodeBinding
from controlplane.identity.ca import init_ca, validate_ca
from controlplane.identity.kube import (
    TRUST_BUNDLE_KEY,
    TRUST_BUNDLE_NAME,
    TokenReviewBootstrap,
    TrustBundlePublisher,
)
from controlplane.identity.server import (
    ControlPlane,
    ControlPlaneConfig,
    IdentityConfig,
    ServerConfig,
)
from controlplane.identity.signer import Signer
from nodeagent.cpclient import ControlPlaneClient
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, key_pem

pytestmark = pytest.mark.sockets

TD = "cluster.local"
API_TOKEN = "controlplane-sa-token"
LABELLED = {"weft.io/capture": "enabled"}


@pytest.fixture(scope="module")
def issuer() -> Any:
    b = init_ca(TD)
    return validate_ca(cert_pem(b.anchor), cert_pem(b.issuer), key_pem(b.issuer_key))


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=API_TOKEN) as api:
        api.create("namespaces", fakeapi.namespace("shop", LABELLED))
        api.create("namespaces", fakeapi.namespace("payments", LABELLED))
        api.create("namespaces", fakeapi.namespace("plain"))
        api.create("namespaces", fakeapi.namespace("weft-system"))
        yield api


def kube_config(fake: FakeKubeAPI) -> KubeConfig:
    return KubeConfig(server=fake.url, token=API_TOKEN, backoff_initial=0.02, backoff_max=0.2)


def publisher(fake: FakeKubeAPI, issuer: Any, **kw: Any) -> TrustBundlePublisher:
    return TrustBundlePublisher(
        make_api_client(kube_config(fake)),
        lambda: "".join(issuer.bundle_pem),
        trust_domain=TD,
        **kw,
    )


def _bundle(fake: FakeKubeAPI, namespace: str) -> str | None:
    cm = fake.get("configmaps", TRUST_BUNDLE_NAME, namespace)
    return None if cm is None else cm["data"][TRUST_BUNDLE_KEY]


def test_every_labelled_namespace_gets_the_anchors_and_only_those(fake, issuer):
    pub = publisher(fake, issuer)
    first = pub.publish_once()
    assert (first.namespaces, first.created, first.updated, first.failed) == (2, 2, 0, [])
    anchors = "".join(issuer.bundle_pem)
    assert _bundle(fake, "shop") == anchors == _bundle(fake, "payments")
    assert _bundle(fake, "plain") is None and _bundle(fake, "weft-system") is None
    cm = fake.get("configmaps", TRUST_BUNDLE_NAME, "shop")
    assert cm is not None
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "weft"
    assert cm["metadata"]["annotations"]["weft.io/trust-domain"] == TD
    # Nothing to do the second time: two lists, no write.
    before = len([r for r in fake.requests if r.method in ("POST", "PUT")])
    again = pub.publish_once()
    assert (again.created, again.updated, again.unchanged) == (0, 0, 2)
    assert len([r for r in fake.requests if r.method in ("POST", "PUT")]) == before
    lists = [r for r in fake.requests if r.path == "/api/v1/configmaps"]
    assert lists[-1].query["fieldSelector"] == f"metadata.name={TRUST_BUNDLE_NAME}"


def test_edited_deleted_or_hand_made_copies_are_put_right(fake, issuer):
    # A hand-made copy (as the docs said to make before): kept, its anchors replaced,
    # our labels added to its own.
    fake.create("configmaps", {"metadata": {"name": TRUST_BUNDLE_NAME, "namespace": "shop",
                "labels": {"team": "a"}}, "data": {TRUST_BUNDLE_KEY: "stale"}})  # fmt: skip
    pub = publisher(fake, issuer)
    r = pub.publish_once()
    assert (r.created, r.updated) == (1, 1)
    shop = fake.get("configmaps", TRUST_BUNDLE_NAME, "shop")
    assert shop is not None and shop["metadata"]["labels"]["team"] == "a"
    assert shop["data"][TRUST_BUNDLE_KEY] == "".join(issuer.bundle_pem)
    fake.delete("configmaps", TRUST_BUNDLE_NAME, "payments")
    payments = pub.publish_once()
    assert payments.created == 1 and _bundle(fake, "payments")
    # A namespace labelled later joins; one unlabelled keeps its copy (nothing secret).
    fake.update("namespaces", fakeapi.namespace("plain", LABELLED))
    assert pub.publish_once().created == 1 and _bundle(fake, "plain")
    fake.update("namespaces", fakeapi.namespace("plain"))
    assert pub.publish_once().namespaces == 2 and _bundle(fake, "plain")


def test_a_race_with_another_replica_is_a_conflict_then_equal(fake, issuer):
    """Replica B created the copy between A's list and A's create: A compares, finds it
    equal, writes nothing.  A stale replace is 409 and counted, not fatal."""
    pub = publisher(fake, issuer)
    other = publisher(fake, issuer)
    original = fake.after_list_page

    def race(resource: str) -> None:
        if resource == "configmaps":
            fake.after_list_page = original
            other.publish_once()

    fake.after_list_page = race
    r = pub.publish_once()
    assert (r.created, r.updated, r.unchanged, r.failed) == (0, 0, 2, [])


def test_without_rbac_a_write_fails_loudly_and_is_retried(fake, issuer, caplog):
    fake.forbidden_writes = {"configmaps"}
    registry = CollectorRegistry()
    pub = publisher(fake, issuer, registry=registry)
    with caplog.at_level(logging.WARNING, logger="weft.controlplane.identity"):
        r = pub.publish_once()
        pub.publish_once()
    assert len(r.failed) == 2 and "HTTP 403" in r.failed[0]
    warned = [m for m in caplog.messages if "needs create and update on configmaps" in m]
    assert len(warned) == 1  # once, not per namespace and pass
    assert registry.get_sample_value("weft_trust_bundle_writes_total", {"outcome": "failed"}) == 4
    fake.forbidden_writes = set()
    assert pub.publish_once().created == 2
    assert registry.get_sample_value("weft_trust_bundle_namespaces") == 2


async def _until(check: Any) -> None:
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110 (state of another thread: the fake's store)
            await asyncio.sleep(0.02)


async def test_the_control_plane_follows_namespace_labels_and_sidecars_trust_it(
    fake, issuer, tmp_path
):
    """Wired as `run_controlplane` wires it: the Kubernetes source pokes the publisher on
    Namespace events (no waiting for its interval); a sidecar whose only trust is the
    published ConfigMap gets its certificate."""
    api = make_api_client(kube_config(fake))
    store = DiscoveryStore()
    source = KubeSource(kube_config(fake), store, api)
    tokens = TokenReviewBootstrap(api)
    registry = CollectorRegistry()
    signer = Signer(issuer, StoreNodeBinding(store), tokens, TD, registry=registry, pods=tokens)
    pub = TrustBundlePublisher(
        api, lambda: "".join(signer.issuer.bundle_pem), trust_domain=TD, interval=3600,
        registry=registry,
    )  # fmt: skip
    source.namespace_listeners.append(pub.poke)
    config = ControlPlaneConfig(
        identity=IdentityConfig(ca_dir=tmp_path),
        server=ServerConfig(listen_address="127.0.0.1", api_port=0, admin_port=0),
    )
    cp = ControlPlane(
        config, signer, registry, store=store, source=source, background={"trust-bundle": pub.run}
    )
    await cp.start()
    try:
        await _until(lambda: _bundle(fake, "shop") is not None)
        fake.create("namespaces", fakeapi.namespace("later", LABELLED))
        await _until(lambda: _bundle(fake, "later") is not None)  # poked, not the hour
        fake.create("pods", fakeapi.pod("web-1", "later", service_account="web",
                                        annotations={"weft.io/mode": "sidecar"}))  # fmt: skip
        mounted = tmp_path / "mounted-ca.crt"
        mounted.write_text(_bundle(fake, "later") or "")
        client = ControlPlaneClient("127.0.0.1", mounted, tmp_path / "state",
                                    port=cp.api.port, trust_domain=TD)  # fmt: skip
        client.use_pod_token(lambda: fake.pod_token("later", "web-1"), lambda: None)
        web = SpiffeId.workload("later", "web", TD)
        issued = await client.request_certificate(web, build_csr(generate_key(), web))
        assert issued.trust_bundle_pem == issuer.bundle_pem
    finally:
        await cp.stop()
