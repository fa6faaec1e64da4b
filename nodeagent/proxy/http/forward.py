"""Per-request forwarding on the app's node: the HTTP servers' outbound `Forwarder`.

Outbound (the app's node), for each request::

    resolve (the original destination: a service VIP -> its ready endpoints)
    -> balance (P2C over peak-EWMA latency x outstanding requests, `Balancer.latency`)
       + failover over connect failures (`Failover`, the TCP path's, with its budget)
    -> a pooled upstream connection for (source identity, endpoint) (`Http1Pool`), or a
       new one from the dial stage: a tunnel stream that tells the other node
       ``http/1.1`` (so it does not sniff again), or plaintext to an uncaptured pod
    -> send; the response streams back through the `Exchange`

so one keep-alive connection's requests spread over every replica, and a slow replica
gets fewer of them. A request that failed on a *reused* connection before any response
byte (the upstream closed it as we sent: the keep-alive race) is sent once more on a
fresh connection when it has no body. Failures the proxy answers itself are mapped to a
status and a ``weft-proxy-error`` token (`ProxyError`).

The general path adds the per-request stages: routes (`_route_request`; a route's own
retry and timeout annotations replace the service's), the retry stage with the retry
budget of the route (or of the service without routes), and the request deadline — the
configured request timeout or, when a gRPC client's ``grpc-timeout`` is shorter, that;
each attempt of a gRPC call tells the upstream what is left of it in ``grpc-timeout``.

The destination node's side is `nodeagent.proxy.http.inbound`. Both record the golden
metrics (`nodeagent.httpmetrics`): the stage that knows the facts records them.

Tracing (`weft.tracing`): with a tracer, each request — once, not per attempt — asks
`Tracer.begin` whether it is traced; each attempt of a traced request leaves with its
trace headers rewritten (`Hop.outgoing`): to a plaintext upstream this hop's span
becomes its parent; to a captured pod — whose node's proxy relays and only observes, so
cannot rewrite them — a fresh span id is reserved for that proxy's SERVER span, made the
app's parent and named with this span in ``tracestate`` (`weft.tracing.peer`).  Where
its metrics are recorded, the request's one ``outbound`` CLIENT span goes to the
exporter's ``record``.  The span ends when the response head arrives (or the request fails), the
point the latency metrics measure, as Linkerd's proxy ends its spans.  Without a
tracer the fast path pays one attribute check; a request without trace context at
sample rate 0 is forwarded as it came.

Tap (`nodeagent.tap`): where its metrics are recorded, a request is also published to
the node's tap hub — only while someone taps (`TapHub.active`, one attribute check per
request otherwise), with the route it matched when routing chose one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from nodeagent.httpmetrics import HttpLabels, HttpMetrics, classify
from nodeagent.meshstate import MeshState
from nodeagent.proxy.admission import Overloaded
from nodeagent.proxy.balance import Lease
from nodeagent.proxy.dial import Dialer
from nodeagent.proxy.failover import Failover, FailoverObserver
from nodeagent.proxy.http.client import Http1Client, Http1Pool, UpstreamLost
from nodeagent.proxy.http.grpctimeout import (
    GRPC_TIMEOUT_HEADER,
    format_grpc_timeout,
    grpc_request,
    parse_grpc_timeout,
)
from nodeagent.proxy.http.h2client import H2Client, H2Pool
from nodeagent.proxy.http.message import (
    RETRY_ATTEMPT_HEADER,
    ROUTE_HEADER,
    ProxyError,
    RequestHead,
    ResponseHead,
    end_to_end,
    header,
    modify_headers,
    set_forward_header,
)
from nodeagent.proxy.http.observe import CANCELLED
from nodeagent.proxy.http.retries import REPLAY_LIMIT, Retrying
from nodeagent.proxy.http.server import Exchange, ProxyFailure
from nodeagent.proxy.listener import Address, format_address
from nodeagent.proxy.resolve import (
    Hop,
    NoRoute,
    PlaintextRefused,
    Resolved,
    resolve,
    resolve_backend,
    workload_name,
)
from nodeagent.proxy.retry import RetryBudget
from nodeagent.proxy.tunnel import Stream, TunnelImpersonation, TunnelRefused, TunnelTimeout
from nodeagent.proxy.tunnel.wire import Status
from nodeagent.retrymetrics import EJECTED, TIMEOUT, RetryMetrics
from nodeagent.tap import OFF, TapEvent, TapHub, account_of
from weft.identity import SpiffeId
from weft.mesh import Workload
from weft.routes import RouteTable, Rule, table_for
from weft.tracing import Attr, AttrValue, Span, SpanKind, Tracer, status_for_http
from weft.tracing import Hop as TraceHop
from weft.traffic import DEFAULT as DEFAULT_TRAFFIC
from weft.traffic import RETRY_TIMEOUT_KEY, TIMEOUT_REQUEST_KEY, TrafficPolicy

log = logging.getLogger("weft.proxy.http")

HTTP1 = "http/1.1"
H2 = "h2"
"""The protocols a forwarder speaks upstream (the tunnel's OPEN names them, as ALPN
would): the one its downstream connection speaks."""

Upstream = Http1Client | H2Client


def failure_of(exc: BaseException) -> ProxyFailure:
    """The answer for a failed attempt to reach an endpoint."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, ProxyFailure):
        return exc
    if isinstance(exc, PlaintextRefused):
        return ProxyFailure(ProxyError.PLAINTEXT_REFUSED, detail)
    if isinstance(exc, NoRoute):
        return ProxyFailure(ProxyError.NO_ENDPOINTS, detail)
    if isinstance(exc, Overloaded):
        return ProxyFailure(ProxyError.OVERLOADED, detail)
    if isinstance(exc, TunnelImpersonation) or (
        isinstance(exc, TunnelRefused) and exc.status is Status.TARGET_IDENTITY_MISMATCH
    ):
        return ProxyFailure(ProxyError.IDENTITY_MISMATCH, detail)
    if isinstance(exc, TunnelRefused) and exc.status is Status.POLICY_DENIED:
        return ProxyFailure(ProxyError.UNAUTHORIZED, detail)
    if isinstance(exc, (TimeoutError, TunnelTimeout)):
        return ProxyFailure(ProxyError.TIMEOUT, f"connecting timed out ({detail})")
    return ProxyFailure(ProxyError.CONNECT_FAILED, detail)


