"""The node's totals from its processes' Prometheus texts (`/metrics` with workers).

Each worker keeps its own registry; the agent asks every worker for its text when
``/metrics`` is scraped and merges them with its own: the same family names, the same
label sets, each sample the sum over the processes (a connection counted by worker 0
and one by worker 1 are two connections of the node; a histogram's buckets, count and
sum add up the same way).  ``*_created`` samples take the earliest time instead.

Merging works on the text format as `prometheus_client.generate_latest` writes it (one
sample per line, ``name{labels} value``, no timestamps): a label value may hold spaces,
the value never does, so a line splits at its last space.  No per-sample object is
built; the cost is one dict lookup per line (docs/benchmarks.md has the figure).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.utils import floatToGoString


def merge(texts: Iterable[str]) -> str:
    """The node's text: families in first-seen order, samples summed by series."""
    families: dict[str, list[str]] = {}
    """Family name -> its ``# HELP``/``# TYPE`` lines, as first seen."""
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line[0] == "#":
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = families.setdefault(family, [])
                    if len(head) < 2 and line not in head:
                        head.append(line)
                    samples.setdefault(family, {})
                continue
            series, _, raw = line.rpartition(" ")
            try:
                value = float(raw)
            except ValueError:
                continue  # not a sample line of ours: dropped rather than mis-summed
            into = samples.setdefault(family, {})
            have = into.get(series)
            if have is None:
                into[series] = value
            elif _metric_name(series).endswith("_created"):
                into[series] = min(have, value)
            else:
                into[series] = have + value
    out: list[str] = []
    for family, in_family in samples.items():
        out.extend(families.get(family, ()))
        for name, value in in_family.items():
            out.append(f"{name} {_go(value)}")
    return "\n".join(out) + "\n" if out else ""


def _metric_name(series: str) -> str:
    return series.split("{", 1)[0]


def _go(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]
