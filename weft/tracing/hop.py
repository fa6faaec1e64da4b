"""One proxy hop's part in a trace: read the incoming context, decide, rewrite outgoing.

The data path calls `Tracer.begin` once per request with the request's header list.
Most requests carry no trace header and sampling is off by default, so that call is
one pass over the header *names* (no value is looked at, nothing is allocated) and
returns None: the request is not traced and its headers are forwarded as they came.

Otherwise the hop reads the context in order of preference — W3C ``traceparent``, then
B3 single ``b3``, then B3 multi ``X-B3-*`` — and decides:

* the caller sampled (W3C flag, B3 ``1``/``d``/``X-B3-Flags: 1``): trace this hop as a
  child of the caller's span;
* the caller did not sample (W3C flag clear, B3 ``0``): do not trace, and forward every
  header untouched — rewriting the parent id of a trace nobody records would point the
  next hop at a span that never reaches a backend;
* the caller deferred (B3 with ids and no sampling state), or there is no usable
  context: start at the configured rate (default 0, as Linkerd's proxy does). A bare
  ``b3: 1`` is a decision without ids: a new trace, propagated in the same format.

A traced hop gets its own span id; `Hop.outgoing` rewrites each format that carries
the chosen trace so that the next hop's parent is this hop's span: ``traceparent``'s
parent-id (flags and the untouched ``tracestate`` kept; a higher version is written as
00, as Trace Context requires), ``b3``'s span and parent fields in the width and form
they came in, ``X-B3-SpanId`` and ``X-B3-ParentSpanId``.  A header that does not parse
— or a second, conflicting context of another trace — is forwarded untouched.  A new
trace started by the rate is propagated with a fresh ``traceparent``, unless the
request already has one (invalid: it stays as it was, the new trace goes no further).

Alternatives not taken: honouring an incoming ``sampled=0`` with our own rate (the
caller's backend would then hold orphan spans), and always adding W3C headers beside
B3 ones (an app configured for B3 never asked for them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from weft.tracing.config import TracingConfig
from weft.tracing.context import (
    B3,
    W3C_SAMPLED,
    TraceParent,
    format_b3_single,
    format_b3_trace_id,
    format_span_id,
    format_traceparent,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)
from weft.tracing.peer import member, with_member
from weft.tracing.span import AttrValue, Span, SpanKind, StatusCode

Headers = list[tuple[bytes, bytes]]
"""As the proxy's HTTP stages hold them (`nodeagent.proxy.http.message.Headers`):
names as received on HTTP/1.1, lowercase on HTTP/2."""

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3_SINGLE = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT_ID = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"

TRACE_HEADERS = frozenset(
    {TRACEPARENT, B3_SINGLE, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_ID, B3_SAMPLED, B3_FLAGS}
)
"""Lowercase names of the headers that can carry a context (``tracestate`` cannot on
its own).  A codec that already lower-cases each name can test membership here and
skip `Tracer.begin` for requests without any."""

T = TypeVar("T")

_LENGTHS = frozenset(len(n) for n in TRACE_HEADERS)
_B3_MULTI = (B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_ID, B3_SAMPLED, B3_FLAGS)


def _random_id(bits: int) -> int:
    n = 0
    while not n:
        n = random.getrandbits(bits)
    return n


@dataclass(frozen=True, slots=True)
class Sampler:
    """Whether to start a trace for a request that brings no decision."""

    rate: float = 0.0
    """0 (never, the default) .. 1 (every such request)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"sample rate must be between 0 and 1, got {self.rate}")


