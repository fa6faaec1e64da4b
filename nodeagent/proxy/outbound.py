"""The node proxy's outbound listener (port 15001): accept, find where to, relay.

eBPF redirects a captured pod's ``connect()`` to this listener and records where the pod
meant to go. For each accepted connection the proxy asks the injected
``original_destination`` lookup, refuses what it cannot or must not serve, opens the
upstream through the injected ``connect`` seam and joins the two with a `Relay`.

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
* The upstream leg is a seam (`UpstreamConnector`): plaintext ``create_connection``
  today, the mTLS tunnel later. The connect timeout wraps whatever is plugged in, and
  the seam gets the client address because the tunnel must present the client
  workload's identity.
* While the upstream connects, the client is not read (see `Relay`): its bytes wait in
  the kernel, where TCP pushes back on the app, not in our memory.
* One task per relayed connection runs connect-then-relay; `close` waits on those tasks
  until the grace deadline and cancels the rest, and cancellation resets both legs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.listener import Address as Address  # re-exported for callers
from nodeagent.proxy.listener import (
    Listener,
    endpoint,
    reset_socket,
    set_nodelay,
)
from nodeagent.proxy.listener import format_address as format_address
from nodeagent.proxy.relay import ByteMeter, Relay

log = logging.getLogger("weft.proxy")


OriginalDestination = Callable[[socket.socket], Address | None]
"""Where the accepted connection was originally headed, or None if it was not captured."""

IsSelf = Callable[[str, int], bool]
"""Whether (ip, port) is one of this proxy's own listeners (inbound, admin, ...)."""


@dataclass
class Upstream:
    """What a connector may return instead of a bare transport: the transport plus a
    per-connection byte meter and a callback for when the relay has ended."""

    transport: asyncio.BaseTransport
    meter: ByteMeter | None = None
    done: Callable[[], None] | None = None


class UpstreamConnector(Protocol):
    """Opens the upstream leg of one outbound connection.

    Connect to ``destination`` (for ``client``), attach a protocol made by
    ``protocol_factory`` to the new transport, and return that transport (or an
    `Upstream` around it) once the protocol's ``connection_made`` has run; raise on
    failure. The proxy applies
    `OutboundConfig.connect_timeout` around the call and cancels it on timeout or shutdown.
    ``loop.create_connection(protocol_factory, *destination)`` is the plaintext version.
    """

    def __call__(
        self,
        client: Address,
        destination: Address,
        protocol_factory: Callable[[], asyncio.Protocol],
        /,
    ) -> Awaitable[asyncio.BaseTransport | Upstream]: ...


async def connect_plaintext(
    client: Address,
    destination: Address,
    protocol_factory: Callable[[], asyncio.Protocol],
) -> asyncio.BaseTransport:
    """Plain TCP straight to the original destination (until the mTLS tunnel lands)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(protocol_factory, *destination)
    return transport


@dataclass(frozen=True)
class OutboundConfig:
    """Tuning of the outbound listener; the defaults suit a node proxy."""

    connect_timeout: float = 5.0
    """Seconds allowed to open the upstream leg before the client is reset."""

    idle_timeout: float = 3600.0
    """Seconds without a byte either way after which a connection is closed."""

    high_water: int = 256 * 1024
    """Bytes buffered towards one side above which the other side is no longer read."""

    low_water: int = 64 * 1024
    """Bytes buffered towards one side below which reading the other side resumes."""

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError(
                f"connect_timeout and idle_timeout must be positive, got "
                f"{self.connect_timeout} and {self.idle_timeout}"
            )
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError(
                f"need 0 <= low_water <= high_water, got low_water={self.low_water}, "
                f"high_water={self.high_water}"
            )


@dataclass
class ProxyStats:
    """Counters of the outbound listener, for /debug/state and metrics."""

    accepted: int = 0
    """Connections accepted, refused ones included."""

    active: int = 0
    """Connections connecting upstream or relaying right now."""

    refused_unknown: int = 0
    """Refused: the lookup had no original destination (not captured by this node)."""

    refused_loop: int = 0
    """Refused: the original destination is this proxy itself."""

    upstream_failed: int = 0
    """The upstream connect failed or timed out; the client was reset."""

    bytes_out: int = 0
    """Bytes relayed from clients to upstreams."""

    bytes_in: int = 0
    """Bytes relayed from upstreams to clients."""


class OutboundProxy(Listener):
    """Relays captured connections to their original destinations.

    ``original_destination`` is called with each accepted socket; ``is_self`` says which
    addresses are this proxy's other listeners (the outbound listener itself is always
    recognised); ``connect`` opens upstream legs (default: plaintext TCP); ``hold``
    parks accepted connections until the agent is ready (see `ReadyHold`).
    """

    def __init__(
        self,
        *,
        original_destination: OriginalDestination,
        is_self: IsSelf,
        connect: UpstreamConnector = connect_plaintext,
        config: OutboundConfig | None = None,
        hold: ReadyHold | None = None,
    ) -> None:
        super().__init__("outbound", hold)
        self.config = config or OutboundConfig()
        self.stats = ProxyStats()
        self._original_destination = original_destination
        self._is_self = is_self
        self._connect = connect

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
        conn.setblocking(False)
        self._spawn(self._run(conn, client, destination, label), f"weft.proxy.outbound {label}")

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

    # --- one connection ---------------------------------------------------------------

    async def _run(
        self, conn: socket.socket, client: Address, destination: Address, label: str
    ) -> None:
        relay = Relay(
            label=f"outbound {label}",
            high_water=self.config.high_water,
            low_water=self.config.low_water,
            idle_timeout=self.config.idle_timeout,
            meter=self.stats,
        )
        self.stats.active += 1
        try:
            await self._connect_and_relay(relay, conn, client, destination)
        except asyncio.CancelledError:
            state = "relaying" if relay.connected else "connecting"
            log.info("outbound %s: still %s at the shutdown deadline; resetting", label, state)
            relay.abort("proxy shut down")
            await relay.wait_closed()
            raise
        finally:
            self.stats.active -= 1

    async def _connect_and_relay(
        self, relay: Relay, conn: socket.socket, client: Address, destination: Address
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: relay.client, conn)
        except OSError as exc:
            # Only if the client vanished while being wrapped; the transport closes it.
            log.info("%s: client connection unusable (%s)", relay.label, exc)
            return
        timeout = self.config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                opened = await self._connect(client, destination, lambda: relay.upstream)
            if not relay.connected:
                raise RuntimeError(
                    "the upstream connector returned without attaching the relay's protocol"
                )
        except Exception as exc:  # any failure of the pluggable seam fails this connection
            self.stats.upstream_failed += 1
            expected = isinstance(exc, (OSError, TimeoutError))
            why = (
                f"timed out after {timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.warning(
                "%s: upstream connect failed (%s); resetting the client",
                relay.label,
                why,
                exc_info=None if expected else exc,
            )
            relay.abort(f"upstream connect failed ({why})")
            await relay.wait_closed()
            return
        log.debug("%s: relaying", relay.label)
        done = None
        if isinstance(opened, Upstream):
            if opened.meter is not None:
                relay.add_meter(opened.meter)
            done = opened.done
        try:
            await relay.wait_closed()
        finally:
            if done is not None:
                done()
        log.debug(
            "%s: closed (%s); %d bytes out, %d bytes in",
            relay.label,
            relay.close_reason,
            relay.bytes_out,
            relay.bytes_in,
        )
