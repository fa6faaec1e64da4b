"""The outbound connect, composed: resolve -> balance + failover -> dial.

`MeshUpstreams` is the `UpstreamConnector` the TCP forward stage calls for each captured
connection: it resolves the original destination (`nodeagent.proxy.resolve`: a service
VIP to its ready endpoints, or the address itself), lets `Failover` pick endpoints with
the balancer and try them in turn, and `Dialer` open each attempt (tunnel or plaintext).
The golden-metric meter of the connection is opened here, and the balancer lease is
released when the relay ends. Failures are reported to the `FailoverObserver` the agent
gives (its metrics and log lines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from nodeagent.meshstate import MeshState
from nodeagent.metrics import ConnLabels
from nodeagent.proxy.dial import Dialed, Dialer
from nodeagent.proxy.failover import Failover, FailoverObserver
from nodeagent.proxy.listener import Address
from nodeagent.proxy.relay import ByteMeter
from nodeagent.proxy.resolve import Resolved, resolve
from nodeagent.proxy.stage import Upstream


class ConnectionMeter(ByteMeter, Protocol):
    def close(self) -> None: ...


MeterFactory = Callable[[ConnLabels], ConnectionMeter]

ObserverFactory = Callable[[Address, Address, Resolved], FailoverObserver]
"""(app, original destination, what it resolved to) -> who hears about failed attempts."""


class MeshUpstreams:
    def __init__(
        self,
        *,
        mesh: MeshState,
        failover: Failover,
        dialer: Dialer,
        meter: MeterFactory,
        observer: ObserverFactory,
    ) -> None:
        self.mesh = mesh
        self.failover = failover
        self.dialer = dialer
        self._meter = meter
        self._observer = observer

    async def __call__(
        self,
        app: Address,
        destination: Address,
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> Upstream:
        source = self.mesh.workload_at(app[0])
        resolved = resolve(self.mesh, destination)
        hops = {h.address: h for h in resolved.hops}

        async def dial(endpoint: Address) -> Dialed:
            return await self.dialer.dial(source, hops[endpoint], protocol_factory)

        connected = await self.failover.connect(
            list(hops),
            dial,
            balanced=resolved.service is not None,
            observer=self._observer(app, destination, resolved),
        )
        meter = self._meter(connected.value.labels)
        lease = connected.lease

        def done() -> None:
            if lease is not None:
                lease.release()
            meter.close()

        return Upstream(connected.value.transport, meter, done)