@dataclass(frozen=True)
class _Route:
    """What a destination resolved to, at one version of the mesh state."""

    service: str
    hops: dict[Address, Hop]
    balanced: bool
    candidates: tuple[Address, ...]
    traffic: TrafficPolicy = DEFAULT_TRAFFIC
    table: RouteTable | None = None
    """The Gateway API routes attached to the service (for the port dialled)."""
    port: int = 0
    """The service port dialled (a route backend without a port uses it)."""
    budget: str = ""
    """The retry budget's key: the service's, or for a request a Gateway API route
    matched, the route's (``default/echo HTTPRoute default/canary``)."""
    name: str = ""
    """The Gateway API route the request matched (``ns/name``), for the counters."""


def _header_map(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}


def _routed(route: _Route, resolved: Resolved, rule: Rule) -> _Route:
    """The `_Route` of a rule's backend: its endpoints, the parent service's policy
    with the route's retry and timeout annotations in place of the service's, then the
    rule's timeouts (``timeouts.request`` the request timeout, ``backendRequest`` the
    per-try one); the route's retry budget."""
    hops = {h.address: h for h in resolved.hops}
    traffic = route.traffic
    if rule.traffic is not None:
        traffic = rule.traffic.apply(traffic)
    if rule.request_timeout is not None or rule.backend_timeout is not None:
        retry = traffic.retry
        if rule.backend_timeout is not None:
            retry = dataclasses.replace(retry, per_try_timeout=rule.backend_timeout)
        traffic = dataclasses.replace(
            traffic,
            retry=retry,
            request_timeout=rule.request_timeout or traffic.request_timeout,
        )
    service = resolved.service.key if resolved.service is not None else route.service
    budget = f"{route.service} {rule.kind} {rule.route}"
    return _Route(service, hops, True, tuple(hops), traffic, None, route.port, budget, rule.route)


class _QuietObserver:
    """Failed connect attempts of requests: logged; counted by the agent's observer."""

    def __init__(self, label: str, inner: FailoverObserver | None) -> None:
        self.label = label
        self.inner = inner

    def failed(
        self, endpoint: Address, error: BaseException, *, retrying: bool, ejected: bool
    ) -> None:
        log.warning("%s: connecting to %s failed (%s)%s", self.label, format_address(endpoint),
                    error, "; trying another endpoint" if retrying else "")  # fmt: skip
        if self.inner is not None:
            self.inner.failed(endpoint, error, retrying=retrying, ejected=ejected)


OutboundAuthorize = Callable[
    [SpiffeId, Address, str, str, Callable[[], Mapping[str, str]], "str | None"], "str | None"
]
"""(caller, endpoint, method, target, headers, the route matched) -> None to send an
HTTP/2 request, else why not: the destination relays HTTP/2 frames, so their requests
are judged here."""

ObserverFactory = Callable[[Address, Address, str], FailoverObserver]
"""(app, original destination, service key or "") -> the agent's failure observer."""

RecordSpan = Callable[[Span], None]
"""Takes a finished span without waiting (`nodeagent.tracing.TraceExporter.record`)."""


