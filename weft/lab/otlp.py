"""A real OTLP trace receiver for tests and the lab, with a JSON view of what it holds.

No Jaeger or OpenTelemetry Collector can be installed on this project's machines, so the
tests (and ``weft lab``) need something that receives spans the way they would: this
decodes OTLP with `opentelemetry-proto`'s own messages, so a span it shows is a span a
backend would show.

* OTLP/HTTP: ``POST /v1/traces``, ``application/x-protobuf`` (gzip accepted), answered
  with an ``ExportTraceServiceResponse``; keep-alive.  JSON-encoded OTLP is refused
  (415): Weft does not send it.
* OTLP/gRPC (when grpcio is installed and ``--grpc-listen`` given):
  ``opentelemetry.proto.collector.trace.v1.TraceService/Export``, served with the
  package's generated service stubs.
* ``GET /api/traces`` — the traces held, newest first: ``traceId``, ``spans``,
  ``root`` (the root span's name, or the earliest span's), ``start`` (unix ns),
  ``durationMs``, ``services``; ``?limit=N``.
* ``GET /api/traces/<traceId>`` — that trace's spans (as `weft.tracing.otlp.decode`
  gives them), ordered by start; 404 if unknown.
* ``DELETE /api/traces`` — forget everything (a test's clean slate).
* ``GET /healthz`` — ``ok``.

Bounded: at most ``--max-spans`` spans are kept; the oldest traces go first.

Run: ``python -m weft.lab.otlp --listen 127.0.0.1:4318 [--grpc-listen 127.0.0.1:4317]``.
When it is listening it prints one JSON line, ``{"http": "HOST:PORT", "grpc": ...}``
(port 0 picks a free one): `launch` starts it from another process and reads that line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from weft.http import HttpError, parse_head
from weft.tracing.otlp import CONTENT_TYPE, TRACES_PATH, response, spans_of

log = logging.getLogger("weft.lab.otlp")

DEFAULT_MAX_SPANS = 10_000
MAX_BODY = 16 * 1024 * 1024
IDLE_TIMEOUT = 60.0


class TraceStore:
    """Spans by trace, oldest trace evicted first once more than ``max_spans`` are held."""

    def __init__(self, max_spans: int = DEFAULT_MAX_SPANS) -> None:
        if max_spans < 1:
            raise ValueError("max_spans must be at least 1")
        self.max_spans = max_spans
        self._traces: collections.OrderedDict[str, list[dict[str, Any]]] = collections.OrderedDict()
        self._count = 0
        self.received_requests = 0
        self.received_spans = 0
        self.evicted_spans = 0
        self._changed = asyncio.Condition()

    def add(self, spans: Sequence[dict[str, Any]]) -> None:
        self.received_requests += 1
        self.received_spans += len(spans)
        for span in spans:
            trace = self._traces.get(span["traceId"])
            if trace is None:
                trace = self._traces[span["traceId"]] = []
            trace.append(span)
            self._count += 1
        while self._count > self.max_spans and self._traces:
            _, oldest = self._traces.popitem(last=False)
            self._count -= len(oldest)
            self.evicted_spans += len(oldest)

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_spans(self, n: int, within: float) -> list[dict[str, Any]]:
        """Every span held, once at least ``n`` are (TimeoutError otherwise)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: self._count >= n)
        return self.spans()

    def clear(self) -> None:
        self._traces.clear()
        self._count = 0

    @property
    def span_count(self) -> int:
        return self._count

    def spans(self) -> list[dict[str, Any]]:
        return [s for trace in self._traces.values() for s in trace]

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        spans = self._traces.get(trace_id.lower())
        if spans is None:
            return None
        return sorted(spans, key=lambda s: (s["startTimeUnixNano"], s["spanId"]))

    def summaries(self, limit: int | None = None) -> list[dict[str, Any]]:
        out = []
        for trace_id in reversed(self._traces):
            spans = self._traces[trace_id]
            ids = {s["spanId"] for s in spans}
            roots = [s for s in spans if not s["parentSpanId"] or s["parentSpanId"] not in ids]
            first = min(roots or spans, key=lambda s: s["startTimeUnixNano"])
            start = min(s["startTimeUnixNano"] for s in spans)
            end = max(s["endTimeUnixNano"] for s in spans)
            services = sorted({str(s["resource"].get("service.name", "")) for s in spans})
            out.append(
                {
                    "traceId": trace_id,
                    "spans": len(spans),
                    "root": first["name"],
                    "start": start,
                    "durationMs": (end - start) / 1e6,
                    "services": services,
                }
            )
            if limit is not None and len(out) >= limit:
                break
        return out


# --- OTLP/HTTP and the JSON API -------------------------------------------------------


