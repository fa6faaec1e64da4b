"""Trace-context propagation through one proxy hop: W3C Trace Context and B3.

Table-driven cases for the parsers and the hop's decisions, then properties: a hop's
outgoing headers parse back to the same trace with the hop's span as parent; headers the
hop does not understand (or that are not trace headers) leave it byte for byte; and a
request without trace headers is never touched.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.tracing import Hop, Sampler, SpanKind, StatusCode, Tracer, TracingConfig
from weft.tracing.context import (
    B3,
    format_b3_single,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{PARENT}-01".encode()
OUR_SPAN = 0x1111222233334444
NEW_TRACE = 0xAAAABBBBCCCCDDDDEEEEFFFF00001111


def _ids(bits: int) -> int:
    return NEW_TRACE if bits == 128 else OUR_SPAN


def tracer(rate: float = 0.0, roll: float = 0.5) -> Tracer:
    return Tracer(Sampler(rate), ids=_ids, random_source=lambda: roll, clock=lambda: 1_000)


def hop_of(headers, **kw) -> Hop | None:
    return tracer(**kw).begin(headers)


# --- parsers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TP, (0, int(TRACE, 16), int(PARENT, 16), 1)),
        (f"00-{TRACE}-{PARENT}-00".encode(), (0, int(TRACE, 16), int(PARENT, 16), 0)),
        (f"00-{TRACE}-{PARENT}-09".encode(), (0, int(TRACE, 16), int(PARENT, 16), 9)),
        (b" " + TP + b" ", (0, int(TRACE, 16), int(PARENT, 16), 1)),
        # A future version: parsed by the 00 layout, unknown fields ignored, sampled only.
        (f"01-{TRACE}-{PARENT}-03-what-ever".encode(), (1, int(TRACE, 16), int(PARENT, 16), 1)),
        (f"cc-{TRACE}-{PARENT}-01".encode(), (0xCC, int(TRACE, 16), int(PARENT, 16), 1)),
    ],
)
def test_traceparent_valid(value, expected):
    tp = parse_traceparent(value)
    assert tp is not None
    assert (tp.version, tp.trace_id, tp.parent_id, tp.flags) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        f"ff-{TRACE}-{PARENT}-01".encode(),  # version ff is forbidden
        f"00-{TRACE.upper()}-{PARENT}-01".encode(),  # uppercase hex
        f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
        f"00-{TRACE}-{PARENT}-01-extra".encode(),  # version 00 is exactly 55 chars
        f"00-{TRACE}-{PARENT}-1".encode(),
        f"00-{TRACE[:-1]}-{PARENT}-01".encode(),
        f"00-{TRACE}x-{PARENT}-01".encode(),
        f"01-{TRACE}-{PARENT}-01x".encode(),  # future version: extra must follow a dash
        f"0g-{TRACE}-{PARENT}-01".encode(),
        f"00_{TRACE}-{PARENT}-01".encode(),
        f"00-{TRACE}-{PARENT}-zz".encode(),
    ],
)
def test_traceparent_invalid(value):
    assert parse_traceparent(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{TRACE}-{PARENT}".encode(), B3(int(TRACE, 16), int(PARENT, 16), 0, None)),
        (f"{TRACE}-{PARENT}-1".encode(), B3(int(TRACE, 16), int(PARENT, 16), 0, True)),
        (f"{TRACE}-{PARENT}-0".encode(), B3(int(TRACE, 16), int(PARENT, 16), 0, False)),
        (f"{TRACE}-{PARENT}-d".encode(), B3(int(TRACE, 16), int(PARENT, 16), 0, True, True)),
        (
            f"{TRACE}-{PARENT}-1-{'05e3ac9a4f6e3b90'}".encode(),
            B3(int(TRACE, 16), int(PARENT, 16), 0x05E3AC9A4F6E3B90, True),
        ),
        (
            f"{TRACE[16:]}-{PARENT}-1".encode(),
            B3(int(TRACE[16:], 16), int(PARENT, 16), 0, True, wide=False),
        ),
        (b"0", B3(0, 0, 0, False)),
        (b"1", B3(0, 0, 0, True)),
        (b"d", B3(0, 0, 0, True, True)),
    ],
)
def test_b3_single_valid(value, expected):
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"2",
        b"true",
        f"{TRACE}".encode(),
        f"{TRACE}-{PARENT}-x".encode(),
        f"{TRACE}-{PARENT}-1-zz".encode(),
        f"{TRACE}-{PARENT}-1-{PARENT}-more".encode(),
        f"{TRACE.upper()}-{PARENT}".encode(),
        f"{'0' * 32}-{PARENT}-1".encode(),
        f"{TRACE}-{'0' * 16}-1".encode(),
        f"{TRACE[:20]}-{PARENT}-1".encode(),  # neither 64 nor 128 bits
    ],
)
def test_b3_single_invalid(value):
    assert parse_b3_single(value) is None


def test_b3_single_formats_back():
    for value in (f"{TRACE}-{PARENT}-1-05e3ac9a4f6e3b90", f"{TRACE[16:]}-{PARENT}-d"):
        ctx = parse_b3_single(value.encode())
        assert ctx is not None
        assert format_b3_single(ctx) == value.encode()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((TRACE, PARENT, None, "1", None), B3(int(TRACE, 16), int(PARENT, 16), 0, True)),
        ((TRACE, PARENT, None, "true", None), B3(int(TRACE, 16), int(PARENT, 16), 0, True)),
        ((TRACE, PARENT, None, "0", None), B3(int(TRACE, 16), int(PARENT, 16), 0, False)),
        ((TRACE, PARENT, None, None, "1"), B3(int(TRACE, 16), int(PARENT, 16), 0, True, True)),
        ((TRACE, PARENT, None, None, None), B3(int(TRACE, 16), int(PARENT, 16), 0, None)),
        (
            (TRACE[16:], PARENT, "05e3ac9a4f6e3b90", "1", None),
            B3(int(TRACE[16:], 16), int(PARENT, 16), 0x05E3AC9A4F6E3B90, True, wide=False),
        ),
        ((None, None, None, "0", None), B3(0, 0, 0, False)),
        ((None, None, None, "1", None), B3(0, 0, 0, True)),
        ((TRACE, None, None, "1", None), None),
        ((None, PARENT, None, "1", None), None),
        ((TRACE, PARENT, None, "yes", None), None),
        ((TRACE, PARENT, None, None, "2"), None),
        ((TRACE, PARENT, "nothex!!nothex!!", "1", None), None),
        ((None, None, None, None, None), None),
        ((None, None, PARENT, None, None), None),
    ],
)
def test_b3_multi(values, expected):
    encoded = [None if v is None else v.encode() for v in values]
    assert parse_b3_multi(*encoded) == expected


# --- one hop: decisions and rewrites ---------------------------------------------------


OUR = f"{OUR_SPAN:016x}"
NEW = f"{NEW_TRACE:032x}"


@pytest.mark.parametrize(
    ("incoming", "outgoing", "parent"),
    [
        # W3C sampled: parent-id becomes our span, flags and tracestate kept.
        (
            [(b"traceparent", TP), (b"tracestate", b"congo=t61rcWkgMzE")],
            [(b"traceparent", f"00-{TRACE}-{OUR}-01".encode()),
             (b"tracestate", b"congo=t61rcWkgMzE")],
            int(PARENT, 16),
        ),
        # Header names keep the case they came in; flags we do not know are kept.
        (
            [(b"TraceParent", f"00-{TRACE}-{PARENT}-03".encode())],
            [(b"TraceParent", f"00-{TRACE}-{OUR}-03".encode())],
            int(PARENT, 16),
        ),
        # A future version is rewritten as 00 with the sampled bit only.
        (
            [(b"traceparent", f"02-{TRACE}-{PARENT}-03-future".encode())],
            [(b"traceparent", f"00-{TRACE}-{OUR}-01".encode())],
            int(PARENT, 16),
        ),
        # B3 single, in its own width, our span, the caller's span as parent.
        (
            [(b"b3", f"{TRACE[16:]}-{PARENT}-1-05e3ac9a4f6e3b90".encode())],
            [(b"b3", f"{TRACE[16:]}-{OUR}-1-{PARENT}".encode())],
            int(PARENT, 16),
        ),
        (
            [(b"b3", f"{TRACE}-{PARENT}-d".encode())],
            [(b"b3", f"{TRACE}-{OUR}-d-{PARENT}".encode())],
            int(PARENT, 16),
        ),
        # B3 multi: span id replaced, parent id replaced (or added), the rest kept.
        (
            [(b"X-B3-TraceId", TRACE.encode()), (b"X-B3-SpanId", PARENT.encode()),
             (b"X-B3-ParentSpanId", b"05e3ac9a4f6e3b90"), (b"X-B3-Sampled", b"1")],
            [(b"X-B3-TraceId", TRACE.encode()), (b"X-B3-SpanId", OUR.encode()),
             (b"X-B3-ParentSpanId", PARENT.encode()), (b"X-B3-Sampled", b"1")],
            int(PARENT, 16),
        ),
        (
            [(b"x-b3-traceid", TRACE[16:].encode()), (b"x-b3-spanid", PARENT.encode()),
             (b"x-b3-flags", b"1")],
            [(b"x-b3-traceid", TRACE[16:].encode()), (b"x-b3-spanid", OUR.encode()),
             (b"x-b3-flags", b"1"), (b"x-b3-parentspanid", PARENT.encode())],
            int(PARENT, 16),
        ),
        # Both formats for the same trace: both rewritten.
        (
            [(b"traceparent", TP), (b"b3", f"{TRACE}-{PARENT}-1".encode())],
            [(b"traceparent", f"00-{TRACE}-{OUR}-01".encode()),
             (b"b3", f"{TRACE}-{OUR}-1-{PARENT}".encode())],
            int(PARENT, 16),
        ),
        # W3C wins; a B3 header of another trace is left as it is.
        (
            [(b"traceparent", TP), (b"b3", f"{'ab' * 16}-{PARENT}-1".encode())],
            [(b"traceparent", f"00-{TRACE}-{OUR}-01".encode()),
             (b"b3", f"{'ab' * 16}-{PARENT}-1".encode())],
            int(PARENT, 16),
        ),
        # An invalid traceparent stays as it was; a valid b3 is used.
        (
            [(b"traceparent", b"00-nonsense"), (b"b3", f"{TRACE}-{PARENT}-1".encode())],
            [(b"traceparent", b"00-nonsense"), (b"b3", f"{TRACE}-{OUR}-1-{PARENT}".encode())],
            int(PARENT, 16),
        ),
        # A bare decision to sample: this hop starts the trace, in the format it came.
        ([(b"b3", b"1")], [(b"b3", f"{NEW}-{OUR}-1".encode())], 0),
        (
            [(b"X-B3-Sampled", b"1")],
            [(b"X-B3-Sampled", b"1"), (b"x-b3-traceid", NEW.encode()),
             (b"x-b3-spanid", OUR.encode())],
            0,
        ),
    ],
)  # fmt: skip
def test_sampled_hop_rewrites(incoming, outgoing, parent):
    other = [(b"Host", b"echo"), (b"accept", b"*/*")]
    hop = hop_of([other[0], *incoming, other[1]])
    assert hop is not None
    assert hop.span_id == OUR_SPAN
    assert hop.parent_id == parent
    # Rewritten headers stay where they were; added ones (listed last) are appended.
    in_place, added = outgoing[: len(incoming)], outgoing[len(incoming) :]
    want = [other[0], *in_place, other[1], *added]
    assert hop.outgoing([other[0], *incoming, other[1]]) == want


@pytest.mark.parametrize(
    "incoming",
    [
        [],
        [(b"host", b"echo")],
        [(b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())],  # the caller did not sample
        [(b"b3", b"0")],
        [(b"b3", f"{TRACE}-{PARENT}-0".encode())],
        [(b"x-b3-sampled", b"0")],
        [(b"X-B3-TraceId", TRACE.encode()), (b"X-B3-SpanId", PARENT.encode()),
         (b"X-B3-Sampled", b"0")],
        [(b"traceparent", b"garbage")],
        [(b"traceparent", TP), (b"traceparent", TP)],  # repeated: ambiguous
        [(b"b3", f"{TRACE}-{PARENT}".encode())],  # deferred, and the rate is 0
        [(b"tracestate", b"congo=1")],
    ],
)  # fmt: skip
def test_not_traced_at_rate_zero(incoming):
    assert hop_of(incoming) is None


def test_unsampled_incoming_is_not_traced_even_at_full_rate():
    assert hop_of([(b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())], rate=1.0) is None
    assert hop_of([(b"b3", b"0")], rate=1.0) is None


def test_rate_starts_traces_for_requests_without_a_decision():
    # No context: a new W3C trace, injected.
    hop = hop_of([(b"host", b"echo")], rate=0.5, roll=0.2)
    assert hop is not None and hop.parent_id == 0 and hop.trace_id == NEW_TRACE
    assert hop.outgoing([(b"host", b"echo")]) == [
        (b"host", b"echo"),
        (b"traceparent", f"00-{NEW}-{OUR}-01".encode()),
    ]
    assert hop_of([(b"host", b"echo")], rate=0.5, roll=0.7) is None
    # B3 deferred: the caller's trace, now sampled.
    hop = hop_of([(b"b3", f"{TRACE}-{PARENT}".encode())], rate=0.5, roll=0.2)
    assert hop is not None and hop.parent_id == int(PARENT, 16)
    assert hop.outgoing([(b"b3", f"{TRACE}-{PARENT}".encode())]) == [
        (b"b3", f"{TRACE}-{OUR}-1-{PARENT}".encode())
    ]
    hop = hop_of([(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", PARENT.encode())], rate=1.0)
    assert hop is not None
    assert (b"x-b3-sampled", b"1") in hop.outgoing([])
    # An invalid traceparent is never duplicated or replaced: the new trace stays here.
    bad = [(b"traceparent", b"01-bad")]
    hop = hop_of(bad, rate=1.0)
    assert hop is not None and hop.outgoing(bad) == bad


def test_sampler_rate_bounds():
    with pytest.raises(ValueError, match="between 0 and 1"):
        Sampler(1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Sampler(-0.1)


def test_disabled_tracer_never_traces():
    t = Tracer(Sampler(1.0), enabled=False)
    assert t.begin([(b"traceparent", TP)]) is None
    assert Tracer.for_config(TracingConfig()).begin([(b"traceparent", TP)]) is None
    on = Tracer.for_config(TracingConfig(collector=("127.0.0.1", 4318)))
    assert on.begin([(b"traceparent", TP)]) is not None
    assert on.begin([]) is None


def test_rate_is_roughly_honoured():
    t = Tracer(Sampler(0.25))
    traced = sum(t.begin([]) is not None for _ in range(20_000))
    assert 4_000 < traced < 6_000


def test_lowercase_hint_finds_h2_headers():
    t = tracer()
    assert t.begin([(b"traceparent", TP)], lowercase=True) is not None
    assert t.begin([(b":path", b"/"), (b"x-b3-sampled", b"1")], lowercase=True) is not None


def test_finish_makes_the_span():
    clock = itertools.count(1_000, 500)
    t = Tracer(Sampler(0.0), ids=_ids, clock=lambda: next(clock))
    hop = t.begin([(b"traceparent", TP)])
    assert hop is not None
    span = hop.finish(
        "outbound", SpanKind.CLIENT, attributes={"x": 1}, status=StatusCode.ERROR, message="m"
    )
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        int(TRACE, 16),
        OUR_SPAN,
        int(PARENT, 16),
    )
    assert (span.start_ns, span.end_ns) == (1_000, 1_500)
    assert span.kind is SpanKind.CLIENT and span.attributes == {"x": 1}
    assert span.trace_id_hex == TRACE and span.span_id_hex == OUR
    assert hop.finish("x", SpanKind.SERVER, end_ns=7).end_ns == 7


# --- properties ---------------------------------------------------------------------------


ids128 = st.integers(1, (1 << 128) - 1)
ids64 = st.integers(1, (1 << 64) - 1)
names = st.sampled_from([b"Host", b"accept", b"user-agent", b"x-request-id", b"tracestate"])
values = st.binary(min_size=0, max_size=40)
plain = st.lists(st.tuples(names, values), max_size=6)


@st.composite
def sampled_context(draw):
    """Headers carrying one sampled context in one of the formats, amid other headers."""
    trace, span = draw(ids128), draw(ids64)
    fmt = draw(st.sampled_from(["w3c", "b3", "b3-64", "multi", "multi-64"]))
    case = draw(st.sampled_from([str.lower, str.upper, str.title]))
    if fmt == "w3c":
        flags = draw(st.integers(0, 255)) | 1
        ctx = [(b"traceparent", b"00-%032x-%016x-%02x" % (trace, span, flags))]
    elif fmt.startswith("b3"):
        if fmt == "b3-64":
            trace &= (1 << 64) - 1
            trace = trace or 1
        width = 16 if fmt == "b3-64" else 32
        state = draw(st.sampled_from([b"1", b"d"]))
        ctx = [(b"b3", b"%0*x-%016x-%s" % (width, trace, span, state))]
    else:
        if fmt == "multi-64":
            trace = (trace & ((1 << 64) - 1)) or 1
        width = 16 if fmt == "multi-64" else 32
        ctx = [
            (b"x-b3-traceid", b"%0*x" % (width, trace)),
            (b"x-b3-spanid", b"%016x" % span),
            (b"x-b3-sampled", b"1"),
        ]
    ctx = [(case(k.decode()).encode(), v) for k, v in ctx]
    others = draw(plain)
    at = draw(st.integers(0, len(others)))
    return trace, span, [*others[:at], *ctx, *others[at:]]


@given(sampled_context())
def test_child_keeps_trace_and_gets_the_proxy_as_parent(case):
    trace, span, headers = case
    hop = Tracer().begin(headers)
    assert hop is not None
    assert hop.trace_id == trace and hop.parent_id == span and hop.span_id
    out = hop.outgoing(headers)
    # Only trace headers changed, nothing reordered or renamed.
    assert [k for k, _ in out[: len(headers)]] == [k for k, _ in headers]
    for (k, v), (_, v2) in zip(headers, out, strict=False):
        if k.lower() not in (b"traceparent", b"b3", b"x-b3-spanid", b"x-b3-parentspanid"):
            assert v2 == v
    # The next hop sees the same trace, with this hop's span as its parent.
    nxt = Tracer(ids=lambda bits: 7).begin(out)
    assert nxt is not None
    assert nxt.trace_id == trace and nxt.parent_id == hop.span_id


@given(plain)
def test_no_trace_headers_means_no_change(headers):
    assert Tracer(Sampler(0.0)).begin(headers) is None
    hop = Tracer(Sampler(1.0)).begin(headers)
    assert hop is not None
    out = hop.outgoing(headers)
    assert out[: len(headers)] == headers
    assert [k for k, _ in out[len(headers) :]] == [b"traceparent"]


trace_names = st.sampled_from(
    [b"traceparent", b"TRACEPARENT", b"b3", b"B3", b"x-b3-traceid", b"X-B3-SpanId",
     b"x-b3-parentspanid", b"x-b3-sampled", b"X-B3-Flags", b"tracestate"]
)  # fmt: skip


@given(st.lists(st.tuples(trace_names, values), min_size=1, max_size=6), plain)
def test_never_corrupts_what_it_cannot_use(junk, others):
    """Whatever the trace headers hold: every header the hop does not rewrite keeps its
    exact bytes, nothing is dropped, and whatever it rewrites parses as valid context."""
    headers = [*junk, *others]
    hop = Tracer(Sampler(1.0)).begin(headers)
    if hop is None:
        return  # untraced: the proxy forwards `headers` itself, unchanged
    out = hop.outgoing(headers)
    assert len(out) >= len(headers)
    assert [k for k, _ in out[: len(headers)]] == [k for k, _ in headers]
    for (k, v), (_, v2) in zip(headers, out, strict=False):
        if v2 != v:
            lk = k.lower()
            if lk == b"traceparent":
                assert parse_traceparent(v2) is not None
            elif lk == b"b3":
                assert parse_b3_single(v2) is not None
            else:
                assert lk in (b"x-b3-spanid", b"x-b3-parentspanid")
                assert len(v2) == 16 and int(v2, 16)
    for k, v in out[len(headers) :]:
        if k == b"traceparent":
            assert parse_traceparent(v) is not None


@given(st.binary(max_size=80))
def test_parsers_never_raise(value):
    for parse in (parse_traceparent, parse_b3_single):
        parse(value)
    parse_b3_multi(value, value, None, value, None)


@given(ids128, ids64, st.integers(0, 255))
def test_traceparent_round_trip(trace, span, flags):
    from weft.tracing.context import format_traceparent

    tp = parse_traceparent(format_traceparent(trace, span, flags))
    assert tp is not None and (tp.trace_id, tp.parent_id, tp.flags) == (trace, span, flags)


@given(ids128, ids64, st.integers(0, (1 << 64) - 1), st.sampled_from([None, True, False]),
       st.booleans(), st.booleans())  # fmt: skip
def test_b3_single_round_trip(trace, span, parent, sampled, debug, wide):
    if not wide:
        trace = (trace & ((1 << 64) - 1)) or 1
    if debug:
        sampled = True
    if sampled is None:
        parent = 0  # a parent cannot follow a deferred decision in the single header
    ctx = B3(trace, span, parent, sampled, debug=debug, wide=wide)
    assert parse_b3_single(format_b3_single(ctx)) == ctx
