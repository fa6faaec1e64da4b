"""The control plane on Kubernetes, against the fake API server over real HTTP and real
mTLS for agents: TokenReview bootstrap, node binding from the Pod watch, discovery.

What a real cluster would add (not here: no API server on this machine): the kubelet
minting projected tokens, RBAC on tokenreviews. The fake answers TokenReview the way the
API server does (audiences intersected, ``user.extra`` with the pod or node binding).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane.discovery.kube import KubeConfig, KubeSource, make_api_client
from controlplane.discovery.model import DiscoveryStore
from controlplane.identity.binding import StoreNodeBinding
from controlplane.identity.ca import init_ca, validate_ca
from controlplane.identity.kube import (
    NODE_NAME,
    POD_NAME,
    POD_UID,
    TokenReviewBootstrap,
    TokenReviewUnavailable,
)
from controlplane.identity.server import (
    ControlPlane,
    ControlPlaneConfig,
    IdentityConfig,
    ServerConfig,
)
from controlplane.identity.signer import CredentialRefused, Signer
from nodeagent.certtypes import TlsMaterial
from nodeagent.cpclient import ControlPlaneClient, RefusedError
from nodeagent.discovery import DiscoveryClient, DiscoveryConfig
from nodeagent.meshstate import MeshState
from tests import fakeapi
from tests.fakeapi import FakeKubeAPI
from weft.identity import SpiffeId, build_csr, cert_pem, generate_key, key_pem
from weft.wire import RefusalCode

pytestmark = pytest.mark.sockets

TD = "cluster.local"
API_TOKEN = "controlplane-sa-token"
AGENT_USER = "system:serviceaccount:weft-system:weft-agent"
AUD = "weft-controlplane"
SIDECAR = {"weft.io/mode": "sidecar"}


def review(
    user: str = AGENT_USER, audiences: tuple[str, ...] = (AUD,), extra: dict[str, str] | None = None
) -> dict:
    extra = extra or {}
    return {
        "authenticated": True,
        "audiences": list(audiences),
        "user": {"username": user, "uid": "u", "extra": {k: [v] for k, v in extra.items()}},
    }


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token=API_TOKEN) as api:
        api.create("namespaces", fakeapi.namespace("default", {"weft.io/capture": "enabled"}))
        api.create("namespaces", fakeapi.namespace("weft-system"))
        api.create(
            "pods",
            fakeapi.pod(
                "weft-agent-abcde", "weft-system", node="node-1", ip="10.240.0.11",
                service_account="weft-agent", uid="agent-uid-1",
            ),
        )  # fmt: skip
        api.create("pods", fakeapi.pod("echo-1", node="node-1", service_account="echo"))
        # Sidecar-mode pods: by the annotation, or by the injected container alone.
        api.create("pods", fakeapi.pod("web-1", node="node-1", ip="10.244.1.7",
                                       service_account="web", annotations=SIDECAR))  # fmt: skip
        injected = fakeapi.pod("web-2", node="node-2", ip="10.244.2.7", service_account="web")
        injected["spec"]["containers"].append({"name": "weft-sidecar", "image": "weft:1"})
        api.create("pods", injected)
        api.create("pods", fakeapi.pod("pending-1", node=None, ip=None, service_account="web",
                                       annotations=SIDECAR))  # fmt: skip
        api.create("pods", fakeapi.pod("done-1", node="node-1", ip=None, service_account="web",
                                       annotations=SIDECAR, phase="Succeeded"))  # fmt: skip
        api.create(
            "pods", fakeapi.pod("other-1", node="node-2", ip="10.244.2.2", service_account="other")
        )
        api.token_reviews = {
            # Kubernetes < 1.30: only the pod the token is bound to.
            "pod-bound": review(extra={POD_NAME: "weft-agent-abcde", POD_UID: "agent-uid-1"}),
            # 1.30+: the node name too.
            "node-bound": review(extra={NODE_NAME: "node-2", POD_NAME: "weft-agent-x"}),
            "stale-pod": review(extra={POD_NAME: "weft-agent-abcde", POD_UID: "older-uid"}),
            "gone-pod": review(extra={POD_NAME: "weft-agent-gone", POD_UID: "x"}),
            "legacy-secret": review(),
            "other-audience": review(audiences=("https://kubernetes.default.svc",)),
            "other-sa": review("system:serviceaccount:default:echo", extra={NODE_NAME: "node-1"}),
        }
        yield api


def kube_config(fake: FakeKubeAPI) -> KubeConfig:
    return KubeConfig(server=fake.url, token=API_TOKEN, backoff_initial=0.02, backoff_max=0.2)


@pytest.mark.parametrize(
    ("token", "node"),
    [
        ("pod-bound", "node-1"),
        ("node-bound", "node-2"),
        ("stale-pod", None),
        ("gone-pod", None),
        ("legacy-secret", None),
        ("other-audience", None),
        ("other-sa", None),
        ("forged", None),
    ],
)
def test_token_review_decides_the_node(fake: FakeKubeAPI, token: str, node: str | None):
    tokens = TokenReviewBootstrap(make_api_client(kube_config(fake)))
    assert tokens.node_for(token) == node
    reviews = [r for r in fake.requests if r.path.endswith("/tokenreviews")]
    assert reviews and reviews[-1].headers["authorization"] == f"Bearer {API_TOKEN}"


def test_an_api_outage_is_not_a_bad_token(fake: FakeKubeAPI):
    fake.token_review_failure = 503
    tokens = TokenReviewBootstrap(make_api_client(kube_config(fake)))
    with pytest.raises(TokenReviewUnavailable, match="HTTP 503"):
        tokens.node_for("pod-bound")


class Plane:
    """A Kubernetes-mode control plane over the fake API server."""

    def __init__(self, fake: FakeKubeAPI, tmp_path: Any) -> None:
        b = init_ca(TD)
        self.bundle = tmp_path / "anchor.pem"
        self.bundle.write_bytes(cert_pem(b.anchor))
        issuer = validate_ca(cert_pem(b.anchor), cert_pem(b.issuer), key_pem(b.issuer_key))
        self.store = DiscoveryStore()
        api = make_api_client(kube_config(fake))
        self.source = KubeSource(kube_config(fake), self.store, api)
        registry = CollectorRegistry()
        tokens = TokenReviewBootstrap(api)
        signer = Signer(
            issuer, StoreNodeBinding(self.store), tokens, TD, registry=registry, pods=tokens
        )
        config = ControlPlaneConfig(
            identity=IdentityConfig(ca_dir=tmp_path),
            server=ServerConfig(listen_address="127.0.0.1", api_port=0, admin_port=0),
        )
        self.cp = ControlPlane(config, signer, registry, store=self.store, source=self.source)
        self.tmp_path = tmp_path

    def client(self, name: str) -> ControlPlaneClient:
        return ControlPlaneClient(
            "127.0.0.1", self.bundle, self.tmp_path / name, port=self.cp.api.port,
            trust_domain=TD,
        )  # fmt: skip


@pytest.fixture
async def plane(fake: FakeKubeAPI, tmp_path: Any) -> AsyncIterator[Plane]:
    p = Plane(fake, tmp_path)
    await p.cp.start()  # returns once the Kubernetes source has synced
    try:
        yield p
    finally:
        await p.cp.stop()


async def _until(check: Any) -> None:
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110 (state of another task; no event to wait on)
            await asyncio.sleep(0.02)


async def _csr_for(client: ControlPlaneClient, sid: SpiffeId) -> Any:
    return await client.request_certificate(sid, build_csr(generate_key(), sid))


async def test_agent_bootstraps_with_its_token_and_gets_bound_identities(plane: Plane):
    client = plane.client("node-1")
    await client.bootstrap("node-1", "pod-bound")
    assert client.node_identity == SpiffeId.node("node-1", TD)
    # Node binding follows the Pod watch: echo runs on node-1, other only on node-2.
    issued = await _csr_for(client, SpiffeId.workload("default", "echo", TD))
    assert issued.certificate_pem
    with pytest.raises(RefusedError) as refused:
        await _csr_for(client, SpiffeId.workload("default", "other", TD))
    assert refused.value.code == RefusalCode.NODE_NOT_BOUND


async def test_a_token_for_another_node_or_audience_is_refused(plane: Plane):
    client = plane.client("impostor")
    with pytest.raises(RefusedError) as refused:
        await client.bootstrap("node-1", "node-bound")  # the token's pod runs on node-2
    assert refused.value.code == RefusalCode.UNAUTHENTICATED
    with pytest.raises(RefusedError):
        await client.bootstrap("node-1", "other-audience")


async def test_an_api_outage_during_bootstrap_is_retryable(plane: Plane, fake: FakeKubeAPI):
    fake.token_review_failure = 500
    client = plane.client("node-1")
    with pytest.raises(RefusedError) as refused:
        await client.bootstrap("node-1", "pod-bound")
    assert refused.value.code == RefusalCode.CREDENTIAL_CHECK_UNAVAILABLE
    fake.token_review_failure = None
    await client.bootstrap("node-1", "pod-bound")


async def test_agents_receive_the_cluster_from_the_pod_watch(plane: Plane, fake: FakeKubeAPI):
    client = plane.client("node-1")
    await client.bootstrap("node-1", "pod-bound")
    state = MeshState()
    agent = DiscoveryClient(
        client, state, config=DiscoveryConfig(backoff_initial=0.05, backoff_max=0.2)
    )
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: state.workload_at("10.244.1.2") is not None)
        echo = state.workload_at("10.244.1.2")
        assert echo is not None and echo.captured and echo.node == "node-1"
        assert echo.identity == SpiffeId.workload("default", "echo", TD)
        # A new pod shows up at the agent through the watch and the stream.
        fake.create("pods", fakeapi.pod("echo-2", node="node-2", ip="10.244.2.9",
                                        service_account="echo"))  # fmt: skip
        await _until(lambda: state.workload_at("10.244.2.9") is not None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- sidecars


def test_a_sidecar_pod_token_names_its_own_pod(fake: FakeKubeAPI):
    tokens = TokenReviewBootstrap(make_api_client(kube_config(fake)))
    claim = tokens.pod_for(fake.pod_token("default", "web-1"))
    web1 = fake.get("pods", "web-1", "default")
    assert web1 is not None
    assert (claim.namespace, claim.name, claim.uid) == ("default", "web-1", web1["metadata"]["uid"])
    assert (claim.service_account, claim.node) == ("web", "node-1")
    assert claim.identity(TD) == SpiffeId.workload("default", "web", TD)
    # Injected without the annotation, and a token without the node (Kubernetes < 1.30).
    claim = tokens.pod_for(fake.pod_token("default", "web-2", node_name=False))
    assert (claim.name, claim.node) == ("web-2", "node-2")


@pytest.mark.parametrize(
    ("pod", "audiences", "code", "words"),
    [
        ("echo-1", (AUD,), RefusalCode.POD_NOT_SIDECAR, "not in sidecar mode"),
        ("pending-1", (AUD,), RefusalCode.POD_NOT_SIDECAR, "not scheduled"),
        ("done-1", (AUD,), RefusalCode.POD_NOT_SIDECAR, "has Succeeded"),
        ("web-1", ("https://kubernetes.default.svc",), RefusalCode.UNAUTHENTICATED, "not valid"),
    ],
)
def test_a_pod_token_is_refused_unless_its_pod_is_a_sidecar(
    fake: FakeKubeAPI, pod: str, audiences: tuple[str, ...], code: RefusalCode, words: str
):
    tokens = TokenReviewBootstrap(make_api_client(kube_config(fake)))
    token = fake.pod_token("default", pod, audiences=audiences)
    with pytest.raises(CredentialRefused, match=words) as refused:
        tokens.pod_for(token)
    assert refused.value.code == code


def test_a_deleted_or_replaced_pods_token_is_refused(fake: FakeKubeAPI):
    tokens = TokenReviewBootstrap(make_api_client(kube_config(fake)))
    token = fake.pod_token("default", "web-1")
    fake.delete("pods", "web-1", "default")
    with pytest.raises(CredentialRefused, match=r"not valid.*not found") as refused:
        tokens.pod_for(token)
    assert refused.value.code == RefusalCode.UNAUTHENTICATED
    # The agent's own token (a pod-bound one) is not a sidecar's, nor is a legacy token.
    for other, words in (("pod-bound", "not in sidecar mode"), ("legacy-secret", "not bound")):
        with pytest.raises(CredentialRefused, match=words):
            tokens.pod_for(other)


def _sidecar_client(plane: Plane, token: str, holder: dict[str, TlsMaterial]) -> ControlPlaneClient:
    client = plane.client("sidecar-web-1")
    client.use_pod_token(lambda: token, lambda: holder.get("web"))
    return client


async def test_a_sidecar_gets_its_own_certificate_and_nothing_else(plane: Plane, fake: FakeKubeAPI):
    holder: dict[str, TlsMaterial] = {}
    client = _sidecar_client(plane, fake.pod_token("default", "web-1"), holder)
    web = SpiffeId.workload("default", "web", TD)
    issued = await _csr_for(client, web)
    assert issued.certificate_pem and client.node_identity is None  # no node certificate
    # Another identity — of a pod on the same node, or the agent's — is refused, saying why.
    for foreign in (
        SpiffeId.workload("default", "echo", TD),
        SpiffeId.workload("weft-system", "weft-agent", TD),
    ):
        with pytest.raises(RefusedError) as refused:
            await _csr_for(client, foreign)
        assert refused.value.code == RefusalCode.NOT_POD_IDENTITY
        assert "belongs to pod default/web-1, which runs as " + str(web) in str(refused.value)
        assert str(foreign) in str(refused.value)
    # A node-mode pod's token gets nothing, not even its own identity.
    echo = _sidecar_client(plane, fake.pod_token("default", "echo-1"), holder)
    with pytest.raises(RefusedError) as refused:
        await _csr_for(echo, SpiffeId.workload("default", "echo", TD))
    assert refused.value.code == RefusalCode.POD_NOT_SIDECAR


async def test_a_sidecar_reads_discovery_with_its_workload_certificate(
    plane: Plane, fake: FakeKubeAPI, tmp_path: Any
):
    holder: dict[str, TlsMaterial] = {}
    client = _sidecar_client(plane, fake.pod_token("default", "web-1"), holder)
    web = SpiffeId.workload("default", "web", TD)
    key = generate_key()
    issued = await client.request_certificate(web, build_csr(key, web))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    (tmp_path / "chain.pem").write_text(issued.certificate_pem + "".join(issued.chain_pem))
    state = MeshState()
    agent = DiscoveryClient(
        client, state, config=DiscoveryConfig(backoff_initial=0.05, backoff_max=0.2)
    )
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.sleep(0.3)  # no certificate yet: the stream waits, retrying
        assert state.workload_at("10.244.1.2") is None
        holder["web"] = TlsMaterial(
            web, tmp_path / "key.pem", tmp_path / "chain.pem", issued.not_after, 1
        )
        await _until(lambda: state.workload_at("10.244.1.2") is not None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_sidecar_bootstraps_on_its_pods_token(
    plane: Plane, fake: FakeKubeAPI, tmp_path: Any
):
    """`nodeagent.sidecar.Sidecar`'s own wiring (pod bootstrap): certificate, then the
    discovery stream opened with it — the listeners are not needed for that."""
    from nodeagent.sidecar import Sidecar, SidecarConfig

    token = tmp_path / "token"
    token.write_text(fake.pod_token("default", "web-1") + "\n")
    env = {
        "POD_NAME": "web-1", "POD_NAMESPACE": "default", "POD_SERVICE_ACCOUNT": "web",
        "POD_IP": "10.244.1.7", "NODE_NAME": "node-1",
        "WEFT_CONTROLPLANE": "127.0.0.1", "WEFT_TOKEN_FILE": str(token),
        "WEFT_TRUST_BUNDLE": str(plane.bundle), "WEFT_CERT_DIR": str(tmp_path / "run/certs"),
    }  # fmt: skip
    sidecar = Sidecar(SidecarConfig.from_env(env))
    sidecar.cp_client.port = plane.cp.api.port
    tasks = [
        sidecar.certs.start(),
        asyncio.create_task(sidecar._bootstrap()),
        asyncio.create_task(sidecar._certificates_ready()),
        asyncio.create_task(sidecar._discover()),
    ]
    try:
        await _until(lambda: sidecar.certs.material(sidecar.identity) is not None)
        assert sidecar.cp_client.node_identity is None
        await _until(lambda: sidecar.mesh.workload_at("10.244.1.2") is not None)
        # The token file is read for every request (the kubelet rotates it in place).
        token.write_text("rotated-and-forged")
        key = generate_key()
        web = SpiffeId.workload("default", "web", TD)
        with pytest.raises(RefusedError) as refused:
            await sidecar.cp_client.request_certificate(web, build_csr(key, web))
        assert refused.value.code == RefusalCode.UNAUTHENTICATED
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sidecar.certs.close()
