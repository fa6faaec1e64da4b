"""Protocol detection (sans-I/O) and the HTTP/1.1 codec's limits, without sockets;
with hypothesis for the codec: arbitrary bytes never crash it or leak past its limits."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.balance import Balancer, PeakEwma
from nodeagent.proxy.http.detect import H2_PREFACE, Detected, detect
from nodeagent.proxy.http.h1 import (
    H1Error,
    Limits,
    RequestCodec,
    ResponseCodec,
    encode_request_head,
    encode_response_head,
)
from nodeagent.proxy.http.message import RequestHead, ResponseHead, end_to_end


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Detected.HTTP1),
        (b"POST /a?b=c HTTP/1.0\r\n", Detected.HTTP1),
        (b"GET / HTTP/1.1\n", Detected.HTTP1),
        (b"GE", Detected.NEED_MORE),
        (b"GET /partial", Detected.NEED_MORE),
        (b"GET / HTTP/1.", Detected.NEED_MORE),
        (b"GET / HTTP/1.1\r", Detected.NEED_MORE),
        (b"GET / HTTP/2.0\r\n", Detected.OPAQUE),
        (b"get / HTTP/1.1\r\n", Detected.OPAQUE),
        (b"GET  / HTTP/1.1\r\n", Detected.OPAQUE),
        (H2_PREFACE, Detected.H2),
        (H2_PREFACE + b"\x00\x00\x00\x04", Detected.H2),
        (H2_PREFACE[:10], Detected.NEED_MORE),
        (b"PRI * HTTP/1.1\r\n", Detected.HTTP1),  # a method named PRI, not the preface
        (b"\x16\x03\x01\x02\x00\x01", Detected.TLS),
        (b"\x16", Detected.NEED_MORE),
        (b"\x16\x01", Detected.OPAQUE),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Detected.OPAQUE),  # PostgreSQL SSLRequest
        (b"EHLO mail.example\r\n", Detected.OPAQUE),
        (b"*1\r\n$4\r\nPING\r\n", Detected.OPAQUE),  # Redis
        (b"A" * 9000, Detected.OPAQUE),
        (b"GET /" + b"a" * 9000, Detected.OPAQUE),
    ],
)
def test_detect(data: bytes, expected: Detected):
    assert detect(data) is expected


@given(st.binary(max_size=200))
def test_detect_never_raises_and_a_prefix_of_http_needs_more(data: bytes):
    assert detect(data) in Detected
    line = b"GET /x HTTP/1.1\r\n"
    for i in range(1, len(line)):
        assert detect(line[:i]) is Detected.NEED_MORE


class Sink:
    def __init__(self) -> None:
        self.heads: list[RequestHead] = []
        self.body = b""
        self.ends = 0
        self.trailers: list[tuple[bytes, bytes]] = []

    def request_head(self, head: RequestHead) -> None:
        self.heads.append(head)

    def request_body(self, data: bytes) -> None:
        self.body += data

    def request_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.ends += 1
        self.trailers = list(trailers)


def test_request_trailers_come_with_the_end_not_into_the_head():
    sink = Sink()
    codec = RequestCodec(sink)
    codec.feed(
        b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-checksum: 42\r\nx-more: y\r\n\r\n"
    )
    assert sink.ends == 1 and sink.body == b"abc"
    assert sink.trailers == [(b"x-checksum", b"42"), (b"x-more", b"y")]
    assert (b"x-checksum", b"42") not in sink.heads[0].headers


def test_request_codec_splits_a_request_fed_byte_by_byte():
    sink = Sink()
    codec = RequestCodec(sink)
    raw = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for i in range(len(raw)):
        codec.feed(raw[i : i + 1])
    assert sink.ends == 1 and sink.body == b"abc"
    head = sink.heads[0]
    assert head.chunked and head.authority == "h" and head.path == "/p" and head.keep_alive


def test_a_header_sent_forever_is_cut_at_the_head_limit():
    codec = RequestCodec(Sink(), Limits(max_head=4096))
    codec.feed(b"GET / HTTP/1.1\r\nX-Long: ")
    with pytest.raises(H1Error) as err:
        for _ in range(100):
            codec.feed(b"a" * 1000)
    assert err.value.error.status == 431


def test_too_many_headers_is_431():
    codec = RequestCodec(Sink(), Limits(max_headers=10))
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20))
    with pytest.raises(H1Error) as err:
        codec.feed(raw + b"\r\n")
    assert err.value.error.status == 431


def test_hop_by_hop_headers_are_not_forwarded():
    headers = [
        (b"Host", b"h"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"X-Kept", b"yes"),
        (b"Content-Length", b"3"),
    ]  # fmt: skip
    assert end_to_end(headers) == [(b"Host", b"h"), (b"X-Kept", b"yes")]


def _parsed(raw: bytes) -> RequestHead:
    sink = Sink()
    RequestCodec(sink).feed(raw)
    return sink.heads[0]


def test_end_to_end_headers_are_collected_as_the_head_is_parsed():
    raw = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Case: Kept\r\n\r\n"
    head = _parsed(raw + b"abc")
    assert head.forward == [(b"Host", b"h"), (b"X-Case", b"Kept")]
    assert head.forward == end_to_end(head.headers)
    assert encode_request_head(head) == (
        b"POST /p HTTP/1.1\r\nHost: h\r\nX-Case: Kept\r\ncontent-length: 3\r\n\r\n"
    )
    keep = _parsed(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nTE: trailers\r\n\r\n")
    assert keep.forward == [(b"Host", b"h")]
    assert encode_request_head(keep) == b"GET / HTTP/1.1\r\nHost: h\r\nte: trailers\r\n\r\n"
    close = _parsed(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert encode_request_head(close) == b"GET / HTTP/1.1\r\nHost: h\r\nconnection: close\r\n\r\n"


def test_a_connection_header_naming_other_headers_takes_the_full_filter():
    head = _parsed(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
        b"TE: trailers\r\nX-Kept: yes\r\n\r\n"
    )
    assert head.forward is None
    assert encode_request_head(head) == (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Kept: yes\r\nconnection: close\r\nte: trailers\r\n\r\n"
    )
    chunked = _parsed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked.chunked and chunked.forward == [(b"Host", b"h")]
    assert encode_request_head(chunked) == (
        b"POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: chunked\r\n\r\n"
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"Connection", b"keep-alive", b"TE", b"X-A", b"x-b", b"Upgrade",
                             b"Trailer", b"Proxy-Connection", b"Content-Length"]),
            st.sampled_from([b"close", b"keep-alive", b"x-a", b"1", b"Keep-Alive, X-B"]),
        ),
        max_size=8,
    )
)  # fmt: skip
def test_the_collected_headers_match_the_full_filter(fields: list[tuple[bytes, bytes]]):
    fields = [(k, v) for k, v in fields if k.lower() != b"content-length"]
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"%s: %s\r\n" % kv for kv in fields)
    sink = Sink()
    try:
        RequestCodec(sink).feed(raw + b"\r\n")
    except H1Error:
        return  # (llhttp refuses some combinations)
    if not sink.heads:
        return
    head = sink.heads[0]
    if head.forward is not None:
        assert head.forward == end_to_end(head.headers)


def test_an_apps_own_weft_route_header_never_leaves_the_node():
    """The destination judges per-route policies by ``weft-route``: only the client
    node's may reach it, so an app's (any case, either filter) is dropped as parsed."""
    simple = _parsed(b"GET / HTTP/1.1\r\nHost: h\r\nWeft-Route: shop/admin\r\nX: 1\r\n\r\n")
    assert simple.forward == [(b"Host", b"h"), (b"X", b"1")]
    assert all(k.lower() != b"weft-route" for k, _ in simple.headers)
    complex_ = _parsed(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X\r\nX: 1\r\n"
                       b"weft-route: shop/admin\r\n\r\n")  # fmt: skip
    assert complex_.forward is None
    assert b"weft-route" not in encode_request_head(complex_).lower()


def test_a_missing_host_is_empty_not_looked_up_again():
    head = _parsed(b"GET / HTTP/1.0\r\n\r\n")
    assert head.host == b"" and head.authority == ""


class ResponseSink:
    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []

    def response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def response_body(self, data: bytes) -> None:
        pass

    def response_end(self, head: ResponseHead) -> None:
        pass


def test_response_heads_are_re_encoded_with_the_framing_chosen():
    sink = ResponseSink()
    codec = ResponseCodec(sink)
    codec.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nX-A: b\r\n\r\nok")
    codec.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\ngrpc-status: 3\r\n\r\n0\r\n\r\n")
    codec.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\ngrpc-status: 5\r\n\r\n")
    sized, chunked, trailed = sink.heads
    assert sized.forward == [(b"X-A", b"b")]
    assert encode_response_head(sized, length=2, chunked=False, close=False, upgrade=False) == (
        b"HTTP/1.1 200 OK\r\nX-A: b\r\ncontent-length: 2\r\n\r\n"
    )
    assert encode_response_head(sized, length=2, chunked=False, close=True, upgrade=False) == (
        b"HTTP/1.1 200 OK\r\nX-A: b\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
    )
    assert encode_response_head(chunked, length=None, chunked=True, close=False, upgrade=False) == (
        b"HTTP/1.1 200 OK\r\ngrpc-status: 3\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert chunked.grpc_status == "3" and trailed.grpc_status == "5"
    assert sized.grpc_status == ""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20), st.booleans())
def test_request_codec_fuzz_raises_only_h1error_and_holds_limits(
    chunks: list[bytes], valid_start: bool
):
    sink = Sink()
    codec = RequestCodec(sink, Limits(max_head=2048, max_headers=20, max_request_line=512))
    prefix = [b"GET / HTTP/1.1\r\nHost: a\r\n"] if valid_start else []
    for chunk in prefix + chunks:
        try:
            if codec.feed(chunk) is not None:
                break
        except H1Error:
            break
    for head in sink.heads:
        assert len(head.target) <= 512 and len(head.headers) <= 20


class RSink:
    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.ended = 0

    def response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def response_body(self, data: bytes) -> None:
        pass

    def response_end(self, head: ResponseHead) -> None:
        self.ended += 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20))
def test_response_codec_fuzz_raises_only_h1error(chunks: list[bytes]):
    codec = ResponseCodec(RSink(), Limits(max_head=2048, max_headers=20))
    for chunk in [b"HTTP/1.1 200 OK\r\n", *chunks]:
        try:
            codec.feed(chunk)
        except H1Error:
            break


def test_response_to_head_ends_without_a_body_and_1xx_are_passed_on():
    sink = RSink()
    codec = ResponseCodec(sink)
    codec.expect(b"HEAD")
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert sink.ended == 1 and not codec.reusable
    sink2 = RSink()
    codec2 = ResponseCodec(sink2)
    codec2.expect(b"POST")
    codec2.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [h.status for h in sink2.heads] == [100, 200] and sink2.ended == 1


# --- the latency-aware balancer -----------------------------------------------------------


def _run(balancer: Balancer[str], rtt: dict[str, float], n: int) -> dict[str, int]:
    now = 0.0
    balancer.clock = lambda: now
    counts = dict.fromkeys(rtt, 0)
    for _ in range(n):
        lease = balancer.lease(list(rtt))
        assert lease is not None
        lease.succeed()
        now += rtt[lease.key]
        lease.observe(rtt[lease.key])
        lease.release()
        counts[lease.key] += 1
    return counts


def test_equal_endpoints_split_evenly_and_a_slow_one_is_avoided():
    even = _run(Balancer(latency=PeakEwma(), rng=random.Random(1)), {"a": 0.001, "b": 0.001}, 1000)
    assert 450 <= even["a"] <= 550, even
    slow = _run(Balancer(latency=PeakEwma(), rng=random.Random(2)), {"a": 0.001, "b": 0.021}, 1000)
    assert slow["b"] < 100, slow


def test_outstanding_requests_count_against_an_endpoint():
    b: Balancer[str] = Balancer(latency=PeakEwma(), rng=random.Random(3), clock=lambda: 0.0)
    held = [b.lease(["a"]) for _ in range(20)]  # 20 in flight on a
    to_b = 0
    for _ in range(200):
        pick = b.lease(["a", "b"])
        assert pick is not None
        to_b += pick.key == "b"
        pick.release()
    assert to_b > 170, to_b  # a costs 21 times b: ~1 pick in 22 goes to a
    for lease in held:
        assert lease is not None
        lease.release()
