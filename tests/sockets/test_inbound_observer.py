"""The inbound HTTP/1.1 path over real sockets: a client connection (standing in for the
tunnel stream) relayed byte for byte to a scripted pod server, observed on the way
(`nodeagent.proxy.http.observe`, `InboundHttp.observe`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.proxy.http.h1 import Limits
from nodeagent.proxy.http.inbound import InboundHttp
from nodeagent.proxy.tunnel.hooks import connect_target_plaintext
from weft.identity import SpiffeId
from weft.mesh import InboundMode, Workload

CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
TIMEOUT = 20.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Pod:
    """A scripted pod: ``handler`` serves each connection; ``received`` is every byte
    it read, per connection."""

    handler: Handler | None = None
    received: list[bytearray] = field(default_factory=list)
    port: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def _read_head(reader: asyncio.StreamReader, sink: bytearray) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    sink += head
    return head


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


async def echo_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: bytearray
) -> None:
    """Answers each request with its request line as the body (keep-alive)."""
    while True:
        try:
            head = await _read_head(reader, sink)
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        body = await reader.readexactly(_length(head))
        sink += body
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"HEAD "):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        else:
            payload = line + b" " + body
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
        await writer.drain()
    writer.close()


POD = Workload(uid="u1", name="echo-1", namespace="default", node="node-1",
               ips=("127.0.0.1",), service_account="echo", identity=SERVER,
               captured=True, inbound_mode=InboundMode.PERMISSIVE)  # fmt: skip
"""The destination pod, on 127.0.0.1."""


def stream_listener() -> socket.socket:
    """Where the test's client connects: the accepted socket stands in for the tunnel
    stream the observed relay is attached to."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    return listener


