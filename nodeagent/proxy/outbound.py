"""The accept stage (port 15001): accept, find where the connection was headed, hand on.

eBPF redirects a captured pod's ``connect()`` to this listener and records where the pod
meant to go. For each accepted connection the proxy asks the injected
``original_destination`` lookup, refuses what it cannot or must not serve, and hands an
`Accepted` to the next stage: the protocol switch (`nodeagent.proxy.switch`), which
decides how the connection is served — today always the opaque TCP forward
(`nodeagent.proxy.tcp`: open the upstream through the ``connect`` seam, join the two with
a `Relay`).

The data path, stage by stage (composed by the agent)::

    accept (here) -> protocol switch -> TCP forward -> resolve -> balance + failover -> dial
                     switch.py          tcp.py         resolve.py  balance.py,      dial.py
                                                                  failover.py

Design choices:

* Accepting is our own ``add_reader`` + non-blocking ``accept()`` loop on the agent's
  socket, not ``loop.create_server``. The lookup needs the accepted ``socket.socket``
  itself (``getsockopt``/the connection's tuple), while transports only expose a wrapper
  (asyncio's ``TransportSocket``, uvloop's ``PseudoSocket``); and a refused connection
  never becomes a transport at all. It also makes "stop accepting" one
  ``remove_reader``, and it batches accepts like asyncio's own server.
* Refusals reset (``SO_LINGER`` 0) instead of closing: to the app a FIN right after a
  successful connect looks like a server that answered with nothing; a reset says the
  connection failed, and app retry logic treats it that way.
* One task per accepted connection runs the next stage; `close` waits on those tasks
  until the grace deadline and cancels the rest, and cancellation resets both legs.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.listener import Address as Address  # re-exported for callers
from nodeagent.proxy.listener import (
    Listener,
    endpoint,
    reset_socket,
    set_nodelay,
)
from nodeagent.proxy.listener import format_address as format_address
from nodeagent.proxy.stage import Accepted as Accepted
from nodeagent.proxy.stage import ConnectionServer as ConnectionServer
from nodeagent.proxy.stage import OutboundConfig as OutboundConfig
from nodeagent.proxy.stage import ProxyStats as ProxyStats
from nodeagent.proxy.stage import Upstream as Upstream
from nodeagent.proxy.stage import UpstreamConnector as UpstreamConnector
from nodeagent.proxy.stage import connect_plaintext as connect_plaintext
from nodeagent.proxy.switch import ProtocolSwitch
from nodeagent.proxy.tcp import TcpForward

log = logging.getLogger("weft.proxy")


OriginalDestination = Callable[[socket.socket], Address | None]
"""Where the accepted connection was originally headed, or None if it was not captured."""

IsSelf = Callable[[str, int], bool]
"""Whether (ip, port) is one of this proxy's own listeners (inbound, admin, ...)."""


class OutboundProxy(Listener):
    """The accept stage: refuses what it must, hands every other connection on.

    ``original_destination`` is called with each accepted socket; ``is_self`` says which
    addresses are this proxy's other listeners (the outbound listener itself is always
    recognised); ``hold`` parks accepted connections until the agent is ready (see
    `ReadyHold`). ``serve`` is the next stage; by default a protocol switch over a TCP
    forward that opens upstream legs with ``connect`` (default: plaintext TCP) under
    ``config``.
    """

    def __init__(
        self,
        *,
        original_destination: OriginalDestination,
        is_self: IsSelf,
        connect: UpstreamConnector = connect_plaintext,
        config: OutboundConfig | None = None,
        hold: ReadyHold | None = None,
        serve: ConnectionServer | None = None,
        stats: ProxyStats | None = None,
    ) -> None:
        super().__init__("outbound", hold)
        self.config = config or OutboundConfig()
        self.stats = stats or ProxyStats()
        self._original_destination = original_destination
        self._is_self = is_self
        if serve is None:
            serve = ProtocolSwitch(opaque=TcpForward(connect, self.config, self.stats))
        self._serve = serve
        self._open_by_source: dict[str, int] = {}
        """Source pod address -> its connections in the proxy now."""
        self._busy_logged = 0.0

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        self.stats.accepted += 1
        client = endpoint(peer)
        set_nodelay(conn)
        try:
            found = self._original_destination(conn)
        except Exception:
            log.exception(
                "original-destination lookup failed for %s; refusing", format_address(client)
            )
            found = None
        if found is None:
            self.stats.refused_unknown += 1
            log.warning(
                "no original destination for %s; refusing (is it captured by this node's eBPF?)",
                format_address(client),
            )
            reset_socket(conn)
            return
        destination = endpoint(found)
        label = f"{format_address(client)} -> {format_address(destination)}"
        if self._is_loop(destination, conn):
            self.stats.refused_loop += 1
            log.warning(
                "outbound %s: the destination is this proxy itself; refusing the loop "
                "(did the app connect to the proxy port directly, or is the proxy's own "
                "cgroup captured?)",
                label,
            )
            reset_socket(conn)
            return
        source = client[0]
        held = self._open_by_source.get(source, 0)
        if held >= self.config.max_connections_per_source:
            self._refuse_busy(source, held, label)
            reset_socket(conn)
            return
        self._open_by_source[source] = held + 1
        conn.setblocking(False)
        accepted = Accepted(conn, client, destination, label)
        self._spawn(self._counted(source, self._serve(accepted)), f"weft.proxy.outbound {label}")

    async def _counted(self, source: str, served: Coroutine[Any, Any, None]) -> None:
        try:
            await served
        finally:
            left = self._open_by_source[source] - 1
            if left:
                self._open_by_source[source] = left
            else:
                del self._open_by_source[source]

    def _refuse_busy(self, source: str, held: int, label: str) -> None:
        """One pod holds its share of the proxy: its new connection is refused, nobody
        else's (counted per source; logged at most once a second)."""
        stats = self.stats
        stats.refused_busy += 1
        by = stats.refused_busy_by_source
        key = source if source in by or len(by) < 1000 else "[other]"
        by[key] = by.get(key, 0) + 1
        now = time.monotonic()
        if now - self._busy_logged >= 1.0:
            self._busy_logged = now
            log.warning("outbound %s: refused, %s already has %d connections open through "
                        "this node's proxy (its limit; %d refused so far)", label, source,
                        held, by[key])  # fmt: skip

    def open_connections(self, source: str) -> int:
        """Connections ``source`` (a pod address) holds through the proxy now."""
        return self._open_by_source.get(source, 0)

    def _is_loop(self, destination: Address, conn: socket.socket) -> bool:
        listen = self._listen_address
        assert listen is not None
        if destination == listen:
            return True
        try:
            # With a wildcard listener this is the concrete address the client reached.
            if destination == endpoint(conn.getsockname()):
                return True
        except OSError:
            pass
        if ipaddress.ip_address(listen[0]).is_unspecified and destination[1] == listen[1]:
            try:
                dest_ip = ipaddress.ip_address(destination[0])
            except ValueError:
                dest_ip = None
            if dest_ip is not None and (dest_ip.is_loopback or dest_ip.is_unspecified):
                return True  # what a wildcard listener answers on without is_self knowing
        return self._is_self(*destination)