def _render(status: int, body: bytes, content_type: str, *, close: bool, reason: str = "") -> bytes:
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               413: "Payload Too Large", 415: "Unsupported Media Type"}  # fmt: skip
    lines = [
        f"HTTP/1.1 {status} {reason or reasons.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json(status: int, value: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(value, indent=1).encode() + b"\n", "application/json"


class OtlpReceiver:
    """The receiver's servers around one `TraceStore`."""

    def __init__(self, store: TraceStore | None = None) -> None:
        self.store = store if store is not None else TraceStore()
        self._server: asyncio.Server | None = None
        self._grpc: Any = None
        self.http_address: tuple[str, int] | None = None
        self.grpc_address: tuple[str, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        grpc: tuple[str, int] | None = None,
    ) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=64 * 1024)
        sock = self._server.sockets[0].getsockname()
        self.http_address = (sock[0], sock[1])
        if grpc is not None:
            await self._start_grpc(*grpc)

    async def _start_grpc(self, host: str, port: int) -> None:
        import grpc as grpcio
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        store = self.store

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(  # the generated name
                self, request: ExportTraceServiceRequest, context: Any
            ) -> ExportTraceServiceResponse:
                store.add(spans_of(request))
                await store.notify()
                return ExportTraceServiceResponse()

        server = grpcio.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen for OTLP/gRPC on {host}:{port}")
        await server.start()
        self._grpc = server
        self.grpc_address = (host, bound)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
            self._grpc = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        raw = await reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_render(431, b"head too large\n", "text/plain", close=True))
                    return
                try:
                    head = parse_head(raw)
                except HttpError as e:
                    body = f"{e.message}\n".encode()
                    writer.write(_render(e.status, body, "text/plain", close=True))
                    return
                length = head.content_length or 0
                if length > MAX_BODY:
                    body = f"body over {MAX_BODY} bytes\n".encode()
                    writer.write(_render(413, body, "text/plain", close=True))
                    return
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        body = await reader.readexactly(length) if length else b""
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                status, answer, ctype = await self._answer(head.method, head.target, head, body)
                close = head.headers.get("connection", "").lower() == "close"
                writer.write(_render(status, answer, ctype, close=close))
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            pass
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _answer(
        self, method: str, target: str, head: Any, body: bytes
    ) -> tuple[int, bytes, str]:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        if path == TRACES_PATH:
            if method != "POST":
                return 405, b"POST OTLP/protobuf here\n", "text/plain"
            return await self._export(head.headers, body)
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/api/traces":
            if method == "DELETE":
                self.store.clear()
                return _json(200, {"cleared": True})
            if method != "GET":
                return 405, b"GET or DELETE\n", "text/plain"
            limit = parse_qs(url.query).get("limit", [""])[0]
            return _json(200, self.store.summaries(int(limit) if limit.isdigit() else None))
        if path.startswith("/api/traces/") and method == "GET":
            trace_id = path.removeprefix("/api/traces/")
            spans = self.store.trace(trace_id)
            if spans is None:
                return _json(404, {"error": f"no trace {trace_id} held"})
            return _json(200, {"traceId": trace_id.lower(), "spans": spans})
        return _json(404, {"error": f"no such path {url.path}"})

    async def _export(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != CONTENT_TYPE:
            return 415, b"only application/x-protobuf OTLP is accepted\n", "text/plain"
        if headers.get("content-encoding", "").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                return 400, b"bad gzip body\n", "text/plain"
        try:
            spans = spans_of(ExportTraceServiceRequest.FromString(body))
        except DecodeError as e:
            return 400, f"not an ExportTraceServiceRequest: {e}\n".encode(), "text/plain"
        self.store.add(spans)
        await self.store.notify()
        return 200, response(), CONTENT_TYPE


# --- running it -------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _show(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _run(args: argparse.Namespace) -> None:
    receiver = OtlpReceiver(TraceStore(args.max_spans))
    host, port = args.listen
    await receiver.start(host, port, grpc=args.grpc_listen)
    assert receiver.http_address is not None
    ready = {
        "http": _show(receiver.http_address),
        "grpc": _show(receiver.grpc_address) if receiver.grpc_address else None,
    }
    print(json.dumps(ready), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await receiver.stop()


@dataclass
class Launched:
    """A receiver started by `launch` in another process."""

    process: subprocess.Popen[str]
    http: tuple[str, int]
    grpc: tuple[str, int] | None

    @property
    def url(self) -> str:
        return f"http://{_show(self.http)}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def launch(
    listen: str = "127.0.0.1:0",
    *,
    grpc_listen: str | None = None,
    max_spans: int = DEFAULT_MAX_SPANS,
    python: str = sys.executable,
    prefix: Sequence[str] = (),
    timeout: float = 30.0,
) -> Launched:
    """Start ``python -m weft.lab.otlp`` (behind ``prefix``, e.g. a command that enters a
    network namespace) and wait until it listens; raises RuntimeError if it does not."""
    argv = [*prefix, python, "-m", "weft.lab.otlp", "--listen", listen]
    argv += ["--max-spans", str(max_spans)]
    if grpc_listen:
        argv += ["--grpc-listen", grpc_listen]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(timeout) else ""
    if not line:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(
            f"the OTLP receiver ({' '.join(argv)}) did not start within {timeout:g}s "
            f"(exit status {proc.returncode}); is the address free?"
        )
    ready = json.loads(line)
    return Launched(
        proc, _address(ready["http"]), _address(ready["grpc"]) if ready["grpc"] else None
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m weft.lab.otlp", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 4318),
                   help="OTLP/HTTP and JSON API address (default 127.0.0.1:4318)")  # fmt: skip
    p.add_argument("--grpc-listen", type=_address, default=None,
                   help="also serve OTLP/gRPC here (grpcio), e.g. 127.0.0.1:4317")  # fmt: skip
    p.add_argument("--max-spans", type=int, default=DEFAULT_MAX_SPANS,
                   help=f"spans kept in memory (default {DEFAULT_MAX_SPANS})")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(_run(args))
    except OSError as e:
        sys.exit(f"otlp receiver: cannot listen: {e}")


if __name__ == "__main__":
    main()
