"""The lab's demo workload: an HTTP/1.1 and h2c echo server, and a gRPC echo service.

Every request gets a JSON answer naming the pod and node that served it, the peer
address the server saw (which shows whether a proxy sat in the path) and the request
line and headers.  Keep-alive, ``Content-Length`` and chunked bodies are supported, and
HTTP/2 with prior knowledge (h2c) on the same port, so load generators (wrk, h2load,
hey) can drive it; anything malformed gets a 4xx (HTTP/2: GOAWAY) and the connection is
closed, and nothing one client sends can hurt another.

With ``--grpc-port`` it also serves gRPC (grpcio): ``weft.lab.Echo/Echo``, a unary method
whose request and response are raw bytes (no generated code needed): the response is
the same JSON, and metadata ``delay_ms``, ``status`` (an HTTP status: 503 becomes
UNAVAILABLE) and ``fail`` inject failures as the query parameters below do.

Failure injection, per request, for drills (query parameters; ``POD:`` limits one to
the named pod, so one replica can be made slow or failing while the others are not):

* ``delay_ms=20`` or ``delay_ms=echo-2:20`` — answer after that long;
* ``status=503`` or ``status=echo-2:503`` — answer with that status;
* ``fail=0.5`` or ``fail=echo-2:0.5`` — answer 503 to that fraction of requests.

``curl 'http://echo/?delay_ms=echo-2:20'`` makes echo-2 20 ms slower than echo-1.

A WebSocket upgrade (``Upgrade: websocket``) is accepted (101, ``x-echo-pod`` naming the
pod) and every text or binary message is echoed back (`weft.lab.echo_ws`).

Run: ``python -m weft.lab.echo --pod echo-1 --node node-1 --port 8080 --grpc-port 9090``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("weft.echo")

MAX_HEAD = 64 * 1024
H2_PREFACE_HEAD = b"PRI * HTTP/2.0\r\n\r\n"
"""What ``readuntil(CRLFCRLF)`` returns of the HTTP/2 preface (``SM\r\n\r\n`` follows)."""
MAX_BODY = 1024 * 1024
TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (``head`` ends with CRLFCRLF)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover — latin-1 decodes every byte
        raise BadRequest(400, "undecodable request head") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= TOKEN_CHARS:
        raise BadRequest(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505, f"unsupported version {version[:16]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= TOKEN_CHARS:
            raise BadRequest(400, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return Request(method, target, version, headers)


async def read_body(reader: asyncio.StreamReader, req: Request) -> bytes:
    te = req.header("transfer-encoding")
    if te is not None:
        if te.lower() != "chunked":
            raise BadRequest(501, f"unsupported transfer-encoding {te[:32]!r}")
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                n = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest(400, "malformed chunk size") from None
            if n < 0:
                raise BadRequest(400, "malformed chunk size")
            size += n
            if size > MAX_BODY:
                raise BadRequest(413, f"body larger than {MAX_BODY} bytes")
            if n == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(n))
            if await reader.readexactly(2) != b"\r\n":
                raise BadRequest(400, "chunk not terminated by CRLF")
    cl = req.header("content-length")
    if cl is None:
        return b""
    if not cl.isdigit():
        raise BadRequest(400, f"malformed content-length {cl[:32]!r}")
    n = int(cl)
    if n > MAX_BODY:
        raise BadRequest(413, f"body larger than {MAX_BODY} bytes")
    return await reader.readexactly(n)


REASONS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    200: "OK",
    400: "Bad Request",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


def response(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


def injected(target: str, pod: str) -> tuple[float, int]:
    """(delay seconds, status) that the query of ``target`` asks of pod ``pod``."""
    return injected_by(parse_qsl(urlsplit(target).query), pod)


def injected_by(params: list[tuple[str, str]], pod: str) -> tuple[float, int]:
    """(delay seconds, status) that ``params`` (query parameters, gRPC metadata) ask."""
    delay, status = 0.0, 200
    for key, value in params:
        who, sep, what = value.rpartition(":")
        if sep and who != pod:
            continue
        try:
            if key == "delay_ms":
                delay = max(0.0, min(float(what), 60_000.0)) / 1000.0
            elif key == "status":
                status = int(what) if 200 <= int(what) <= 599 else status
            elif key == "fail" and random.random() < float(what):
                status = 503
        except ValueError:
            continue
    return delay, status


class EchoServer:
    def __init__(self, pod: str, node: str, namespace: str) -> None:
        self.pod = pod
        self.node = node
        self.namespace = namespace

    def payload(self, peer: str, local: str | None, req: Request, body_bytes: int) -> bytes:
        return json.dumps(
            {
                "pod": self.pod,
                "node": self.node,
                "namespace": self.namespace,
                "peer": peer,
                "local": local,
                "method": req.method,
                "path": req.target,
                "version": req.version,
                "headers": dict(req.headers),
                "body_bytes": body_bytes,
            }
        ).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests, or mid-head
                except asyncio.LimitOverrunError:
                    writer.write(response(431, b'{"error":"request head too large"}', False))
                    return
                if head == H2_PREFACE_HEAD:
                    from weft.lab.echo_h2 import serve_h2

                    await serve_h2(self, reader, writer, peer_s, local)
                    return
                try:
                    req = parse_head(head)
                    body = await read_body(reader, req)
                except BadRequest as e:
                    log.info("bad request from %s: %s", peer_s, e.reason)
                    payload = json.dumps({"error": e.reason}).encode()
                    writer.write(response(e.status, payload, False))
                    return
                if (req.header("upgrade") or "").lower() == "websocket":
                    from weft.lab.echo_ws import serve_websocket

                    await serve_websocket(self.pod, req, reader, writer)
                    return
                local_s = f"{local[0]}:{local[1]}" if local else None
                payload = self.payload(peer_s, local_s, req, len(body))
                delay, status = injected(req.target, self.pod)
                if delay:
                    await asyncio.sleep(delay)
                writer.write(response(status, payload, req.keep_alive))
                await writer.drain()
                if not req.keep_alive:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


async def serve(
    pod: str, node: str, namespace: str, host: str, port: int, grpc_port: int | None = None
) -> None:
    app = EchoServer(pod, node, namespace)
    server = await asyncio.start_server(app.handle, host, port, limit=MAX_HEAD, backlog=1024)
    grpc_server = None
    if grpc_port:
        from weft.lab.echo_grpc import start_grpc

        grpc_server = start_grpc(app, host, grpc_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("echo %s on %s listening on %s:%d", pod, node, host, port)
    async with server:
        await stop.wait()
    log.info("echo %s stopping", pod)
    if grpc_server is not None:
        grpc_server.stop(1).wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pod", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main = serve(args.pod, args.node, args.namespace, args.host, args.port, args.grpc_port)
    try:
        import uvloop
    except ImportError:  # pragma: no cover — uvloop is a dependency; stay usable without it
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    main()
