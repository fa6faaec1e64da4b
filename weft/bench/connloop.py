"""A client connecting in a tight loop, run *inside* a lab pod (stdlib only), until a
stop file appears: one request per connection, each with its own marker in the path.
Prints one JSON object: answers, failures (with times, to see the window), the peer
addresses the echo server saw, and the slowest connect + request.

The peer address is the witness for plaintext: through the mesh, an echo pod on another
node sees its own node's address (the tunnel server); a connection the source node sent
in plaintext would show the source node's address instead.

Run: ``python -m weft.bench.connloop HOST PORT MARKER STOP_FILE``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any


def loop(target: str, port: int, marker: str, stop_file: str) -> dict[str, Any]:
    ok = failed = 0
    peers: dict[str, int] = {}
    errors: list[str] = []
    failures_at: list[float] = []
    slowest = 0.0
    i = 0
    while not os.path.exists(stop_file):
        i += 1
        started = time.monotonic()
        try:
            with socket.create_connection((target, port), timeout=30) as s:
                s.settimeout(30)
                s.sendall(
                    f"GET /{marker}-{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            body = json.loads(data.partition(b"\r\n\r\n")[2])
            if body["path"] != f"/{marker}-{i}":
                raise ValueError(f"answer for another request: {body['path']}")
            peer = body["peer"].rsplit(":", 1)[0]
            peers[peer] = peers.get(peer, 0) + 1
            ok += 1
            slowest = max(slowest, time.monotonic() - started)
        except (OSError, ValueError, KeyError) as e:
            failed += 1
            failures_at.append(time.time())
            if len(errors) < 20:
                errors.append(f"{time.time():.3f} {e!r}")
        time.sleep(0.005)
    return {
        "ok": ok,
        "failed": failed,
        "peers": peers,
        "errors": errors,
        "failure_window_s": round(failures_at[-1] - failures_at[0], 3) if failures_at else 0.0,
        "slowest_ok_s": round(slowest, 3),
    }


def main() -> None:
    target, port, marker, stop_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    print(json.dumps(loop(target, port, marker, stop_file)))


if __name__ == "__main__":
    main()
