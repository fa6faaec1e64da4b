"""The dial stage: open the connection to one chosen endpoint.

A captured destination gets a stream over the mTLS tunnel to its node (to the pod itself
for a sidecar-mode pod, `weft.mesh.Workload.sidecar`), presenting the
*source* workload's identity and requiring the destination's; anything else gets
plaintext TCP — unless the source pod is strict (``weft.io/inbound-mode=strict``), which
refuses plaintext to anything outside the mesh. Each result carries the golden-metric
labels of the connection it made (`ConnLabels`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.metrics import ConnLabels
from nodeagent.proxy.listener import Address
from nodeagent.proxy.resolve import Hop, NoRoute, PlaintextRefused, workload_name
from nodeagent.proxy.stage import UpstreamConnector, connect_plaintext
from nodeagent.proxy.tunnel import TUNNEL_PORT, TunnelClient
from nodeagent.proxy.tunnel.wire import protocol_extension
from weft.mesh import Workload


@dataclass(frozen=True)
class Dialed:
    transport: asyncio.BaseTransport
    labels: ConnLabels


class Dialer:
    """``tunnel`` is None when this node has no identity material (capture-only mode):
    then everything is plaintext, and strictness cannot be honoured either way."""

    def __init__(
        self,
        *,
        tunnel: TunnelClient | None,
        attempt_timeout: float,
        plaintext: UpstreamConnector = connect_plaintext,
    ) -> None:
        self.tunnel = tunnel
        self.attempt_timeout = attempt_timeout
        self._plaintext = plaintext

    async def dial(
        self,
        source: Workload | None,
        hop: Hop,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        protocol: str | None = None,
    ) -> Dialed:
        """``protocol`` (``http/1.1``, ``h2``) tells the destination node's proxy how to
        serve a tunnel stream; None is opaque bytes."""
        dest = hop.workload
        src_name = workload_name(source)
        if dest is not None and dest.captured and self.tunnel is not None:
            if source is None:
                raise NoRoute(
                    f"source {hop.address[0]} is not in discovery yet: cannot present its "
                    "identity to a captured destination"
                )
            # A sidecar-mode pod serves its own tunnel; any other, its node's agent.
            peer = hop.address[0] if dest.sidecar else dest.node_ip
            if not peer:
                raise NoRoute(f"destination pod {dest.namespace}/{dest.name} has no node address")
            # The tunnel client times its own stages once it has a handshake slot.
            stream = await self.tunnel.connect(
                source.identity,
                (peer, TUNNEL_PORT),
                hop.address,
                dest.identity,
                protocol_factory,
                protocol_extension(protocol) if protocol else (),
            )
            labels = ConnLabels(
                "outbound", *src_name, *workload_name(dest), "true",
                str(source.identity), str(dest.identity),
            )  # fmt: skip
            return Dialed(stream, labels)
        if source is not None and source.strict and self.tunnel is not None:
            where = f"{dest.namespace}/{dest.name}" if dest else "outside the mesh"
            raise PlaintextRefused(
                f"{source.namespace}/{source.name} is strict: refusing plaintext to "
                f"{hop.address[0]}:{hop.address[1]} ({where}, not captured)"
            )
        # A plain connect has one stage and no queue.
        address: Address = hop.address
        async with asyncio.timeout(self.attempt_timeout):
            transport = await self._plaintext(address, address, protocol_factory)
        if not isinstance(transport, asyncio.BaseTransport):
            transport = transport.transport
        labels = ConnLabels(
            "outbound", *src_name, *workload_name(dest), "false",
            str(source.identity) if source else "", "",
        )  # fmt: skip
        return Dialed(transport, labels)
