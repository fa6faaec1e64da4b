"""The discovery stream over real mTLS on 127.0.0.1: control plane <-> agent clients.

Snapshot then deltas, resume after a reconnect, a fresh snapshot after a control plane
restart, heartbeats keeping a quiet stream alive, a slow agent that cannot stall the
others, and refusals of unauthenticated or malformed subscriptions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from controlplane.discovery.model import DiscoveryStore
from controlplane.discovery.stream import StreamConfig
from controlplane.identity.ca import init_ca, validate_ca
from controlplane.identity.server import (
    ControlPlane,
    ControlPlaneConfig,
    IdentityConfig,
    ServerConfig,
)
from controlplane.identity.signer import Signer
from nodeagent.cpclient import ControlPlaneClient
from nodeagent.discovery import DiscoveryClient, DiscoveryConfig
from nodeagent.meshstate import MeshState
from weft.identity import SpiffeId, cert_pem, key_pem
from weft.mesh import Endpoint, InboundMode, Service, ServicePort, Workload
from weft.meshwire import DISCOVERY_PATH, FrameDecoder, SnapshotMsg, Subscribe, decode_message
from weft.wire import Refusal, RefusalCode

pytestmark = pytest.mark.sockets

TD = "cluster.local"


def workload(i: int, node: str = "node-1", pad: str = "") -> Workload:
    return Workload(
        uid=f"uid-{i}",
        name=f"pod-{i}{pad}",
        namespace="default",
        node=node,
        node_ip="10.240.0.11",
        ips=(f"10.244.{i // 250}.{i % 250 + 2}",),
        service_account="echo",
        identity=SpiffeId.workload("default", "echo", TD),
        captured=True,
        inbound_mode=InboundMode.PERMISSIVE,
    )


def service(endpoints: int) -> Service:
    return Service(
        name="echo",
        namespace="default",
        vips=("10.96.0.10",),
        ports=(ServicePort(80, 8080),),
        endpoints=tuple(Endpoint(workload(i).ips[0], f"uid-{i}", True) for i in range(endpoints)),
    )


class Binding:
    def identities_on(self, node: str) -> set[SpiffeId]:
        return set()


class Tokens:
    def node_for(self, token: str) -> str | None:
        return {"tok-1": "node-1", "tok-2": "node-2"}.get(token)


class Env:
    def __init__(self, tmp_path, stream_config: StreamConfig, node_lifetime: float = 3600) -> None:
        b = init_ca(TD)
        self.bundle = tmp_path / "anchor.pem"
        self.bundle.write_bytes(cert_pem(b.anchor))
        self.issuer = validate_ca(cert_pem(b.anchor), cert_pem(b.issuer), key_pem(b.issuer_key))
        self.tmp_path = tmp_path
        self.stream_config = stream_config
        self.node_lifetime = dt.timedelta(seconds=node_lifetime)
        self.store = DiscoveryStore()
        self.store.replace([workload(i) for i in range(3)], [service(3)])
        self.store.mark_synced()
        self.cp: ControlPlane | None = None
        self.registry = CollectorRegistry()
        self.port = 0
        self._run: asyncio.Task[None] | None = None

    async def start(self, store: DiscoveryStore | None = None) -> None:
        if store is not None:
            self.store = store
        self.registry = CollectorRegistry()
        config = ControlPlaneConfig(
            identity=IdentityConfig(ca_dir=self.tmp_path),
            server=ServerConfig(
                listen_address="127.0.0.1", api_port=self.port, admin_port=0, drain_seconds=0.5
            ),
        )
        signer = Signer(
            self.issuer, Binding(), Tokens(), TD, registry=self.registry,
            node_lifetime=self.node_lifetime,
        )  # fmt: skip
        self.cp = ControlPlane(
            config, signer, self.registry, store=self.store, stream_config=self.stream_config
        )
        await self.cp.start()
        self.port = self.cp.api.port

    async def stop(self) -> None:
        if self.cp is not None:
            await self.cp.stop()
            self.cp = None

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return value or 0.0

    async def agent(self, node: str = "node-1", state: MeshState | None = None) -> Agent:
        client = ControlPlaneClient(
            "127.0.0.1", self.bundle, self.tmp_path / f"agent-{node}", port=self.port,
            trust_domain=TD,
        )  # fmt: skip
        await client.bootstrap(node, f"tok-{node[-1]}")
        config = DiscoveryConfig(inactivity=1.0, backoff_initial=0.05, backoff_max=0.2)
        return Agent(DiscoveryClient(client, state or MeshState(), config=config))


class Agent:
    def __init__(self, client: DiscoveryClient) -> None:
        self.client = client
        self.state = client.state
        self.task = asyncio.create_task(client.run())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def reconnects(self) -> float:
        return sum(
            s.value
            for m in self.client.m_reconnects.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` (state of other tasks and sockets, with no event to wait on)."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[Env]:
    e = Env(tmp_path, StreamConfig(heartbeat=0.2, queue_bytes=64 * 1024, write_timeout=1.0))
    await e.start()
    yield e
    await e.stop()


async def test_snapshot_then_deltas_reach_the_agent(env: Env):
    agent = await env.agent()
    try:
        await eventually(lambda: agent.state.revision == env.store.revision)
        assert set(agent.state.workloads) == {"uid-0", "uid-1", "uid-2"}
        assert agent.state.vip("10.96.0.10", 80) is not None
        env.store.update([workload(7, node="node-2")])
        env.store.update([service(2)])
        await eventually(lambda: agent.state.revision == env.store.revision)
        moved = agent.state.workload_at(workload(7).ips[0])
        assert moved is not None and moved.node == "node-2"
        target = agent.state.vip("10.96.0.10", 80)
        assert target is not None and len(target.service.endpoints) == 2
        assert env.metric("weft_discovery_snapshots_sent_total", reason="new") == 1
        assert env.metric("weft_discovery_subscribers") == 1
    finally:
        await agent.stop()


async def test_heartbeats_keep_a_quiet_stream_open(env: Env):
    agent = await env.agent()
    try:
        await eventually(lambda: agent.state.synced)
        await asyncio.sleep(2.5)  # 2.5 x the agent's inactivity timeout, nothing changes
        assert agent.reconnects() == 0
        assert agent.client.connected
    finally:
        await agent.stop()


async def test_a_reconnecting_agent_resumes_with_deltas(env: Env):
    state = MeshState()
    first = await env.agent(state=state)
    await eventually(lambda: state.revision == env.store.revision)
    await first.stop()
    env.store.update([workload(9)])  # a change while it is away
    second = await env.agent(state=state)
    try:
        await eventually(lambda: state.revision == env.store.revision)
        assert "uid-9" in state.workloads
        # Resumed from its revision: still only the one snapshot of the first connection.
        assert env.metric("weft_discovery_snapshots_sent_total", reason="new") == 1
    finally:
        await second.stop()


async def test_a_restarted_control_plane_sends_a_fresh_snapshot(env: Env):
    agent = await env.agent()
    try:
        await eventually(lambda: agent.state.revision == env.store.revision)
        old_epoch = agent.state.epoch
        await env.stop()
        await eventually(lambda: not agent.client.connected)
        # Agents keep their state while the control plane is away.
        assert "uid-1" in agent.state.workloads
        # A new control plane (new epoch, revisions restart) without uid-1.
        store = DiscoveryStore()
        store.replace([workload(0), workload(2)], [service(1)])
        store.mark_synced()
        await env.start(store)
        await eventually(lambda: agent.state.epoch == store.epoch, within=10)
        assert agent.state.epoch != old_epoch
        assert set(agent.state.workloads) == {"uid-0", "uid-2"}
    finally:
        await agent.stop()


async def _raw_subscriber(env: Env, *, cert: bool, body: bytes, rcvbuf: int = 0):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(env.bundle))
    if cert:
        client = ControlPlaneClient(
            "127.0.0.1", env.bundle, env.tmp_path / "raw", port=env.port, trust_domain=TD
        )
        await client.bootstrap("node-2", "tok-2")
        ctx.load_cert_chain(
            env.tmp_path / "raw" / "node-chain.pem", env.tmp_path / "raw" / "node-key.pem"
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", env.port))
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="cp")
    head = f"POST {DISCOVERY_PATH} HTTP/1.1\r\nHost: cp\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def test_subscribing_needs_the_node_certificate(env: Env):
    reader, writer = await _raw_subscriber(env, cert=False, body=Subscribe().encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert Refusal.decode(body).code == RefusalCode.UNAUTHENTICATED


async def test_a_malformed_subscription_is_refused(env: Env):
    reader, writer = await _raw_subscriber(env, cert=True, body=b'{"epoch": "x"}')
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert "epoch and revision go together" in Refusal.decode(body).message


async def test_the_stream_is_frames_a_plain_tls_client_can_read(env: Env):
    reader, writer = await _raw_subscriber(env, cert=True, body=Subscribe().encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"application/vnd.weft.discovery.v1" in head
        decoder = FrameDecoder()
        while not (frames := decoder.feed(await asyncio.wait_for(reader.read(65536), 5))):
            pass
        msg = decode_message(frames[0])
        assert isinstance(msg, SnapshotMsg) and msg.revision == env.store.revision
    finally:
        writer.close()


async def test_a_slow_agent_does_not_stall_the_others(env: Env):
    # An agent that subscribes and then never reads, with a tiny receive buffer.
    slow_reader, slow_writer = await _raw_subscriber(
        env, cert=True, body=Subscribe().encode(), rcvbuf=4096
    )
    fast = await env.agent()
    try:
        await eventually(lambda: fast.state.synced)
        await eventually(lambda: env.metric("weft_discovery_subscribers") == 2)
        # 2 MB of changes in 200 batches: far past the slow agent's 64 KiB queue.
        for round_ in range(200):
            env.store.update([workload(i, pad=f"-{round_}-" + "x" * 200) for i in range(40)])
            await asyncio.sleep(0)
        await eventually(lambda: fast.state.revision == env.store.revision, within=10)
        assert fast.state.workloads["uid-5"].name.startswith("pod-5-199-")
        await eventually(
            lambda: (
                env.metric("weft_discovery_snapshots_sent_total", reason="overflow")
                + env.metric("weft_discovery_slow_disconnects_total")
                >= 1
            ),
            within=10,
        )
    finally:
        await fast.stop()
        slow_writer.transport.abort()
        del slow_reader


async def test_a_stream_ends_when_its_node_certificate_expires(tmp_path):
    env = Env(tmp_path, StreamConfig(heartbeat=0.2), node_lifetime=2.0)
    await env.start()
    agent = await env.agent()
    try:
        await eventually(lambda: agent.state.synced)
        first_epoch_streams = env.metric("weft_controlplane_requests_total",
                                         endpoint="/v1/discovery", status="200")  # fmt: skip
        # The server ends the stream at the certificate's expiry; the agent renews its
        # node certificate (at 70 %) and subscribes again, resuming.
        await eventually(
            lambda: env.metric("weft_controlplane_requests_total", endpoint="/v1/discovery",
                               status="200") > first_epoch_streams,
            within=10,
        )  # fmt: skip
        env.store.update([workload(42)])
        await eventually(lambda: "uid-42" in agent.state.workloads)
        assert env.metric("weft_discovery_snapshots_sent_total", reason="new") == 1
    finally:
        await agent.stop()
        await env.stop()


async def test_a_node_may_hold_only_a_few_streams(env: Env):
    held = []
    try:
        for _ in range(env.stream_config.max_per_node):
            held.append(await _raw_subscriber(env, cert=True, body=Subscribe().encode()))
        await eventually(
            lambda: env.metric("weft_discovery_subscribers") == env.stream_config.max_per_node
        )
        reader, writer = await _raw_subscriber(env, cert=True, body=Subscribe().encode())
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429")
        assert Refusal.decode(body).code == RefusalCode.TOO_MANY_STREAMS
    finally:
        for _, w in held:
            w.transport.abort()
