"""The node proxy's golden TCP metrics (nodeagent.metrics), scraped from a registry.

Counts and bytes as Prometheus sees them (live connections included), the series cap
and its overflow series, and pruning of series whose pods discovery no longer knows.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.metrics import OVERFLOW, ConnLabels, TcpMetrics

NO_IDS = ("", "")


def out(src: str, dst: str, ns: str = "shop") -> ConnLabels:
    return ConnLabels("outbound", src, ns, dst, ns, "false", *NO_IDS)


def inbound(src_sa: str, dst: str, ns: str = "shop") -> ConnLabels:
    return ConnLabels(
        "inbound", src_sa, ns, dst, ns, "true",
        f"spiffe://cluster.local/ns/{ns}/sa/{src_sa}",
        f"spiffe://cluster.local/ns/{ns}/sa/{dst}",
    )  # fmt: skip


class Scrape:
    def __init__(self, metrics: TcpMetrics) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(metrics)

    def __call__(self, name: str, labels: ConnLabels) -> float | None:
        values = dict(zip(ConnLabels._fields, labels, strict=True))
        values["overflow"] = "true" if labels.overflow else "false"
        return self.registry.get_sample_value(name, values)

    def all(self, labels: ConnLabels) -> dict[str, float | None]:
        return {
            n: self(n, labels)
            for n in (
                "tcp_open_total",
                "tcp_close_total",
                "tcp_open_connections",
                "tcp_read_bytes_total",
                "tcp_write_bytes_total",
            )
        }

    def overflowed(self) -> float | None:
        return self.registry.get_sample_value("weft_metrics_overflow_total")


def known_pods(*pods: tuple[str, str]) -> Callable[[str, str], bool]:
    """``known(namespace, name)`` as the agent builds it from discovery."""
    pod_set = set(pods)
    return lambda ns, name: (ns, name) in pod_set


@pytest.fixture
def metrics() -> TcpMetrics:
    return TcpMetrics(max_series=100)


@pytest.fixture
def scrape(metrics: TcpMetrics) -> Scrape:
    return Scrape(metrics)


# -- counts and bytes --------------------------------------------------------------------


def test_nothing_open_exposes_only_the_overflow_counter(scrape: Scrape) -> None:
    text = generate_latest(scrape.registry).decode()
    assert scrape.overflowed() == 0
    assert "tcp_open_total{" not in text
    assert "# TYPE tcp_open_connections gauge" in text
    assert "# TYPE tcp_open_total counter" in text


def test_open_and_close_counts(metrics: TcpMetrics, scrape: Scrape) -> None:
    lbl = out("web", "db")
    a, b, c = metrics.open(lbl), metrics.open(lbl), metrics.open(lbl)
    assert scrape.all(lbl) == {
        "tcp_open_total": 3,
        "tcp_close_total": 0,
        "tcp_open_connections": 3,
        "tcp_read_bytes_total": 0,
        "tcp_write_bytes_total": 0,
    }
    a.close()
    b.close()
    b.close()  # closing twice counts once
    assert scrape("tcp_close_total", lbl) == 2
    assert scrape("tcp_open_connections", lbl) == 1
    c.close()
    assert scrape("tcp_open_connections", lbl) == 0
    assert scrape("tcp_open_total", lbl) == 3
    assert metrics.series == 1


def test_label_sets_are_separate_series(metrics: TcpMetrics, scrape: Scrape) -> None:
    x, y = out("web", "db"), inbound("web", "db")
    metrics.open(x)
    metrics.open(y).close()
    assert scrape("tcp_open_connections", x) == 1
    assert scrape("tcp_open_connections", y) == 0
    assert scrape("tcp_close_total", y) == 1
    assert metrics.series == 2


def test_bytes_of_open_connections_are_visible_when_scraped(
    metrics: TcpMetrics, scrape: Scrape
) -> None:
    lbl = out("web", "db")
    m1, m2 = metrics.open(lbl), metrics.open(lbl)
    m1.bytes_out += 100  # read from the app
    m1.bytes_in += 7  # written back to it
    m2.bytes_out += 20
    assert scrape("tcp_read_bytes_total", lbl) == 120
    assert scrape("tcp_write_bytes_total", lbl) == 7
    m2.bytes_in += 1000
    assert scrape("tcp_write_bytes_total", lbl) == 1007  # a later scrape sees more
    m1.close()
    assert scrape("tcp_read_bytes_total", lbl) == 120  # folded into the series on close
    assert scrape("tcp_write_bytes_total", lbl) == 1007
    m2.close()
    assert scrape("tcp_read_bytes_total", lbl) == 120
    assert scrape("tcp_write_bytes_total", lbl) == 1007


def test_bytes_are_counted_once_even_if_a_meter_closes_twice(
    metrics: TcpMetrics, scrape: Scrape
) -> None:
    lbl = out("web", "db")
    m = metrics.open(lbl)
    m.bytes_out = 50
    m.close()
    m.close()
    assert scrape("tcp_read_bytes_total", lbl) == 50


def test_the_exposition_names_every_label(metrics: TcpMetrics, scrape: Scrape) -> None:
    metrics.open(inbound("client", "db"))
    text = generate_latest(scrape.registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("tcp_open_total{"))
    for name in [*ConnLabels._fields, "overflow"]:
        assert f"{name}=" in line
    assert 'direction="inbound"' in line
    assert 'client_id="spiffe://cluster.local/ns/shop/sa/client"' in line
    assert 'overflow="false"' in line
    assert line.endswith(" 1.0")


# -- the series cap ----------------------------------------------------------------------


def test_new_label_sets_beyond_the_cap_go_to_overflow() -> None:
    metrics = TcpMetrics(max_series=2)
    scrape = Scrape(metrics)
    a, b = out("a", "db"), out("b", "db")
    metrics.open(a)
    metrics.open(b)
    m = metrics.open(out("c", "db"))
    assert m.labels == OVERFLOW
    assert scrape.overflowed() == 1
    m.bytes_out = 9
    metrics.open(out("d", "db")).close()
    assert scrape.overflowed() == 2
    assert scrape("tcp_open_total", OVERFLOW) == 2
    assert scrape("tcp_open_connections", OVERFLOW) == 1
    assert scrape("tcp_read_bytes_total", OVERFLOW) == 9
    assert scrape("tcp_open_total", out("c", "db")) is None
    # Label sets that already have a series keep counting under their own labels.
    metrics.open(a)
    assert scrape("tcp_open_total", a) == 2
    assert scrape.overflowed() == 2
    assert metrics.series == 3  # the cap, plus the one overflow series
    text = generate_latest(scrape.registry).decode()
    overflow_line = next(
        x for x in text.splitlines() if x.startswith("tcp_open_total{") and 'overflow="true"' in x
    )
    assert 'direction=""' in overflow_line and 'dst_workload=""' in overflow_line


def test_pruning_makes_room_under_the_cap() -> None:
    metrics = TcpMetrics(max_series=2)
    metrics.open(out("a", "db")).close()
    metrics.open(out("b", "db")).close()
    assert metrics.open(out("c", "db")).labels == OVERFLOW
    assert metrics.prune(known_pods()) == 2
    assert metrics.open(out("c", "db")).labels == out("c", "db")
    assert metrics.overflowed == 1


# -- pruning -----------------------------------------------------------------------------


def test_prune_drops_closed_series_whose_pods_are_gone(metrics: TcpMetrics, scrape: Scrape) -> None:
    series = {
        "both known": out("web", "db"),
        "src gone": out("old-web", "db"),
        "dst gone": out("web", "old-db"),
        "other namespace": out("web", "db", ns="other"),
        "inbound, source not a pod": inbound("client-sa", "db"),
        "inbound, dst gone": inbound("client-sa", "old-db"),
    }
    for lbl in series.values():
        metrics.open(lbl).close()
    known = known_pods(("shop", "web"), ("shop", "db"))
    assert metrics.prune(known) == 4
    kept = {name for name, lbl in series.items() if scrape("tcp_open_total", lbl) is not None}
    assert kept == {"both known", "inbound, source not a pod"}
    assert metrics.series == 2
    assert metrics.prune(known) == 0


def test_prune_keeps_series_with_open_connections(metrics: TcpMetrics, scrape: Scrape) -> None:
    lbl = out("web", "db")
    first = metrics.open(lbl)
    second = metrics.open(lbl)
    first.close()
    nobody = known_pods()
    assert metrics.prune(nobody) == 0
    assert scrape("tcp_open_connections", lbl) == 1
    second.bytes_out = 3
    second.close()
    assert scrape("tcp_read_bytes_total", lbl) == 3
    assert metrics.prune(nobody) == 1
    assert scrape("tcp_open_total", lbl) is None
    assert metrics.series == 0


def test_prune_never_drops_the_overflow_series() -> None:
    metrics = TcpMetrics(max_series=1)
    scrape = Scrape(metrics)
    metrics.open(out("a", "db")).close()
    metrics.open(out("b", "db")).close()
    assert metrics.prune(known_pods()) == 1
    assert scrape("tcp_open_total", OVERFLOW) == 1
    assert scrape.overflowed() == 1  # the overflow count is never pruned either


def test_prune_asks_about_namespace_then_name(metrics: TcpMetrics) -> None:
    asked: list[tuple[str, str]] = []

    def known(ns: str, name: str) -> bool:
        asked.append((ns, name))
        return True

    metrics.open(ConnLabels("outbound", "web", "front", "db", "back", "true", *NO_IDS)).close()
    metrics.open(ConnLabels("inbound", "sa", "front", "db", "back", "true", *NO_IDS)).close()
    assert metrics.prune(known) == 0
    assert sorted(asked) == [("back", "db"), ("back", "db"), ("front", "web")]


def test_a_pruned_label_set_starts_again_from_zero(metrics: TcpMetrics, scrape: Scrape) -> None:
    lbl = out("web", "db")
    metrics.open(lbl).close()
    metrics.prune(known_pods())
    metrics.open(lbl)
    assert scrape("tcp_open_total", lbl) == 1
    assert scrape("tcp_close_total", lbl) == 0
