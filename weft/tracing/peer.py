"""The inbound hop's span, reserved by the caller's node: sans-I/O helpers for both ends.

The destination node does not rebuild requests: it relays HTTP/1.1 bytes and HTTP/2
frames to the pod and only observes them (`nodeagent.proxy.http.observe`), so it cannot
rewrite ``traceparent`` to make its own span the app's parent.  The caller's node does
it for both hops instead:

* it *reserves* the destination's span id S2 and sends the request with S2 as the app's
  parent (``traceparent``'s parent-id; B3's span id, with its own span S1 as B3's parent
  id), while recording its own ``CLIENT`` span S1 as before;
* it tells the destination both ids in its own ``tracestate`` list-member,
  ``weft=<S1>-<S2>`` (16 lowercase hex digits each), put first and replacing an earlier
  ``weft`` member, as Trace Context §3.3.1.3 asks of a vendor that updates its entry;
* the destination reads ``traceparent``/``tracestate`` (or ``b3``/``X-B3-*``) from the
  request head it observes and, when the ``weft`` member is there *and its S2 is the
  parent the app is handed*, records a ``SERVER`` span S2 with parent S1.  No ``weft``
  member (a caller outside the mesh, an old node, tracing off on the caller's node): the
  destination records nothing.

Why S2 is in the member too, not only S1: an app that propagates its incoming
``tracestate`` (OpenTelemetry SDKs do) carries a ``weft`` member onto its own outgoing
requests; if those pass a caller node that does not trace (tracing off, an old agent),
the stale member reaches another destination.  That destination sees that the member's
S2 is not the parent in ``traceparent`` and records nothing, instead of a second span
with S2's id under a stale parent.  The same check makes a member that some other hop
moved off its request worthless.

For B3 the reservation is as clean: B3 carries the parent of the span it names, so the
app gets ``b3: <trace>-<S2>-1-<S1>`` (or ``X-B3-SpanId: S2``, ``X-B3-ParentSpanId: S1``)
— B3's own meaning of "S2 is a child of S1" — and the ``weft`` member in a
``tracestate`` header marks the reservation (an app that speaks only B3 never reads
``tracestate``; one that speaks W3C ignores a ``tracestate`` without ``traceparent``).

Trace Context limits (§3.3.1.5): at most 32 list-members (the rightmost go first), and
when the combined value would exceed 512 characters, members over 128 characters are
removed first, then the rightmost, until it fits.  Empty members (``a=1,,b=2``) are
dropped, as the spec allows; every other member keeps its bytes and order.
"""

from __future__ import annotations

from typing import NamedTuple

from weft.tracing.context import _hex, parse_b3_single, parse_traceparent
from weft.tracing.span import AttrValue, Span, SpanKind, StatusCode

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3_SINGLE = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"

KEY = b"weft"
"""Weft's ``tracestate`` key (a simple key: lowercase letters)."""
MAX_MEMBERS = 32
MAX_LENGTH = 512
LONG_MEMBER = 128

INBOUND_HEADERS = frozenset({TRACEPARENT, TRACESTATE, B3_SINGLE, B3_TRACE_ID, B3_SPAN_ID})
"""Lowercase names of the headers the destination collects from an observed head
(only with tracing on): enough to find a reservation and check it."""
INBOUND_LENGTHS = frozenset(len(n) for n in INBOUND_HEADERS)
"""Their lengths: an observer compares a header name's length before lower-casing it."""

_MARK = KEY + b"="


def member(client_span: int, server_span: int) -> bytes:
    """Weft's ``tracestate`` list-member: ``weft=<S1>-<S2>``."""
    return b"weft=%016x-%016x" % (client_span, server_span)


