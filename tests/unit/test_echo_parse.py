import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.lab.echo import BadRequest, parse_head, response


def test_parses_request_line_and_headers():
    req = parse_head(b"GET /x?y=1 HTTP/1.1\r\nHost: echo\r\nX-A:  b \r\n\r\n")
    assert (req.method, req.target, req.version) == ("GET", "/x?y=1", "HTTP/1.1")
    assert req.headers == [("Host", "echo"), ("X-A", "b")]
    assert req.header("host") == "echo"
    assert req.keep_alive


@pytest.mark.parametrize(
    ("head", "keep"),
    [
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    ],
)
def test_keep_alive_rules(head, keep):
    assert parse_head(head).keep_alive is keep


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n", 400),
        (b"G\x00T / HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_heads_are_refused_with_a_status(head, status):
    with pytest.raises(BadRequest) as e:
        parse_head(head)
    assert e.value.status == status


@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_parse_or_raise_bad_request(data):
    try:
        parse_head(data + b"\r\n\r\n")
    except BadRequest:
        pass


def test_response_framing():
    raw = response(200, b"{}", keep_alive=True)
    assert raw == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: keep-alive\r\n\r\n{}"
    )


def test_failure_injection_by_query_and_pod():
    from weft.lab.echo import injected

    assert injected("/", "echo-1") == (0.0, 200)
    assert injected("/?delay_ms=20&status=503", "echo-1") == (0.02, 503)
    assert injected("/?delay_ms=echo-2:20", "echo-1") == (0.0, 200)
    assert injected("/?delay_ms=echo-2:20", "echo-2") == (0.02, 200)
    assert injected("/?status=echo-2:500&fail=echo-1:1", "echo-1") == (0.0, 503)
    assert injected("/?status=99&delay_ms=x", "echo-1") == (0.0, 200)  # ignored, not an error
