"""What the data path's stages hand each other: an `Accepted` connection, the next
stage that serves it (`ConnectionServer`), the upstream seam (`UpstreamConnector`) and
what it returns (`Upstream`), and the outbound path's tuning and counters. A module of
its own so that the stages import it, not each other (see `nodeagent.proxy.outbound`
for the order they run in)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodeagent.proxy.listener import Address
from nodeagent.proxy.relay import ByteMeter


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

    max_connections_per_source: int = 8192
    """Open connections one source pod (address) may hold through the proxy; beyond, its
    new ones are refused (a reset), the other pods' are not (issue #18). With the
    buffers above, it also bounds the bytes one pod can have the proxy hold."""

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

    refused_busy: int = 0
    """Refused: the source pod already held ``max_connections_per_source``."""

    refused_busy_by_source: dict[str, int] = field(default_factory=dict)
    """Those refusals by source address (bounded: beyond 1,000 under ``[other]``)."""

    upstream_failed: int = 0
    """The upstream connect failed or timed out; the client was reset."""

    bytes_out: int = 0
    """Bytes relayed from clients to upstreams."""

    bytes_in: int = 0
    """Bytes relayed from upstreams to clients."""


@dataclass(frozen=True)
class Accepted:
    """One accepted, captured connection, as the accept stage hands it on."""

    conn: socket.socket
    """The accepted socket, non-blocking; the next stage owns it."""
    client: Address
    """The app's address (its pod IP and port)."""
    original_destination: Address
    """Where the app was connecting (from eBPF): a service VIP or a pod address."""
    label: str
    """``client -> original destination``, for log lines."""


ConnectionServer = Callable[[Accepted], Coroutine[Any, Any, None]]
"""Serves one accepted connection to its end (the protocol switch, a TCP forward, ...);
cancelled at the shutdown deadline, when it must reset what it holds."""
