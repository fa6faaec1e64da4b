"""The destination node's HTTP: tunnel streams whose client node detected HTTP, to the
local pod they name.

* **HTTP/1.1** (`InboundHttp.observe`): the client node has already balanced, framed
  and cleaned each request, and sends one exchange at a time on the stream; this node
  relays the stream byte for byte to one connection to the pod, opened before the
  stream is answered (a pod that is down refuses it, and the client node fails over),
  and *observes* it (`Http1Observer`): strict parsing and limits, and each exchange
  recorded with the client's verified identity.
* **HTTP/2** (`InboundHttp.observe_h2`): the same relay, to one h2c connection to the pod
  per tunnel stream (the client node's `H2Client` talks to the pod end to end: SETTINGS,
  flow control, GOAWAY), observed frame by frame (`H2Observer`): each stream recorded,
  HPACK kept in step, floods and malformed frames refused.

Both record the golden metrics with ``direction="inbound"``; the source is named by the
identity the tunnel proved. HTTP/1.1 requests are also authorized one by one on their
parsed head (`RequestGate`, the agent's `nodeagent.authz.Authorizer`): a denied one is
answered 403 ``weft-proxy-error: unauthorized`` and nothing of it reaches the pod.
Neither rebuilds a message: the client node has done the per-request work, and the
destination only watches (docs/benchmarks.md has what that saved on each path).

Tracing: the destination cannot rewrite ``traceparent``, so the client node reserves
this hop's span id and names it, with its own span, in ``tracestate``
(`weft.tracing.peer`). With a tracer, each stream's observer keeps the request heads'
trace headers, and the recorder turns a request that carries a matching reservation
into the ``inbound`` SERVER span: the reserved id, the client node's span as parent,
the identity the tunnel verified (never a header), the pod's workload, status and
``grpc-status``, from the request head to the response head (wall-clock times the
observer reads for traced requests only).
A request without one (a caller outside the mesh, an old node) records nothing.

Tap (`nodeagent.tap`): while someone taps (`TapHub.active`, checked once per request
head by the observers), the observers keep each request's method and target, and the
recorder publishes each exchange that has them, the caller named by the identity the
tunnel proved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nodeagent.httpmetrics import HttpLabels, HttpMetrics
from nodeagent.proxy.http.h1 import Limits
from nodeagent.proxy.http.h2conn import H2Config
from nodeagent.proxy.http.observe import Http1Observer, RequestGate, Traced
from nodeagent.proxy.http.observe_h2 import H2Observer
from nodeagent.proxy.listener import Address, format_address
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.resolve import workload_name
from nodeagent.proxy.tunnel.hooks import ServedStream, TargetConnector
from nodeagent.tap import OFF, TapEvent, TapHub
from weft.identity import SpiffeId
from weft.mesh import Workload
from weft.tracing import Attr, AttrValue, Span, SpanKind, Tracer, status_for_http

RecordSpan = Callable[[Span], None]
"""Takes a finished span without waiting (`nodeagent.tracing.TraceExporter.record`)."""

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
IDLE_TIMEOUT = 600.0
"""Seconds an inbound HTTP stream may carry nothing (the client node's pools age their
idle connections out after 60 s)."""


GateFactory = Callable[[SpiffeId, Address, bool], RequestGate]
"""(client identity, target, whether the client node marks each request with the route
it matched) -> the gate of one HTTP/1.1 stream's requests."""


class InboundHttp:
    """The destination node's HTTP: requests of tunnel streams to their local pods."""

    def __init__(
        self,
        *,
        connect: TargetConnector,
        metrics: HttpMetrics,
        workload_at: Callable[[str], Workload | None],
        limits: Limits | None = None,
        h2_config: H2Config | None = None,
        gate: GateFactory | None = None,
        tracer: Tracer | None = None,
        record_span: RecordSpan | None = None,
        tap: TapHub | None = None,
    ) -> None:
        self.gate = gate
        self.tap = tap if tap is not None else OFF
        """The node's live tap; the observers look at its ``active`` per request head."""
        self.tracer = tracer if tracer is not None and record_span is not None else None
        """None: tracing is off (no collector); the observers then keep no headers. Its
        ``enabled`` is looked at per stream (the agent turns it off if the exporter
        dies)."""
        self.record_span: RecordSpan = record_span if record_span is not None else _no_span
        self.connect = connect
        self.metrics = metrics
        self.workload_at = workload_at
        self.limits = limits or Limits()
        self.h2_config = h2_config or H2Config()
        self.requests = 0
        self.streams = 0
        """HTTP/1.1 tunnel streams observed so far."""
        self.h2_streams = 0
        """HTTP/2 tunnel streams (connections to a pod) observed so far."""

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
        self,
        client: SpiffeId,
        presented: SpiffeId | None,
        target: Address,
        label: str,
        *,
        routed: bool = False,
    ) -> ServedStream:
        """An HTTP/1.1 tunnel stream: connect to the pod now (raising ``OSError`` if it
        cannot be reached, which refuses the stream), and return the protocol to attach
        the stream to. ``routed``: the client node sets ``weft-route`` on each request a
        route matched (and removes any the app sent), so per-route policies may
        believe it (`nodeagent.proxy.tunnel.wire.EXT_ROUTE`)."""
        loop = asyncio.get_running_loop()
        recorder = _Recorder(self, client, presented, target, self._tracing(), "1.1")
        gate = self.gate(client, target, routed) if self.gate is not None else None
        observer = Http1Observer(
            recorder, label=label, clock=loop.time, limits=self.limits, gate=gate,
            tracing=recorder.tracing, tap=self.tap,
        )  # fmt: skip
        served = await self._relay(observer, target, label)
        self.streams += 1
        return served

    async def observe_h2(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address, label: str
    ) -> ServedStream:
        """An HTTP/2 tunnel stream (one h2c connection of the client node's to this
        pod): as `observe`, with the frame observer."""
        loop = asyncio.get_running_loop()
        recorder = _Recorder(self, client, presented, target, self._tracing(), "2")
        observer = H2Observer(
            recorder, label=label, clock=loop.time, config=self.h2_config,
            tracing=recorder.tracing, tap=self.tap,
        )  # fmt: skip
        served = await self._relay(observer, target, label)
        self.h2_streams += 1
        return served

    def _tracing(self) -> bool:
        tracer = self.tracer
        return tracer is not None and tracer.enabled

    async def _relay(
        self, observer: Http1Observer | H2Observer, target: Address, label: str
    ) -> ServedStream:
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
        return relay.client


