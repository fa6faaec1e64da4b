"""A small closed-loop HTTP/1.1 load generator, run *inside* a lab pod (stdlib only).

It is deliberately simple: the sockmap comparison needs the same client on both sides of
the A/B, not a realistic traffic mix (the fixed-rate, open-loop latency runs belong to
``weft bench`` proper).  Prints one JSON object.

Errors (refused, reset, timed out) are counted in ``errors``, not raised, so a run with
failures still reports, and ``weft bench`` can mark it invalid.

Modes:
  rr    one keep-alive connection, one small request at a time: latency percentiles
  conn  a new connection per request: connections per second
  bulk  one keep-alive connection, 1 MiB request bodies back to back: MB/s upstream
"""

from __future__ import annotations

import json
import socket
import sys
import time

BODY = b"x" * (1024 * 1024)
TIMEOUT = 5.0
"""Seconds a connect or a response may take before it counts as an error."""


def _read_response(sock: socket.socket, buf: bytearray) -> None:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed mid-response")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed mid-body")
        rest += chunk
    buf[:] = rest[length:]


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def run(mode: str, host: str, port: int, seconds: float) -> dict[str, object]:
    request = f"GET /bench HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    latencies: list[int] = []
    sent_bytes = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    errors = 0
    if mode in ("rr", "bulk"):
        post = (
            f"POST /bench HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
            + BODY
        )
        sock: socket.socket | None = None
        buf = bytearray()
        while time.perf_counter() < deadline:
            t0 = time.perf_counter_ns()
            try:
                if sock is None:  # (re)connect: a failed request costs its connection
                    sock = socket.create_connection((host, port), timeout=TIMEOUT)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = bytearray()
                sock.sendall(request if mode == "rr" else post)
                _read_response(sock, buf)
            except OSError:
                errors += 1
                if sock is not None:
                    sock.close()
                sock = None
                continue
            latencies.append(time.perf_counter_ns() - t0)
            sent_bytes += len(post) if mode == "bulk" else len(request)
        if sock is not None:
            sock.close()
    elif mode == "conn":
        close_req = f"GET /bench HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        while time.perf_counter() < deadline:
            t0 = time.perf_counter_ns()
            try:
                with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
                    conn.sendall(close_req)
                    _read_response(conn, bytearray())
            except OSError:  # refused, reset, timed out: a result, counted
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - t0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "mode": mode,
        "count": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "per_second": round(len(latencies) / elapsed, 1),
        "mb_per_second": round(sent_bytes / elapsed / 1e6, 1),
        "p50_us": _percentile(latencies, 0.50),
        "p90_us": _percentile(latencies, 0.90),
        "p99_us": _percentile(latencies, 0.99),
    }


if __name__ == "__main__":
    mode, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(run(mode, host, port, seconds)))
