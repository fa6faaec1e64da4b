"""The inbound HTTP/2 path over real sockets: an h2c client connection (standing in for
the tunnel stream) relayed byte for byte to a real h2c replica, observed frame by frame
on the way (`nodeagent.proxy.http.observe_h2`, `InboundHttp.observe_h2`). The client is
the lab's `h2` peer and raw frames; the replica is `tests.h2util`'s."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.inbound import InboundHttp
from nodeagent.proxy.tunnel.hooks import connect_target_plaintext
from tests.h2util import H2Replica
from tests.sockets.test_inbound_observer import CLIENT, POD, SERVER, stream_listener
from weft.lab.h2peer import H2Peer

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 30.0


@dataclass
class Harness:
    pod: H2Replica
    port: int
    http: InboundHttp
    metrics: HttpMetrics
    listener: socket.socket
    peers: list[H2Peer] = field(default_factory=list)
    served: list[asyncio.Future[None]] = field(default_factory=list)

    async def stream(self, **kw: object) -> H2Peer:
        """An h2c client whose far end is an observed inbound stream to the pod."""
        loop = asyncio.get_running_loop()
        served = await self.http.observe_h2(CLIENT, SERVER, ("127.0.0.1", self.port), "test")
        sock = socket.create_connection(self.listener.getsockname())
        sock.setblocking(False)
        accepted, _ = await loop.sock_accept(self.listener)
        protocol = cast(asyncio.Protocol, served)
        await loop.connect_accepted_socket(lambda: protocol, accepted)
        _, peer = await loop.create_connection(lambda: H2Peer(**kw), sock=sock)  # type: ignore[arg-type]
        self.peers.append(peer)
        self.served.append(served.closed)
        return peer

    def responses(self) -> dict[tuple[str, str, str], float]:
        """(status_code, grpc_status, error) -> count, from ``response_total``."""
        out: dict[tuple[str, str, str], float] = {}
        for m in self.metrics.collect():
            for s in m.samples:
                if s.name == "response_total":
                    assert s.labels["direction"] == "inbound"
                    assert s.labels["client_id"] == str(CLIENT)
                    key = (s.labels["status_code"], s.labels["grpc_status"], s.labels["error"])
                    out[key] = out.get(key, 0) + s.value
        return out

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.responses()}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def harness(unused_tcp_port: int) -> AsyncIterator[Harness]:
    pod = H2Replica("echo-1")
    await pod.start("127.0.0.1", unused_tcp_port)
    listener = stream_listener()
    metrics = HttpMetrics()
    http = InboundHttp(
        connect=connect_target_plaintext,
        metrics=metrics,
        workload_at=lambda ip: POD,
        h2_config=H2Config(resets=(50, 10.0), control_frames=(50, 10.0)),
    )
    harness = Harness(pod, unused_tcp_port, http, metrics, listener)
    try:
        yield harness
    finally:
        for peer in harness.peers:
            peer.close()
        for closed in harness.served:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), TIMEOUT)
        listener.close()
        pod.close()


# --- passing streams through ------------------------------------------------------------


async def test_streams_pass_unchanged_and_each_is_counted(harness: Harness):
    peer = await harness.stream()
    # Distinct header values on every stream: both dynamic tables keep changing (and
    # evicting), which the observer's decoders must follow exactly.
    got = []
    for batch in range(6):  # 50 at a time: the replica allows 100 concurrent streams
        got += await asyncio.gather(*(
            peer.request("GET", f"/?n={i}", headers=[(b"x-request", b"r" * (i % 300) + b"%d" % i)])
            for i in range(batch * 50, batch * 50 + 50)
        ))  # fmt: skip
    assert {r.status for r in got} == {200}
    assert all(r.headers[b"x-replica"] == b"echo-1" for r in got)
    assert harness.pod.paths.count("/?n=7") == 1
    await harness.until(lambda: harness.responses().get(("200", "", "")) == 300, "300 streams")
    assert harness.http.h2_streams == 1


async def test_grpc_status_from_trailers(harness: Harness):
    peer = await harness.stream()
    ok = await peer.request("POST", "/grpc-ok", headers=[(b"content-type", b"application/grpc")])
    bad = await peer.request("POST", "/grpc-fail", headers=[(b"content-type", b"application/grpc")])
    assert ok.trailers[b"grpc-status"] == b"0" and bad.trailers[b"grpc-status"] == b"14"
    await harness.until(
        lambda: harness.responses() == {("200", "0", ""): 1, ("200", "14", ""): 1}, "gRPC"
    )


async def test_bodies_both_ways_cross_reads_under_flow_control(harness: Harness):
    peer = await harness.stream()
    big = await peer.request("GET", "/big/3000000")
    assert len(big.body) == 3_000_000
    body = bytes(range(256)) * 2000
    echoed = await peer.request("POST", "/echo", body=body)
    assert echoed.body == body
    await harness.until(lambda: harness.responses().get(("200", "", "")) == 2, "two streams")


async def test_a_larger_header_table_the_client_allows_is_followed(harness: Harness):
    # The client lets the pod's encoder use 64 KiB of dynamic table: the pod announces
    # the new size in its next block, which the observer accepts only if it read the
    # client's SETTINGS.
    peer = await harness.stream()
    peer.conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 65536})
    peer.flush()
    for i in range(20):
        r = await peer.request("GET", f"/{i}", headers=[(b"x-big", b"v" * 3000 + b"%d" % i)])
        assert r.status == 200
    await harness.until(lambda: harness.responses().get(("200", "", "")) == 20, "20 streams")


async def test_resets_both_ways_are_counted_and_refused_streams_are_not(harness: Harness):
    peer = await harness.stream()
    sid, _ = peer.start("GET", "/delay/5000")
    await harness.until(lambda: "/delay/5000" in harness.pod.paths, "the slow stream")
    peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
    peer.flush()
    reset = await peer.request("GET", "/reset")
    assert reset.reset == ErrorCodes.INTERNAL_ERROR
    refused = await peer.request("GET", "/refuse-echo-1")
    assert refused.reset == ErrorCodes.REFUSED_STREAM
    assert (await peer.request("GET", "/")).status == 200
    await harness.until(
        lambda: (
            harness.responses()
            == {("", "", "cancelled"): 1, ("502", "", "upstream-reset"): 1, ("200", "", ""): 1}
        ),
        "a cancel, a reset and a success; no refused stream",
    )


async def test_streams_open_when_the_client_goes_are_cancelled(harness: Harness):
    peer = await harness.stream()
    peer.start("GET", "/delay/5000")
    peer.start("GET", "/delay/5000")
    await harness.until(lambda: harness.pod.paths.count("/delay/5000") == 2, "two streams")
    peer.close()
    await harness.until(lambda: harness.responses() == {("", "", "cancelled"): 2}, "both cancelled")


# --- floods and malformed input: the relay is reset, the pod sees nothing of it ---------


async def _reset_after(harness: Harness, send: Callable[[H2Peer], Awaitable[None]]) -> None:
    peer = await harness.stream()
    assert (await peer.request("GET", "/before")).status == 200
    await send(peer)
    await asyncio.wait_for(peer.lost, TIMEOUT)
    other = await harness.stream()
    assert (await other.request("GET", "/after")).status == 200


async def test_rapid_reset_flood_resets_the_connection(harness: Harness):
    async def flood(peer: H2Peer) -> None:
        for _ in range(2000):
            if peer.transport is None or peer.transport.is_closing():
                return
            try:
                sid, _ = peer.start("GET", "/delay/1000")
                peer.conn.reset_stream(sid, ErrorCodes.CANCEL)
            except ProtocolError:
                return
            peer.flush()
            await asyncio.sleep(0)

    await _reset_after(harness, flood)
    # The pod saw the budget's worth of streams, not the flood.
    assert harness.pod.paths.count("/delay/1000") < 200


async def test_a_ping_flood_resets_the_connection(harness: Harness):
    async def flood(peer: H2Peer) -> None:
        for i in range(5000):
            if peer.transport is None or peer.transport.is_closing():
                return
            peer.conn.ping(i.to_bytes(8, "big"))
            peer.flush()
            if i % 50 == 0:
                await asyncio.sleep(0)

    await _reset_after(harness, flood)


async def test_a_continuation_flood_resets_the_connection(harness: Harness):
    async def flood(peer: H2Peer) -> None:
        assert peer.transport is not None
        head = HeadersFrame(101)
        head.data = b"\x82"  # :method GET, no END_HEADERS
        frames = [head.serialize()]
        for _ in range(200):
            cont = ContinuationFrame(101)
            cont.data = b"\x00" * 1000
            frames.append(cont.serialize())
        peer.transport.write(b"".join(frames))

    await _reset_after(harness, flood)


async def test_an_hpack_bomb_resets_the_connection(harness: Harness):
    async def bomb(peer: H2Peer) -> None:
        # One 4 KiB header in the dynamic table, referenced 100 times: 400 KiB decoded.
        peer.start("GET", "/bomb", headers=[(b"x-bomb", b"b" * 4000)] * 101)

    await _reset_after(harness, bomb)
    assert "/bomb" not in harness.pod.paths


async def test_a_wrong_preface_reaches_nothing(harness: Harness):
    loop = asyncio.get_running_loop()
    served = await harness.http.observe_h2(CLIENT, SERVER, ("127.0.0.1", harness.port), "t")
    reader, writer = await asyncio.open_connection(*harness.listener.getsockname())
    accepted, _ = await loop.sock_accept(harness.listener)
    await loop.connect_accepted_socket(lambda: cast(asyncio.Protocol, served), accepted)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    await asyncio.wait_for(asyncio.shield(served.closed), TIMEOUT)
    assert harness.pod.served == 0
    other = await harness.stream()
    assert (await other.request("GET", "/")).status == 200