class OutboundHttp:
    """The node-wide part of outbound HTTP: mesh view, balancing, dialing, the pool and
    the metrics. `forwarder` makes the per-connection `Forwarder` for one app connection."""

    def __init__(
        self,
        *,
        mesh: MeshState,
        failover: Failover,
        dialer: Dialer,
        pool: Http1Pool,
        metrics: HttpMetrics,
        observer: ObserverFactory | None = None,
        h2_pool: H2Pool | None = None,
        retry_metrics: RetryMetrics | None = None,
        authorize: OutboundAuthorize | None = None,
        tracer: Tracer | None = None,
        record_span: RecordSpan | None = None,
        tap: TapHub | None = None,
    ) -> None:
        self.authorize = authorize
        """Judges each HTTP/2 request for the endpoint chosen (`nodeagent.authz`)."""
        self.mesh = mesh
        self.failover = failover
        self.dialer = dialer
        self.pool = pool
        self.h2_pool = h2_pool or H2Pool()
        self.metrics = metrics
        self._observer = observer
        self.retry_metrics = retry_metrics or RetryMetrics()
        self.rng = random.Random()
        """Weighted backend choice."""
        self._budgets: dict[str, RetryBudget] = {}
        self.requests = 0
        self.replayed = 0
        self.tracer = tracer if tracer is not None and record_span is not None else None
        """None: tracing is off (no collector), and nothing of it is looked at."""
        self.record_span: RecordSpan = record_span if record_span is not None else _no_span
        self.tap = tap if tap is not None else OFF
        """The node's live tap (`nodeagent.tap`); looked at only through its ``active``."""

    def budget(self, key: str) -> RetryBudget:
        """The retry budget of ``key`` (`_Route.budget`: a service without routes, or a
        route of one), per node as Linkerd's is per proxy."""
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= 10_000:  # routes come and go: start afresh
                self._budgets.clear()
            budget = self._budgets[key] = RetryBudget()
        return budget

    def forwarder(
        self, app: Address, destination: Address, label: str, protocol: str = HTTP1
    ) -> OutboundForwarder:
        return OutboundForwarder(self, app, destination, label, protocol)

    def _route(self, destination: Address) -> _Route:
        resolved = resolve(self.mesh, destination)
        hops = {h.address: h for h in resolved.hops}
        service = resolved.service
        table = None
        if service is not None and service.routes:
            table = table_for(service.key, service.routes, destination[1])
        key = service.key if service is not None else ""
        return _Route(
            key,
            hops,
            service is not None,
            tuple(hops),
            service.traffic if service is not None else DEFAULT_TRAFFIC,
            table if table is not None and table.entries else None,
            destination[1],
            key,
        )

    def _current(self, client: Upstream, source: Workload | None) -> bool:
        """Whether a pooled connection may take new requests: not if its tunnel
        connection is going away (draining, or made with a rotated certificate)."""
        transport = client.transport
        tunnel = self.dialer.tunnel
        return not (
            isinstance(transport, Stream)
            and tunnel is not None
            and source is not None
            and not tunnel.current(transport, source.identity)
        )

    def idle_connection(self, source: Workload | None, hop: Hop) -> Http1Client | None:
        """A pooled HTTP/1.1 connection to ``hop`` for ``source`` that may take a new
        request now, or None (without waiting for anything)."""
        key = (source.identity if source else None, hop.address)
        while True:
            client = self.pool.take(key)
            if client is None or self._current(client, source):
                return client
            client.close()  # its tunnel connection is going away: not for new requests

    async def _connection(
        self, source: Workload | None, hop: Hop, *, fresh: bool, label: str, protocol: str
    ) -> tuple[Upstream, bool]:
        """A connection to ``hop`` for ``source`` speaking ``protocol``: a pooled one
        unless ``fresh``, and whether it was reused."""
        key = (source.identity if source else None, hop.address)

        async def dial(factory: Callable[[], asyncio.Protocol]) -> object:
            return await self.dialer.dial(source, hop, factory, protocol=protocol)

        label = f"{label} -> {format_address(hop.address)} (upstream)"
        if protocol == H2:
            if fresh:
                return await self.h2_pool.open(key, dial, label), False
            while True:
                h2 = await self.h2_pool.connection(key, dial, label)
                if self._current(h2[0], source):
                    return h2
                h2[0].drain()
        if not fresh:
            client = self.idle_connection(source, hop)
            if client is not None:
                return client, True
        return await self.pool.open(key, dial, label), False


def _no_span(span: Span) -> None:
    pass


FastDone = Callable[[Exchange, ProxyFailure | None, bool], None]
"""(exchange, the failure to answer or None, whether to send it again with `forward`)."""


@dataclass(slots=True)
class _Call:
    """One request on the general path: what `_attempts` needs across attempts."""

    exchange: Exchange
    route: _Route
    observer: _QuietObserver
    source: Workload | None
    authority: str
    src_name: tuple[str, str]
    retrying: Retrying | None = None
    deadline: asyncio.Timeout | None = None
    """The request timeout's context, to tell its expiry from the client leaving."""
    expires: float | None = None
    """A gRPC call's deadline (loop time): each attempt tells the upstream what is left
    of it in ``grpc-timeout``."""


@dataclass(slots=True)
class _Traced:
    """A traced request in progress: its hop, and what routing chose for its span."""

    hop: TraceHop
    route: str = ""
    """The Gateway API route matched (``ns/name``)."""
    service: str = ""
    """The service sent to (a route's backend), when routing chose one."""


@dataclass(slots=True)
class _InFlight:
    exchange: Exchange
    done: FastDone
    client: Http1Client
    lease: Lease[Address] | None
    hop: Hop
    source: Workload | None


