"""Trace-context header values: W3C Trace Context (Level 1) and B3, bytes in, values out.

Three wire formats carry the same three facts (trace id, the caller's span id, whether
the caller sampled):

* W3C ``traceparent: 00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>``, with an
  opaque ``tracestate`` beside it that a proxy must carry unchanged;
* B3 single ``b3: <trace-id>-<span-id>[-<sampling>[-<parent-span-id>]]`` or a bare
  sampling decision ``b3: 0|1|d``;
* B3 multi ``X-B3-TraceId``, ``X-B3-SpanId``, ``X-B3-ParentSpanId``, ``X-B3-Sampled``,
  ``X-B3-Flags``.  B3 trace ids may be 64-bit (16 hex): the width is kept, so the value
  the next hop sees is the value it would have seen without the mesh.

Parsing is strict (lowercase hex, exact lengths, no all-zero ids, W3C version ``ff``
refused) because the caller of these functions forwards an unparseable header
*untouched* and treats the request as carrying no context: being strict costs nothing
but a lost trace, while being lenient would mean rewriting a header we do not
understand.  The one leniency is W3C's own: a version above ``00`` is read by the
version-00 layout when it is at least as long, and rewritten as version ``00`` (the
highest this implementation knows), as Trace Context §3.2.4 says.

Ids are ints: cheap to compare and to make, formatted as hex only when a header is
written and as bytes only when a span is encoded.
"""

from __future__ import annotations

import re
from typing import NamedTuple

TRACE_ID_MAX = (1 << 128) - 1
SPAN_ID_MAX = (1 << 64) - 1

W3C_SAMPLED = 0x01

_HEX = b"0123456789abcdef"


def _is_hex(value: bytes) -> bool:
    """Only lowercase hex digits (``translate`` deletes them in C: the cheapest check;
    ``int(x, 16)`` alone would also take uppercase, signs, spaces and underscores)."""
    return not value.translate(None, _HEX)


def _hex(value: bytes, width: int) -> int | None:
    """The int of exactly ``width`` lowercase hex digits, or None (all zero is None too)."""
    if len(value) != width or value.translate(None, _HEX):
        return None
    n = int(value, 16)
    return n or None


class TraceParent(NamedTuple):
    """A parsed W3C ``traceparent``.  (Named tuples: a frozen dataclass costs several
    times as much to make, and one is made per traced request.)"""

    version: int
    trace_id: int
    parent_id: int
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & W3C_SAMPLED)


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)


def parse_traceparent(value: bytes) -> TraceParent | None:
    """The ``traceparent`` value's fields, or None when it is not valid Trace Context.

    Version 00 must be exactly 55 characters. A higher version (not ``ff``) is parsed by
    the version-00 layout when it is at least 55 characters and any extra starts with a
    dash; its unknown fields are ignored.
    """
    m = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if m is None:
        return None
    version_text, trace_text, parent_text, flags_text, extra = m.groups()
    if version_text == b"ff" or (extra is not None and version_text == b"00"):
        return None
    trace_id, parent_id = int(trace_text, 16), int(parent_text, 16)
    if not trace_id or not parent_id:
        return None
    version, flags = int(version_text, 16), int(flags_text, 16)
    if version:
        # Only the sampled bit is defined for versions we do not know.
        flags &= W3C_SAMPLED
    return TraceParent(version, trace_id, parent_id, flags)


def format_traceparent(trace_id: int, parent_id: int, flags: int) -> bytes:
    """A version-00 ``traceparent``."""
    return b"00-%032x-%016x-%02x" % (trace_id, parent_id, flags)


class B3(NamedTuple):
    """A parsed B3 context (single or multi header).

    ``trace_id`` and ``span_id`` are 0 for a bare sampling decision (``b3: 1``).
    ``sampled`` is None when the caller deferred the decision.
    """

    trace_id: int
    span_id: int
    parent_id: int
    sampled: bool | None
    debug: bool = False
    wide: bool = True
    """The trace id was sent as 32 hex digits (128-bit); False: 16 (64-bit)."""

    @property
    def has_ids(self) -> bool:
        return self.trace_id != 0


