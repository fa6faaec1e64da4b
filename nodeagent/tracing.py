"""The node agent's span exporter: OTLP to a collector, off the hot path.

The data path calls `TraceExporter.record` with a finished span.  That is a bounded
``deque.append`` and an int compare — no lock, no await, no I/O — and when the queue
is full the span is dropped and counted, never waited for: a collector that is slow or
down costs a request nothing but its span.

One background task (`TraceExporter.run`, named ``trace-exporter``) takes batches (up
to ``batch_size`` spans, or whatever came within ``batch_interval`` of the first),
encodes them a slice at a time (yielding between slices, so the event loop the proxy
shares is never held for more than a fraction of a millisecond) and sends them with a
`Sender`:

* `OtlpHttpSender` — OTLP/HTTP protobuf, ``POST /v1/traces`` over a small HTTP/1.1
  client of its own (a connection per export: batches are at most one a second per
  node at low rates, so a pool would buy little and add a failure mode);
* `OtlpGrpcSender` — OTLP/gRPC ``TraceService/Export`` with grpcio, when installed.

Failures follow the OTLP specification's advice: connection errors, timeouts, 429,
502, 503 and 504 (gRPC: UNAVAILABLE, RESOURCE_EXHAUSTED, ...) are retried with
exponential backoff and jitter (``Retry-After`` honoured, capped) for up to
``retry_for`` seconds, then the batch is dropped; any other answer drops it at once.
A failure episode is logged once, naming the collector, and its end once, with what it
cost.  Backoff persists across batches until an export succeeds, so a dead collector
sees a probe every ``backoff_max`` seconds at most, not one per batch.

Series (``_total`` added by the exposition):

* ``weft_trace_spans_exported_total`` — spans the collector accepted;
* ``weft_trace_spans_dropped_total{reason}`` — ``queue-full`` (recorded while the queue
  was full), ``export-failed`` (the batch could not be delivered), ``rejected`` (the
  collector answered with a partial success rejecting them), ``shutdown`` (still queued
  when the flush deadline passed);
* ``weft_trace_export_failures_total`` — export requests that failed;
* ``weft_trace_queue_spans`` — spans waiting now.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from weft.tracing import Resource, Span, TracingConfig
from weft.tracing.otlp import CONTENT_TYPE, TRACES_PATH, RequestBuilder, rejected_spans

log = logging.getLogger("weft.tracing")

ENCODE_SLICE = 32
"""Spans encoded between two yields to the event loop (about 1 ms of work)."""
MAX_RESPONSE_BODY = 64 * 1024
GRPC_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

QUEUE_FULL = "queue-full"
EXPORT_FAILED = "export-failed"
REJECTED = "rejected"
SHUTDOWN = "shutdown"
DROP_REASONS = (QUEUE_FULL, EXPORT_FAILED, REJECTED, SHUTDOWN)


@dataclass(frozen=True)
class Outcome:
    """What one export request came to."""

    ok: bool
    retryable: bool = False
    reason: str = ""
    """Why it failed, for the log (``connection refused``, ``HTTP 503``...)."""
    retry_after: float | None = None
    """Seconds the collector asked us to wait (``Retry-After``)."""
    rejected: int = 0
    """Spans a successful answer said it rejected (partial success)."""
    message: str = ""


class Sender(Protocol):
    address: str
    """The collector as logs name it."""

    async def send(self, body: bytes, within: float) -> Outcome: ...

    async def close(self) -> None: ...


# --- OTLP/HTTP --------------------------------------------------------------------------


RETRYABLE_HTTP = frozenset({408, 429, 502, 503, 504})


class OtlpHttpSender:
    """``POST /v1/traces`` with a protobuf body, one connection per export."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.address = f"http://{shown}:{port}{TRACES_PATH}"
        self._head = (
            f"POST {TRACES_PATH} HTTP/1.1\r\n"
            f"Host: {shown}:{port}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\n"
            "User-Agent: weft-proxy\r\n"
            "Connection: close\r\n"
        ).encode("ascii")

    async def send(self, body: bytes, within: float) -> Outcome:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(within):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                status, headers, answer = await read_response(reader)
        except TimeoutError:
            return Outcome(False, True, f"no answer within {within:g}s")
        except ConnectionRefusedError:
            return Outcome(False, True, "connection refused")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            return Outcome(False, True, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        except ValueError as e:
            return Outcome(False, True, f"not an HTTP answer: {e}")
        finally:
            if writer is not None:
                writer.transport.abort()
        if 200 <= status < 300:
            rejected, message = rejected_spans(answer)
            return Outcome(True, rejected=rejected, message=message)
        detail = answer[:200].decode("utf-8", "replace").strip()
        reason = f"HTTP {status}" + (f": {detail}" if detail else "")
        return Outcome(
            False, status in RETRYABLE_HTTP, reason, _retry_after(headers.get("retry-after"))
        )

    async def close(self) -> None:
        pass


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None  # the HTTP-date form is not worth a parser here: our backoff applies
    return float(value.strip())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body up to `MAX_RESPONSE_BODY`) of one HTTP/1.x
    answer; raises ValueError for something that is not one.  Tolerant where a
    collector may differ (chunked or close-delimited bodies): only the status matters."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    status = int(code)
    length = headers.get("content-length")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif length is not None and length.isdigit():
        n = int(length)
        body = await reader.readexactly(n) if n <= MAX_RESPONSE_BODY else b""
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await _read_to_eof(reader)
    return status, headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while len(body) <= MAX_RESPONSE_BODY:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    return body


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while len(body) <= MAX_RESPONSE_BODY:
        chunk = await reader.read(MAX_RESPONSE_BODY)
        if not chunk:
            break
        body += chunk
    return body


