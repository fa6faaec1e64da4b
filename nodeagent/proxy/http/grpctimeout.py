"""The gRPC ``grpc-timeout`` request header (gRPC over HTTP/2: ``1*8DIGIT`` and a unit,
``H`` hours, ``M`` minutes, ``S`` seconds, ``m`` milliseconds, ``u`` microseconds, ``n``
nanoseconds), sans-I/O.

The client's deadline bounds the outbound request as ``weft.io/timeout-request`` does:
the forwarder takes the smaller of the two, and tells the upstream what is left of it
(Envoy and Linkerd do the same), so the server stops working on a call nobody waits for.
A malformed value is the client's bug, not a reason to fail its call: it is ignored.
"""

from __future__ import annotations

from nodeagent.proxy.http.message import Headers

GRPC_TIMEOUT_HEADER = b"grpc-timeout"

MAX_DIGITS = 8

_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}

_ENCODE = ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600))
"""Finest unit first: the most precise value that fits in `MAX_DIGITS`."""


def parse_grpc_timeout(value: bytes) -> float:
    """Seconds in a ``grpc-timeout`` value; ValueError if it is not 1-8 ASCII digits
    and a unit (surrounding whitespace aside)."""
    value = value.strip(b" \t")
    digits = value[:-1]
    if not digits or len(digits) > MAX_DIGITS or not digits.isdigit():
        raise ValueError(f"{value[:32]!r} is not 1-{MAX_DIGITS} digits and a unit")
    scale = _UNITS.get(value[-1])
    if scale is None:
        raise ValueError(f"{value[:32]!r}: unit {value[-1:]!r} is not one of H M S m u n")
    return int(digits) * scale


def format_grpc_timeout(seconds: float) -> bytes:
    """``seconds`` (rounded down, at least 0) as a ``grpc-timeout`` value."""
    seconds = max(seconds, 0.0)
    for unit, scale in _ENCODE:
        n = int(seconds * scale)
        if n < 10**MAX_DIGITS:
            return b"%d%s" % (n, unit)
    return b"99999999H"


def grpc_request(headers: Headers) -> tuple[bool, bytes | None]:
    """Whether a request is a gRPC call (``content-type: application/grpc``, ``+proto``,
    ``-web``, ...), and its raw ``grpc-timeout`` (None: absent), in one pass."""
    grpc, value = False, None
    for k, v in headers:
        name = k.lower()
        if name == GRPC_TIMEOUT_HEADER:
            if value is None:
                value = v
        elif name == b"content-type":
            grpc = v[:16].lower() == b"application/grpc"
    return grpc, value
