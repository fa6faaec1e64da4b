"""HTTP/2 load, run *inside* a lab pod: h2load (nghttp2) against the echo server, as
h2c with prior knowledge (``h2``: GET /) or as gRPC unary calls (``grpc``: POST of one
length-prefixed message to ``weft.lab.Echo/Echo`` with ``te: trailers``). Prints one
JSON object in the shape the other load generators use (``per_second``, ``count``,
``errors``, ``mean_us``).

h2load counts HTTP statuses, not ``grpc-status``: a gRPC error carried in trailers of a
200 would count as success here (the echo service only fails when asked to).

    python -m weft.bench.h2load h2|grpc HOST PORT SECONDS CONNECTIONS STREAMS
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile

GRPC_PATH = "/weft.lab.Echo/Echo"
GRPC_MESSAGE = b"\x00\x00\x00\x00\x04ping"


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"unparsable duration {text!r}")
    return float(m[1]) * {"us": 1.0, "ms": 1e3, "s": 1e6}[m[2]]


def parse(out: str) -> dict[str, float | int]:
    """The figures of h2load's summary."""
    finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout", out)  # fmt: skip
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if finished is None or counts is None or statuses is None:
        raise ValueError(f"unexpected h2load output:\n{out[-2000:]}")
    done, ok = int(counts[2]), int(statuses[1])
    return {
        "seconds": float(finished[1]),
        "per_second": round(float(finished[2]), 1),
        "count": done,
        "errors": int(counts[4]) + int(counts[5]) + int(counts[6]) + (done - ok),
        "mean_us": round(_duration_us(timing[3]), 1) if timing else 0.0,
        "max_us": round(_duration_us(timing[2]), 1) if timing else 0.0,
    }


def main(argv: list[str]) -> int:
    mode, host, port, seconds, conns, streams = argv
    h2load = shutil.which("h2load")
    if h2load is None:
        print(json.dumps({"mode": mode, "error": "h2load is not installed (nghttp2-client)"}))
        return 1
    duration = str(max(1, round(float(seconds))))  # h2load takes whole seconds ("2", not "2.0")
    cmd = [h2load, "-D", duration, "-c", conns, "-m", streams, "-t", "1", "--warm-up-time=1s"]
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        if mode == "grpc":
            body.write(GRPC_MESSAGE)
            body.flush()
            cmd += ["-d", body.name, "-H", "content-type: application/grpc", "-H", "te: trailers",
                    f"http://{host}:{port}{GRPC_PATH}"]  # fmt: skip
        else:
            cmd.append(f"http://{host}:{port}/")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=float(seconds) + 60)
    try:
        figures = parse(proc.stdout)
    except ValueError as exc:
        # A result (invalid: errors), not a crash: the bench goes on and says so.
        print(json.dumps({"mode": mode, "error": str(exc)[:500], "errors": 1, "per_second": 0,
                          "count": 0}))  # fmt: skip
        return 0
    print(json.dumps({"mode": mode, "connections": int(conns), "streams": int(streams),
                      **figures}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
