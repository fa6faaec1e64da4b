"""The balancing client's summary: per-pod counts, latency and switches."""

from __future__ import annotations

from collections import Counter

from weft.lab.echoclient import summary


def test_summary_counts_latency_and_switches_per_pod():
    pods = ["a", "a", "b", "a", "b", "b"]
    took = [0.001, 0.003, 0.010, 0.002, 0.012, 0.014]
    out = summary(pods, took, Counter({"503": 1}))
    assert out["pods"] == {"a": 3, "b": 3}
    assert out["errors"] == {"503": 1}
    assert out["latency_ms"]["a"] == {"p50": 2.0, "p99": 3.0, "mean": 2.0}
    assert out["latency_ms"]["b"]["p50"] == 12.0
    assert out["switches"] == 3


def test_summary_of_nothing():
    out = summary([], [], Counter())
    assert out["pods"] == {} and out["latency_ms"] == {} and out["switches"] == 0
