"""The tunnel server's seams (STYLE.md §9): where a target pod is, who may reach it,
and how to connect to it. The agent supplies them from discovery and policy; tests
supply their own."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nodeagent.proxy.listener import Address
from nodeagent.proxy.tunnel.wire import Extensions
from weft.identity import SpiffeId


class NotLocal(enum.Enum):
    """Why `LocateTarget` found no local pod at an address."""

    UNKNOWN = "unknown"
    """No pod is known at that address anywhere (or it is not a pod address at all)."""
    ELSEWHERE = "elsewhere"
    """A pod is there, but it runs on another node."""


LocateTarget = Callable[[Address], SpiffeId | NotLocal]
"""The workload identity of the local pod at a target address, or why there is none.

Deliberately not a bool: the client needs to tell stale discovery (``ELSEWHERE``: retry
after an update) from an address that is no pod at all, and the server needs the pod's
identity to check it against the certificate it presented."""


@dataclass(frozen=True)
class Decision:
    """An authorization verdict; ``reason`` goes into the server's log line."""

    allowed: bool
    reason: str = ""

    @classmethod
    def allow(cls, reason: str = "") -> Decision:
        return cls(True, reason)

    @classmethod
    def deny(cls, reason: str) -> Decision:
        return cls(False, reason)


Authorize = Callable[[SpiffeId, Address, "str | None"], Decision]
"""Whether a client workload may reach a target with a stream that will carry
``protocol`` (the OPEN's hint: ``http/1.1``, ``h2``, or None for bytes); called for every
stream, on the loop, so it must be quick and must not block (the agent's is
`nodeagent.authz.Authorizer.stream`)."""


def allow_trust_domain(trust_domain: str) -> Authorize:
    """Without policies: any workload of ``trust_domain`` may reach any local pod."""

    def authorize(client: SpiffeId, target: Address, protocol: str | None = None) -> Decision:
        if client.trust_domain == trust_domain and not client.is_node:
            return Decision.allow()
        return Decision.deny(f"{client} is not a workload of trust domain {trust_domain!r}")

    return authorize


class ServedStream(Protocol):
    """A protocol that serves a whole tunnel stream itself (the HTTP server, the inbound
    HTTP/1.1 relay), and says when it is done."""

    @property
    def closed(self) -> asyncio.Future[None]: ...

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def abandon(self) -> None:
        """The stream ended before it was attached: release what was opened for it."""


StreamServer = Callable[
    [SpiffeId, "SpiffeId | None", Address, str, Extensions], Awaitable[ServedStream]
]
"""(client identity, identity presented, target, label, the OPEN's optional fields) ->
the protocol for a stream
whose OPEN named an application protocol (``http/1.1``): the stream is attached to it
instead of being relayed to the target as bytes. It connects to the target before it
returns (raising ``OSError`` if it cannot), so that a pod that is down is refused at
OPEN (TARGET_UNREACHABLE) and the client node fails over, as for a relayed stream."""


class TargetConnector(Protocol):
    """Opens the connection to the local pod: attach a protocol made by
    ``protocol_factory`` and return the transport once ``connection_made`` has run."""

    def __call__(
        self, target: Address, protocol_factory: Callable[[], asyncio.Protocol], /
    ) -> Awaitable[asyncio.BaseTransport]: ...


async def connect_target_plaintext(
    target: Address, protocol_factory: Callable[[], asyncio.Protocol]
) -> asyncio.BaseTransport:
    transport, _ = await asyncio.get_running_loop().create_connection(protocol_factory, *target)
    return transport
