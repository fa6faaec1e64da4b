"""Distributed tracing for the proxy, sans-I/O: trace-context propagation (W3C Trace
Context and B3), the per-hop sampling decision, the span model and its OTLP encoding.

The data path uses `Tracer` (one per node) and `Hop` (one per traced request); the node
agent's exporter (`nodeagent.tracing`) sends the spans; `weft.lab.otlp` is a receiver
for tests and the lab.  Nothing here opens a socket or imports asyncio (import-linter
checks it), so every piece is tested, fuzzed and benchmarked in memory.
"""

from weft.tracing.config import TracingConfig, TracingConfigError
from weft.tracing.hop import TRACE_HEADERS, Headers, Hop, Sampler, Tracer
from weft.tracing.otlp import Resource, decode, encode
from weft.tracing.span import Attr, AttrValue, Span, SpanKind, StatusCode, status_for_http

__all__ = [
    "TRACE_HEADERS",
    "Attr",
    "AttrValue",
    "Headers",
    "Hop",
    "Resource",
    "Sampler",
    "Span",
    "SpanKind",
    "StatusCode",
    "Tracer",
    "TracingConfig",
    "TracingConfigError",
    "decode",
    "encode",
    "status_for_http",
]
