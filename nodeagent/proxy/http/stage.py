"""The HTTP stages of the outbound path: what the protocol switch hands an accepted
connection to when it found an HTTP/1.x request line (`HttpForward`) or the HTTP/2
preface (`H2Forward`). Each wraps the socket in its server (`Http1Server`, `H2Server`)
whose forwarder resolves, balances and dials per request (HTTP/2: per stream;
`nodeagent.proxy.http.forward`), and serves it until it closes."""

from __future__ import annotations

import asyncio
import logging

from nodeagent.proxy.http.forward import H2, HTTP1, OutboundHttp
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.h2server import H2Server
from nodeagent.proxy.http.server import FastForwarder, Http1Server, HttpServerConfig
from nodeagent.proxy.http.tenancy import RequestShares, SharedForwarder
from nodeagent.proxy.relay import reset_transport
from nodeagent.proxy.stage import Accepted, ProxyStats

log = logging.getLogger("weft.proxy.http")


class HttpForward:
    """HTTP/1.1 (``config`` an `HttpServerConfig`) or HTTP/2 (an `H2Config`)."""

    def __init__(
        self,
        http: OutboundHttp,
        config: HttpServerConfig | H2Config,
        stats: ProxyStats,
        shares: RequestShares | None = None,
    ) -> None:
        self.http = http
        self.config = config
        self.stats = stats
        self.protocol = H2 if isinstance(config, H2Config) else HTTP1
        self.shares = shares
        """Each source pod's share of in-flight requests (`nodeagent.proxy.http.tenancy`)."""

    def _server(self, accepted: Accepted, label: str) -> Http1Server | H2Server:
        forwarder: FastForwarder = self.http.forwarder(
            accepted.client, accepted.original_destination, label, self.protocol
        )
        if self.shares is not None:
            forwarder = SharedForwarder(forwarder, self.shares, accepted.client[0])
        if isinstance(self.config, H2Config):
            return H2Server(forwarder, label=label, config=self.config)
        return Http1Server(forwarder, label=label, config=self.config)

    async def __call__(self, accepted: Accepted) -> None:
        label = f"outbound {accepted.label}" + (" (h2)" if self.protocol == H2 else "")
        server = self._server(accepted, label)
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
