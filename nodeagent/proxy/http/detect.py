"""Protocol detection, sans-I/O: what the first bytes a client sent say it speaks.

`detect` looks at bytes *peeked* from an accepted socket (nothing is consumed, so a
connection served as opaque TCP afterwards loses no byte) and answers one of:

* ``HTTP1`` — a complete HTTP/1.x request line (``METHOD SP target SP HTTP/1.x CRLF``);
* ``H2`` — the HTTP/2 connection preface (prior knowledge, h2c);
* ``TLS`` — a TLS ClientHello record (the app's own TLS: opaque to us);
* ``OPAQUE`` — anything else;
* ``NEED_MORE`` — a prefix of one of the above: peek again once more bytes arrived.

The caller bounds the wait (`nodeagent.proxy.switch`): a client that sends nothing, or
not enough, within the detection deadline is served as opaque TCP — the server-first
protocols (SMTP, MySQL, ...) never wait longer than that, and those on well-known ports
do not wait at all (`DEFAULT_OPAQUE_PORTS`).

Like linkerd2-proxy's detection, this only looks at the request line: a request whose
line is valid HTTP/1 but whose head is not is still HTTP, and the HTTP server answers it
with 400 rather than passing it through unparsed.
"""

from __future__ import annotations

import enum
import re


class Detected(enum.StrEnum):
    HTTP1 = "http1"
    H2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"
    NEED_MORE = "need_more"


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_REQUEST_LINE = 8192
"""Bytes of a request line detection waits for (and peeks); a longer line is opaque —
the HTTP server's own limit (`nodeagent.proxy.http.h1`) is this size too."""

DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
"""Server-first or binary protocols served as opaque TCP without waiting for the client:
SMTP (25, 587), MySQL (3306), Galera (4444), PostgreSQL (5432), Redis (6379),
Elasticsearch transport (9300), memcached (11211) — Linkerd's default list."""

# tchar of RFC 9110: methods are tokens; real ones are upper case, at most ~20 bytes.
_METHOD = re.compile(rb"[A-Z][A-Z0-9_-]{0,19}")
_LINE = re.compile(rb"([A-Z][A-Z0-9_-]{0,19}) [\x21-\x7e]+ HTTP/1\.[01]\r?\n")
_VERSION = b" HTTP/1."


def detect(data: bytes) -> Detected:
    """What ``data`` (the first bytes of a connection, as peeked) starts with."""
    if not data:
        return Detected.NEED_MORE
    if data[0] == 0x16:
        # A TLS handshake record: content type 22, then version 3.x.
        if len(data) < 2:
            return Detected.NEED_MORE
        return Detected.TLS if data[1] == 0x03 else Detected.OPAQUE
    if data[:1] == b"P" and H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        if len(data) >= len(H2_PREFACE):
            return Detected.H2
        return Detected.NEED_MORE
    return _http1(data)


def _http1(data: bytes) -> Detected:
    end = data.find(b"\n", 0, MAX_REQUEST_LINE)
    if end < 0:
        if len(data) >= MAX_REQUEST_LINE:
            return Detected.OPAQUE
        return Detected.NEED_MORE if _could_be_request_line(data) else Detected.OPAQUE
    return Detected.HTTP1 if _LINE.fullmatch(data, 0, end + 1) else Detected.OPAQUE


def _could_be_request_line(data: bytes) -> bool:
    """Whether ``data`` (no newline yet) is a prefix of a valid request line."""
    space = data.find(b" ")
    if space < 0:
        return _METHOD.fullmatch(data) is not None
    if _METHOD.fullmatch(data, 0, space) is None:
        return False
    rest = data[space + 1 :]
    second = rest.find(b" ")
    if second < 0:
        return all(0x21 <= b <= 0x7E for b in rest)
    target, version = rest[:second], rest[second:]
    if not target or not all(0x21 <= b <= 0x7E for b in target):
        return False
    if len(version) <= len(_VERSION):
        return _VERSION.startswith(version)
    tail = version[len(_VERSION) :]
    return version.startswith(_VERSION) and tail[:1] in (b"0", b"1") and tail[1:] in (b"", b"\r")
