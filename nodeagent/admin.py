"""The agent's admin endpoint (port 15020): /live, /ready, /debug/state, /metrics.

A deliberately tiny HTTP/1.1 responder (:func:`weft.http.answer_one`): one request per
connection, GET only, bounded request size.  It must keep answering when the data path
is in trouble, so it shares nothing with the proxy but the event loop.

The port listens on the node's address (kubelet probes it, Prometheus scrapes
``/metrics``), but ``/debug/state`` — pods, identities, certificate expiries, endpoint
health — answers only clients on the node itself (loopback): anyone else gets 403.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from weft.http import TEXT, RequestHead, answer_one

log = logging.getLogger("weft.admin")


class Readiness:
    """Named blockers; ready when none is left (ztunnel's readiness, in miniature)."""

    def __init__(self, *blockers: str) -> None:
        self.blockers = set(blockers)
        self._changed = asyncio.Event()
        self.on_ready: Callable[[], None] | None = None
        """Called once, when the last blocker is done."""

    def done(self, name: str) -> None:
        if name in self.blockers:
            self.blockers.discard(name)
            log.info("readiness: %s done%s", name, "" if self.blockers else "; ready")
            self._changed.set()
            if not self.blockers and self.on_ready is not None:
                self.on_ready()

    @property
    def ready(self) -> bool:
        return not self.blockers

    async def wait(self, *besides: str) -> None:
        """Until every blocker is done, except those named in ``besides``."""
        allowed = set(besides)
        while True:
            self._changed.clear()
            if self.blockers <= allowed:
                return
            await self._changed.wait()


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

    def route(self, head: RequestHead, peer: str = "127.0.0.1") -> tuple[int, bytes, str]:
        """Sans-I/O: a GET request head (and the client's address) in, (status, body,
        content type) out."""
        path = head.target.split("?", 1)[0]
        if path in LOCAL_ONLY and not _loopback(peer):
            return 403, f"{path} answers only on the node itself (127.0.0.1)\n".encode(), TEXT
        if path == "/live":
            return 200, b"live\n", TEXT
        if path == "/ready":
            if self.readiness.ready:
                return 200, b"ready\n", TEXT
            waiting = ", ".join(sorted(self.readiness.blockers))
            return 503, f"not ready: waiting for {waiting}\n".encode(), TEXT
        if path == "/debug/state":
            try:
                return 200, json.dumps(self.state(), indent=2).encode(), "application/json"
            except Exception:
                log.exception("building /debug/state failed")
                return 500, b"internal error; see the agent's log\n", TEXT
        if path == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        return 404, b"not found: try /live /ready /debug/state /metrics\n", TEXT

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        await answer_one(reader, writer, lambda head: self.route(head, host), within=10.0)


LOCAL_ONLY = frozenset({"/debug/state"})
"""Paths only loopback clients may read (what they show is the node's business)."""


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False