def _b3_trace_id(value: bytes) -> tuple[int, bool] | None:
    if len(value) == 32:
        n = _hex(value, 32)
        return None if n is None else (n, True)
    n = _hex(value, 16)
    return None if n is None else (n, False)


def parse_b3_single(value: bytes) -> B3 | None:
    """The ``b3`` header's context, or None when it is not valid B3."""
    value = value.strip(b" \t")
    if value in (b"0", b"1", b"d"):
        return B3(0, 0, 0, value != b"0", debug=value == b"d")
    parts = value.split(b"-")
    if not 2 <= len(parts) <= 4:
        return None
    trace = _b3_trace_id(parts[0])
    span_id = _hex(parts[1], 16)
    if trace is None or span_id is None:
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        state = parts[2]
        if state == b"d":
            sampled, debug = True, True
        elif state in (b"0", b"1"):
            sampled = state == b"1"
        else:
            return None
    parent_id = 0
    if len(parts) == 4:
        parent = _hex(parts[3], 16)
        if parent is None:
            return None
        parent_id = parent
    return B3(trace[0], span_id, parent_id, sampled, debug=debug, wide=trace[1])


def format_b3_single(ctx: B3) -> bytes:
    """A ``b3`` value for ``ctx`` (which has ids), in its trace id's width."""
    trace = b"%032x" % ctx.trace_id if ctx.wide else b"%016x" % ctx.trace_id
    out = b"%s-%016x" % (trace, ctx.span_id)
    if ctx.debug:
        out += b"-d"
    elif ctx.sampled is not None:
        out += b"-1" if ctx.sampled else b"-0"
    elif ctx.parent_id:
        # The parent is the fourth field: a deferred decision cannot be left out before it.
        return out
    if ctx.parent_id:
        out += b"-%016x" % ctx.parent_id
    return out


_SAMPLED_VALUES = {b"1": True, b"0": False, b"true": True, b"false": False}
"""``X-B3-Sampled``: ``1``/``0``, and the ``true``/``false`` older tracers sent (the B3
spec asks receivers to accept both)."""


def parse_b3_multi(
    trace_id: bytes | None,
    span_id: bytes | None,
    parent_id: bytes | None,
    sampled: bytes | None,
    flags: bytes | None,
) -> B3 | None:
    """The context the ``X-B3-*`` header values give (None for an absent header), or
    None when they are not valid B3 (including when none is present)."""
    sampled_value: bool | None = None
    if sampled is not None:
        sampled_value = _SAMPLED_VALUES.get(sampled.strip(b" \t").lower())
        if sampled_value is None:
            return None
    debug = False
    if flags is not None:
        flags = flags.strip(b" \t")
        if flags == b"1":
            debug, sampled_value = True, True
        elif flags != b"0":
            return None
    if trace_id is None and span_id is None:
        if parent_id is not None or (sampled is None and flags is None):
            return None
        assert sampled_value is not None
        return B3(0, 0, 0, sampled_value, debug=debug)
    if trace_id is None or span_id is None:
        return None
    trace = _b3_trace_id(trace_id.strip(b" \t"))
    span = _hex(span_id.strip(b" \t"), 16)
    if trace is None or span is None:
        return None
    parent = 0
    if parent_id is not None:
        p = _hex(parent_id.strip(b" \t"), 16)
        if p is None:
            return None
        parent = p
    return B3(trace[0], span, parent, sampled_value, debug=debug, wide=trace[1])


def format_b3_trace_id(trace_id: int, wide: bool) -> bytes:
    return b"%032x" % trace_id if wide else b"%016x" % trace_id


def format_span_id(span_id: int) -> bytes:
    return b"%016x" % span_id
