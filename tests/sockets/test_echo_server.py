"""The echo server over real sockets on 127.0.0.1."""

import asyncio
import json

import pytest

from weft.lab.echo import EchoServer

pytestmark = pytest.mark.sockets


@pytest.fixture
async def echo():
    server = await asyncio.start_server(
        EchoServer("echo-1", "node-1", "default").handle, "127.0.0.1", 0, limit=64 * 1024
    )
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    return status, json.loads(await reader.readexactly(length))


async def test_keep_alive_requests_on_one_connection_see_the_same_peer(echo):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    local = writer.get_extra_info("sockname")
    for i in range(3):
        writer.write(f"GET /{i} HTTP/1.1\r\nHost: echo\r\nX-Req: {i}\r\n\r\n".encode())
        status, body = await _read_response(reader)
        assert status == 200
        assert body["pod"] == "echo-1" and body["node"] == "node-1"
        assert body["path"] == f"/{i}"
        assert body["headers"]["X-Req"] == str(i)
        assert body["peer"] == f"{local[0]}:{local[1]}"
    writer.close()


async def test_bodies_content_length_and_chunked(echo):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    writer.write(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert (await _read_response(reader))[1]["body_bytes"] == 5
    writer.write(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert (await _read_response(reader))[1]["body_bytes"] == 5
    writer.close()


async def test_garbage_gets_400_and_close_while_others_are_served(echo):
    bad_r, bad_w = await asyncio.open_connection("127.0.0.1", echo)
    good_r, good_w = await asyncio.open_connection("127.0.0.1", echo)
    bad_w.write(b"\x16\x03\x01garbage-that-is-not-http\r\n\r\n")
    status, body = await _read_response(bad_r)
    assert status == 400 and "malformed" in body["error"]
    assert await bad_r.read() == b""  # closed after the error
    good_w.write(b"GET / HTTP/1.1\r\n\r\n")
    assert (await _read_response(good_r))[0] == 200
    bad_w.close()
    good_w.close()


async def test_oversized_head_gets_431(echo):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    writer.write(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    status, _ = await _read_response(reader)
    assert status == 431
    writer.close()


async def test_h2c_on_the_same_port_with_injection(echo):
    from weft.lab.h2peer import H2Peer

    peer = await H2Peer.connect(echo)
    try:
        ok, failed = await asyncio.gather(
            peer.request("GET", "/a"), peer.request("POST", "/b?status=503", body=b"x" * 70000)
        )
    finally:
        peer.close()
    assert ok.status == 200 and json.loads(ok.body)["version"] == "HTTP/2"
    assert failed.status == 503 and json.loads(failed.body)["body_bytes"] == 70000


async def test_websocket_messages_are_echoed(echo):
    from weft.lab.echo_ws import client_handshake, client_message

    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    try:
        headers = await client_handshake(reader, writer, "echo")
        assert headers["x-echo-pod"] == "echo-1"
        for text in ("one", "two" * 1000):
            assert await client_message(reader, writer, text) == text
    finally:
        writer.close()


async def test_grpc_echo_and_injected_status(unused_tcp_port):
    import grpc

    from weft.lab.echo_grpc import FULL_METHOD, start_grpc

    server = start_grpc(EchoServer("echo-1", "node-1", "default"), "127.0.0.1", unused_tcp_port)

    def call() -> tuple[dict, str]:
        with grpc.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
            echo = channel.unary_unary(FULL_METHOD)
            answer = json.loads(echo(b"ping", timeout=10))
            try:
                echo(b"ping", timeout=10, metadata=(("status", "echo-1:503"),))
            except grpc.RpcError as exc:
                return answer, exc.code().name
            return answer, "OK"

    try:
        answer, code = await asyncio.to_thread(call)
    finally:
        server.stop(0)
    assert answer["pod"] == "echo-1" and answer["body_bytes"] == 4
    assert code == "UNAVAILABLE"
