"""The inbound hop's reserved span (`weft.tracing.peer`), in memory: the caller's hop
writes a reservation (``Hop.outgoing(peer=True)``) in each format, the destination reads
it back from the headers as they arrive (`peer_span`) — same trace, the reserved id as
the app's parent, the caller's span as its parent; ``tracestate``'s limits; and what the
destination must not believe (no member, a stale one, an unsampled context)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.tracing import Sampler, Tracer
from weft.tracing.context import parse_b3_single, parse_traceparent
from weft.tracing.peer import (
    INBOUND_HEADERS,
    find_member,
    member,
    peer_span,
    with_member,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{APP}-01".encode()


def tracer(rate: float = 0.0) -> Tracer:
    counter = itertools.count(0x1000)
    return Tracer(Sampler(rate), ids=lambda bits: next(counter), clock=lambda: 1)


def inbound(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """What the destination's observer keeps of a head (names lower case)."""
    return [(n.lower(), v) for n, v in headers if n.lower() in INBOUND_HEADERS]


def test_w3c_reservation_round_trip():
    hop = tracer().begin([(b"Traceparent", TP), (b"tracestate", b"vendor=1,other=2")])
    assert hop is not None
    headers = [(b"Host", b"echo"), (b"Traceparent", TP), (b"tracestate", b"vendor=1,other=2")]
    out = hop.outgoing(headers, peer=True)
    assert hop.peer_id and hop.peer_id != hop.span_id
    sent = dict(out)
    tp = parse_traceparent(sent[b"Traceparent"])
    assert tp is not None and tp.parent_id == hop.peer_id and tp.sampled
    assert sent[b"tracestate"] == member(hop.span_id, hop.peer_id) + b",vendor=1,other=2"
    assert [n for n, _ in out] == [b"Host", b"Traceparent", b"tracestate"]  # in place
    span = peer_span(inbound(out))
    assert span is not None
    assert (span.trace_id, span.span_id, span.parent_id) == (int(TRACE, 16), hop.peer_id,
                                                             hop.span_id)  # fmt: skip
    # The caller's own span is unchanged: child of the app's.
    assert hop.parent_id == int(APP, 16)


def test_each_attempt_reserves_anew_and_rewrites_consistently():
    hop = tracer().begin([(b"traceparent", TP)])
    assert hop is not None
    first = hop.outgoing([(b"traceparent", TP)], peer=True)
    s2a = hop.peer_id
    second = hop.outgoing(first, peer=True)
    s2b = hop.peer_id
    assert s2a != s2b
    assert len([n for n, _ in second if n == b"tracestate"]) == 1
    span = peer_span(inbound(second))
    assert span is not None and span.span_id == s2b
    # To a plaintext upstream: this hop's own span is the parent, no reservation.
    plain = hop.outgoing([(b"traceparent", TP)])
    assert hop.peer_id == 0
    tp = parse_traceparent(dict(plain)[b"traceparent"])
    assert tp is not None and tp.parent_id == hop.span_id
    assert b"tracestate" not in dict(plain)


def test_b3_single_reservation_is_b3s_own_parent_child():
    b3 = f"{TRACE}-{APP}-1".encode()
    hop = tracer().begin([(b"b3", b3)])
    assert hop is not None
    out = hop.outgoing([(b"b3", b3)], peer=True)
    sent = parse_b3_single(dict(out)[b"b3"])
    assert sent is not None
    assert (sent.span_id, sent.parent_id, sent.sampled) == (hop.peer_id, hop.span_id, True)
    assert b"traceparent" not in dict(out)  # the app chose B3: no W3C context added
    span = peer_span(inbound(out))
    assert span is not None and (span.span_id, span.parent_id) == (hop.peer_id, hop.span_id)


