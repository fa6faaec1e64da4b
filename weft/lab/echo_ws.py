"""The echo server's WebSocket side (RFC 6455, the small part a demo needs): the 101
handshake, then every text/binary message echoed back, PING answered with PONG, CLOSE
answered and the connection closed. Messages over 64 KiB close the connection (1009).
`client_handshake` / `client_message` are the other end, for `weft.lab.echoclient`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weft.lab.echo import Request

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 64 * 1024
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of one frame (unmasked); raises ValueError when too large."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes")
    key = await reader.readexactly(4) if b1 & 0x80 else b""
    data = await reader.readexactly(n)
    if key:
        data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data


async def serve_websocket(
    pod: str, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    key = req.header("sec-websocket-key")
    if not key:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        return
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        b"sec-websocket-accept: %s\r\nx-echo-pod: %s\r\n\r\n"
        % (accept_key(key).encode(), pod.encode())
    )
    try:
        while True:
            try:
                opcode, data = await read_frame(reader)
            except ValueError:
                writer.write(encode_frame(CLOSE, struct.pack("!H", 1009), mask=False))
                return
            if opcode in (TEXT, BINARY):
                writer.write(encode_frame(opcode, data, mask=False))
            elif opcode == PING:
                writer.write(encode_frame(PONG, data, mask=False))
            elif opcode == CLOSE:
                writer.write(encode_frame(CLOSE, data[:2], mask=False))
                await writer.drain()
                return
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
) -> dict[str, str]:
    """Upgrade an open connection; returns the 101's headers (lower-case names)."""
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n".encode()
    )
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    if not head[0].startswith("HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[0]}")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in head[1:] if line)
    )
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise ConnectionError("wrong sec-websocket-accept")
    return headers


async def client_message(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str
) -> str:
    writer.write(encode_frame(TEXT, text.encode(), mask=True))
    opcode, data = await read_frame(reader)
    if opcode != TEXT:
        raise ConnectionError(f"expected a text frame, got opcode {opcode}")
    return data.decode()
