"""The discovery stream's wire format (weft.meshwire), in memory.

Round trips of every message kind through the frame decoder, however the bytes are
split; the frame size limit, enforced on the header; a table of malformed messages, each
refused with a :class:`MeshWireError` that names the offending field; and the
subscription body.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import weft.meshwire as meshwire
from weft.identity import SpiffeId
from weft.mesh import (
    Delta,
    Endpoint,
    InboundMode,
    Kind,
    Service,
    ServicePort,
    Workload,
    WorkloadPort,
    kind_of,
)
from weft.meshwire import (
    MAX_FRAME,
    DeltasMsg,
    FrameDecoder,
    HeartbeatMsg,
    MeshWireError,
    SnapshotMsg,
    Subscribe,
    decode_message,
    deltas_frame,
    encode_service,
    encode_workload,
    heartbeat_frame,
    snapshot_frame,
)

# -- strategies --------------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
texts = st.text(max_size=12)
ports = st.integers(1, 65535)
addresses = st.ip_addresses().map(str)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    ns, sa = draw(labels), draw(labels)
    return Workload(
        uid=draw(texts),
        name=draw(texts),
        namespace=ns,
        node=draw(texts),
        ips=tuple(draw(st.lists(addresses, max_size=2))),
        service_account=sa,
        identity=SpiffeId.workload(ns, sa),
        captured=draw(st.booleans()),
        inbound_mode=draw(st.sampled_from(InboundMode)),
        ports=tuple(draw(st.lists(st.builds(WorkloadPort, ports, texts, texts), max_size=3))),
        ready=draw(st.booleans()),
        node_ip=draw(st.one_of(st.just(""), addresses)),
    )


endpoints = st.builds(
    Endpoint,
    address=addresses,
    workload_uid=st.one_of(st.none(), texts),
    ready=st.booleans(),
    target_ports=st.lists(st.tuples(texts, ports), max_size=2).map(tuple),
)

services = st.builds(
    Service,
    name=texts,
    namespace=texts,
    vips=st.lists(addresses, max_size=2).map(tuple),
    ports=st.lists(
        st.builds(ServicePort, ports, st.one_of(ports, texts), texts, texts), max_size=3
    ).map(tuple),
    endpoints=st.lists(endpoints, max_size=3).map(tuple),
)

items = st.one_of(workloads(), services)
epochs = st.text(max_size=10)
revisions = st.integers(0, 2**53)


@st.composite
def delta_lists(draw: st.DrawFn) -> tuple[Delta, ...]:
    first = draw(st.integers(1, 2**40))
    changes = draw(st.lists(st.tuples(items, st.booleans()), min_size=1, max_size=4))
    return tuple(
        Delta(first + i, kind_of(item), item.key, None if deleted else item)
        for i, (item, deleted) in enumerate(changes)
    )


def decode_all(data: bytes, cuts: list[int]) -> list[Any]:
    """Feed ``data`` cut at ``cuts``; decode every frame that comes out."""
    decoder = FrameDecoder()
    payloads: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        payloads += decoder.feed(data[start:cut])
        start = cut
    assert decoder.pending == 0
    return [decode_message(p) for p in payloads]


# -- fixed values ------------------------------------------------------------------------


def workload(name: str = "web-1", ns: str = "shop", sa: str = "web") -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        node="node-1",
        ips=("10.244.1.2", "fd00::2"),
        service_account=sa,
        identity=SpiffeId.workload(ns, sa),
        captured=True,
        inbound_mode=InboundMode.STRICT,
        ports=(WorkloadPort(8080, "TCP", "http"),),
        ready=True,
        node_ip="192.168.0.10",
    )


def service(name: str = "web", ns: str = "shop") -> Service:
    return Service(
        name=name,
        namespace=ns,
        vips=("10.96.0.10",),
        ports=(ServicePort(80, 8080, "TCP", "plain"), ServicePort(443, "https", "TCP", "tls")),
        endpoints=(
            Endpoint("10.244.1.2", "uid-web-1", True, (("tls", 8443),)),
            Endpoint("10.244.9.9", None, False),
        ),
    )


def three_frames() -> bytes:
    w, s = workload(), service()
    return (
        snapshot_frame("e1", 7, [w], [s])
        + deltas_frame(
            "e1", [Delta(8, Kind.WORKLOAD, w.key, None), Delta(9, Kind.SERVICE, s.key, s)]
        )
        + heartbeat_frame("e1", 9)
    )


THREE_MESSAGES = [
    SnapshotMsg("e1", 7, (workload(),), (service(),)),
    DeltasMsg(
        "e1",
        (
            Delta(8, Kind.WORKLOAD, "uid-web-1", None),
            Delta(9, Kind.SERVICE, "shop/web", service()),
        ),
    ),
    HeartbeatMsg("e1", 9),
]


# -- round trips -------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    epoch=epochs,
    revision=revisions,
    ws=st.lists(workloads(), max_size=3),
    ss=st.lists(services, max_size=3),
    data=st.data(),
)
def test_a_snapshot_round_trips_however_it_is_split(
    epoch: str, revision: int, ws: list[Workload], ss: list[Service], data: st.DataObject
) -> None:
    raw = snapshot_frame(epoch, revision, ws, ss)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))
    assert decode_all(raw, cuts) == [SnapshotMsg(epoch, revision, tuple(ws), tuple(ss))]


@settings(max_examples=100)
@given(epoch=epochs, deltas=delta_lists(), data=st.data())
def test_deltas_round_trip_however_they_are_split(
    epoch: str, deltas: tuple[Delta, ...], data: st.DataObject
) -> None:
    raw = deltas_frame(epoch, deltas)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))
    [msg] = decode_all(raw, cuts)
    assert msg == DeltasMsg(epoch, deltas)
    assert isinstance(msg, DeltasMsg)
    assert msg.revision == deltas[-1].revision
    assert [d.deleted for d in msg.deltas] == [d.value is None for d in deltas]


@given(epoch=epochs, revision=revisions)
def test_a_heartbeat_round_trips(epoch: str, revision: int) -> None:
    assert decode_all(heartbeat_frame(epoch, revision), []) == [HeartbeatMsg(epoch, revision)]


def test_the_fixed_messages_round_trip_in_one_piece() -> None:
    assert decode_all(three_frames(), []) == THREE_MESSAGES


def test_frames_split_at_every_byte_boundary() -> None:
    raw = three_frames()
    for cut in range(len(raw) + 1):
        decoder = FrameDecoder()
        first = decoder.feed(raw[:cut])
        assert decoder.pending == cut - sum(4 + len(p) for p in first), cut
        rest = decoder.feed(raw[cut:])
        assert decoder.pending == 0, cut
        assert [decode_message(p) for p in first + rest] == THREE_MESSAGES, cut


def test_frames_fed_one_byte_at_a_time() -> None:
    raw = three_frames()
    decoder = FrameDecoder()
    payloads: list[bytes] = []
    for i in range(len(raw)):
        payloads += decoder.feed(raw[i : i + 1])
    assert [decode_message(p) for p in payloads] == THREE_MESSAGES
    assert decoder.pending == 0


def test_a_frame_is_a_big_endian_length_then_compact_json() -> None:
    raw = heartbeat_frame("e", 3)
    payload = b'{"type":"heartbeat","epoch":"e","revision":3}'
    assert raw == struct.pack("!I", len(payload)) + payload


def test_an_empty_feed_and_a_zero_length_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00\x00\x00\x00") == [b""]
    assert decoder.pending == 0
    with pytest.raises(MeshWireError, match="not JSON"):
        decode_message(b"")


# -- frame size --------------------------------------------------------------------------


def test_an_oversized_frame_is_refused_on_its_header() -> None:
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(MeshWireError, match="frame of 11 bytes exceeds the 10 limit"):
        decoder.feed(struct.pack("!I", 11))  # no payload needed to refuse it


def test_an_oversized_header_is_refused_even_when_it_arrives_split() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(MeshWireError, match="exceeds"):
        decoder.feed(b"\x00\x0b")


def test_an_oversized_frame_after_a_good_one_in_the_same_feed_is_refused() -> None:
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(MeshWireError, match="exceeds"):
        decoder.feed(struct.pack("!I", 2) + b"{}" + struct.pack("!I", 11))


def test_a_frame_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(struct.pack("!I", 10) + b"0123456789") == [b"0123456789"]


def test_the_default_limit_is_max_frame() -> None:
    assert FrameDecoder().feed(struct.pack("!I", MAX_FRAME)) == []
    with pytest.raises(MeshWireError, match="exceeds"):
        FrameDecoder().feed(struct.pack("!I", MAX_FRAME + 1))


def test_the_encoder_refuses_a_frame_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    small = len(heartbeat_frame("e", 1)) - 4
    monkeypatch.setattr(meshwire, "MAX_FRAME", small)
    assert heartbeat_frame("e", 1)  # exactly at the limit
    with pytest.raises(MeshWireError, match="exceeds"):
        heartbeat_frame("ee", 1)


# -- malformed messages ------------------------------------------------------------------

Edit = Callable[[dict[str, Any]], object]


def snapshot_obj() -> dict[str, Any]:
    return {
        "type": "snapshot",
        "epoch": "e1",
        "revision": 4,
        "workloads": [encode_workload(workload())],
        "services": [encode_service(service())],
    }


def deltas_obj() -> dict[str, Any]:
    w, s = workload(), service()
    return {
        "type": "deltas",
        "epoch": "e1",
        "deltas": [
            {"revision": 5, "kind": "workload", "key": w.key, "value": encode_workload(w)},
            {"revision": 6, "kind": "service", "key": s.key, "value": encode_service(s)},
            {"revision": 7, "kind": "workload", "key": "uid-gone", "value": None},
        ],
    }


def heartbeat_obj() -> dict[str, Any]:
    return {"type": "heartbeat", "epoch": "e1", "revision": 4}


def W(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["workloads"][0]


def S(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["services"][0]


def E(obj: dict[str, Any]) -> dict[str, Any]:
    return S(obj)["endpoints"][0]


def D(obj: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return obj["deltas"][i]


def valid(obj: dict[str, Any]) -> None:
    decode_message(json.dumps(obj).encode())  # the base messages themselves are fine


@pytest.mark.parametrize("base", [snapshot_obj, deltas_obj, heartbeat_obj])
def test_the_base_messages_of_the_table_are_valid(base: Callable[[], dict[str, Any]]) -> None:
    valid(base())


HB, SN, DE = heartbeat_obj, snapshot_obj, deltas_obj

# fmt: off
MALFORMED: list[tuple[str, Callable[[], dict[str, Any]], Edit, str]] = [
    # message envelope
    ("type missing", HB, lambda o: o.pop("type"), "message.type: missing"),
    ("type not text", HB, lambda o: o.update(type=1), "message.type: unexpected int"),
    ("unknown type", HB, lambda o: o.update(type="hello"), "message.type: unknown 'hello'"),
    ("epoch missing", HB, lambda o: o.pop("epoch"), "message.epoch: missing"),
    ("epoch not text", HB, lambda o: o.update(epoch=3), "message.epoch: unexpected int"),
    ("epoch null", SN, lambda o: o.update(epoch=None), "message.epoch: unexpected NoneType"),
    # heartbeat
    ("heartbeat revision text", HB, lambda o: o.update(revision="4"),
     "message.revision: unexpected str"),
    ("heartbeat revision bool", HB, lambda o: o.update(revision=True),
     "message.revision: unexpected bool"),
    ("heartbeat revision float", HB, lambda o: o.update(revision=4.0),
     "message.revision: unexpected float"),
    ("heartbeat revision negative", HB, lambda o: o.update(revision=-1),
     "heartbeat.revision: negative"),
    ("heartbeat revision missing", HB, lambda o: o.pop("revision"), "message.revision: missing"),
    # snapshot
    ("snapshot revision negative", SN, lambda o: o.update(revision=-5),
     "snapshot.revision: negative"),
    ("snapshot revision bool", SN, lambda o: o.update(revision=False),
     "message.revision: unexpected bool"),
    ("workloads not a list", SN, lambda o: o.update(workloads={}),
     "message.workloads: unexpected dict"),
    ("services missing", SN, lambda o: o.pop("services"), "message.services: missing"),
    ("workload not an object", SN, lambda o: o.update(workloads=["uid"]),
     "workloads[0]: expected an object, got str"),
    # workload fields
    ("workload uid missing", SN, lambda o: W(o).pop("uid"), "workloads[0].uid: missing"),
    ("workload name not text", SN, lambda o: W(o).update(name=7),
     "workloads[0].name: unexpected int"),
    ("workload node_ip not text", SN, lambda o: W(o).update(node_ip=False),
     "workloads[0].node_ip: unexpected bool"),
    ("workload captured int", SN, lambda o: W(o).update(captured=1),
     "workloads[0].captured: unexpected int"),
    ("workload captured text", SN, lambda o: W(o).update(captured="true"),
     "workloads[0].captured: unexpected str"),
    ("workload ready null", SN, lambda o: W(o).update(ready=None),
     "workloads[0].ready: unexpected NoneType"),
    ("workload ips not strings", SN, lambda o: W(o).update(ips=[167772161]),
     "workloads[0].ips: expected strings"),
    ("workload ips not a list", SN, lambda o: W(o).update(ips="10.0.0.1"),
     "workloads[0].ips: unexpected str"),
    ("workload port zero", SN, lambda o: W(o).update(ports=[[0, "TCP", ""]]),
     "workloads[0].ports[0]: not a port: 0"),
    ("workload port too big", SN, lambda o: W(o).update(ports=[[65536, "TCP", ""]]),
     "workloads[0].ports[0]: not a port: 65536"),
    ("workload port bool", SN, lambda o: W(o).update(ports=[[True, "TCP", ""]]),
     "workloads[0].ports[0]: not a port: True"),
    ("workload port text", SN, lambda o: W(o).update(ports=[["80", "TCP", ""]]),
     "workloads[0].ports[0]: not a port: '80'"),
    ("workload port short", SN, lambda o: W(o).update(ports=[[80, "TCP"]]),
     "workloads[0].ports[0]: expected [port, protocol, name]"),
    ("workload port protocol", SN, lambda o: W(o).update(ports=[[80, 6, ""]]),
     "workloads[0].ports[0]: expected [port, protocol, name]"),
    ("identity missing", SN, lambda o: W(o).pop("identity"), "workloads[0].identity: missing"),
    ("identity not text", SN, lambda o: W(o).update(identity=1),
     "workloads[0].identity: unexpected int"),
    ("identity no scheme", SN, lambda o: W(o).update(identity="cluster.local/ns/shop/sa/web"),
     "workloads[0].identity: not a SPIFFE ID"),
    ("identity bad namespace", SN,
     lambda o: W(o).update(identity="spiffe://cluster.local/ns/Shop/sa/web"),
     "workloads[0].identity: invalid namespace 'Shop'"),
    ("identity bad path", SN, lambda o: W(o).update(identity="spiffe://cluster.local/ns/shop/web"),
     "workloads[0].identity: workload ID must be"),
    ("identity bad trust domain", SN,
     lambda o: W(o).update(identity="spiffe://Cluster.Local/ns/shop/sa/web"),
     "workloads[0].identity: invalid trust domain"),
    ("inbound mode unknown", SN, lambda o: W(o).update(inbound_mode="Strict"),
     "workloads[0].inbound_mode: 'Strict'"),
    ("inbound mode not text", SN, lambda o: W(o).update(inbound_mode=1),
     "workloads[0].inbound_mode: 1"),
    # service fields
    ("service not an object", SN, lambda o: o.update(services=[None]),
     "services[0]: expected an object, got NoneType"),
    ("service name missing", SN, lambda o: S(o).pop("name"), "services[0].name: missing"),
    ("service vips not strings", SN, lambda o: S(o).update(vips=[None]),
     "services[0].vips: expected strings"),
    ("service port zero", SN, lambda o: S(o).update(ports=[[0, 80, "TCP", ""]]),
     "services[0].ports[0]: not a port: 0"),
    ("service port bool", SN, lambda o: S(o).update(ports=[[True, 80, "TCP", ""]]),
     "services[0].ports[0]: not a port: True"),
    ("service target port zero", SN, lambda o: S(o).update(ports=[[80, 0, "TCP", ""]]),
     "services[0].ports[0].target: not a port: 0"),
    ("service target port bool", SN, lambda o: S(o).update(ports=[[80, False, "TCP", ""]]),
     "services[0].ports[0].target: not a port: False"),
    ("service target port float", SN, lambda o: S(o).update(ports=[[80, 80.5, "TCP", ""]]),
     "services[0].ports[0].target: not a port: 80.5"),
    ("service port short", SN, lambda o: S(o).update(ports=[[80, 8080, "TCP"]]),
     "services[0].ports[0]: expected [port, target, protocol, name]"),
    ("service port name", SN, lambda o: S(o).update(ports=[[80, 8080, "TCP", 1]]),
     "services[0].ports[0]: expected [port, target, protocol, name]"),
    ("endpoint not an object", SN, lambda o: S(o).update(endpoints=["10.0.0.1"]),
     "services[0].endpoints[0]: expected an object, got str"),
    ("endpoint address missing", SN, lambda o: E(o).pop("address"),
     "services[0].endpoints[0].address: missing"),
    ("endpoint ready missing", SN, lambda o: E(o).pop("ready"),
     "services[0].endpoints[0].ready: missing"),
    ("endpoint ready int", SN, lambda o: E(o).update(ready=0),
     "services[0].endpoints[0].ready: unexpected int"),
    ("endpoint workload_uid int", SN, lambda o: E(o).update(workload_uid=5),
     "services[0].endpoints[0].workload_uid: unexpected int"),
    ("endpoint target port zero", SN, lambda o: E(o).update(target_ports=[["tls", 0]]),
     "services[0].endpoints[0].target_ports: not a port: 0"),
    ("endpoint target port bool", SN, lambda o: E(o).update(target_ports=[["tls", True]]),
     "services[0].endpoints[0].target_ports: not a port: True"),
    ("endpoint target port shape", SN, lambda o: E(o).update(target_ports=[[443, "tls"]]),
     "services[0].endpoints[0].target_ports: expected [name, port]"),
    # deltas
    ("deltas empty", DE, lambda o: o.update(deltas=[]), "deltas: empty"),
    ("deltas not a list", DE, lambda o: o.update(deltas={}), "message.deltas: unexpected dict"),
    ("delta not an object", DE, lambda o: o.update(deltas=[5]),
     "deltas[0]: expected an object, got int"),
    ("delta revision negative", DE, lambda o: D(o).update(revision=-1),
     "deltas[0].revision: negative"),
    ("delta revision bool", DE, lambda o: D(o).update(revision=True),
     "deltas[0].revision: unexpected bool"),
    ("delta revision text", DE, lambda o: D(o).update(revision="5"),
     "deltas[0].revision: unexpected str"),
    ("delta revision skips", DE, lambda o: D(o, 1).update(revision=7),
     "deltas[1].revision 7 does not follow"),
    ("delta revision repeats", DE, lambda o: D(o, 2).update(revision=6),
     "deltas[2].revision 6 does not follow"),
    ("delta revision goes back", DE, lambda o: D(o, 1).update(revision=4),
     "deltas[1].revision 4 does not follow"),
    ("delta kind unknown", DE, lambda o: D(o).update(kind="pod"), "deltas[0].kind: 'pod'"),
    ("delta kind missing", DE, lambda o: D(o).pop("kind"), "deltas[0].kind: None"),
    ("delta key missing", DE, lambda o: D(o, 2).pop("key"), "deltas[2].key: missing"),
    ("delta key not text", DE, lambda o: D(o, 2).update(key=1), "deltas[2].key: unexpected int"),
    ("delta value missing", DE, lambda o: D(o, 2).pop("value"), "deltas[2].value: missing"),
    ("delta value a list", DE, lambda o: D(o).update(value=[]), "deltas[0].value: unexpected list"),
    ("delta workload key mismatch", DE, lambda o: D(o).update(key="uid-other"),
     "deltas[0]: key does not match the value"),
    ("delta service key mismatch", DE, lambda o: D(o, 1).update(key="shop/other"),
     "deltas[1]: key does not match the value"),
    ("delta kind does not fit the value", DE, lambda o: D(o, 1).update(kind="workload"),
     "deltas[1].value."),
    ("delta value bad port", DE, lambda o: D(o)["value"].update(ports=[[70000, "TCP", ""]]),
     "deltas[0].value.ports[0]: not a port: 70000"),
    ("delta value bad identity", DE,
     lambda o: D(o)["value"].update(identity="spiffe://cluster.local/ns/shop"),
     "deltas[0].value.identity: workload ID must be"),
]
# fmt: on


@pytest.mark.parametrize(
    ("base", "edit", "error"),
    [pytest.param(base, edit, error, id=name) for name, base, edit, error in MALFORMED],
)
def test_a_malformed_message_is_refused_naming_the_field(
    base: Callable[[], dict[str, Any]], edit: Edit, error: str
) -> None:
    obj = copy.deepcopy(base())
    edit(obj)
    with pytest.raises(MeshWireError, match=re.escape(error)):
        decode_message(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", "frame is not JSON"),
        (b"\xff\xfe{}", "frame is not JSON"),
        (b"[]", "message: expected an object, got list"),
        (b"null", "message: expected an object, got NoneType"),
        (b'"heartbeat"', "message: expected an object, got str"),
    ],
)
def test_a_payload_that_is_not_a_json_object_is_refused(payload: bytes, error: str) -> None:
    with pytest.raises(MeshWireError, match=re.escape(error)):
        decode_message(payload)


def test_a_refusal_is_a_value_error() -> None:
    # Callers that treat any ValueError as a bad message keep working.
    assert issubclass(MeshWireError, ValueError)


def test_defaults_of_optional_workload_fields() -> None:
    obj = snapshot_obj()
    del W(obj)["ready"], W(obj)["node_ip"]
    msg = decode_message(json.dumps(obj).encode())
    assert isinstance(msg, SnapshotMsg)
    assert msg.workloads[0].ready is True
    assert msg.workloads[0].node_ip == ""


# -- subscribe ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", Subscribe()),
        (b"{}", Subscribe()),
        (b'{"epoch": null, "revision": null}', Subscribe()),
        (b'{"epoch": "e1", "revision": 0}', Subscribe("e1", 0)),
        (b'{"epoch": "", "revision": 12}', Subscribe("", 12)),
        (b'{"epoch": "e1", "revision": 3, "extra": true}', Subscribe("e1", 3)),
    ],
)
def test_subscribe_decodes(body: bytes, expected: Subscribe) -> None:
    assert Subscribe.decode(body) == expected


@given(epoch=st.one_of(st.none(), st.text()), revision=st.integers(0, 2**63))
def test_subscribe_round_trips(epoch: str | None, revision: int) -> None:
    sub = Subscribe(epoch, None if epoch is None else revision)
    assert Subscribe.decode(sub.encode()) == sub


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", "subscribe: not JSON"),
        (b"\xff", "subscribe: not JSON"),
        (b"[]", "subscribe: expected an object, got list"),
        (b"null", "subscribe: expected an object, got NoneType"),
        (b'{"epoch": 1, "revision": 1}', "subscribe.epoch: unexpected int"),
        (b'{"epoch": "e", "revision": true}', "subscribe.revision: unexpected bool"),
        (b'{"epoch": "e", "revision": "1"}', "subscribe.revision: unexpected str"),
        (b'{"epoch": "e", "revision": 1.5}', "subscribe.revision: unexpected float"),
        (b'{"epoch": "e", "revision": -1}', "subscribe.revision: negative"),
        (b'{"epoch": "e"}', "subscribe: epoch and revision go together"),
        (b'{"revision": 4}', "subscribe: epoch and revision go together"),
        (b'{"epoch": null, "revision": 4}', "subscribe: epoch and revision go together"),
    ],
)
def test_subscribe_refuses(body: bytes, error: str) -> None:
    with pytest.raises(MeshWireError, match=re.escape(error)):
        Subscribe.decode(body)


@pytest.mark.parametrize("decode", [Subscribe.decode, decode_message], ids=["subscribe", "message"])
def test_deeply_nested_json_is_refused_as_a_wire_error(decode: Callable[[bytes], object]) -> None:
    body = b"[" * 50_000 + b"]" * 50_000  # under the server's 64 KiB body limit
    with pytest.raises(MeshWireError):
        decode(body)


def test_opaque_ports_round_trip_and_are_optional_on_the_wire() -> None:
    from weft.identity import SpiffeId
    from weft.mesh import InboundMode, Service, ServicePort, Workload
    from weft.meshwire import decode_service, decode_workload, encode_service, encode_workload

    w = Workload(
        uid="u", name="db", namespace="default", node="n", ips=("10.0.0.5",),
        service_account="db", identity=SpiffeId.workload("default", "db"), captured=True,
        inbound_mode=InboundMode.PERMISSIVE, opaque_ports=(2525, 3307),
    )  # fmt: skip
    s = Service("db", "default", ("10.96.0.9",), (ServicePort(25, 2525),), (), opaque_ports=(25,))
    assert decode_workload(encode_workload(w)) == w
    assert decode_service(encode_service(s)) == s
    older = encode_service(s)
    del older["opaque_ports"]  # a control plane of the previous release
    assert decode_service(older).opaque_ports == ()


def test_policies_round_trip_and_are_absent_for_the_default() -> None:
    from weft.identity import SpiffeId
    from weft.mesh import InboundMode, Workload
    from weft.meshwire import decode_workload, encode_workload
    from weft.policy import DefaultPolicy, parse_policy

    policy = parse_policy({
        "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop", "uid": "dropped"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]},
    })  # fmt: skip
    plain = Workload(
        uid="u", name="pay-1", namespace="shop", node="n", ips=("10.0.0.5",),
        service_account="pay", identity=SpiffeId.workload("shop", "pay"), captured=True,
        inbound_mode=InboundMode.STRICT,
    )  # fmt: skip
    assert "policies" not in encode_workload(plain)
    assert "default_policy" not in encode_workload(plain)
    w = dataclasses.replace(plain, default_policy=DefaultPolicy.DENY, policies=(policy,))
    assert decode_workload(json.loads(json.dumps(encode_workload(w)))) == w
    bad = encode_workload(w)
    bad["policies"][0]["spec"]["action"] = "ALLOWED"
    with pytest.raises(MeshWireError, match=r"policies\[0\]: spec.action"):
        decode_workload(bad)
    bad = encode_workload(w)
    bad["default_policy"] = "yes"
    with pytest.raises(MeshWireError, match="default_policy"):
        decode_workload(bad)
