"""The HTTP/1.1 stage of the outbound path: what the protocol switch hands an accepted
connection to when it found an HTTP/1.x request line. It wraps the socket in an
`Http1Server` whose forwarder resolves, balances and dials per request
(`nodeagent.proxy.http.forward`), and serves it until it closes."""

from __future__ import annotations

import asyncio
import logging

from nodeagent.proxy.http.forward import OutboundHttp
from nodeagent.proxy.http.server import Http1Server, HttpServerConfig
from nodeagent.proxy.relay import reset_transport
from nodeagent.proxy.stage import Accepted, ProxyStats

log = logging.getLogger("weft.proxy.http")


class HttpForward:
    def __init__(self, http: OutboundHttp, config: HttpServerConfig, stats: ProxyStats) -> None:
        self.http = http
        self.config = config
        self.stats = stats

    async def __call__(self, accepted: Accepted) -> None:
        label = f"outbound {accepted.label}"
        forwarder = self.http.forwarder(accepted.client, accepted.original_destination, label)
        server = Http1Server(forwarder, label=label, config=self.config)
        loop = asyncio.get_running_loop()
        self.stats.active += 1
        try:
            try:
                await loop.connect_accepted_socket(lambda: server, accepted.conn)
            except OSError as exc:
                log.info("%s: client connection unusable (%s)", label, exc)
                return
            await asyncio.shield(server.closed)
            log.debug("%s: closed (%s) after %d request(s)", label, server.close_reason,
                      server.requests)  # fmt: skip
        except asyncio.CancelledError:
            log.info("%s: still open at the shutdown deadline; resetting", label)
            if server.transport is not None:
                reset_transport(server.transport)
            raise
        finally:
            self.stats.active -= 1
