"""Sans-I/O HTTP/1.1 for Weft's own small endpoints: strict, bounded, no dependencies.

The control plane's agent API and admin port, the agent's admin port and the agent's
control plane client all speak a narrow HTTP/1.1: one request per connection, bodies
with ``Content-Length`` only, bounded heads.  Those pieces live here once, bytes in and
values (or :class:`HttpError` / :class:`HttpProtocolError`) out, plus
:func:`answer_one`, the whole life of a plain admin connection.

Strict on purpose: no obsolete line folding, no bare LF, no duplicate Content-Length, no
Transfer-Encoding — the ambiguities request smuggling lives on.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("weft.http")

MAX_HEAD = 8 * 1024
"""Request line + headers.  A legitimate request's head is ~150 bytes."""
MAX_HEADERS = 32


class HttpError(Exception):
    """The request is not acceptable HTTP; ``status`` is what to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]
    """Lower-cased names."""

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return None if value is None else int(value)


_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_DIGITS = re.compile(r"^[0-9]{1,10}$")
_SINGLETON = {"content-length", "transfer-encoding", "host"}


def parse_head(raw: bytes) -> RequestHead:
    """Parse a request head that ends with the blank line (``\\r\\n\\r\\n``).

    Strict on purpose: no obsolete line folding, no bare LF, no duplicate
    Content-Length, no Transfer-Encoding — the ambiguities request smuggling lives on.
    """
    if len(raw) > MAX_HEAD:
        raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
    if not raw.endswith(b"\r\n\r\n"):
        raise HttpError(400, "request head does not end with CRLF CRLF")
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line: expected 'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version != b"HTTP/1.1":
        raise HttpError(505, "only HTTP/1.1 is served")
    if not _TOKEN.match(method) or not _TARGET.match(target):
        raise HttpError(400, "malformed request line: bad method or target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header field (line folding and bare LF are refused)")
        value = value.strip(b" \t")
        if b"\n" in value or b"\r" in value or b"\x00" in value:
            raise HttpError(400, "control characters in a header value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key in _SINGLETON:
                raise HttpError(400, f"duplicate {key} header")
            text = f"{headers[key]}, {text}"
        headers[key] = text
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported: send Content-Length")
    length = headers.get("content-length")
    if length is not None and not _DIGITS.match(length):
        raise HttpError(400, "Content-Length must be a decimal number")
    return RequestHead(method.decode("ascii"), target.decode("ascii"), headers)


def render_response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    extra: Mapping[str, str] | None = None,
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (extra or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------- admin port


# --- the client side ------------------------------------------------------------


class HttpProtocolError(ValueError):
    """The response is not the strict HTTP/1.1 this client accepts."""


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]
    """Lower-cased names; a repeated header is an error, except identical Content-Length."""
    content_length: int


def encode_request(method: str, path: str, host: str, body: bytes) -> bytes:
    """One HTTP/1.1 request with a JSON body; the connection closes after the answer."""
    for part in (method, path, host):
        if not part or any(c in part for c in "\r\n \t"):
            raise ValueError(f"invalid request line component {part!r}")
    head = (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


def parse_response_head(
    raw: bytes, *, max_headers: int = 64, stream_type: str | None = None
) -> ResponseHead:
    """Parse a status line and headers ending with an empty line (``\\r\\n\\r\\n``).

    Strict on purpose: HTTP/1.1 only, CRLF line endings, no obsolete line folding, a
    ``Content-Length`` (digits only) and no ``Transfer-Encoding``.  Anything else is an
    `HttpProtocolError`: the peer is not the server we expect.  With ``stream_type``, a
    200 answer must instead be a stream of that content type with no length
    (``content_length`` is then 0).
    """
    if not raw.endswith(b"\r\n\r\n"):
        raise HttpProtocolError("response head does not end with an empty line")
    try:
        text = raw[:-4].decode("ascii")
    except UnicodeDecodeError:
        raise HttpProtocolError("response head is not ASCII") from None
    lines = text.split("\r\n")
    if any("\n" in line or "\r" in line for line in lines):
        raise HttpProtocolError("bare CR or LF in the response head")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version != "HTTP/1.1":
        raise HttpProtocolError(f"expected HTTP/1.1, got status line {lines[0][:80]!r}")
    if len(code) != 3 or not code.isdigit() or not 200 <= int(code) <= 599:
        raise HttpProtocolError(f"bad status code in {lines[0][:80]!r}")
    if len(lines) - 1 > max_headers:
        raise HttpProtocolError(f"more than {max_headers} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise HttpProtocolError(f"malformed header line {line[:80]!r}")
        name, value = name.lower(), value.strip(" \t")
        if name in headers and not (name == "content-length" and headers[name] == value):
            raise HttpProtocolError(f"repeated header {name!r}")
        headers[name] = value
    if "transfer-encoding" in headers:
        raise HttpProtocolError("Transfer-Encoding is not supported; send Content-Length")
    if stream_type is not None and code == "200":
        if headers.get("content-type") != stream_type or "content-length" in headers:
            raise HttpProtocolError(
                f"expected a {stream_type} stream, got content type {headers.get('content-type')!r}"
            )
        return ResponseHead(200, reason, headers, 0)
    length = headers.get("content-length")
    if length is None or not length.isdigit() or len(length) > 12:
        raise HttpProtocolError(f"missing or invalid Content-Length {length!r}")
    return ResponseHead(int(code), reason, headers, int(length))


# --- a whole admin connection ---------------------------------------------------------


Responder = Callable[[RequestHead], tuple[int, bytes, str]]
"""(request head) -> (status, body, content type)."""


async def answer_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    respond: Responder,
    *,
    within: float = 5.0,
) -> None:
    """Read one request head, answer it with ``respond`` (GET only) and close.

    A client that sends nothing in ``within`` seconds, or disconnects, gets nothing; a
    malformed head gets its 4xx.  The connection is always closed, aborted if the peer
    does not take the close within a second.
    """
    try:
        async with asyncio.timeout(within):
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raw = b"oversized"  # parse_head answers 400
            try:
                head = parse_head(raw)
            except HttpError as e:
                status, body, ctype = e.status, f"{e.message}\n".encode(), TEXT
            else:
                if head.method != "GET":
                    status, body, ctype = 405, b"GET only\n", TEXT
                else:
                    try:
                        status, body, ctype = respond(head)
                    except Exception:
                        log.exception("answering %s %s failed", head.method, head.target[:100])
                        status, body, ctype = 500, b"internal error; see the log\n", TEXT
            writer.write(render_response(status, body, ctype))
            await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        await close_writer(writer)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close, waiting briefly for the peer (TLS close_notify); abort a peer that does not
    answer, and abort when cancelled while closing, so no transport is left behind."""
    writer.close()
    try:
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
    except BaseException:
        writer.transport.abort()
        raise


TEXT = "text/plain; charset=utf-8"
