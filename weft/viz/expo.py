"""Prometheus text exposition (format 0.0.4) and query-API JSON → `Sample` lists.

A small parser of our own rather than ``prometheus_client.parser``: the CLI needs only
samples (name, labels, value), must report *where* a line is malformed, and should not
build metric families it would flatten again. Comments (``# HELP``, ``# TYPE``) and
blank lines are skipped; timestamps after the value are accepted and ignored (a scrape
is stamped when it was taken).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Labels = tuple[tuple[str, str], ...]
"""Sorted (name, value) pairs: hashable, so a series can key a dict."""


class ExpositionError(ValueError):
    """A line of the text format could not be parsed; the message names the line."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Labels
    value: float

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def make_labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_value(text: str, lineno: int) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise ExpositionError(f"line {lineno}: value {text[:40]!r} is not a number") from None


def _parse_labels(line: str, start: int, lineno: int) -> tuple[dict[str, str], int]:
    """Labels from ``line[start]`` == ``{`` to the matching ``}``; returns the index after it."""
    labels: dict[str, str] = {}
    i = start + 1
    n = len(line)
    while True:
        while i < n and line[i] in " ,":
            i += 1
        if i < n and line[i] == "}":
            return labels, i + 1
        eq = line.find("=", i)
        if eq < 0 or eq + 1 >= n or line[eq + 1] != '"':
            raise ExpositionError(f"line {lineno}: malformed label at column {i + 1}")
        key = line[i:eq].strip()
        if not key:
            raise ExpositionError(f"line {lineno}: empty label name at column {i + 1}")
        i = eq + 2
        value: list[str] = []
        while True:
            if i >= n:
                raise ExpositionError(f"line {lineno}: unterminated value of label {key!r}")
            c = line[i]
            if c == "\\" and i + 1 < n:
                value.append(_ESCAPES.get(line[i + 1], "\\" + line[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                value.append(c)
                i += 1
        labels[key] = "".join(value)


def parse_text(text: str) -> list[Sample]:
    """Every sample of a text exposition, in order."""
    samples: list[Sample] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            labels, end = _parse_labels(line, brace, lineno)
            rest = line[end:].split()
        else:
            name, _, tail = line.partition(" ")
            labels, rest = {}, tail.split()
        if not name or not rest:
            raise ExpositionError(f"line {lineno}: expected 'name{{labels}} value': {raw[:80]!r}")
        samples.append(Sample(name, make_labels(labels), _parse_value(rest[0], lineno)))
    return samples


def parse_query_vector(answer: Mapping[str, Any]) -> list[Sample]:
    """Samples of a Prometheus ``/api/v1/query`` answer whose result is an instant vector
    (``__name__`` becomes the name; every other label, ``instance`` included, stays)."""
    if answer.get("status") != "success":
        raise ExpositionError(
            f"Prometheus answered {answer.get('errorType', 'error')}: "
            f"{answer.get('error', 'no error message')}"
        )
    data = answer.get("data") or {}
    if data.get("resultType") != "vector":
        raise ExpositionError(f"expected an instant vector, got {data.get('resultType')!r}")
    samples: list[Sample] = []
    for item in data.get("result") or ():
        metric = dict(item.get("metric") or {})
        name = metric.pop("__name__", "")
        try:
            value = _parse_value(str(item["value"][1]), 0)
        except (KeyError, IndexError, TypeError):
            raise ExpositionError(f"malformed vector element {item!r:.120}") from None
        samples.append(Sample(name, make_labels(metric), value))
    return samples


def by_name(samples: Iterable[Sample], *names: str) -> list[Sample]:
    wanted = set(names)
    return [s for s in samples if s.name in wanted]