def test_b3_multi_and_64_bit_trace_ids():
    headers = [(b"X-B3-TraceId", APP.encode()), (b"X-B3-SpanId", b"1111222233334444"),
               (b"X-B3-Sampled", b"1")]  # fmt: skip
    hop = tracer().begin(headers)
    assert hop is not None
    out = hop.outgoing(headers, peer=True)
    sent = {n.lower(): v for n, v in out}
    assert sent[b"x-b3-spanid"] == b"%016x" % hop.peer_id
    assert sent[b"x-b3-parentspanid"] == b"%016x" % hop.span_id
    assert sent[b"x-b3-traceid"] == APP.encode()  # 64-bit stays 64-bit
    span = peer_span(inbound(out))
    assert span is not None and span.trace_id == int(APP, 16) and span.span_id == hop.peer_id


def test_a_new_trace_is_reserved_too():
    hop = tracer(rate=1.0).begin([(b"host", b"x")])
    assert hop is not None and hop.parent_id == 0
    out = hop.outgoing([(b"host", b"x")], peer=True)
    span = peer_span(inbound(out))
    assert span is not None and span.parent_id == hop.span_id


def test_no_member_stale_member_unsampled_record_nothing():
    assert peer_span([(b"traceparent", TP)]) is None
    assert peer_span([(b"traceparent", TP), (b"tracestate", b"vendor=1")]) is None
    # An app that forwarded the member it was given onto its own call, through a node
    # that does not trace: the member's S2 is not the parent the app hands on.
    stale = member(0x1, 0x2)
    assert peer_span([(b"traceparent", TP), (b"tracestate", stale)]) is None
    ok = f"00-{TRACE}-0000000000000002-01".encode()
    assert peer_span([(b"traceparent", ok), (b"tracestate", stale)]) is not None
    unsampled = f"00-{TRACE}-0000000000000002-00".encode()
    assert peer_span([(b"traceparent", unsampled), (b"tracestate", stale)]) is None
    assert peer_span([(b"traceparent", ok), (b"traceparent", ok), (b"tracestate", stale)]) is None
    assert peer_span([(b"tracestate", stale)]) is None  # no context at all


@pytest.mark.parametrize(
    "value",
    [b"weft=1", b"weft=0000000000000001-", b"weft=000000000000000g-0000000000000002",
     b"weft=0000000000000000-0000000000000002", b"weft=0000000000000001_0000000000000002"],
)  # fmt: skip
def test_malformed_members_are_not_ours(value: bytes):
    assert find_member([value]) is None


def test_member_found_among_others_and_split_lines():
    m = member(0xA, 0xB)
    assert find_member([b"x=1 , " + m + b" ,y=2"]) == (0xA, 0xB)
    assert find_member([b"x=1", m]) == (0xA, 0xB)


def test_tracestate_limits():
    ours = member(1, 2)
    old = [b"k%d=v" % i for i in range(40)]
    value = with_member([b",".join(old)], ours)
    members = value.split(b",")
    assert len(members) == 32 and members[0] == ours and members[1:] == old[:31]
    # An earlier weft member goes; empty members are dropped; the rest keep their bytes.
    assert with_member([b"a=1,, weft=old ,b=2"], ours) == ours + b",a=1,b=2"
    # Over 512 characters: long members go first, then from the right.
    long = b"big=" + b"x" * 200
    value = with_member([b"a=1," + long + b"," + b",".join(b"s%d=%s" % (i, b"y" * 40)
                                                          for i in range(12))], ours)  # fmt: skip
    assert len(value) <= 512 and long not in value and value.startswith(ours + b",a=1,s0=")


@given(st.lists(st.from_regex(rb"\A[a-z][a-z0-9_\-*/]{0,20}=[!-+\--<>-~]{1,30}\Z"), max_size=40))
def test_with_member_property(members: list[bytes]):
    value = with_member([b",".join(members)], member(7, 9))
    out = value.split(b",")
    assert out[0] == member(7, 9) and len(out) <= 32 and len(value) <= 512
    kept = [m for m in members if not m.startswith(b"weft=")]
    assert out[1:] == kept[: len(out) - 1] or len(value) > 400
    assert find_member([value]) == (7, 9)
