"""When a request lost with its upstream connection (or stream) may be sent again."""

from __future__ import annotations

import pytest

from nodeagent.proxy.http.client import UpstreamLost
from nodeagent.proxy.http.h2server import request_head
from nodeagent.proxy.http.message import RequestHead


def _head(method: bytes, **kw: object) -> RequestHead:
    return RequestHead(method, b"/", b"1.1", [], True, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [(b"GET", True), (b"HEAD", True), (b"PUT", True), (b"DELETE", True), (b"OPTIONS", True),
     (b"POST", False), (b"PATCH", False), (b"CONNECT", False)],
)  # fmt: skip
def test_idempotent_methods(method: bytes, idempotent: bool) -> None:
    assert _head(method).idempotent is idempotent


def test_the_keep_alive_race_replays_only_idempotent_requests() -> None:
    lost = UpstreamLost("closed", response_started=False)
    assert lost.retryable(True, reused=True)
    assert not lost.retryable(False, reused=True)  # a POST may have been processed
    assert not lost.retryable(True, reused=False)  # a fresh connection: no race to blame


def test_a_refused_stream_is_retried_whatever_the_method() -> None:
    refused = UpstreamLost("refused", response_started=False, refused=True)
    assert refused.retryable(False, reused=False)


def test_nothing_is_retried_once_the_response_started() -> None:
    for lost in (
        UpstreamLost("reset", response_started=True),
        UpstreamLost("refused", response_started=True, refused=True),
    ):
        assert not lost.retryable(True, reused=True)


def test_an_h2_request_has_a_body_unless_its_headers_end_the_stream() -> None:
    block = [(b":method", b"POST"), (b":path", b"/x"), (b":authority", b"svc"),
             (b":scheme", b"http"), (b"te", b"trailers")]  # fmt: skip
    open_ = request_head(block, ended=False)
    assert open_.has_body and open_.authority == "svc" and open_.target == b"/x"
    assert open_.headers == [(b"te", b"trailers")]  # pseudo-headers kept apart
    assert not request_head(block, ended=True).has_body
    sized = request_head([*block, (b"content-length", b"0")], ended=False)
    assert not sized.has_body
