"""The agent's admin endpoint (port 15020): /live, /ready, /debug/state, /metrics, /tap
(and a sidecar's ``/app-health/...``: the app's probes, `nodeagent.probes`).

A deliberately tiny HTTP/1.1 responder: one request per connection, GET only, bounded
request size.  It must keep answering when the data path is in trouble, so it shares
nothing with the proxy but the event loop.  `AdminServer.route` is the sans-I/O part
for answers of one body (status, body, content type); `AdminServer.tap_request` judges a
``/tap`` request; `AdminServer.handle` is the I/O: it reads the head (as
:func:`weft.http.answer_one` does) and either writes the routed answer or streams.

The port listens on the node's address (kubelet probes it, Prometheus scrapes
``/metrics``), but ``/debug/state`` — pods, identities, certificate expiries, endpoint
health — and ``/tap`` — every request's method, path, both identities — answer only
clients on the node itself (loopback): anyone else, a pod included, gets 403 saying so.
In Kubernetes that means ``kubectl port-forward`` to the agent's pod (the forwarded
connection arrives from the pod's loopback) or running on the node.

``/tap?…`` (`nodeagent.tap` parses the filters) is a stream of newline-delimited JSON in
a chunked response: one object per request, ``{"dropped": N}`` when this subscriber's
bounded queue overflowed (N: all lost so far), and last ``{"end": why, "events": n,
"dropped": N}`` when ``max`` events were sent, ``duration`` ran out or the agent stops.
It ends early when the client goes away.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from nodeagent.probes import AppProber
from nodeagent.tap import TapBusy, TapError, TapHub, TapRequest, parse_query
from weft.http import TEXT, HttpError, RequestHead, close_writer, parse_head, render_response

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
        *,
        tap: TapHub | None = None,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
        probes: AppProber | None = None,
    ) -> None:
        self.readiness = readiness
        self.probes = probes
        """A sidecar's app probes (``/app-health/...``, `nodeagent.probes`): the kubelet
        asks them here, from the node's address."""
        self.state = state
        self.registry = registry
        self.tap = tap
        """The node's live tap (None: ``/tap`` answers 404)."""
        self.metrics = metrics
        """The ``/metrics`` text when it is not just ``registry``'s: with proxy workers,
        the agent's merged with theirs (asked for on each scrape)."""

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
        if path == "/tap":
            if self.tap is None:
                return 404, b"this agent has no tap\n", TEXT
            return 400, b"/tap is a stream: ask it over HTTP (weft viz tap)\n", TEXT
        return 404, b"not found: try /live /ready /debug/state /metrics /tap\n", TEXT

    def tap_request(
        self, head: RequestHead, peer: str = "127.0.0.1"
    ) -> TapRequest | tuple[int, bytes, str]:
        """Sans-I/O: a ``/tap`` request head in, the stream to serve — or the refusal
        (status, body, content type)."""
        if not _loopback(peer):
            return (
                403,
                b"/tap answers only on the node itself (127.0.0.1): it shows every "
                b"request's path and identities. Use `kubectl port-forward` to the agent's "
                b"pod, or run `weft viz tap` on the node\n",
                TEXT,
            )
        if self.tap is None:
            return 404, b"this agent has no tap\n", TEXT
        try:
            return parse_query(head.target.partition("?")[2])
        except TapError as e:
            return 400, f"{e}\n".encode(), TEXT

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        try:
            async with asyncio.timeout(10.0):
                head = await self._read_head(reader, writer)
            if head is None:
                return
            path = head.target.split("?", 1)[0]
            if path == "/metrics" and self.metrics is not None:
                answer = 200, await self.metrics(), CONTENT_TYPE_LATEST
            elif self.probes is not None and self.probes.handles(path):
                answer = await self.probes.answer(path)
            elif path == "/tap":
                asked = self.tap_request(head, host)
                if isinstance(asked, TapRequest):
                    await self._stream(asked, reader, writer)
                    return
                answer = asked
            else:
                try:
                    answer = self.route(head, host)
                except Exception:
                    log.exception("answering GET %s failed", head.target[:100])
                    answer = 500, b"internal error; see the log\n", TEXT
            writer.write(render_response(*answer))
            async with asyncio.timeout(10.0):
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await close_writer(writer)

    @staticmethod
    async def _read_head(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> RequestHead | None:
        """The request head, or None when it was answered already (malformed, not GET)."""
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raw = b"oversized"  # parse_head answers 400
        try:
            head = parse_head(raw)
        except HttpError as e:
            writer.write(render_response(e.status, f"{e.message}\n".encode(), TEXT))
            await writer.drain()
            return None
        if head.method != "GET":
            writer.write(render_response(405, b"GET only\n", TEXT))
            await writer.drain()
            return None
        return head

    async def _stream(
        self, asked: TapRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Stream events to one tap client until ``max``, ``duration``, the client going
        away (it sends nothing after its head: any read that returns means it left) or
        the hub closing. Writes wait for a slow client; meanwhile its queue fills and
        drops (counted, and said before the next event)."""
        hub = self.tap
        assert hub is not None
        try:
            sub = hub.subscribe(asked.filter)
        except TapBusy as e:
            writer.write(render_response(503, f"{e}\n".encode(), TEXT))
            await writer.drain()
            return
        gone = asyncio.ensure_future(reader.read(1))

        def left(done: asyncio.Future[bytes]) -> None:
            if not done.cancelled():
                done.exception()  # a reset is how a client leaves: retrieved, not logged
            sub.close()

        gone.add_done_callback(left)
        sent, reported, why = 0, 0, "agent stopping"
        limit = asked.max_events
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\nCache-Control: no-store\r\n"
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            try:
                async with asyncio.timeout(asked.duration):
                    while True:
                        event = await sub.get()
                        if gone.done():
                            why = "client left"
                            break
                        if event is None:
                            break
                        lines = []
                        while event is not None:
                            if sub.dropped > reported:
                                reported = sub.dropped
                                lines.append(_line({"dropped": reported}))
                            lines.append(_line(event.to_json(hub.node)))
                            sent += 1
                            if limit is not None and sent >= limit:
                                break
                            event = sub.take()
                        writer.write(_chunk(b"".join(lines)))
                        await writer.drain()
                        if limit is not None and sent >= limit:
                            why = "max"
                            break
            except TimeoutError:
                why = "duration"
            if why != "client left":
                end = {"end": why, "events": sent, "dropped": sub.dropped}
                writer.write(_chunk(_line(end)) + b"0\r\n\r\n")
                async with asyncio.timeout(2.0):
                    await writer.drain()
        finally:
            hub.unsubscribe(sub)
            gone.cancel()


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LOCAL_ONLY = frozenset({"/debug/state", "/tap"})
"""Paths only loopback clients may read (what they show is the node's business)."""


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False