# --- OTLP/gRPC --------------------------------------------------------------------------


RETRYABLE_GRPC = frozenset(
    {"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "OUT_OF_RANGE",
     "UNAVAILABLE", "DATA_LOSS"}
)  # fmt: skip
"""The codes the OTLP specification calls retryable."""


class OtlpGrpcSender:
    """``TraceService/Export`` over an insecure gRPC channel (grpcio, the ``lab`` extra).
    The body is already the serialized request, so the call passes bytes through."""

    def __init__(self, host: str, port: int) -> None:
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "OTLP/gRPC needs grpcio (pip install grpcio, or the weft[lab] extra); "
                "or use the HTTP protocol (port 4318)"
            ) from None
        shown = f"[{host}]" if ":" in host else host
        self.target = f"{shown}:{port}"
        self.address = f"grpc://{self.target}"
        self._channel: Any = None
        self._export: Any = None

    async def send(self, body: bytes, within: float) -> Outcome:
        import grpc

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._export = self._channel.unary_unary(GRPC_EXPORT)
        try:
            answer: bytes = await self._export(body, timeout=within)
        except grpc.aio.AioRpcError as e:
            name = e.code().name
            return Outcome(False, name in RETRYABLE_GRPC, f"gRPC {name}: {e.details()}")
        rejected, message = rejected_spans(answer)
        return Outcome(True, rejected=rejected, message=message)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def sender_for(config: TracingConfig) -> Sender:
    if config.collector is None:
        raise ValueError("tracing is off: no collector configured")
    host, port = config.collector
    if config.protocol == "grpc":
        return OtlpGrpcSender(host, port)
    return OtlpHttpSender(host, port)


# --- metrics ----------------------------------------------------------------------------


class TraceMetrics(Collector):
    """Plain ints on the hot path; families built only when scraped."""

    def __init__(self, queued: Callable[[], int]) -> None:
        self.exported = 0
        self.failures = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._queued = queued

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "weft_trace_spans_exported", "Spans the trace collector accepted.", value=self.exported
        )
        dropped = CounterMetricFamily(
            "weft_trace_spans_dropped",
            "Spans not delivered to the trace collector, by why.",
            labels=["reason"],
        )
        for reason, n in self.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily(
            "weft_trace_export_failures",
            "Export requests to the trace collector that failed.",
            value=self.failures,
        )
        yield GaugeMetricFamily(
            "weft_trace_queue_spans", "Spans waiting to be exported.", value=self._queued()
        )


# --- the exporter -----------------------------------------------------------------------