@dataclass
class Harness:
    pod: Pod
    http: InboundHttp
    metrics: HttpMetrics
    listener: socket.socket
    clients: list[asyncio.StreamWriter] = field(default_factory=list)
    served: list[asyncio.Future[None]] = field(default_factory=list)

    async def stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection whose far end is an observed inbound stream."""
        loop = asyncio.get_running_loop()
        served = await self.http.observe(
            CLIENT, SERVER, ("127.0.0.1", self.pod.port), "test stream"
        )
        reader, writer = await asyncio.open_connection(*self.listener.getsockname())
        sock, _ = await loop.sock_accept(self.listener)
        protocol = cast(asyncio.Protocol, served)
        await loop.connect_accepted_socket(lambda: protocol, sock)
        self.clients.append(writer)
        self.served.append(served.closed)
        return reader, writer

    async def close(self) -> None:
        for writer in self.clients:
            writer.close()
        for closed in self.served:
            await asyncio.wait_for(asyncio.shield(closed), TIMEOUT)
        for writer in self.clients:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await asyncio.wait_for(asyncio.gather(*self.pod.tasks, return_exceptions=True), TIMEOUT)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [
            (s.labels, s.value)
            for m in self.metrics.collect()
            if m.name == name
            for s in m.samples
            if s.name == name + ("_total" if name in ("request", "response") else "")
        ]

    def responses(self) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for labels, value in self.samples("response"):
            key = (labels["status_code"], labels["error"])
            out[key] = out.get(key, 0) + value
        return out


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    pod = Pod()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = bytearray()
        pod.received.append(sink)
        task = asyncio.current_task()
        assert task is not None
        pod.tasks.append(task)
        try:
            if pod.handler is not None:
                await pod.handler(reader, writer)
            else:
                await echo_handler(reader, writer, sink)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pod.port = server.sockets[0].getsockname()[1]
    listener = stream_listener()
    metrics = HttpMetrics()
    http = InboundHttp(
        connect=connect_target_plaintext,
        metrics=metrics,
        workload_at=lambda ip: POD,
        limits=Limits(max_headers=20, max_head=4096),
    )
    harness = Harness(pod, http, metrics, listener)
    try:
        yield harness
    finally:
        try:
            await harness.close()
        finally:
            listener.close()
            server.close()
            await server.wait_closed()


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    body = await asyncio.wait_for(reader.readexactly(_length(head)), TIMEOUT)
    return head, body


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What arrives before the connection ends (EOF or reset)."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            out += chunk
    except ConnectionResetError:
        pass
    return out


# --- passing requests through -------------------------------------------------------------


async def test_keep_alive_requests_pass_unchanged_and_are_counted(harness: Harness):
    reader, writer = await harness.stream()
    sent = []
    for i in range(5):
        request = (
            b"POST /item/%d HTTP/1.1\r\nHost: echo.default\r\ncontent-length: 3\r\n\r\nabc" % i
        )
        sent.append(request)
        writer.write(request)
        head, body = await _response(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == b"POST /item/%d HTTP/1.1 abc" % i
    writer.close()
    assert bytes(harness.pod.received[0]) == b"".join(sent)  # byte for byte
    assert harness.responses() == {("200", ""): 5}
    ((labels, value),) = harness.samples("request")
    assert value == 5
    assert labels["direction"] == "inbound"
    assert labels["authority"] == "echo.default"
    assert labels["client_id"] == str(CLIENT)
    assert labels["server_id"] == str(SERVER)
    assert labels["src_namespace"] == "shop"
    assert labels["dst_workload"] == "echo-1"
    assert harness.http.requests == 5


async def test_pipelined_requests_keep_their_order(harness: Harness):
    reader, writer = await harness.stream()
    writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(4)))
    for i in range(4):
        _, body = await _response(reader)
        assert body == b"GET /%d HTTP/1.1 " % i
    writer.close()
    assert harness.responses() == {("200", ""): 4}


async def test_chunked_bodies_and_trailers_pass_unchanged(harness: Harness):
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = harness.pod.received[-1]
        await _read_head(reader, sink)
        sink += await reader.readuntil(b"0\r\nx-sum: 1\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"3\r\none\r\n3\r\ntwo\r\n0\r\ngrpc-ish: 0\r\n\r\n")  # fmt: skip
        await writer.drain()
        await reader.read()

    harness.pod.handler = chunked
    reader, writer = await harness.stream()
    request = (b"POST /up HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n"
               b"2\r\nhi\r\n0\r\nx-sum: 1\r\n\r\n")  # fmt: skip
    writer.write(request)
    response = b""
    while not response.endswith(b"0\r\ngrpc-ish: 0\r\n\r\n"):
        response += await asyncio.wait_for(reader.read(65536), TIMEOUT)
    assert response.endswith(b"3\r\none\r\n3\r\ntwo\r\n0\r\ngrpc-ish: 0\r\n\r\n")
    writer.close()
    assert bytes(harness.pod.received[0]) == request
    assert harness.responses() == {("200", ""): 1}


async def test_head_then_get_on_one_connection(harness: Harness):
    reader, writer = await harness.stream()
    writer.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert b"content-length: 5" in head  # and no body follows
    writer.write(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    _, body = await _response(reader)
    assert body == b"GET /after HTTP/1.1 "
    writer.close()
    assert harness.responses() == {("200", ""): 2}


async def test_a_request_pipelined_behind_head_resets_rather_than_desynchronise(harness: Harness):
    reader, writer = await harness.stream()
    writer.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    await _until_closed(reader)
    writer.close()
    outcomes = harness.responses()
    assert outcomes.get(("200", "")) == 1  # the HEAD was answered and counted
    assert outcomes.get(("502", "upstream-reset")) == 1


async def test_expect_continue_counts_one_exchange(harness: Harness):
    async def continue_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = harness.pod.received[-1]
        head = await _read_head(reader, sink)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        sink += await reader.readexactly(_length(head))
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    harness.pod.handler = continue_then_ok
    reader, writer = await harness.stream()
    writer.write(b"PUT /f HTTP/1.1\r\nHost: a\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"data")
    head, _ = await _response(reader)
    assert head.startswith(b"HTTP/1.1 201")
    writer.close()
    assert harness.responses() == {("201", ""): 1}


# --- upgrades -----------------------------------------------------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"


async def test_an_accepted_upgrade_becomes_opaque_and_early_bytes_wait_for_it(harness: Harness):
    early: list[bytes] = []

    async def websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader, harness.pod.received[-1])
        # Nothing of what the client sent after the head may arrive before the 101.
        try:
            early.append(await asyncio.wait_for(reader.read(100), 0.5))
        except TimeoutError:
            early.append(b"")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                     b"upgrade: websocket\r\n\r\nserver-frame")  # fmt: skip
        await writer.drain()
        data = await reader.readexactly(len(b"client-frame-1client-frame-2"))
        writer.write(data.upper())
        await writer.drain()
        await reader.read()

    harness.pod.handler = websocket
    reader, writer = await harness.stream()
    writer.write(UPGRADE + b"client-frame-1")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101")
    assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == b"server-frame"
    writer.write(b"client-frame-2")
    assert (
        await asyncio.wait_for(reader.readexactly(28), TIMEOUT) == b"CLIENT-FRAME-1CLIENT-FRAME-2"
    )
    writer.close()
    assert early == [b""]
    assert harness.responses() == {("101", ""): 1}


async def test_a_declined_upgrade_closes_and_never_passes_what_followed(harness: Harness):
    async def decline(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = harness.pod.received[-1]
        await _read_head(reader, sink)
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 2\r\n\r\nno")
        await writer.drain()
        sink += await reader.read()

    harness.pod.handler = decline
    reader, writer = await harness.stream()
    smuggled = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    writer.write(UPGRADE + smuggled)
    response = await _until_closed(reader)
    assert response.startswith(b"HTTP/1.1 426") and response.endswith(b"no")
    writer.close()
    await asyncio.sleep(0.2)
    assert bytes(harness.pod.received[0]) == UPGRADE
    assert harness.responses() == {("426", ""): 1}


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
            b"400",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\nHost: a\n\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", b"501"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"x-h: 1\r\n" * 30 + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nx-big: " + b"a" * 5000, b"431"),
    ],
    ids=["cl+te", "two-lengths", "bare-lf", "no-host", "connect", "many-headers", "big-head"],
)
async def test_bad_requests_get_a_status_and_a_close_and_reach_no_pod(
    harness: Harness, request_bytes: bytes, status: bytes
):
    reader, writer = await harness.stream()
    writer.write(request_bytes)
    response = await _until_closed(reader)
    assert response.startswith(b"HTTP/1.1 " + status), response[:80]
    assert b"weft-proxy-error: " in response
    writer.close()
    await asyncio.sleep(0.1)
    assert all(not r for r in harness.pod.received)


async def test_a_pod_closing_mid_response_resets_the_client_and_is_counted(harness: Harness):
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader, harness.pod.received[-1])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly-part")
        await writer.drain()
        writer.close()

    harness.pod.handler = truncate
    reader, writer = await harness.stream()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    got = await _until_closed(reader)
    assert len(got) < 100
    writer.close()
    await asyncio.sleep(0.1)
    assert harness.responses() == {("502", "upstream-reset"): 1}


async def test_a_close_delimited_response_is_complete_at_eof(harness: Harness):
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader, harness.pod.received[-1])
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    harness.pod.handler = until_close
    reader, writer = await harness.stream()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    got = await _until_closed(reader)
    assert got.endswith(b"\r\n\r\nall of it")
    writer.close()
    await asyncio.sleep(0.1)
    assert harness.responses() == {("200", ""): 1}


async def test_a_malformed_response_resets_the_client(harness: Harness):
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader, harness.pod.received[-1])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxx")
        await writer.drain()
        await reader.read()

    harness.pod.handler = garbage
    reader, writer = await harness.stream()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    got = await _until_closed(reader)
    assert not got.startswith(b"HTTP/1.1 200")  # nothing of the bad response passes
    writer.close()
    await asyncio.sleep(0.1)
    assert harness.responses() == {("502", "bad-response"): 1}


async def test_a_pod_that_is_down_refuses_the_stream(harness: Harness):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(OSError):
            await harness.http.observe(CLIENT, SERVER, ("127.0.0.1", port), "down")


async def test_a_client_that_goes_away_mid_request_counts_as_cancelled(harness: Harness):
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader, harness.pod.received[-1])
        await reader.read()  # never answers; closes when the client has gone
        writer.close()

    harness.pod.handler = stall
    _, writer = await harness.stream()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0.2)
    writer.transport.abort()
    for _ in range(100):
        if harness.responses():
            break
        await asyncio.sleep(0.05)
    assert harness.responses() == {("", "cancelled"): 1}


async def test_a_head_trickled_past_the_head_timeout_gets_408(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
):
    from nodeagent.proxy.http import observe

    monkeypatch.setattr(observe, "HEAD_TIMEOUT", 0.5)
    reader, writer = await harness.stream()
    # One complete request first: the timeout is per head, not per connection.
    writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _ = await _response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.7)
    for piece in (b"GET /slow HTTP/1.1\r\n", b"Host: a\r\n", b"x-a: 1\r\n", b"x-b: 2\r\n"):
        writer.write(piece)
        await asyncio.sleep(0.3)
    answer = await _until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"weft-proxy-error: head-timeout" in answer
    assert harness.responses() == {("200", ""): 1}  # the trickled head was not an exchange


# --- authorization ------------------------------------------------------------------------


async def test_requests_a_policy_denies_get_403_and_reach_no_pod(harness: Harness):
    from nodeagent.authz import Authorizer
    from weft.policy import parse_policy

    policy = parse_policy({
        "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "echo-web", "namespace": "default"},
        "spec": {"rules": [
            {"from": [{"source": {"principals": [str(CLIENT)]}}],
             "to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]},
            {"to": [{"operation": {"paths": ["/tenant/*"],
                                   "headers": [{"name": "x-tenant", "values": ["acme"]}]}}]},
        ]},
    })  # fmt: skip
    pod = dataclasses.replace(POD, policies=(policy,))
    authz = Authorizer(lambda ip: pod)
    harness.http.gate = authz.gate
    reader, writer = await harness.stream()
    writer.write(b"GET /public/a?x=1 HTTP/1.1\r\nHost: echo\r\n\r\n")
    head, body = await _response(reader)
    assert head.startswith(b"HTTP/1.1 200") and body.startswith(b"GET /public/a?x=1 ")
    writer.write(b"GET /tenant/7 HTTP/1.1\r\nHost: echo\r\nX-Tenant: acme\r\n\r\n")
    head, _ = await _response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"POST /public/%2e%2e/admin HTTP/1.1\r\nHost: echo\r\ncontent-length: 6\r\n\r\n"
                 b"secret")  # fmt: skip
    response = await _until_closed(reader)
    assert response.startswith(b"HTTP/1.1 403"), response[:80]
    assert b"weft-proxy-error: unauthorized" in response and b"connection: close" in response
    assert b"echo-web" not in response  # the caller is not told which policy
    received = b"".join(harness.pod.received)
    assert b"/admin" not in received and b"secret" not in received
    assert authz.metrics.value("http", "allow") == 2
    assert authz.metrics.value("http", "deny", policy="default/echo-web") == 1
