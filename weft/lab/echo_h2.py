"""The echo server's HTTP/2 side (h2c, prior knowledge): the same JSON answers and
failure injection as HTTP/1.1, one per stream, on the `h2` state machine. Request bodies
are counted, not kept (bounded: at most ``MAX_BODY`` per stream is accepted)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError, StreamClosedError

if TYPE_CHECKING:
    from weft.lab.echo import EchoServer

log = logging.getLogger("weft.echo")

PREFACE_REST = b"SM\r\n\r\n"


async def serve_h2(
    app: EchoServer,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    peer: str,
    local: tuple[str, int] | None,
) -> None:
    """Serve an h2c connection whose preface head ``PRI * HTTP/2.0`` has been read."""
    from weft.lab.echo import MAX_BODY, Request, injected

    if await reader.readexactly(len(PREFACE_REST)) != PREFACE_REST:
        return
    conn = H2Connection(H2Configuration(client_side=False, header_encoding="latin-1"))
    conn.initiate_connection()
    # The preface was consumed by the HTTP/1 reader: hand h2 the whole of it.
    conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    writer.write(conn.data_to_send())
    streams: dict[int, tuple[Request, int]] = {}
    local_s = f"{local[0]}:{local[1]}" if local else None
    loop = asyncio.get_running_loop()

    def answer(stream_id: int) -> None:
        req, size = streams.pop(stream_id, (None, 0))
        if req is None:
            return
        delay, status = injected(req.target, app.pod)
        body = app.payload(peer, local_s, req, size)

        def send() -> None:
            try:
                conn.send_headers(stream_id, [(":status", str(status)),
                                              ("content-type", "application/json"),
                                              ("content-length", str(len(body)))])  # fmt: skip
                conn.send_data(stream_id, body, end_stream=True)
            except (StreamClosedError, ProtocolError):
                return  # reset meanwhile
            writer.write(conn.data_to_send())

        if delay:
            loop.call_later(delay, send)
        else:
            send()

    try:
        while data := await reader.read(65536):
            try:
                events = conn.receive_data(data)
            except ProtocolError as exc:
                log.info("h2 protocol error from %s: %s", peer, exc)
                writer.write(conn.data_to_send())
                return
            for ev in events:
                if isinstance(ev, RequestReceived):
                    hs = [(str(k), str(v)) for k, v in ev.headers]
                    pseudo = {k: v for k, v in hs if k.startswith(":")}
                    headers = [(k, v) for k, v in hs if not k.startswith(":")]
                    req = Request(pseudo.get(":method", ""), pseudo.get(":path", ""),
                                  "HTTP/2", headers)  # fmt: skip
                    if ":authority" in pseudo:
                        headers.insert(0, ("host", pseudo[":authority"]))
                    streams[ev.stream_id] = (req, 0)
                elif isinstance(ev, DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if ev.stream_id in streams:
                        req, size = streams[ev.stream_id]
                        size += len(ev.data)
                        if size > MAX_BODY:
                            streams.pop(ev.stream_id)
                            conn.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)
                        else:
                            streams[ev.stream_id] = (req, size)
                elif isinstance(ev, StreamEnded):
                    answer(ev.stream_id)
                elif isinstance(ev, StreamReset):
                    streams.pop(ev.stream_id, None)
                elif isinstance(ev, ConnectionTerminated):
                    writer.write(conn.data_to_send())
                    return
            writer.write(conn.data_to_send())
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()