class OutboundForwarder:
    """The `Forwarder` of one app connection (its source and original destination)."""

    def __init__(
        self, http: OutboundHttp, app: Address, destination: Address, label: str, protocol: str
    ) -> None:
        self.http = http
        self.app = app
        self.destination = destination
        self.label = label
        self.protocol = protocol
        # Per connection, recomputed when the mesh state changes (version): what the
        # destination resolves to, its failure observer and the requests' labels.
        self._version = -1
        self._route: _Route | None = None
        self._observer: _QuietObserver | None = None
        self._labels: dict[tuple[Address | None, str], HttpLabels] = {}
        self._backends: dict[tuple[str, int], Resolved] = {}
        self._fast: _InFlight | None = None
        self._loop = asyncio.get_running_loop()
        self._replay: tuple[Address, ...] | None = None
        """Set when a fast-path exchange is to be sent again on a new connection (the
        keep-alive race): the endpoints to avoid."""
        self._traces: dict[Exchange, _Traced] = {}
        """The traced requests in progress (HTTP/2: several at once), until their span
        is recorded (`_record`); keyed by the exchange itself (identity)."""
        self._tapped_routes: dict[Exchange, _Route] = {}
        """While someone taps: the route (and backend service) routing chose for a
        request in progress, for its tap event."""

    def _resolve(self) -> tuple[_Route, _QuietObserver]:
        http = self.http
        if self._version != http.mesh.version or self._route is None or self._observer is None:
            route = http._route(self.destination)  # raises NoRoute (not cached)
            self._version = http.mesh.version
            self._route = route
            inner = (
                http._observer(self.app, self.destination, route.service)
                if http._observer
                else None
            )
            self._observer = _QuietObserver(self.label, inner)
            self._labels.clear()
            self._backends.clear()
        return self._route, self._observer

    # --- the fast path: an idle pooled connection, no task --------------------------------

    def start(self, exchange: Exchange, done: FastDone) -> bool:
        """Send ``exchange`` now if the endpoint the balancer picks has an idle pooled
        connection (the common case on a keep-alive connection), without a task or a
        future: ``done`` is called when it ends. False: nothing was done, use `forward`
        (no route, a direct address, an upgrade, or a connection to dial)."""
        if exchange.head.upgrade is not None or self.protocol != HTTP1:
            return False
        http = self.http
        try:
            route, _ = self._resolve()
        except NoRoute:
            self._version = -1
            return False  # `forward` answers it
        if not route.traffic.plain or route.table is not None:
            return False  # retries, timeouts or routes: `forward` has those stages
        grpc, grpc_timeout = grpc_request(exchange.head.headers)
        if grpc and grpc_timeout is not None:
            return False  # gRPC-Web with a deadline: `forward` keeps it
        lease = None
        if route.balanced:
            lease = http.failover.balancer.lease(route.candidates)
            if lease is None:
                return False
            hop = route.hops[lease.key]
        else:
            hop = route.hops[route.candidates[0]]  # a direct address: nothing to balance
        source = http.mesh.workload_at(self.app[0])
        client = http.idle_connection(source, hop)
        if client is None:
            if lease is not None:
                lease.abandon()  # no verdict on the endpoint: `forward` picks and dials
            return False
        http.requests += 1
        if lease is not None:
            http.failover.budget.attempt()
            lease.succeed()
        if http.tracer is not None:
            self._trace(http.tracer, exchange)
            if self._traces:
                self._propagate(exchange, hop)
        self._fast = _InFlight(exchange, done, client, lease, hop, source)
        client.start(exchange, self._fast_finished)
        return True

    def _fast_finished(self, error: BaseException | None) -> None:
        flight, self._fast = self._fast, None
        if flight is None:
            return  # cancelled meanwhile
        exchange, lease, hop, source = flight.exchange, flight.lease, flight.hop, flight.source
        authority = exchange.head.authority or format_address(self.destination)
        src_name = workload_name(source)
        if lease is not None:
            if error is None and exchange.responded is not None and exchange.sent is not None:
                lease.observe(exchange.responded - exchange.sent)
            lease.release()
        if error is None:
            self._record(exchange, authority, src_name, hop, source)
            flight.done(exchange, None, False)
            return
        if isinstance(error, UpstreamLost):
            if exchange.replayable and error.retryable(exchange.head.idempotent, True):
                exchange.unbind()
                self.http.replayed += 1
                self._replay = (hop.address,) if error.refused else ()
                flight.done(exchange, None, True)
                return
            flight.done(exchange, self._lost(exchange, authority, src_name, hop, source, error),
                        False)  # fmt: skip
            return
        self._record(exchange, authority, src_name, hop, source, error=ProxyError.BAD_RESPONSE)
        flight.done(exchange, ProxyFailure(ProxyError.BAD_RESPONSE, f"internal error ({error})"),
                    False)  # fmt: skip

    def cancel(self, exchange: Exchange) -> None:
        """The client went away (or the proxy is shutting down) during a fast-path
        exchange: counted as cancelled, the upstream connection reset."""
        flight, self._fast = self._fast, None
        if flight is None or flight.exchange is not exchange:
            return
        if flight.lease is not None:
            flight.lease.release()
        flight.client.cancel(exchange)
        authority = exchange.head.authority or format_address(self.destination)
        self._record(exchange, authority, workload_name(flight.source), None, flight.source,
                     cancelled=True)  # fmt: skip

    # --- the general path ----------------------------------------------------------------

    async def forward(self, exchange: Exchange) -> None:
        try:
            await self._forward(exchange)
        except asyncio.CancelledError:
            # The client left (reset the stream, closed the connection) or the proxy is
            # shutting down: counted, as Linkerd counts it, as a failure without status.
            source = self.http.mesh.workload_at(self.app[0])
            authority = exchange.head.authority or format_address(self.destination)
            self._record(exchange, authority, workload_name(source), None, source, cancelled=True)
            raise
        finally:
            if self._traces:  # a way out that recorded nothing must not keep the hop
                self._traces.pop(exchange, None)
            if self._tapped_routes:
                self._tapped_routes.pop(exchange, None)

    async def _forward(self, exchange: Exchange) -> None:
        http = self.http
        if http.tracer is not None and exchange not in self._traces:
            self._trace(http.tracer, exchange)  # not again for a fast-path replay
        source = http.mesh.workload_at(self.app[0])
        authority = exchange.head.authority or format_address(self.destination)
        src_name = workload_name(source)
        try:
            route, observer = self._resolve()
        except NoRoute as exc:
            self._version = -1
            self._record(exchange, authority, src_name, None, source, error=ProxyError.NO_ENDPOINTS)
            raise ProxyFailure(ProxyError.NO_ENDPOINTS, str(exc)) from None
        if route.table is not None:
            try:
                route = self._route_request(exchange, route)
            except ProxyFailure as failure:
                self._record(exchange, authority, src_name, None, source, error=failure.error)
                raise
            if route.name and self.protocol == HTTP1:
                # The destination judges per-route policies by it (the request codec
                # dropped any the app sent: `nodeagent.proxy.tunnel.wire.EXT_ROUTE`).
                set_forward_header(exchange.head, ROUTE_HEADER, route.name.encode())
        if self._traces:
            traced = self._traces.get(exchange)
            if traced is not None:
                traced.route, traced.service = route.name, route.service
        if route.name and http.tap.active:
            self._tapped_routes[exchange] = route
        call = _Call(exchange, route, observer, source, authority, src_name)
        traffic = route.traffic
        if exchange.head.upgrade is None and traffic.retry.enabled:
            call.retrying = Retrying(traffic.retry, http.budget(route.budget),
                                     http.retry_metrics, route.service, route.name)  # fmt: skip
            exchange.keep_for_replay(REPLAY_LIMIT)
        timeout = traffic.request_timeout
        grpc, grpc_timeout = grpc_request(exchange.head.headers)
        asked = self._client_deadline(grpc_timeout) if grpc else None
        by_client = asked is not None and (timeout is None or asked < timeout)
        if by_client:
            timeout = asked
        if timeout is None:
            await self._attempts(call)
            return
        if grpc:
            call.expires = self._loop.time() + timeout
        try:
            async with asyncio.timeout(timeout) as call.deadline:
                await self._attempts(call)
        except TimeoutError:
            http.retry_metrics.count(TIMEOUT, route.service, "request", route.name)
            self._record(exchange, authority, src_name, None, source, error=ProxyError.TIMEOUT)
            why = "the client's grpc-timeout" if by_client else TIMEOUT_REQUEST_KEY
            raise ProxyFailure(
                ProxyError.TIMEOUT,
                f"{route.service}: no complete response within {timeout:g} s "
                f"({why}); the upstream request was cancelled",
            ) from None

    def _client_deadline(self, raw: bytes | None) -> float | None:
        """Seconds of a gRPC call's ``grpc-timeout``; None: absent, or malformed (the
        client's bug is not a reason to fail its call: ignored)."""
        if raw is None:
            return None
        try:
            return parse_grpc_timeout(raw)
        except ValueError as e:
            log.debug("%s: ignoring the request's grpc-timeout (%s)", self.label, e)
            return None

    async def _attempts(self, call: _Call) -> None:
        """Send the request until an attempt's response is taken: failover over connect
        failures, one replay for the keep-alive race, and the retry stage's retries."""
        http = self.http
        exchange, route, retrying = call.exchange, call.route, call.retrying
        fresh = False
        avoid: tuple[Address, ...] = ()
        race = True
        if self._replay is not None:  # a fast-path exchange lost in the keep-alive race
            fresh, avoid, race = True, self._replay, False
            self._replay = None
        else:
            http.requests += 1
            if retrying is not None:
                retrying.budget.attempt()
        while True:
            try:
                connected = await http.failover.connect(
                    route.candidates,
                    functools.partial(self._connect, call.source, route.hops, fresh),
                    balanced=route.balanced,
                    observer=call.observer,
                    avoid=avoid,
                )
            except Exception as exc:
                failure = failure_of(exc)
                self._record(exchange, call.authority, call.src_name, None, call.source,
                             error=failure.error)  # fmt: skip
                raise failure from None
            client, reused = connected.value
            hop = route.hops[connected.endpoint]
            lease = connected.lease
            if self.protocol == H2 and http.authorize is not None and call.source is not None:
                asked = exchange.head
                why = http.authorize(
                    call.source.identity, hop.address, asked.method.decode("latin-1"),
                    asked.target.decode("latin-1"), functools.partial(_header_map, asked.headers),
                    route.name or None,
                )  # fmt: skip
                if why is not None:
                    self._settle(call, lease, None)
                    self._record(exchange, call.authority, call.src_name, hop, call.source,
                                 error=ProxyError.UNAUTHORIZED)  # fmt: skip
                    raise ProxyFailure(ProxyError.UNAUTHORIZED, why)
            per_try = None
            if retrying is not None:
                exchange.retry_gate = functools.partial(self._gate, exchange, retrying)
                per_try = retrying.policy.per_try_timeout if retrying.left else None
            if call.expires is not None:  # what is left after the time spent and retries
                left = format_grpc_timeout(call.expires - self._loop.time())
                self._set_header(exchange.head, GRPC_TIMEOUT_HEADER, left)
            if self._traces:
                self._propagate(exchange, hop)
            try:
                done = client.send(exchange)  # type: ignore[arg-type]
                if per_try is None:
                    await done
                else:
                    await asyncio.wait_for(done, per_try)
            except UpstreamLost as lost:
                raced = (
                    race
                    and exchange.replayable
                    and lost.retryable(exchange.head.idempotent, reused)
                )
                self._settle(call, lease, None if raced else False)
                if raced:
                    # The keep-alive race (the upstream closed the idle connection as we
                    # reused it), or a stream the upstream refused: once more, on a new
                    # connection (a refused stream: to another endpoint if there is one).
                    exchange.unbind()
                    http.replayed += 1
                    race, fresh = False, True
                    avoid = (connected.endpoint,) if lost.refused else ()
                    continue
                raise self._lost(exchange, call.authority, call.src_name, hop, call.source,
                                 lost) from None  # fmt: skip
            except TimeoutError:  # the per-try timeout (never the request's: see above)
                self._settle(call, lease, False)
                client.cancel(exchange)  # type: ignore[arg-type]
                assert retrying is not None
                http.retry_metrics.count(TIMEOUT, route.service, "try", route.name)
                if exchange.response_started or not retrying.allow(
                    idempotent=exchange.head.idempotent,
                    replayable=exchange.replayable,
                    reason="timeout",
                ):
                    self._record(exchange, call.authority, call.src_name, hop, call.source,
                                 error=ProxyError.TIMEOUT)  # fmt: skip
                    raise ProxyFailure(
                        ProxyError.TIMEOUT,
                        f"{format_address(hop.address)}: no response within {per_try:g} s "
                        f"({RETRY_TIMEOUT_KEY}), and no retry allowed",
                    ) from None
                self._again(exchange, retrying)
                fresh, avoid = False, (connected.endpoint,)
                continue
            except BaseException:
                # Cancelled: the client left, or the request timeout expired (a failure).
                expired = call.deadline is not None and call.deadline.expired()
                self._settle(call, lease, False if expired else None)
                client.cancel(exchange)  # type: ignore[arg-type]
                raise
            head = exchange.response or exchange.discarded
            ok = head is not None and classify(head.status, head.grpc_status) == "success"
            self._settle(call, lease, ok)
            if retrying is not None and exchange.discarded is not None:
                # The retry stage swallowed this response (and allowed a retry): to
                # another endpoint when there is one.
                self._again(exchange, retrying)
                fresh, avoid = False, (connected.endpoint,)
                continue
            self._record(exchange, call.authority, call.src_name, hop, call.source)
            return

    def _route_request(self, exchange: Exchange, route: _Route) -> _Route:
        """The route stage: the rule the request matches (the spec's precedence), the
        backend its weights pick, the rule's header modifiers; raises `ProxyFailure`
        (404 no rule matched, 500 no usable backend, 503 a backend without endpoints)."""
        assert route.table is not None
        head = exchange.head
        target = head.target.decode("latin-1")
        query = dict(parse_qsl(target.partition("?")[2], keep_blank_values=True))
        headers: dict[str, str] = {}
        for k, v in head.headers:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        metrics = self.http.retry_metrics
        rule = route.table.match(head.method.decode("latin-1"), head.path, headers, query)
        if rule is None:
            metrics.routed(route.service, "[no-match]", "")
            raise ProxyFailure(ProxyError.NO_ROUTE,
                               f"no route of {route.service} matches {head.path}")  # fmt: skip
        backend = rule.pick(self.http.rng.random())
        if backend is None or backend.invalid:
            metrics.routed(route.service, rule.route, "")
            why = backend.invalid if backend is not None else "every backend weight is 0"
            raise ProxyFailure(ProxyError.ROUTE_BACKEND, f"route {rule.route}: {why}")
        metrics.routed(route.service, rule.route, backend.service)
        key = (backend.service, backend.port or route.port)
        resolved = self._backends.get(key)
        if resolved is None:
            try:
                resolved = resolve_backend(self.http.mesh, *key)
            except NoRoute as exc:
                raise ProxyFailure(ProxyError.NO_ENDPOINTS, str(exc)) from None
            self._backends[key] = resolved
        if rule.request_headers is not None:
            modify_headers(head, rule.request_headers)
        if rule.response_headers is not None:
            exchange.response_modifier = rule.response_headers
        return _routed(route, resolved, rule)

    def _settle(self, call: _Call, lease: Lease[Address] | None, ok: bool | None) -> None:
        """An attempt on ``lease``'s endpoint ended: the balancer learns its latency (when
        it failed without a response, what it waited: a hung endpoint must look slow; not
        when the client left — a long poll it abandoned says nothing about the endpoint)
        and, under request-level failure accrual, its verdict (None: none)."""
        if lease is None:
            return
        exchange = call.exchange
        if exchange.sent is not None:
            end = exchange.responded
            if end is not None:
                lease.observe(end - exchange.sent)
            elif ok is False:
                lease.observe(self._loop.time() - exchange.sent)
        lease.release()
        accrual = call.route.traffic.accrual
        if accrual is None:
            return
        balancer = self.http.failover.balancer
        probe = lease.pick.probation
        if ok is None:
            if probe:
                balancer.abandoned(lease.key)  # its probe slot goes to the next request
        elif balancer.responded(lease.key, ok, accrual, probe=probe):
            self.http.retry_metrics.count(EJECTED, call.route.service, "failures", call.route.name)

    @staticmethod
    def _gate(exchange: Exchange, retrying: Retrying, head: ResponseHead) -> bool:
        """`Exchange.retry_gate`: swallow this response if its status (gRPC: the
        ``grpc-status`` of a trailers-only response) is retried and a retry is allowed.
        A gRPC status in trailers after a message comes too late: the message is out."""
        grpc = head.grpc_status
        if grpc:
            if not retrying.retryable_grpc(grpc):
                return False
            idempotent = True  # the server said the call failed; gRPC's own retry rule
        else:
            if not retrying.retryable_status(head.status):
                return False
            idempotent = exchange.head.idempotent
        return retrying.allow(
            idempotent=idempotent, replayable=exchange.replayable, reason="status"
        )

    def _again(self, exchange: Exchange, retrying: Retrying) -> None:
        exchange.rewind()
        exchange.retries = retrying.retries
        self._set_header(exchange.head, RETRY_ATTEMPT_HEADER, b"%d" % retrying.retries)

    def _trace(self, tracer: Tracer, exchange: Exchange) -> None:
        """Begin the request's hop (its headers are written per attempt: `_propagate`)."""
        hop = tracer.begin(exchange.head.headers, lowercase=self.protocol != HTTP1)
        if hop is not None:
            self._traces[exchange] = _Traced(hop)

    def _propagate(self, exchange: Exchange, dest: Hop) -> None:
        """A traced request's trace headers for the attempt about to go to ``dest``: this
        hop's span as the upstream's parent, or — to a captured pod, whose node's proxy
        only observes — a span id reserved for that proxy's SERVER span
        (`weft.tracing.peer`), fresh for each attempt."""
        traced = self._traces.get(exchange)
        if traced is None:
            return
        head = exchange.head
        peer = self._tunneled(dest)
        if self.protocol != HTTP1:  # HTTP/2 heads are sent with their headers as they are
            head.headers = traced.hop.outgoing(head.headers, peer=peer)
            return
        forward = head.forward
        if forward is None:  # as `set_forward_header` computes them
            head.te = header(head.headers, b"te")
            forward = end_to_end(head.headers)
        head.forward = traced.hop.outgoing(forward, peer=peer)

    def _tunneled(self, hop: Hop) -> bool:
        """Whether ``hop`` is reached over the tunnel (as `nodeagent.proxy.dial` decides)."""
        dest = hop.workload
        return dest is not None and dest.captured and self.http.dialer.tunnel is not None

    def _span(
        self,
        traced: _Traced,
        exchange: Exchange,
        labels: HttpLabels,
        dest: Hop | None,
        error: ProxyError | None,
        cancelled: bool,
    ) -> None:
        """The request's ``outbound`` CLIENT span, to the exporter."""
        head = exchange.head
        route = self._route
        service = traced.service or (route.service if route is not None else "")
        attrs: dict[str, AttrValue] = {
            Attr.DIRECTION: "outbound",
            Attr.HTTP_METHOD: head.method.decode("latin-1"),
            Attr.URL_PATH: head.path,
            Attr.SERVER_ADDRESS: labels.authority,
            Attr.PROTOCOL_VERSION: "2" if self.protocol == H2 else "1.1",
            Attr.SRC_NAMESPACE: labels.src_namespace,
            Attr.SRC_WORKLOAD: labels.src_workload,
            Attr.CLIENT_ID: labels.client_id,
            Attr.RETRIES: exchange.retries,
            Attr.TLS: labels.tls == "true",
        }
        if service:
            attrs[Attr.DST_SERVICE] = service
        if dest is not None:
            attrs[Attr.ENDPOINT] = format_address(dest.address)
            attrs[Attr.DST_NAMESPACE] = labels.dst_namespace
            attrs[Attr.DST_WORKLOAD] = labels.dst_workload
            if labels.server_id:
                attrs[Attr.SERVER_ID] = labels.server_id
        response = exchange.response
        if cancelled:
            status, grpc = 0, ""
            attrs[Attr.ERROR_TYPE] = attrs[Attr.PROXY_ERROR] = CANCELLED
        elif error is not None:
            status, grpc = error.status, ""
            attrs[Attr.ERROR_TYPE] = attrs[Attr.PROXY_ERROR] = error.token
        elif response is not None:
            status, grpc = response.status, response.grpc_status
            if grpc:
                attrs[Attr.RPC_GRPC_STATUS] = int(grpc) if grpc.isdigit() else grpc
        else:
            status, grpc = 0, ""
        if status:
            attrs[Attr.HTTP_STATUS] = status
        name = traced.route
        if name:
            attrs[Attr.ROUTE] = name
        self.http.record_span(
            traced.hop.finish(
                "outbound",
                SpanKind.CLIENT,
                attributes=attrs,
                status=status_for_http(SpanKind.CLIENT, status, grpc),
            )
        )

    def _set_header(self, head: RequestHead, name: bytes, value: bytes) -> None:
        """Send ``head`` with the proxy's own header ``name`` (lower case) = ``value``."""
        if self.protocol == HTTP1:
            set_forward_header(head, name, value)
        else:  # HTTP/2 heads are sent with their headers as they are (names lower case)
            head.headers = [(k, v) for k, v in head.headers if k != name]
            head.headers.append((name, value))

    def _connect(
        self, source: Workload | None, hops: dict[Address, Hop], fresh: bool, endpoint: Address
    ) -> Awaitable[tuple[Upstream, bool]]:
        return self.http._connection(
            source, hops[endpoint], fresh=fresh, label=self.label, protocol=self.protocol
        )

    def _lost(
        self,
        exchange: Exchange,
        authority: str,
        src_name: tuple[str, str],
        hop: Hop,
        source: Workload | None,
        lost: UpstreamLost,
    ) -> ProxyFailure:
        error = ProxyError.BAD_RESPONSE if lost.bad_response else ProxyError.UPSTREAM_RESET
        self._record(exchange, authority, src_name, hop, source, error=error)
        detail = f"{format_address(hop.address)}: {lost.detail}"
        return ProxyFailure(error, detail, code=lost.code)

    def _record(
        self,
        exchange: Exchange,
        authority: str,
        src_name: tuple[str, str],
        hop: Hop | None,
        source: Workload | None,
        *,
        error: ProxyError | None = None,
        cancelled: bool = False,
    ) -> None:
        key = (hop.address if hop is not None else None, authority)
        labels = self._labels.get(key)
        if labels is None:
            dest = hop.workload if hop is not None else None
            tunnel = hop is not None and self._tunneled(hop)
            labels = HttpLabels(
                "outbound", authority, *src_name,
                *(workload_name(dest) if hop is not None else ("", "")),
                "true" if tunnel else "false",
                str(source.identity) if source is not None else "",
                str(dest.identity) if tunnel and dest is not None else "",
            )  # fmt: skip
            if len(self._labels) < 64:  # the authority comes from the client
                self._labels[key] = labels
        if self._traces:
            trace = self._traces.pop(exchange, None)
            if trace is not None:
                self._span(trace, exchange, labels, hop, error, cancelled)
        if self.http.tap.active:
            self._tap(exchange, labels, hop, error, cancelled)
        record_exchange(self.http.metrics, labels, exchange, error, cancelled=cancelled)

    def _tap(
        self,
        exchange: Exchange,
        labels: HttpLabels,
        hop: Hop | None,
        error: ProxyError | None,
        cancelled: bool,
    ) -> None:
        """The request's tap event (only while someone taps)."""
        head = exchange.head
        routed = self._tapped_routes.pop(exchange, None) if self._tapped_routes else None
        route = routed or self._route
        response = exchange.response
        latency = None
        if cancelled:
            status, grpc, why = None, "", CANCELLED
        elif error is not None:
            status, grpc, why = error.status, "", error.token
        else:
            status = response.status if response is not None else None
            grpc = response.grpc_status if response is not None else ""
            why = ""
            if exchange.responded is not None:
                latency = exchange.responded - exchange.started
        self.http.tap.publish(
            TapEvent(
                "outbound",
                head.method.decode("latin-1"),
                head.path,
                labels.authority,
                status,
                why,
                latency,
                labels.src_workload,
                labels.src_namespace,
                account_of(labels.client_id),
                labels.client_id,
                labels.dst_workload if hop is not None else "",
                labels.dst_namespace if hop is not None else "",
                labels.server_id,
                labels.tls == "true",
                grpc_status=grpc,
                route=routed.name if routed is not None else "",
                service=route.service if route is not None else "",
                endpoint=format_address(hop.address) if hop is not None else "",
            )
        )


def record_exchange(
    metrics: HttpMetrics,
    labels: HttpLabels,
    exchange: Exchange,
    error: ProxyError | None,
    *,
    cancelled: bool = False,
) -> None:
    response = exchange.response
    if cancelled:
        metrics.record(labels, status=None, latency=None, error=CANCELLED)
        return
    if error is not None:
        metrics.record(labels, status=error.status, latency=None, error=error.token)
        return
    latency = exchange.responded - exchange.started if exchange.responded is not None else None
    metrics.record(
        labels,
        status=response.status if response is not None else None,
        grpc_status=response.grpc_status if response is not None else "",
        latency=latency,
    )
