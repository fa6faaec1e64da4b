"""The agent's admin endpoint (port 15020): /live, /ready, /debug/state, /metrics.

A deliberately tiny HTTP/1.1 responder: one request per connection, GET only, bounded
request size.  It must keep answering when the data path is in trouble, so it shares
nothing with the proxy but the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger("weft.admin")


class Readiness:
    """Named blockers; ready when none is left (ztunnel's readiness, in miniature)."""

    def __init__(self, *blockers: str) -> None:
        self.blockers = set(blockers)

    def done(self, name: str) -> None:
        if name in self.blockers:
            self.blockers.discard(name)
            log.info("readiness: %s done%s", name, "" if self.blockers else "; ready")

    @property
    def ready(self) -> bool:
        return not self.blockers


class AdminServer:
    def __init__(
        self,
        readiness: Readiness,
        state: Callable[[], dict[str, Any]],
        registry: CollectorRegistry,
    ) -> None:
        self.readiness = readiness
        self.state = state
        self.registry = registry

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/live":
            return 200, "text/plain", b"live\n"
        if path == "/ready":
            if self.readiness.ready:
                return 200, "text/plain", b"ready\n"
            waiting = ", ".join(sorted(self.readiness.blockers))
            return 503, "text/plain", f"not ready: waiting for {waiting}\n".encode()
        if path == "/debug/state":
            return 200, "application/json", json.dumps(self.state(), indent=2).encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(self.registry)
        return 404, "text/plain", b"not found: try /live /ready /debug/state /metrics\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or parts[0] != b"GET":
                status, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                status, ctype, body = self.route(parts[1].decode("latin-1").split("?", 1)[0])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        except Exception:
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
