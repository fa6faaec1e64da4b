"""Golden TCP metrics of the node proxy, with bounded label cardinality.

Series (Prometheus names; the ``_total`` suffix is added by the exposition):

* ``tcp_open_total`` / ``tcp_close_total`` — connections opened / closed;
* ``tcp_open_connections`` — open now;
* ``tcp_read_bytes_total`` — bytes the proxy read from the connection's *source side*
  (outbound: the local app; inbound: the tunnel from the remote proxy);
* ``tcp_write_bytes_total`` — bytes it wrote back to the source side.

Labels: ``direction`` (outbound/inbound), ``src_workload``, ``src_namespace``,
``dst_workload``, ``dst_namespace`` (pod names; ``unknown`` when discovery has none; an
inbound connection's source is named by its service account: the tunnel proves the
client's identity, not which of its pods connected),
``tls`` (true when the connection crossed nodes in the mTLS tunnel), ``client_id`` and
``server_id`` (SPIFFE IDs of the two ends, empty for plaintext).

Cardinality: a series exists per distinct label set seen.  Pods come and go, so series
of closed connections whose pods are no longer in discovery are dropped at the next
:meth:`TcpMetrics.prune` (the agent calls it on every discovery change), and the number
of series is capped at ``max_series``: beyond it, new label sets are counted under
``overflow="true"`` with every other label empty, and ``weft_metrics_overflow_total``
says so.  So a node's series are bounded by (local pods x pods they talk to), cut at the
cap.  Hot path cost: connection bytes are added to plain ints on a per-connection meter;
the collector sums them only when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DEFAULT_MAX_SERIES = 5_000


class ConnLabels(NamedTuple):
    direction: str
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


_LABEL_NAMES = [*ConnLabels._fields, "overflow"]
OVERFLOW = ConnLabels("", "", "", "", "", "", "", "")


@dataclass
class _Series:
    opened: int = 0
    closed: int = 0
    read: int = 0
    written: int = 0


class ConnMeter:
    """One connection's byte counts; a relay adds to it (``bytes_out``: read from the
    source side, ``bytes_in``: written back to it)."""

    __slots__ = ("_closed", "_metrics", "bytes_in", "bytes_out", "labels")

    def __init__(self, metrics: TcpMetrics, labels: ConnLabels) -> None:
        self.labels = labels
        self.bytes_out = 0
        self.bytes_in = 0
        self._metrics = metrics
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._metrics._close(self)


class TcpMetrics(Collector):
    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_series = max_series
        self._series: dict[ConnLabels, _Series] = {}
        self._live: dict[ConnLabels, set[ConnMeter]] = {}
        self.overflowed = 0

    def open(self, labels: ConnLabels) -> ConnMeter:
        real = len(self._series) - (OVERFLOW in self._series)
        if labels not in self._series and real >= self.max_series:
            self.overflowed += 1
            labels = OVERFLOW
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series()
        series.opened += 1
        meter = ConnMeter(self, labels)
        self._live.setdefault(labels, set()).add(meter)
        return meter

    def _close(self, meter: ConnMeter) -> None:
        series = self._series.setdefault(meter.labels, _Series())
        series.closed += 1
        series.read += meter.bytes_out
        series.written += meter.bytes_in
        live = self._live.get(meter.labels)
        if live is not None:
            live.discard(meter)
            if not live:
                del self._live[meter.labels]

    def prune(self, known: Callable[[str, str], bool]) -> int:
        """Drop series with no open connection whose source or destination pod
        (namespace, name) is no longer known; returns how many were dropped.  (Inbound
        sources are named by service account — the tunnel carries the client's identity,
        not its pod — so only their destination is checked.)"""

        def stale(k: ConnLabels) -> bool:
            if not known(k.dst_namespace, k.dst_workload):
                return True
            return k.direction == "outbound" and not known(k.src_namespace, k.src_workload)

        gone = [k for k in self._series if k not in self._live and not k.overflow and stale(k)]
        for k in gone:
            del self._series[k]
        return len(gone)

    @property
    def series(self) -> int:
        return len(self._series)

    def collect(self) -> Iterator[Metric]:
        families = {
            "opened": CounterMetricFamily(
                "tcp_open", "TCP connections opened by the node proxy.", labels=_LABEL_NAMES
            ),
            "closed": CounterMetricFamily(
                "tcp_close", "TCP connections closed by the node proxy.", labels=_LABEL_NAMES
            ),
            "read": CounterMetricFamily(
                "tcp_read_bytes",
                "Bytes read from the source side of proxied connections.",
                labels=_LABEL_NAMES,
            ),
            "written": CounterMetricFamily(
                "tcp_write_bytes",
                "Bytes written to the source side of proxied connections.",
                labels=_LABEL_NAMES,
            ),
        }
        open_now = GaugeMetricFamily(
            "tcp_open_connections", "TCP connections open now.", labels=_LABEL_NAMES
        )
        for labels, s in list(self._series.items()):
            live = self._live.get(labels, ())
            read = s.read + sum(m.bytes_out for m in live)
            written = s.written + sum(m.bytes_in for m in live)
            values = [*labels, "true" if labels.overflow else "false"]
            families["opened"].add_metric(values, s.opened)
            families["closed"].add_metric(values, s.closed)
            families["read"].add_metric(values, read)
            families["written"].add_metric(values, written)
            open_now.add_metric(values, s.opened - s.closed)
        yield from families.values()
        yield open_now
        over = CounterMetricFamily(
            "weft_metrics_overflow",
            "Connections counted under overflow=true because the series cap was reached.",
        )
        over.add_metric([], self.overflowed)
        yield over
