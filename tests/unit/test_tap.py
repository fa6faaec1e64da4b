"""The live tap's agent side (`nodeagent.tap`): filters, the bounded queue that drops and
counts, the ``/tap`` query, and what the data path does with and without a subscriber
(the outbound forwarder's `_record`, the inbound recorder, both observers)."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any, cast

import pytest

from nodeagent.httpmetrics import HttpMetrics
from nodeagent.proxy.http import forward as forward_mod
from nodeagent.proxy.http import inbound as inbound_mod
from nodeagent.proxy.http.forward import HTTP1, OutboundForwarder, OutboundHttp
from nodeagent.proxy.http.inbound import InboundHttp, _Recorder
from nodeagent.proxy.http.message import ProxyError, RequestHead, ResponseHead
from nodeagent.proxy.http.observe import Http1Observer
from nodeagent.proxy.http.observe_h2 import H2Observer
from nodeagent.proxy.http.server import Exchange
from nodeagent.proxy.resolve import Hop
from nodeagent.tap import (
    OFF,
    Ends,
    Subscription,
    TapBusy,
    TapError,
    TapEvent,
    TapFilter,
    TapHub,
    account_of,
    parse_query,
)
from weft.identity import SpiffeId
from weft.mesh import InboundMode, Workload

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"


def event(**kw: Any) -> TapEvent:
    base = dict(
        direction="outbound", method="GET", path="/api/x", authority="echo", status=200,
        error="", latency=0.002, src_pod="client-1", src_namespace="default",
        src_account="client", src_identity=CLIENT, dst_pod="echo-1",
        dst_namespace="default", dst_identity=ECHO, tls=True,
    )  # fmt: skip
    base.update(kw)
    return TapEvent(**base)  # type: ignore[arg-type]


INBOUND = event(direction="inbound", src_pod="")


def test_account_of_an_identity() -> None:
    assert account_of(CLIENT) == "client"
    assert account_of("") == "" and account_of("spiffe://td/sa/x") == ""


def test_filters_by_resource_either_end_and_by_direction_of_the_call() -> None:
    echo = Ends(pods=frozenset({("default", "echo-1"), ("default", "echo-2")}))
    client = Ends(
        pods=frozenset({("default", "client-1")}), accounts=frozenset({("default", "client")})
    )
    assert TapFilter().matches(event())
    assert TapFilter(resource=echo).matches(event())  # the destination is echo
    assert TapFilter(resource=echo).matches(INBOUND)
    assert not TapFilter(resource=echo).matches(event(dst_pod="other-1"))
    assert TapFilter(resource=client).matches(event(dst_pod="other-1"))  # the source
    # An inbound event knows its caller by identity only: matched by service account.
    assert TapFilter(from_=client).matches(INBOUND)
    assert not TapFilter(from_=client).matches(dataclasses.replace(INBOUND, src_account="web"))
    assert TapFilter(to=echo, from_=client).matches(event())
    assert not TapFilter(to=client).matches(event())
    # A pod the event names is matched by name, never by its account.
    assert not TapFilter(from_=Ends(accounts=frozenset({("default", "client")}))).matches(event())
    # Name prefixes (a Deployment's pods, without a topology) and whole namespaces.
    assert TapFilter(to=Ends(prefixes=(("default", "echo-"),))).matches(event())
    assert not TapFilter(to=Ends(prefixes=(("shop", "echo-"),))).matches(event())
    assert TapFilter(resource=Ends(namespaces=frozenset({"default"}))).matches(event())
    # Method and path prefix.
    assert TapFilter(method="GET", path="/api").matches(event())
    assert not TapFilter(method="POST").matches(event())
    assert not TapFilter(path="/web").matches(event())


def test_the_query_string() -> None:
    asked = parse_query(
        "pod=default/echo-1&pod=default/echo-2&to.sa=default/echo&from.prefix=default/client-"
        "&from.ns=shop&method=get&path=/api&max=5&duration=2.5"
    )
    f = asked.filter
    assert f.resource.pods == {("default", "echo-1"), ("default", "echo-2")}
    assert f.to.accounts == {("default", "echo")}
    assert f.from_.prefixes == (("default", "client-"),) and f.from_.namespaces == {"shop"}
    assert (f.method, f.path, asked.max_events, asked.duration) == ("GET", "/api", 5, 2.5)
    assert parse_query("").filter == TapFilter() and parse_query("").max_events is None
    for bad, why in [
        ("pod=echo-1", "NAMESPACE/NAME"),
        ("bogus=1", "unknown tap parameter"),
        ("via.pod=a/b", "unknown tap parameter"),
        ("max=0", "whole number"),
        ("max=x", "whole number"),
        ("duration=-1", "duration"),
        ("duration=soon", "give seconds"),
        ("path=api", "starting with /"),
    ]:
        with pytest.raises(TapError, match=why):
            parse_query(bad)


async def test_a_slow_subscriber_loses_events_counted_and_the_queue_stays_bounded() -> None:
    hub = TapHub("node-1", queue_size=3)
    sub = hub.subscribe(TapFilter())
    other = hub.subscribe(TapFilter(method="POST"))
    for i in range(10):
        hub.publish(event(path=f"/{i}"))
    assert sub.pending() == 3 and sub.dropped == 7
    assert other.pending() == 0 and other.dropped == 0  # its filter matched none
    assert [(await sub.get()).path for _ in range(3)] == ["/0", "/1", "/2"]  # type: ignore[union-attr]
    hub.publish(event(path="/10"))
    assert sub.take() is not None and sub.take() is None
    assert hub.state() == {"subscribers": 2, "published": 11, "dropped": 7}


async def test_get_waits_for_an_event_and_ends_when_closed() -> None:
    hub = TapHub("node-1")
    sub = hub.subscribe(TapFilter())
    waiter = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish(event())
    assert (await waiter) is not None
    waiter = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    hub.close()
    assert (await waiter) is None
    assert not hub.active and hub.subscribers == ()


def _active(hub: TapHub) -> bool:
    return hub.active


def test_subscribers_are_bounded_and_active_follows_them() -> None:
    hub = TapHub("n", max_subscribers=2)
    assert not _active(hub)
    a = hub.subscribe(TapFilter())
    b = hub.subscribe(TapFilter())
    assert _active(hub)
    with pytest.raises(TapBusy, match="2 taps are already running"):
        hub.subscribe(TapFilter())
    hub.unsubscribe(a)
    assert _active(hub)
    hub.unsubscribe(b)
    hub.unsubscribe(b)  # twice: harmless
    assert not _active(hub)
    with pytest.raises(TapBusy):
        OFF.subscribe(TapFilter())
    assert isinstance(Subscription(TapFilter()), Subscription)


# -- the data path ----------------------------------------------------------------------

ECHO_POD = Workload(uid="u1", name="echo-1", namespace="default", node="node-1",
                    ips=("10.0.0.2",), service_account="echo",
                    identity=SpiffeId.parse(ECHO), captured=True,
                    inbound_mode=InboundMode.PERMISSIVE)  # fmt: skip
CLIENT_POD = dataclasses.replace(
    ECHO_POD, uid="u2", name="client-1", ips=("10.0.0.1",), service_account="client",
    identity=SpiffeId.parse(CLIENT),
)  # fmt: skip


class _Never:
    """Stands in for `TapEvent` where building one would be a cost nobody asked for."""

    def __init__(self, *args: object, **kw: object) -> None:
        raise AssertionError("a tap event was built with nobody tapping")


def _exchange(status: int = 200) -> Exchange:
    head = RequestHead(b"POST", b"/api/v1?q=1", b"1.1", [(b"host", b"echo")], True)
    response = ResponseHead(status, b"OK", b"1.1", [], True)
    return cast(Exchange, SimpleNamespace(
        head=head, response=response, started=1.0, responded=1.004, retries=0,
    ))  # fmt: skip


async def _forwarder(hub: TapHub) -> OutboundForwarder:
    http = SimpleNamespace(tap=hub, metrics=HttpMetrics(), dialer=SimpleNamespace(tunnel=object()))
    return OutboundForwarder(
        cast(OutboundHttp, http), ("10.0.0.1", 40000), ("10.96.0.10", 80), "t", HTTP1
    )


async def test_outbound_record_publishes_only_while_someone_taps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = TapHub("node-1")
    fwd = await _forwarder(hub)
    hop = Hop(("10.0.0.2", 8080), ECHO_POD)
    with monkeypatch.context() as m:
        m.setattr(forward_mod, "TapEvent", _Never)
        fwd._record(_exchange(), "echo", ("client-1", "default"), hop, CLIENT_POD)
    sub = hub.subscribe(TapFilter())
    fwd._record(_exchange(), "echo", ("client-1", "default"), hop, CLIENT_POD)
    fwd._record(_exchange(), "echo", ("client-1", "default"), None, CLIENT_POD,
                error=ProxyError.NO_ENDPOINTS)  # fmt: skip
    ok, failed = sub.take(), sub.take()
    assert ok is not None and failed is not None
    got = ok.to_json("node-1")
    assert got["direction"] == "outbound" and got["node"] == "node-1"
    assert (got["method"], got["path"], got["authority"], got["status"]) == (
        "POST", "/api/v1", "echo", 200,
    )  # fmt: skip
    assert got["latency_ms"] == pytest.approx(4.0)
    assert got["src"] == {"pod": "client-1", "namespace": "default",
                          "service_account": "client", "identity": CLIENT}  # fmt: skip
    assert got["dst"]["pod"] == "echo-1" and got["dst"]["identity"] == ECHO
    assert got["dst"]["endpoint"] == "10.0.0.2:8080" and got["tls"] is True
    assert (failed.status, failed.error, failed.dst_pod, failed.latency) == (
        503, "no-endpoints", "", None,
    )  # fmt: skip


def _recorder(hub: TapHub) -> _Recorder:
    http = InboundHttp(
        connect=cast(Any, None), metrics=HttpMetrics(), workload_at=lambda ip: ECHO_POD, tap=hub
    )
    return _Recorder(
        http, SpiffeId.parse(CLIENT), SpiffeId.parse(ECHO), ("10.0.0.2", 8080), False, "1.1"
    )


def test_inbound_recorder_publishes_only_while_someone_taps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = TapHub("node-2")
    recorder = _recorder(hub)
    with monkeypatch.context() as m:
        m.setattr(inbound_mod, "TapEvent", _Never)
        recorder.exchange(b"echo", 200, 0.001, "")  # the observer kept nothing: no tap
    sub = hub.subscribe(TapFilter())
    recorder.exchange(b"echo", 200, 0.001, "", asked=(b"GET", b"/x?y=1"))
    recorder.exchange(None, 502, None, "upstream-reset", asked=(b"PUT", b""))
    ok, lost = sub.take(), sub.take()
    assert ok is not None and lost is not None
    got = ok.to_json("node-2")
    assert (got["direction"], got["method"], got["path"], got["status"]) == (
        "inbound", "GET", "/x", 200,
    )  # fmt: skip
    assert got["src"] == {"pod": None, "namespace": "default", "service_account": "client",
                          "identity": CLIENT}  # fmt: skip
    assert got["dst"]["pod"] == "echo-1" and got["dst"]["identity"] == ECHO
    assert (lost.status, lost.error, lost.method, lost.authority) == (
        502, "upstream-reset", "PUT", "10.0.0.2:8080",
    )  # fmt: skip


class _Sink:
    def __init__(self) -> None:
        self.asked: list[tuple[bytes, bytes] | None] = []

    def exchange(self, authority: bytes | None, status: int | None, latency: float | None,
                 error: str, grpc_status: str = "", trace: object = None,
                 asked: tuple[bytes, bytes] | None = None) -> None:  # fmt: skip
        self.asked.append(asked)


def test_the_http1_observer_keeps_method_and_target_only_while_someone_taps() -> None:
    hub = TapHub("n")
    sink = _Sink()
    observer = Http1Observer(sink, label="t", clock=lambda: 0.0, tap=hub)
    request = b"GET /a?b=1 HTTP/1.1\r\nHost: echo\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    observer.client_data(request)
    observer.upstream_data(response)
    sub = hub.subscribe(TapFilter())
    observer.client_data(request)
    observer.upstream_data(response)
    hub.unsubscribe(sub)
    observer.client_data(request)
    observer.upstream_data(response)
    assert sink.asked == [None, (b"GET", b"/a?b=1"), None]


def test_the_h2_observer_keeps_method_and_path_only_while_someone_taps() -> None:
    import hpack

    hub = TapHub("n")
    sink = _Sink()
    observer = H2Observer(sink, label="t", clock=lambda: 0.0, tap=hub)
    client, pod = hpack.Encoder(), hpack.Encoder()

    def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(3, "big")
            + bytes([ftype, flags])
            + sid.to_bytes(4, "big")
            + payload
        )

    request = [(":method", "GET"), (":path", "/svc/Call"), (":authority", "echo"),
               (":scheme", "http")]  # fmt: skip
    observer.client_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
    for sid, tapping in [(1, False), (3, True), (5, False)]:
        sub = hub.subscribe(TapFilter()) if tapping else None
        observer.client_data(frame(1, 0x5, sid, client.encode(request)))
        if sub is not None:
            hub.unsubscribe(sub)
        observer.upstream_data(frame(1, 0x5, sid, pod.encode([(":status", "200")])))
    assert sink.asked == [None, (b"GET", b"/svc/Call"), None]