def with_member(values: list[bytes], entry: bytes) -> bytes:
    """The ``tracestate`` value made of the incoming ``values`` (one per header line, in
    order; they form one list) with ``entry`` first and any earlier ``weft`` member gone,
    within the Trace Context limits."""
    members = [entry]
    for value in values:
        for m in value.split(b","):
            m = m.strip(b" \t")
            if m and m.partition(b"=")[0].strip(b" \t") != KEY:
                members.append(m)
    del members[MAX_MEMBERS:]
    if sum(map(len, members)) + len(members) - 1 > MAX_LENGTH:
        members = [members[0], *(m for m in members[1:] if len(m) <= LONG_MEMBER)]
        while sum(map(len, members)) + len(members) - 1 > MAX_LENGTH:
            members.pop()
    return b",".join(members)


def find_member(values: list[bytes]) -> tuple[int, int] | None:
    """(S1, S2) of the first ``weft`` member of these ``tracestate`` values, or None
    (absent or not ours: malformed)."""
    for value in values:
        if _MARK not in value:
            continue
        for m in value.split(b","):
            m = m.strip(b" \t")
            key, eq, ids = m.partition(b"=")
            if not eq or key.strip(b" \t") != KEY:
                continue
            ids = ids.strip(b" \t")
            if len(ids) != 33 or ids[16:17] != b"-":
                return None
            client, server = _hex(ids[:16], 16), _hex(ids[17:], 16)
            if client is None or server is None:
                return None
            return client, server
    return None


class PeerSpan(NamedTuple):
    """The span the destination records for a request the caller's node reserved."""

    trace_id: int
    span_id: int
    """S2: the id the caller's node reserved, the app's parent."""
    parent_id: int
    """S1: the caller's node's CLIENT span."""

    def finish(
        self,
        name: str,
        kind: SpanKind,
        *,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, AttrValue],
        status: StatusCode = StatusCode.UNSET,
    ) -> Span:
        return Span(
            name=name,
            kind=kind,
            trace_id=self.trace_id,
            span_id=self.span_id,
            parent_span_id=self.parent_id,
            start_ns=start_ns,
            end_ns=end_ns,
            attributes=attributes,
            status=status,
        )

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"


def peer_span(found: list[tuple[bytes, bytes]]) -> PeerSpan | None:
    """The reserved span of a request whose trace headers (``INBOUND_HEADERS``, names
    lowercase, in order) are ``found``; None: none reserved, or a reservation that does
    not match the context the app is handed (stale), or the context is unsampled."""
    states = [v for n, v in found if n == TRACESTATE]
    if not states:
        return None
    ids = find_member(states)
    if ids is None:
        return None
    client, server = ids
    by_name: dict[bytes, list[bytes]] = {}
    for n, v in found:
        by_name.setdefault(n, []).append(v)
    # In the order the caller's node prefers them (`weft.tracing.hop`): the first
    # format that parses is the one it rewrote.
    tp = by_name.get(TRACEPARENT)
    if tp is not None and len(tp) == 1:
        w3c = parse_traceparent(tp[0])
        if w3c is not None:
            if w3c.sampled and w3c.parent_id == server:
                return PeerSpan(w3c.trace_id, server, client)
            return None
    single = by_name.get(B3_SINGLE)
    if single is not None and len(single) == 1:
        b3 = parse_b3_single(single[0])
        if b3 is not None and b3.has_ids:
            if b3.sampled and b3.span_id == server and b3.parent_id == client:
                return PeerSpan(b3.trace_id, server, client)
            return None
    trace, span = by_name.get(B3_TRACE_ID), by_name.get(B3_SPAN_ID)
    if trace is not None and span is not None and len(trace) == len(span) == 1:
        t = trace[0].strip(b" \t")
        trace_id = _hex(t, len(t)) if len(t) in (16, 32) else None
        if trace_id is not None and _hex(span[0].strip(b" \t"), 16) == server:
            return PeerSpan(trace_id, server, client)
    return None


__all__ = [
    "INBOUND_HEADERS",
    "INBOUND_LENGTHS",
    "KEY",
    "PeerSpan",
    "find_member",
    "member",
    "peer_span",
    "with_member",
]
