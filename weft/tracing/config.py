"""Tracing configuration: one typed object, validated once, parsed from a mapping.

The agent's environment (or the lab's settings) is a ``Mapping[str, str]``; tests pass a
dict.  Keys:

``WEFT_TRACE_COLLECTOR``
    ``host:port`` of an OTLP receiver (OpenTelemetry Collector, Jaeger, Tempo); a
    ``http://host:port`` form is accepted.  Unset: tracing is off and trace headers pass
    through untouched.
``WEFT_TRACE_PROTOCOL``
    ``http`` (OTLP/HTTP protobuf to ``/v1/traces``, default; port 4318 by convention)
    or ``grpc`` (OTLP/gRPC, port 4317; needs grpcio).
``WEFT_TRACE_SAMPLE_RATE``
    0..1: the share of requests *without* a sampling decision that start a trace.
    Default 0: only requests the caller sampled are traced.
``WEFT_TRACE_QUEUE``, ``WEFT_TRACE_BATCH``, ``WEFT_TRACE_INTERVAL``,
``WEFT_TRACE_TIMEOUT``
    Exporter bounds: see the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class TracingConfigError(ValueError):
    pass


PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class TracingConfig:
    collector: tuple[str, int] | None = None
    """(host, port) of the OTLP receiver; None: tracing off."""
    protocol: str = "http"
    """``http`` (OTLP/HTTP protobuf) or ``grpc``."""
    sample_rate: float = 0.0
    """Share of requests without an incoming decision that start a trace."""
    max_queue: int = 2048
    """Spans waiting for export at most; more are dropped and counted
    (``weft_trace_spans_dropped_total{reason="queue-full"}``), never waited for."""
    batch_size: int = 512
    """Spans per export request at most; a full batch is sent at once."""
    batch_interval: float = 1.0
    """Seconds a span waits at most for its batch to fill."""
    export_timeout: float = 5.0
    """Seconds one export request (connect, send, answer) may take."""
    retry_for: float = 30.0
    """Seconds a batch is retried (with backoff) while the collector fails; then it is
    dropped (``reason="export-failed"``)."""
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    shutdown_timeout: float = 2.0
    """On shutdown, seconds spent flushing the queue at most."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise TracingConfigError(
                f"trace protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if not 0.0 <= self.sample_rate <= 1.0:
            raise TracingConfigError(f"trace sample rate must be 0..1, got {self.sample_rate}")
        if self.max_queue < 1 or self.batch_size < 1:
            raise TracingConfigError("trace queue and batch sizes must be at least 1")
        for name in ("batch_interval", "export_timeout", "retry_for", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise TracingConfigError(f"trace {name.replace('_', ' ')} must be positive")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise TracingConfigError("trace backoff: 0 < initial <= max is needed")

    @property
    def enabled(self) -> bool:
        return self.collector is not None

    @property
    def collector_url(self) -> str:
        """What logs and docs call the collector (``http://host:port/v1/traces``)."""
        if self.collector is None:
            return "(none)"
        host, port = self.collector
        shown = f"[{host}]" if ":" in host else host
        if self.protocol == "grpc":
            return f"grpc://{shown}:{port}"
        return f"http://{shown}:{port}/v1/traces"

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> TracingConfig:
        def number(key: str, default: float) -> float:
            raw = env.get(key, "").strip()
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise TracingConfigError(f"${key} must be a number, got {raw!r}") from None

        def whole(key: str, default: int) -> int:
            value = number(key, default)
            if value != int(value):
                raise TracingConfigError(f"${key} must be a whole number, got {value}")
            return int(value)

        protocol = env.get("WEFT_TRACE_PROTOCOL", "").strip().lower() or "http"
        raw = env.get("WEFT_TRACE_COLLECTOR", "").strip()
        collector = parse_address(raw, 4317 if protocol == "grpc" else 4318) if raw else None
        return cls(
            collector=collector,
            protocol=protocol,
            sample_rate=number("WEFT_TRACE_SAMPLE_RATE", 0.0),
            max_queue=whole("WEFT_TRACE_QUEUE", cls.max_queue),
            batch_size=whole("WEFT_TRACE_BATCH", cls.batch_size),
            batch_interval=number("WEFT_TRACE_INTERVAL", cls.batch_interval),
            export_timeout=number("WEFT_TRACE_TIMEOUT", cls.export_timeout),
        )


def parse_address(raw: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` (the default port) or the same behind
    ``http://`` (a path, if given, must be empty or ``/v1/traces``)."""
    text = raw.strip()
    for scheme in ("http://", "grpc://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text, _, path = text.partition("/")
    if path not in ("", "v1/traces"):
        raise TracingConfigError(
            f"collector address {raw!r}: give host:port (the path is always /v1/traces)"
        )
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if sep else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise TracingConfigError(f"collector address {raw!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TracingConfigError(f"collector address {raw!r}: bad port {port_text!r}")
    return host, int(port_text)
