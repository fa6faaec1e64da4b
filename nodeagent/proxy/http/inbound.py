"""The destination node's HTTP: tunnel streams whose client node detected HTTP, to the
local pod they name.

* **HTTP/1.1** (`InboundHttp.observe`): the client node has already balanced, framed
  and cleaned each request, and sends one exchange at a time on the stream; this node
  relays the stream byte for byte to one connection to the pod, opened before the
  stream is answered (a pod that is down refuses it, and the client node fails over),
  and *observes* it (`Http1Observer`): strict parsing and limits, and each exchange
  recorded with the client's verified identity.
* **HTTP/2** (`InboundForwarder`): an `H2Server` on the stream, whose streams go to the
  pod over a pooled h2c connection.

Both record the golden metrics with ``direction="inbound"``; the source is named by the
identity the tunnel proved. (Per-route authorization will decide on the parsed head.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nodeagent.httpmetrics import HttpLabels, HttpMetrics
from nodeagent.proxy.http.client import UpstreamLost
from nodeagent.proxy.http.forward import failure_of, record_exchange
from nodeagent.proxy.http.h1 import Limits
from nodeagent.proxy.http.h2client import H2Client, H2Pool
from nodeagent.proxy.http.message import ProxyError
from nodeagent.proxy.http.observe import Http1Observer
from nodeagent.proxy.http.server import Exchange, ProxyFailure
from nodeagent.proxy.listener import Address, format_address
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.resolve import workload_name
from nodeagent.proxy.tunnel.hooks import ServedStream, TargetConnector
from weft.identity import SpiffeId
from weft.mesh import Workload

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
IDLE_TIMEOUT = 600.0
"""Seconds an inbound HTTP/1.1 stream may carry nothing (the client node's pool ages
its idle connections out after 60 s)."""


class InboundHttp:
    """The destination node's HTTP: requests of tunnel streams to their local pods."""

    def __init__(
        self,
        *,
        connect: TargetConnector,
        metrics: HttpMetrics,
        workload_at: Callable[[str], Workload | None],
        h2_pool: H2Pool | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.connect = connect
        self.h2_pool = h2_pool or H2Pool()
        self.metrics = metrics
        self.workload_at = workload_at
        self.limits = limits or Limits()
        self.requests = 0
        self.streams = 0
        """HTTP/1.1 tunnel streams observed so far."""

    def labels(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address, authority: str
    ) -> HttpLabels:
        dest = self.workload_at(target[0])
        return HttpLabels(
            "inbound",
            authority or format_address(target),
            client.service_account or "unknown",
            client.namespace or "unknown",
            *workload_name(dest),
            "true",
            str(client),
            str(presented) if presented is not None else "",
        )

    async def observe(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address, label: str
    ) -> ServedStream:
        """An HTTP/1.1 tunnel stream: connect to the pod now (raising ``OSError`` if it
        cannot be reached, which refuses the stream), and return the protocol to attach
        the stream to."""
        recorder = _Recorder(self, client, presented, target)
        loop = asyncio.get_running_loop()
        observer = Http1Observer(recorder, label=label, clock=loop.time, limits=self.limits)
        relay = Relay(
            label=label,
            high_water=HIGH_WATER,
            low_water=LOW_WATER,
            idle_timeout=IDLE_TIMEOUT,
            tap=observer,
        )
        observer.relay = relay
        try:
            await self.connect(target, lambda: relay.upstream)
        except BaseException:
            relay.abort("pod connect failed")
            raise
        self.streams += 1
        return relay.client

    def h2_forwarder(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address, label: str
    ) -> InboundForwarder:
        return InboundForwarder(self, client, presented, target, label)


class _Recorder:
    """An observer's `ExchangeSink`: the golden metrics of one inbound stream."""

    __slots__ = ("_client", "_http", "_labels", "_presented", "_target")

    def __init__(
        self, http: InboundHttp, client: SpiffeId, presented: SpiffeId | None, target: Address
    ) -> None:
        self._http = http
        self._client = client
        self._presented = presented
        self._target = target
        self._labels: dict[bytes | None, HttpLabels] = {}

    def exchange(
        self, authority: bytes | None, status: int | None, latency: float | None, error: str
    ) -> None:
        labels = self._labels.get(authority)
        if labels is None:
            host = authority.decode("latin-1") if authority is not None else ""
            labels = self._http.labels(self._client, self._presented, self._target, host)
            if len(self._labels) < 8:  # the authority comes from the client
                self._labels[authority] = labels
        self._http.requests += 1
        self._http.metrics.record(labels, status=status, latency=latency, error=error)


class InboundForwarder:
    """The `Forwarder` of an inbound HTTP/2 stream's `H2Server`: each stream to the pod
    over the pooled h2c connection of that pod."""

    def __init__(
        self,
        http: InboundHttp,
        client: SpiffeId,
        presented: SpiffeId | None,
        target: Address,
        label: str,
    ) -> None:
        self.http = http
        self.client = client
        self.presented = presented
        self.target = target
        self.label = label
        self._key = ("", target)
        self._pod_label = f"{label} (to the pod)"

    async def prepare(self) -> None:
        """Open (or find) the pod's h2c connection now: raises if the pod cannot be
        reached, which refuses the tunnel stream before any request is sent on it."""
        await self.http.h2_pool.connection(self._key, self._dial, self._pod_label)

    async def _upstream(self, fresh: bool) -> tuple[H2Client, bool]:
        pool = self.http.h2_pool
        if fresh:
            return await pool.open(self._key, self._dial, self._pod_label), False
        return await pool.connection(self._key, self._dial, self._pod_label)

    async def _dial(self, factory: Callable[[], asyncio.Protocol]) -> object:
        return await self.http.connect(self.target, factory)

    async def forward(self, exchange: Exchange) -> None:
        try:
            await self._forward(exchange)
        except asyncio.CancelledError:
            self._record(exchange, None, cancelled=True)
            raise

    async def _forward(self, exchange: Exchange) -> None:
        self.http.requests += 1
        for attempt in range(2):
            try:
                client, reused = await self._upstream(fresh=attempt > 0)
            except Exception as exc:
                failure = failure_of(exc)
                self._record(exchange, failure.error)
                # Nothing reached the pod: a request the client node may send again
                # gets REFUSED_STREAM, which it takes for a refused stream and fails over.
                raise ProxyFailure(
                    failure.error,
                    f"{format_address(self.target)}: {failure.detail}",
                    reset=exchange.replayable,
                ) from None
            try:
                await client.send(exchange)  # type: ignore[arg-type]
            except UpstreamLost as lost:
                if (
                    attempt == 0
                    and exchange.replayable
                    and lost.retryable(exchange.head.idempotent, reused)
                ):
                    exchange.unbind()
                    continue
                error = ProxyError.BAD_RESPONSE if lost.bad_response else ProxyError.UPSTREAM_RESET
                self._record(exchange, error)
                detail = f"{format_address(self.target)}: {lost.detail}"
                raise ProxyFailure(error, detail, code=lost.code) from None
            except BaseException:
                client.cancel(exchange)  # type: ignore[arg-type]
                raise
            self._record(exchange, None)
            return

    def _record(
        self, exchange: Exchange, error: ProxyError | None, *, cancelled: bool = False
    ) -> None:
        labels = self.http.labels(self.client, self.presented, self.target, exchange.head.authority)
        record_exchange(self.http.metrics, labels, exchange, error, cancelled=cancelled)
