"""HTTP golden metrics of the node proxy, with Linkerd's names and bounded cardinality.

Series (Prometheus names; ``_total`` is added by the exposition):

* ``request_total`` — requests the proxy received, counted as each one ends (so its
  series names the endpoint it was balanced to);
* ``response_total`` — responses, with ``classification`` (``success``/``failure``),
  ``status_code`` and ``grpc_status`` (empty for non-gRPC), ``error`` (the
  ``weft-proxy-error`` token when the proxy answered itself, else empty);
* ``response_latency_ms`` — histogram (Linkerd's buckets) of the time from the request
  head to the response head, as the proxy sees it.

Labels as the TCP metrics (`nodeagent.metrics`) plus ``authority`` (the Host header, or
the original destination address when there is none): ``direction``,
``authority``, ``src_workload``, ``src_namespace``, ``dst_workload``, ``dst_namespace``,
``tls``, ``client_id``, ``server_id``. Outbound, ``dst_workload`` is the endpoint the
request was balanced to; inbound, the source is named by the client's identity (its
service account), which the tunnel proved.

Classification follows Linkerd: a response is a failure when its status is 5xx, or, for
gRPC, when ``grpc-status`` (in the head or the trailers) is not 0; a request that got no
response (reset) is a failure with status_code empty.

Cardinality: one series per label set; past ``max_series`` label sets new ones are
counted under ``overflow="true"`` (``weft_metrics_overflow_total{kind="http"}``). The
``authority`` label comes from the client, so the cap is what bounds it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

DEFAULT_MAX_SERIES = 5_000

LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)  # fmt: skip
"""linkerd2-proxy's ``response_latency_ms`` buckets."""


class HttpLabels(NamedTuple):
    direction: str
    authority: str
    src_workload: str
    src_namespace: str
    dst_workload: str
    dst_namespace: str
    tls: str
    client_id: str
    server_id: str

    @property
    def overflow(self) -> bool:
        return self.direction == ""


OVERFLOW = HttpLabels("", "", "", "", "", "", "", "", "")
_LABELS = [*HttpLabels._fields, "overflow"]


class _Outcome(NamedTuple):
    classification: str
    status_code: str
    grpc_status: str
    error: str


@dataclass
class _Series:
    requests: int = 0
    responses: dict[_Outcome, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum: float = 0.0


def classify(status: int | None, grpc_status: str) -> str:
    if status is None or status >= 500:
        return "failure"
    if grpc_status and grpc_status != "0":
        return "failure"
    return "success"


class HttpMetrics(Collector):
    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_series = max_series
        self._series: dict[HttpLabels, _Series] = {}
        self._outcomes: dict[tuple[int | None, str, str], _Outcome] = {}
        self.overflowed = 0

    def _get(self, labels: HttpLabels) -> _Series:
        series = self._series.get(labels)
        if series is None:
            real = len(self._series) - (OVERFLOW in self._series)
            if real >= self.max_series:
                self.overflowed += 1
                labels = OVERFLOW
                series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = _Series()
        return series

    def record(
        self,
        labels: HttpLabels,
        *,
        status: int | None,
        grpc_status: str = "",
        latency: float | None,
        error: str = "",
    ) -> None:
        """One request and its outcome: ``status`` None when no response came (reset),
        ``latency`` in seconds to the response head (None: none came)."""
        series = self._get(labels)
        series.requests += 1
        key = (status, grpc_status, error)
        outcome = self._outcomes.get(key)
        if outcome is None:
            outcome = _Outcome(
                classify(status, grpc_status), str(status) if status else "", grpc_status, error
            )
            if len(self._outcomes) < 1024:  # grpc_status comes from the upstream
                self._outcomes[key] = outcome
        series.responses[outcome] = series.responses.get(outcome, 0) + 1
        if latency is not None:
            ms = latency * 1000.0
            series.buckets[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
            series.latency_sum += ms

    def prune(self, known: Callable[[str, str], bool]) -> int:
        """Drop series whose destination pod (or outbound source pod) is gone."""

        def stale(k: HttpLabels) -> bool:
            if k.dst_workload and not known(k.dst_namespace, k.dst_workload):
                return True
            return (
                k.direction == "outbound"
                and bool(k.src_workload)
                and not known(k.src_namespace, k.src_workload)
            )

        gone = [k for k in self._series if not k.overflow and stale(k)]
        for k in gone:
            del self._series[k]
        return len(gone)

    @property
    def series(self) -> int:
        return len(self._series)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "request", "HTTP requests received by the node proxy.", labels=_LABELS
        )
        responses = CounterMetricFamily(
            "response",
            "HTTP responses (and requests that got none), classified.",
            labels=[*_LABELS, "classification", "status_code", "grpc_status", "error"],
        )
        latency = HistogramMetricFamily(
            "response_latency_ms",
            "Time from the request head to the response head, milliseconds.",
            labels=_LABELS,
        )
        for labels, s in list(self._series.items()):
            values = [*labels, "true" if labels.overflow else "false"]
            requests.add_metric(values, s.requests)
            for outcome, n in s.responses.items():
                responses.add_metric([*values, *outcome], n)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(LATENCY_BUCKETS_MS, s.buckets, strict=False):
                cumulative += n
                buckets.append((str(bound), cumulative))
            cumulative += s.buckets[-1]
            buckets.append(("+Inf", cumulative))
            latency.add_metric(values, buckets, s.latency_sum)
        yield requests
        yield responses
        yield latency
        over = CounterMetricFamily(
            "weft_http_metrics_overflow",
            "HTTP requests counted under overflow=true because the series cap was reached.",
        )
        over.add_metric([], self.overflowed)
        yield over
