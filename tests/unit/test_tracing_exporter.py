"""The span exporter against a scripted sender (no sockets): the bounded queue, batching
by size and time, retries and backoff, drops counted by reason, one log line per failure
episode, and the flush on close."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.tracing import (
    EXPORT_FAILED,
    QUEUE_FULL,
    REJECTED,
    SHUTDOWN,
    Outcome,
    TraceExporter,
    _retry_after,
)
from weft.tracing import Resource, Span, SpanKind, TracingConfig, decode


def span(i: int = 1) -> Span:
    return Span("outbound", SpanKind.CLIENT, 0xABC, i, 0, 1_000, 2_000, {"i": i})


class ScriptedSender:
    address = "http://collector.test:4318/v1/traces"

    def __init__(self, *outcomes: Outcome, delay: float = 0.0) -> None:
        self.script = list(outcomes)
        self.bodies: list[bytes] = []
        self.attempts = 0
        self.delay = delay
        self.closed = False

    async def send(self, body: bytes, within: float) -> Outcome:
        self.attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        outcome = self.script.pop(0) if self.script else Outcome(True)
        if outcome.ok:
            self.bodies.append(body)
        return outcome

    async def close(self) -> None:
        self.closed = True

    def spans(self) -> list[int]:
        return [int(s["spanId"], 16) for body in self.bodies for s in decode(body)]


def config(**kw) -> TracingConfig:
    base = dict(
        collector=("collector.test", 4318),
        batch_size=10,
        batch_interval=0.2,
        backoff_initial=0.01,
        backoff_max=0.05,
        retry_for=5.0,
        shutdown_timeout=2.0,
    )
    base.update(kw)
    return TracingConfig(**base)  # type: ignore[arg-type]


async def until(predicate, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (state of another task)
            await asyncio.sleep(0.01)


def test_record_is_bounded_and_counts_drops():
    # No task runs: the queue fills, then every further span is dropped and counted.
    exporter = TraceExporter(config(max_queue=100), Resource(), sender=ScriptedSender())
    for i in range(10_000):
        exporter.record(span(i + 1))
    assert exporter.queued == 100
    assert exporter.metrics.dropped[QUEUE_FULL] == 9_900


async def test_batches_by_size_then_by_time():
    sender = ScriptedSender()
    exporter = TraceExporter(config(batch_interval=0.5), Resource(), sender=sender)
    task = exporter.start()
    for i in range(25):
        exporter.record(span(i + 1))
    await until(lambda: len(sender.bodies) == 2, within=0.45)  # two full batches at once
    assert sender.spans() == list(range(1, 21))
    await until(lambda: len(sender.bodies) == 3)  # the rest when the interval passed
    assert sender.spans() == list(range(1, 26))
    assert exporter.metrics.exported == 25
    await exporter.close()
    assert task.done() and sender.closed


async def test_retries_with_backoff_and_logs_one_line_per_episode(caplog):
    caplog.set_level(logging.INFO, "weft.tracing")
    failing = Outcome(False, True, "connection refused")
    sender = ScriptedSender(failing, failing, failing, Outcome(True))
    exporter = TraceExporter(config(), Resource(), sender=sender)
    exporter.start()
    for i in range(3):
        exporter.record(span(i + 1))
    await until(lambda: exporter.metrics.exported == 3)
    assert sender.attempts == 4
    assert exporter.metrics.failures == 3
    failed = [r for r in caplog.records if "failed (" in r.getMessage()]
    assert len(failed) == 1
    assert "http://collector.test:4318/v1/traces" in failed[0].getMessage()
    assert "connection refused" in failed[0].getMessage()
    assert sum("works again after 3 failed attempts" in r.getMessage() for r in caplog.records) == 1
    await exporter.close()


async def test_non_retryable_answers_drop_the_batch_at_once():
    sender = ScriptedSender(Outcome(False, False, "HTTP 400: bad"))
    exporter = TraceExporter(config(), Resource(), sender=sender)
    exporter.start()
    exporter.record(span())
    await until(lambda: exporter.metrics.dropped[EXPORT_FAILED] == 1)
    assert sender.attempts == 1
    exporter.record(span(2))
    await until(lambda: exporter.metrics.exported == 1)
    await exporter.close()


async def test_a_batch_is_given_up_after_retry_for():
    sender = ScriptedSender(*[Outcome(False, True, "HTTP 503")] * 1000)
    exporter = TraceExporter(config(retry_for=0.2), Resource(), sender=sender)
    exporter.start()
    for i in range(4):
        exporter.record(span(i + 1))
    await until(lambda: exporter.metrics.dropped[EXPORT_FAILED] == 4)
    assert 2 <= sender.attempts < 100
    await exporter.close()


async def test_partial_success_counts_rejected():
    sender = ScriptedSender(Outcome(True, rejected=2, message="too old"))
    exporter = TraceExporter(config(), Resource(), sender=sender)
    exporter.start()
    for i in range(5):
        exporter.record(span(i + 1))
    await until(lambda: exporter.metrics.exported == 3)
    assert exporter.metrics.dropped[REJECTED] == 2
    await exporter.close()


async def test_close_flushes_what_is_queued():
    sender = ScriptedSender()
    exporter = TraceExporter(config(batch_interval=60), Resource(), sender=sender)
    exporter.start()
    for i in range(5):
        exporter.record(span(i + 1))
    await asyncio.sleep(0.05)
    assert sender.bodies == []  # waiting for the batch to fill
    await exporter.close()
    assert sender.spans() == [1, 2, 3, 4, 5]


async def test_close_gives_up_at_its_deadline():
    sender = ScriptedSender(delay=30)
    exporter = TraceExporter(config(batch_size=2, shutdown_timeout=0.3), Resource(), sender=sender)
    exporter.start()
    for i in range(6):
        exporter.record(span(i + 1))
    await until(lambda: sender.attempts == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await exporter.close()
    assert loop.time() - started < 5
    assert exporter.metrics.dropped[SHUTDOWN] == 4
    assert exporter.queued == 0


async def test_close_without_a_task_counts_the_queue():
    exporter = TraceExporter(config(), Resource(), sender=ScriptedSender())
    exporter.record(span())
    await exporter.close()
    assert exporter.metrics.dropped[SHUTDOWN] == 1


def test_metrics_exposition():
    registry = CollectorRegistry()
    exporter = TraceExporter(config(max_queue=1), Resource(), sender=ScriptedSender(),
                             registry=registry)  # fmt: skip
    exporter.record(span())
    exporter.record(span())
    text = generate_latest(registry).decode()
    assert 'weft_trace_spans_dropped_total{reason="queue-full"} 1.0' in text
    assert "weft_trace_spans_exported_total 0.0" in text
    assert "weft_trace_export_failures_total 0.0" in text
    assert "weft_trace_queue_spans 1.0" in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 10 ", 10.0), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)
def test_retry_after(value, expected):
    assert _retry_after(value) == expected


def test_grpc_sender_needs_nothing_until_used():
    from nodeagent.tracing import sender_for

    grpc = sender_for(config(protocol="grpc", collector=("127.0.0.1", 4317)))
    assert grpc.address == "grpc://127.0.0.1:4317"
    http = sender_for(config(collector=("::1", 4318)))
    assert http.address == "http://[::1]:4318/v1/traces"
    with pytest.raises(ValueError, match="off"):
        sender_for(TracingConfig())