def _no_span(span: Span) -> None:
    pass


class _Recorder:
    """An observer's `ExchangeSink`: the golden metrics of one inbound stream, and the
    SERVER spans of its traced requests."""

    __slots__ = ("_client", "_http", "_labels", "_presented", "_target", "_version", "tracing")

    def __init__(
        self,
        http: InboundHttp,
        client: SpiffeId,
        presented: SpiffeId | None,
        target: Address,
        tracing: bool = False,
        version: str = "1.1",
    ) -> None:
        self._http = http
        self._version = version
        self._client = client
        self._presented = presented
        self._target = target
        self._labels: dict[bytes | None, HttpLabels] = {}
        self.tracing = tracing
        """This stream's requests are looked at for a reserved span."""

    def exchange(
        self,
        authority: bytes | None,
        status: int | None,
        latency: float | None,
        error: str,
        grpc_status: str = "",
        trace: Traced | None = None,
        asked: tuple[bytes, bytes] | None = None,
    ) -> None:
        labels = self._labels.get(authority)
        if labels is None:
            host = authority.decode("latin-1") if authority is not None else ""
            labels = self._http.labels(self._client, self._presented, self._target, host)
            if len(self._labels) < 8:  # the authority comes from the client
                self._labels[authority] = labels
        self._http.requests += 1
        self._http.metrics.record(
            labels, status=status, grpc_status=grpc_status, latency=latency, error=error
        )
        if trace is not None and self.tracing:
            self._span(trace, labels, status, error, grpc_status)
        if asked is not None:  # kept by the observer only while someone taps
            method, target = asked
            self._http.tap.publish(
                TapEvent(
                    "inbound",
                    method.decode("latin-1"),
                    target.decode("latin-1").partition("?")[0],
                    labels.authority,
                    status,
                    error,
                    latency,
                    "",
                    labels.src_namespace,
                    labels.src_workload,
                    labels.client_id,
                    labels.dst_workload,
                    labels.dst_namespace,
                    labels.server_id,
                    True,
                    grpc_status=grpc_status,
                    endpoint=format_address(self._target),
                )
            )

    def _span(
        self, trace: Traced, labels: HttpLabels, status: int | None, error: str, grpc: str
    ) -> None:
        """The request's ``inbound`` SERVER span, to the exporter."""
        target = trace.target.decode("latin-1")
        attrs: dict[str, AttrValue] = {
            Attr.DIRECTION: "inbound",
            Attr.HTTP_METHOD: trace.method.decode("latin-1"),
            Attr.URL_PATH: target.partition("?")[0],
            Attr.SERVER_ADDRESS: labels.authority,
            Attr.PROTOCOL_VERSION: self._version,
            Attr.SRC_NAMESPACE: labels.src_namespace,
            Attr.SRC_WORKLOAD: labels.src_workload,
            Attr.CLIENT_ID: labels.client_id,
            Attr.DST_NAMESPACE: labels.dst_namespace,
            Attr.DST_WORKLOAD: labels.dst_workload,
            Attr.SERVER_ID: labels.server_id,
            Attr.ENDPOINT: format_address(self._target),
            Attr.TLS: True,
        }
        if status:
            attrs[Attr.HTTP_STATUS] = status
        if grpc:
            attrs[Attr.RPC_GRPC_STATUS] = int(grpc) if grpc.isdigit() else grpc
        if error:
            attrs[Attr.ERROR_TYPE] = attrs[Attr.PROXY_ERROR] = error
        self._http.record_span(
            trace.span.finish(
                "inbound",
                SpanKind.SERVER,
                start_ns=trace.started,
                end_ns=trace.ended,
                attributes=attrs,
                status=status_for_http(SpanKind.SERVER, status or 0, grpc),
            )
        )