class TraceExporter:
    """Bounded queue → batches → OTLP.  `record` is for the event loop's thread only."""

    def __init__(
        self,
        config: TracingConfig,
        resource: Resource,
        *,
        sender: Sender | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.resource = resource
        self.sender = sender if sender is not None else sender_for(config)
        self.metrics = TraceMetrics(lambda: len(self._queue))
        if registry is not None:
            registry.register(self.metrics)
        self._queue: collections.deque[Span] = collections.deque()
        self._max = config.max_queue
        self._batch = config.batch_size
        self._dropped = self.metrics.dropped
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._clock = clock
        self._jitter = jitter
        self._delay = 0.0
        """Current backoff (0: the last export succeeded)."""
        self._failing: str | None = None
        """The failure episode's first reason, while one lasts."""
        self._episode_failures = 0
        self._episode_drops = 0
        self._task: asyncio.Task[None] | None = None

    # The hot path ------------------------------------------------------------------

    def record(self, span: Span) -> None:
        """Queue ``span`` for export, or drop and count it when the queue is full."""
        queue = self._queue
        n = len(queue)
        if n >= self._max:
            self._dropped[QUEUE_FULL] += 1
            return
        queue.append(span)
        if n == 0 or n + 1 == self._batch:
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # The background task ------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the exporter as the named task ``trace-exporter`` (the caller guards it)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="trace-exporter")
        return self._task

    async def run(self) -> None:
        """Until `close`: wait for a batch, export it; then flush what is left."""
        log.info(
            "tracing: exporting spans to %s (batches of %d, every %gs; queue %d)",
            self.sender.address,
            self._batch,
            self.config.batch_interval,
            self._max,
        )
        try:
            while not self._closing.is_set():
                await self._next_batch()
                if self._queue:
                    await self._export(self._take())
            while self._queue:
                await self._export(self._take())
        finally:
            await self.sender.close()

    async def close(self) -> None:
        """Stop, flushing what can be sent within ``shutdown_timeout``; what is left is
        counted as dropped (``shutdown``)."""
        self._closing.set()
        self._wake.set()
        task = self._task
        if task is None:
            self._dropped[SHUTDOWN] += len(self._queue)
            self._queue.clear()
            await self.sender.close()
            return
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        left = len(self._queue)
        if left:
            self._dropped[SHUTDOWN] += left
            self._queue.clear()
            log.warning(
                "tracing: %d spans not exported to %s before the shutdown deadline",
                left,
                self.sender.address,
            )

    async def _next_batch(self) -> None:
        queue, wake = self._queue, self._wake
        if not queue:
            wake.clear()
            await wake.wait()
        if len(queue) >= self._batch or self._closing.is_set():
            return
        try:
            async with asyncio.timeout(self.config.batch_interval):
                while len(queue) < self._batch and not self._closing.is_set():
                    wake.clear()
                    await wake.wait()
        except TimeoutError:
            pass

    def _take(self) -> list[Span]:
        queue = self._queue
        n = min(len(queue), self._batch)
        return [queue.popleft() for _ in range(n)]

    async def _encode(self, batch: list[Span]) -> bytes:
        builder = RequestBuilder(self.resource)
        for i in range(0, len(batch), ENCODE_SLICE):
            builder.add(batch[i : i + ENCODE_SLICE])
            await asyncio.sleep(0)
        return builder.encode()

    async def _export(self, batch: list[Span]) -> None:
        cfg = self.config
        try:
            body = await self._encode(batch)
        except Exception:
            log.exception("tracing: encoding %d spans failed; dropped", len(batch))
            self._dropped[EXPORT_FAILED] += len(batch)
            return
        give_up = self._clock() + cfg.retry_for
        while True:
            outcome = await self.sender.send(body, cfg.export_timeout)
            if outcome.ok:
                self._succeeded(len(batch), outcome)
                return
            self._failed(outcome)
            delay = self._next_delay(outcome.retry_after)
            if not outcome.retryable or self._closing.is_set() or self._clock() + delay > give_up:
                self._drop(len(batch))
                return
            try:
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            except TimeoutError:
                pass
            if self._closing.is_set():
                # One last try for this batch, without waiting out the backoff.
                outcome = await self.sender.send(body, min(cfg.export_timeout, 1.0))
                if outcome.ok:
                    self._succeeded(len(batch), outcome)
                else:
                    self._drop(len(batch))
                return

    def _next_delay(self, retry_after: float | None) -> float:
        cfg = self.config
        self._delay = min(cfg.backoff_max, max(cfg.backoff_initial, self._delay * 2))
        delay = self._delay * (0.5 + 0.5 * self._jitter())
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max))
        return delay

    def _drop(self, n: int) -> None:
        self._dropped[EXPORT_FAILED] += n
        self._episode_drops += n

    def _succeeded(self, n: int, outcome: Outcome) -> None:
        m = self.metrics
        m.exported += n - outcome.rejected
        if outcome.rejected:
            self._dropped[REJECTED] += outcome.rejected
            log.warning(
                "tracing: %s rejected %d of %d spans: %s",
                self.sender.address,
                outcome.rejected,
                n,
                outcome.message or "(no reason given)",
            )
        self._delay = 0.0
        if self._failing is not None:
            log.warning(
                "tracing: export to %s works again after %d failed attempts (%d spans "
                "dropped meanwhile, queue-full drops not included)",
                self.sender.address,
                self._episode_failures,
                self._episode_drops,
            )
            self._failing = None
            self._episode_failures = self._episode_drops = 0

    def _failed(self, outcome: Outcome) -> None:
        self.metrics.failures += 1
        self._episode_failures += 1
        if self._failing is None:
            self._failing = outcome.reason
            log.warning(
                "tracing: export to %s failed (%s); %s, and spans are dropped "
                "(weft_trace_spans_dropped_total) while this lasts — requests are not "
                "affected. Check that the collector listens there.",
                self.sender.address,
                outcome.reason,
                "retrying with backoff" if outcome.retryable else "not retrying this batch",
            )
