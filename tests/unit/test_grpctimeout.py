"""The gRPC ``grpc-timeout`` header (`nodeagent.proxy.http.grpctimeout`): parsing every
unit, refusing what the spec does not allow, and the value sent upstream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.proxy.http.grpctimeout import (
    format_grpc_timeout,
    grpc_request,
    parse_grpc_timeout,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"1500u", 0.0015),
        (b"7000000n", 0.007),
        (b"0m", 0.0),
        (b"99999999S", 99_999_999.0),  # 8 digits: the most the spec allows
        (b"00000005S", 5.0),
        (b" 100m ", 0.1),  # optional whitespace around a header value
    ],
)
def test_every_unit(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"123456789S",  # 9 digits: too many (the spec's overflow guard)
        b"100000000000000000000H",
        b"",
        b"S",
        b"10",  # no unit
        b"10s",  # units are case-sensitive: s is not S
        b"10 S",
        b"1.5S",
        b"-1S",
        b"+1S",
        b"10ms",
        b"1e3m",
        b"\xd9\xa1S",  # a non-ASCII digit
        b"infS",
    ],
)
def test_malformed_values_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError, match=r"digits|unit"):
        parse_grpc_timeout(value)


@given(st.binary(max_size=12))
def test_any_bytes_parse_or_raise_value_error(value: bytes) -> None:
    try:
        assert parse_grpc_timeout(value) >= 0
    except ValueError:
        pass


@pytest.mark.parametrize(
    ("seconds", "value"),
    [
        (0.25, b"250000u"),
        (99.0, b"99000000u"),
        (100.0, b"100000m"),
        (3600.0, b"3600000m"),
        (200_000.0, b"200000S"),
        (-1.0, b"0u"),  # already expired: nothing left
        (0.0000004, b"0u"),  # rounded down: the upstream gives up no later than we do
        (1e12, b"99999999H"),
    ],
)
def test_the_value_sent_upstream_is_the_finest_that_fits(seconds: float, value: bytes) -> None:
    assert format_grpc_timeout(seconds) == value


@given(st.floats(min_value=0, max_value=3.0e8, allow_nan=False))
def test_formatted_values_parse_back_to_no_more_than_was_left(seconds: float) -> None:
    value = format_grpc_timeout(seconds)
    back = parse_grpc_timeout(value)
    assert back <= seconds * (1 + 1e-9)
    assert len(value) <= 9


def test_only_grpc_requests_have_a_deadline() -> None:
    grpc = [(b"Content-Type", b"application/grpc+proto"), (b"grpc-timeout", b"1S")]
    assert grpc_request(grpc) == (True, b"1S")
    assert grpc_request([(b"content-type", b"application/grpc-web")]) == (True, None)
    assert grpc_request([(b"content-type", b"text/plain"), (b"grpc-timeout", b"1S")]) == (
        False,
        b"1S",
    )
    assert grpc_request([]) == (False, None)
