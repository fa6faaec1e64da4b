"""HTTP/2 peers for the tests, on the `h2` library: the lab's h2c client
(`weft.lab.h2peer`, many streams over one connection) and a replica server with failure
injection by path. Independent of the proxy's own HTTP/2 code (only the library is
shared), so the tests judge the proxy from the outside."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError

from weft.lab.h2peer import H2Protocol

Headers = list[tuple[bytes, bytes]]


@dataclass
class H2Replica:
    """A replica that speaks h2c. Paths: ``/`` (its name), ``/grpc-ok``, ``/grpc-fail``
    (gRPC trailers), ``/delay/MS``, ``/reset`` (RST after the head), ``/refuse-NAME``
    (REFUSED_STREAM when NAME is this replica), ``/big/N`` (N bytes), ``/echo`` (the
    request body back, after reading it all), ``/stall`` (never reads the body),
    ``/unavailable-NAME`` (when NAME is this replica: gRPC requests get a trailers-only
    UNAVAILABLE, others 503; elsewhere the request body back, after reading it all)."""

    name: str
    delay: float = 0.0
    """Seconds before answering ``/``."""
    served: int = 0
    refused: int = 0
    resets_seen: int = 0
    sent: int = 0
    paths: list[str] = field(default_factory=list)
    headers_seen: list[dict[bytes, bytes]] = field(default_factory=list)
    conns: list[_ReplicaConn] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ReplicaConn(self), host, port,
                                               reuse_address=True)  # fmt: skip

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()


class _ReplicaConn(H2Protocol):
    client_side = False

    def __init__(self, replica: H2Replica) -> None:
        super().__init__()
        self.replica = replica
        self.bodies: dict[int, bytes] = {}
        self.paths: dict[int, str] = {}
        self.pending: dict[int, bytes] = {}
        self.grpc: set[int] = set()
        self.answered: set[int] = set()
        replica.conns.append(self)

    def events(self, events: Sequence[object]) -> None:
        for ev in events:
            if isinstance(ev, RequestReceived):
                hs = dict(ev.headers)
                path = hs[b":path"].decode()
                self.paths[ev.stream_id] = path
                if hs.get(b"content-type") == b"application/grpc":
                    self.grpc.add(ev.stream_id)
                self.bodies[ev.stream_id] = b""
                self.replica.paths.append(path)
                self.replica.headers_seen.append(hs)
                if path.startswith("/refuse-") and path.endswith(self.replica.name):
                    self.replica.refused += 1
                    self.conn.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)
                    self.paths.pop(ev.stream_id)
                elif ev.stream_ended is not None or not (
                    path in ("/echo", "/stall") or path.startswith("/unavailable-")
                ):
                    self._respond(ev.stream_id)
            elif isinstance(ev, DataReceived):
                if ev.stream_id in self.bodies:
                    self.bodies[ev.stream_id] += ev.data
                if self.paths.get(ev.stream_id) != "/stall":
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                path = self.paths.get(ev.stream_id, "")
                if (path == "/echo" or path.startswith("/unavailable-")) and (
                    ev.stream_id not in self.answered
                ):
                    self._respond(ev.stream_id)
            elif isinstance(ev, StreamReset):
                self.replica.resets_seen += 1
                self.pending.pop(ev.stream_id, None)
            elif isinstance(ev, WindowUpdated):
                for sid in list(self.pending):
                    self._pump(sid)
        self.flush()

    def _respond(self, sid: int) -> None:
        path = self.paths.get(sid, "/")
        self.answered.add(sid)
        r = self.replica
        r.served += 1
        me = r.name.encode()
        if path.startswith("/unavailable-"):
            is_grpc = sid in self.grpc
            if path.endswith(r.name):
                head = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                        (b"grpc-status", b"14"), (b"grpc-message", me)] if is_grpc else [
                        (b":status", b"503"), (b"content-length", b"0")]  # fmt: skip
                self.conn.send_headers(sid, head, end_stream=True)
                return
            path = "/echo"
            self.paths[sid] = path
            if is_grpc:
                self.conn.send_headers(sid, [(b":status", b"200"), (b"x-replica", me),
                                             (b"content-type", b"application/grpc")])  # fmt: skip
                self.conn.send_data(sid, self.bodies.get(sid, b""))
                self.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                return
        if path.startswith("/delay/"):
            ms = int(path.rsplit("/", 1)[1])
            asyncio.get_running_loop().call_later(ms / 1000, self._plain, sid, me)
            return
        if path in ("/grpc-ok", "/grpc-fail"):
            grpc = [(b":status", b"200"), (b"content-type", b"application/grpc")]
            self.conn.send_headers(sid, grpc)
            self.conn.send_data(sid, b"\x00\x00\x00\x00\x02hi")
            status = b"0" if path == "/grpc-ok" else b"14"
            self.conn.send_headers(sid, [(b"grpc-status", status), (b"grpc-message", me)],
                                   end_stream=True)  # fmt: skip
            return
        if path == "/reset":
            self.conn.send_headers(sid, [(b":status", b"200")])
            self.conn.send_data(sid, b"partial")
            self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            return
        if path.startswith("/big/"):
            self.conn.send_headers(sid, [(b":status", b"200")])
            self.pending[sid] = b"x" * int(path.rsplit("/", 1)[1])
            self._pump(sid)
            return
        if path == "/echo":
            body = self.bodies.get(sid, b"")
            self.conn.send_headers(sid, [(b":status", b"200"), (b"x-replica", me)])
            self.pending[sid] = body
            self._pump(sid)
            return
        if r.delay:
            asyncio.get_running_loop().call_later(r.delay, self._plain, sid, me)
            return
        self._plain(sid, me)

    def _plain(self, sid: int, me: bytes) -> None:
        body = json.dumps({"replica": me.decode(), "path": self.paths.get(sid)}).encode()
        try:
            self.conn.send_headers(sid, [(b":status", b"200"), (b"x-replica", me),
                                         (b"content-length", b"%d" % len(body))])  # fmt: skip
            self.conn.send_data(sid, body, end_stream=True)
        except (StreamClosedError, ProtocolError):
            pass
        self.flush()

    def _pump(self, sid: int) -> None:
        data = self.pending.get(sid)
        if data is None:
            return
        try:
            while data:
                room = min(self.conn.local_flow_control_window(sid), 16384)
                if room <= 0:
                    break
                self.conn.send_data(sid, data[:room])
                self.replica.sent += room if room < len(data) else len(data)
                data = data[room:]
            if not data:
                self.conn.end_stream(sid)
                del self.pending[sid]
            else:
                self.pending[sid] = data
        except (StreamClosedError, ProtocolError):
            self.pending.pop(sid, None)
        self.flush()