class Tracer:
    """Per-node trace participation: the sampler, the id source and the clock.

    ``enabled=False`` (no collector configured) makes every `begin` return None at once:
    the proxy is then a pure pass-through for trace headers.  ``ids(bits)`` returns a
    non-zero random int of ``bits`` bits and ``random()`` a float in [0, 1); tests inject
    deterministic ones.
    """

    __slots__ = ("_clock", "_ids", "_random", "_rate", "enabled", "sampler")

    def __init__(
        self,
        sampler: Sampler | None = None,
        *,
        enabled: bool = True,
        ids: Callable[[int], int] = _random_id,
        random_source: Callable[[], float] = random.random,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.sampler = sampler or Sampler()
        self.enabled = enabled
        self._rate = self.sampler.rate
        self._ids = ids
        self._random = random_source
        self._clock = clock

    @classmethod
    def for_config(cls, config: TracingConfig) -> Tracer:
        """The node's tracer: off without a collector, else sampling at its rate."""
        return cls(Sampler(config.sample_rate), enabled=config.enabled)

    def begin(self, headers: Headers, *, lowercase: bool = False) -> Hop | None:
        """This hop's part in the request's trace, or None: not traced, forward the
        headers as they are.  ``lowercase``: every name in ``headers`` is lowercase
        (HTTP/2), which makes the no-trace-header pass cheaper."""
        if not self.enabled:
            return None
        if lowercase:
            for name, _ in headers:
                if name in TRACE_HEADERS:
                    return self._begin(headers)
        else:
            for name, _ in headers:
                if len(name) in _LENGTHS and name.lower() in TRACE_HEADERS:
                    return self._begin(headers)
        rate = self._rate
        if rate <= 0.0 or (rate < 1.0 and self._random() >= rate):
            return None
        return self._hop(self._ids(128), self._ids(64), 0, _NEW)

    def _roll(self) -> bool:
        rate = self._rate
        return rate > 0.0 and (rate >= 1.0 or self._random() < rate)

    def _begin(self, headers: Headers) -> Hop | None:
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            lname = name.lower()
            if lname in TRACE_HEADERS:
                found.setdefault(lname, []).append(value)
        # Each format is parsed only when it can matter: an unsampled traceparent (what
        # an app's OpenTelemetry SDK sends on most requests) ends the work right here.
        w3c = _one(found, TRACEPARENT, parse_traceparent)
        if w3c is not None and not w3c.sampled:
            return None
        single = _one(found, B3_SINGLE, parse_b3_single) if B3_SINGLE in found else None
        multi = (
            _multi(found) if len(found) > (TRACEPARENT in found) + (single is not None) else None
        )
        span_id = self._ids(64)

        if w3c is not None:
            trace_id, parent_id = w3c.trace_id, w3c.parent_id
            flags = w3c.flags if w3c.version == 0 else W3C_SAMPLED
            recipe = _Recipe(w3c=flags)
        else:
            b3 = single if single is not None else multi
            if b3 is None:
                if not self._roll():
                    return None
                # A new trace; an invalid traceparent stays as it was (the new trace then
                # goes no further).
                recipe = _NEW if TRACEPARENT not in found else _NOTHING
                return self._hop(self._ids(128), span_id, 0, recipe)
            if b3.sampled is False or (b3.sampled is None and not self._roll()):
                return None
            if b3.has_ids:
                trace_id, parent_id = b3.trace_id, b3.span_id
                recipe = _NOTHING
            else:
                # A bare decision to sample: this hop is the trace's root, propagated in
                # the format the decision came in.
                recipe = _Recipe(single=b3) if single is b3 else _Recipe(multi=_ROOT)
                return self._hop(self._ids(128), span_id, 0, recipe)

        if single is not None and single.has_ids and single.trace_id == trace_id:
            recipe = recipe._replace(single=single)
        if multi is not None and multi.has_ids and multi.trace_id == trace_id:
            mode = _CHILD_WITH_PARENT if B3_PARENT_ID in found else _CHILD
            recipe = recipe._replace(multi=mode, sampled=multi.sampled is None)
        return self._hop(trace_id, span_id, parent_id, recipe)

    def _hop(self, trace_id: int, span_id: int, parent_id: int, recipe: _Recipe) -> Hop:
        return Hop(trace_id, span_id, parent_id, self._clock(), recipe, self._clock, self._ids)


_ROOT, _CHILD, _CHILD_WITH_PARENT = 1, 2, 3


class _Recipe(NamedTuple):
    """Which trace headers a hop writes, so that it can write them for any next parent:
    its own span (`Hop.outgoing`), or the span it reserved for the destination's proxy
    (``peer=True``, `weft.tracing.peer`)."""

    w3c: int | None = None
    """The flags of the ``traceparent`` to write; None: none is written."""
    w3c_new: bool = False
    """Add ``traceparent`` (a new trace), rather than replace the one received."""
    single: B3 | None = None
    """The ``b3`` received (its width and debug flag are kept), to replace."""
    multi: int = 0
    """``X-B3-*``: 0 untouched; `_ROOT` add TraceId and SpanId; `_CHILD` replace SpanId,
    add ParentSpanId; `_CHILD_WITH_PARENT` replace both."""
    sampled: bool = False
    """Add ``X-B3-Sampled: 1`` (the caller deferred, this hop decided)."""


_NOTHING = _Recipe()
_NEW = _Recipe(w3c=W3C_SAMPLED, w3c_new=True)


def _edits(
    recipe: _Recipe, trace_id: int, down: int, up: int
) -> tuple[dict[bytes, bytes], list[bytes]]:
    """The header values that make ``down`` the next hop's parent (``up``: ``down``'s own
    parent, 0 for a root), and which of them are added when absent."""
    edits: dict[bytes, bytes] = {}
    added: list[bytes] = []
    if recipe.w3c is not None:
        edits[TRACEPARENT] = format_traceparent(trace_id, down, recipe.w3c)
        if recipe.w3c_new:
            added.append(TRACEPARENT)
    single = recipe.single
    if single is not None:
        edits[B3_SINGLE] = format_b3_single(
            B3(trace_id, down, up, True, debug=single.debug, wide=single.wide)
        )
    multi = recipe.multi
    if multi:
        edits[B3_SPAN_ID] = format_span_id(down)
        if multi == _ROOT:
            edits[B3_TRACE_ID] = format_b3_trace_id(trace_id, True)
            added += (B3_TRACE_ID, B3_SPAN_ID)
        if up:
            edits[B3_PARENT_ID] = format_span_id(up)
            if multi != _CHILD_WITH_PARENT:
                added.append(B3_PARENT_ID)
        if recipe.sampled:
            edits[B3_SAMPLED] = b"1"
            added.append(B3_SAMPLED)
    return edits, added


def _one(found: dict[bytes, list[bytes]], name: bytes, parse: Callable[[bytes], T]) -> T | None:
    values = found.get(name)
    if values is None or len(values) != 1:
        return None  # absent, or repeated: ambiguous, so not ours to interpret
    return parse(values[0])


def _multi(found: dict[bytes, list[bytes]]) -> B3 | None:
    values: list[bytes | None] = []
    for name in _B3_MULTI:
        v = found.get(name)
        if v is not None and len(v) != 1:
            return None
        values.append(None if v is None else v[0])
    if all(v is None for v in values):
        return None
    return parse_b3_multi(*values)


class Hop:
    """A traced request's hop through this proxy: its span's ids and start, and the
    header edits that make this span the next hop's parent."""

    __slots__ = (
        "_added",
        "_clock",
        "_edits",
        "_ids",
        "_recipe",
        "parent_id",
        "peer_id",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        start_ns: int,
        recipe: _Recipe,
        clock: Callable[[], int] = time.time_ns,
        ids: Callable[[int], int] = _random_id,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        """The caller's span (0: this hop starts the trace)."""
        self.start_ns = start_ns
        self.peer_id = 0
        """The span id the last `outgoing` with ``peer=True`` reserved for the next hop's
        proxy (0: none)."""
        self._recipe = recipe
        self._edits, self._added = _edits(recipe, trace_id, span_id, parent_id)
        self._clock = clock
        self._ids = ids

    def outgoing(self, headers: Headers, *, peer: bool = False) -> Headers:
        """``headers`` as they should leave this hop: a new list, every other header in
        place and unchanged, names kept as they were.

        ``peer``: the next hop is a Weft proxy that only observes (the destination
        node's, `weft.tracing.peer`): reserve a fresh span id for it (`peer_id`), make
        that the app's parent and name both spans in ``tracestate``'s ``weft`` member.
        Each call reserves anew (each attempt of a retried request reaches its own
        destination), and a second call on headers this one returned rewrites them
        again consistently."""
        recipe = self._recipe
        state: bytes | None = None
        if peer and recipe != _NOTHING:
            self.peer_id = down = self._ids(64)
            edits, added = _edits(recipe, self.trace_id, down, self.span_id)
            state = member(self.span_id, down)
        else:
            self.peer_id = 0
            edits, added = self._edits, self._added
        out: Headers = []
        seen: set[bytes] = set()
        states: list[bytes] = []
        state_at = -1
        for name, value in headers:
            lname = name.lower()
            if state is not None and lname == TRACESTATE:
                if state_at < 0:  # one list, where the first line was
                    state_at = len(out)
                    out.append((name, b""))
                states.append(value)
                continue
            new = edits.get(lname)
            if new is not None:
                out.append((name, new))
                seen.add(lname)
            else:
                if lname in TRACE_HEADERS:
                    seen.add(lname)
                out.append((name, value))
        for name in added:
            if name not in seen:
                out.append((name, edits[name]))
        if state is not None:
            value = with_member(states, state)
            if state_at < 0:
                out.append((TRACESTATE, value))
            else:
                out[state_at] = (out[state_at][0], value)
        return out

    def finish(
        self,
        name: str,
        kind: SpanKind,
        *,
        attributes: dict[str, AttrValue] | None = None,
        status: StatusCode = StatusCode.UNSET,
        message: str = "",
        end_ns: int | None = None,
    ) -> Span:
        """The hop's span, ended now (or at ``end_ns``)."""
        return Span(
            name=name,
            kind=kind,
            trace_id=self.trace_id,
            span_id=self.span_id,
            parent_span_id=self.parent_id,
            start_ns=self.start_ns,
            end_ns=end_ns if end_ns is not None else self._clock(),
            attributes=attributes if attributes is not None else {},
            status=status,
            status_message=message,
        )

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"


__all__ = ["TRACESTATE", "Hop", "Sampler", "TraceParent", "Tracer"]
