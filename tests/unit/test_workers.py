"""Proxy workers' sans-I/O parts: the channel's framing, the metrics merge, the
certificate message, the CPU count behind ``--workers auto``."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.certtypes import TlsMaterial
from nodeagent.workers import usable_cpus
from nodeagent.workers.aggregate import merge
from nodeagent.workers.certs import CertMessage, SharedCerts
from nodeagent.workers.channel import MAX_BODY, Channel, ChannelError, FrameReader, Kind, encode
from weft.identity import SpiffeId


def test_frames_survive_any_split():
    frames = [(Kind.MESH, b'{"type":"snapshot"}'), (Kind.DRAIN, b""), (Kind.CERTS, b"x" * 70000)]
    wire = b"".join(encode(k, b) for k, b in frames)
    for step in (1, 3, 4096, len(wire)):
        reader = FrameReader()
        got = [f for i in range(0, len(wire), step) for f in reader.feed(wire[i : i + step])]
        assert got == frames


def test_a_broken_peer_is_a_channel_error():
    with pytest.raises(ChannelError, match="unknown frame kind"):
        list(FrameReader().feed(b"\x00\x00\x00\x00\xfe"))
    with pytest.raises(ChannelError, match="announced"):
        list(FrameReader().feed((MAX_BODY + 1).to_bytes(4, "big") + b"\x02"))


def test_channel_over_a_socketpair_in_order():
    async def main() -> list[tuple[Kind, bytes]]:
        a, b = socket.socketpair()
        left, right = await Channel.open(a), await Channel.open(b)
        for i in range(100):
            left.send(Kind.MESH, str(i).encode())
        left.close()
        got = []
        with pytest.raises(ChannelError, match="closed"):
            while True:
                got.append(await right.recv())
        right.close()
        return got

    got = asyncio.run(main())
    assert got == [(Kind.MESH, str(i).encode()) for i in range(100)]


def _registry(n: float, path: str) -> str:
    r = CollectorRegistry()
    c = Counter("request", "Requests.", ["path"], registry=r)
    c.labels(path).inc(n)
    c.labels("/both").inc(1)
    Gauge("open_connections", "Open now.", registry=r).set(n)
    h = Histogram("latency_ms", "Latency.", registry=r, buckets=(1, 10))
    h.observe(n)
    return generate_latest(r).decode()


def test_merge_sums_every_series_and_keeps_the_families():
    merged = merge([_registry(2, "/a b"), _registry(5, "/c}")])
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families.values() for s in f.samples}  # fmt: skip
    assert values[("request_total", (("path", "/a b"),))] == 2
    assert values[("request_total", (("path", "/c}"),))] == 5
    assert values[("request_total", (("path", "/both"),))] == 2
    assert values[("open_connections", ())] == 7
    assert values[("latency_ms_bucket", (("le", "1.0"),))] == 0
    assert values[("latency_ms_bucket", (("le", "10.0"),))] == 2
    assert values[("latency_ms_count", ())] == 2
    assert values[("latency_ms_sum", ())] == 7
    assert families["request"].type == "counter"
    assert families["latency_ms"].type == "histogram"
    # Creation times are not added up: the earliest one stands.
    created = [v for (name, _), v in values.items() if name == "request_created"]
    assert created and all(v < 4e9 for v in created)


def test_merge_of_one_text_is_that_text():
    text = _registry(3, "/x")
    assert merge([text]) == text


def test_cert_message_round_trip_and_expiry(tmp_path: Path):
    ident = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
    other = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/gone")
    now = [1000.0]
    live = TlsMaterial(ident, tmp_path / "1.key.pem", tmp_path / "1.chain.pem", 2000.0, 1)
    expired = TlsMaterial(other, tmp_path / "k", tmp_path / "c", 500.0, 3)
    msg = CertMessage(b"-----BEGIN CERTIFICATE-----\n", 4, (live, expired))
    back = CertMessage.decode(msg.encode())
    assert back == msg
    assert b"PRIVATE KEY" not in msg.encode()  # paths, never key material
    certs = SharedCerts(clock=lambda: now[0])
    certs.update(back)
    assert certs.material(ident) == live
    assert certs.material(other) is None  # never an expired certificate
    assert certs.trust_generation == 4 and certs.identities == {ident, other}
    now[0] = 2000.0
    assert certs.material(ident) is None


def test_usable_cpus_follows_the_cgroup_limit(tmp_path: Path):
    cpu_max = tmp_path / "cpu.max"
    affinity = usable_cpus(tmp_path / "absent")
    assert affinity >= 1
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU: one worker
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{150000 * 64} 100000\n")  # more than the affinity allows
    assert usable_cpus(cpu_max) == affinity


def test_workers_config_is_checked(tmp_path: Path):
    from nodeagent.agent import AgentConfig, AgentError
    from tests.agentenv import kube_env

    env = kube_env(tmp_path, "worker-3", "192.0.2.13")
    assert AgentConfig.for_kubernetes(env, workers=4).workers == 4
    with pytest.raises(AgentError, match=r"workers must be 1\.\.64"):
        AgentConfig.for_kubernetes(env, workers=0)
    cfg = AgentConfig.for_kubernetes(env)
    with pytest.raises(AgentError, match="needs the mesh"):
        AgentConfig(**{**cfg.__dict__, "controlplane": None, "workers": 2})


def test_workers_option():
    import click

    from weft.cli.agent import _workers

    assert _workers("auto", kubernetes=False) == 1  # the lab's nodes share the machine
    assert 1 <= _workers("auto", kubernetes=True) <= 8
    assert _workers("3", kubernetes=False) == 3
    for bad in ("0", "many"):
        with pytest.raises(click.BadParameter):
            _workers(bad, kubernetes=True)
