"""The Grafana dashboards in ``grafana/`` as the tests read them: their panels, every
query a panel or a template variable sends to Prometheus, and Grafana's substitution of
``$variables`` — as much of it as these dashboards use — so a test can send the very
PromQL Grafana would (tests/unit/test_grafana.py checks the files, tests/lab/
test_grafana.py runs the queries on a real Prometheus scraping a lab)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
"""Grafana's own variables, with values that fit a lab scraped every few seconds."""

# Grafana's variable syntaxes that these dashboards use: $name and ${name}.
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)$", re.S)
_QUERY_RESULT = re.compile(r"^query_result\((?P<expr>.+)\)$", re.S)


@dataclass(frozen=True)
class Query:
    board: str
    """The dashboard's uid."""
    panel: str
    """The panel's title (or ``$name`` for a template variable's query)."""
    ref: str
    expr: str


def boards() -> dict[str, dict[str, Any]]:
    """Every dashboard, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA.glob("*.json"))}


def panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """All panels, rows included, and the panels a collapsed row holds."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", ())


def queries(board: Mapping[str, Any]) -> Iterator[Query]:
    for panel in panels(board):
        for target in panel.get("targets", ()):
            yield Query(board["uid"], panel["title"], target["refId"], target["expr"])


def variables(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The template variables that query Prometheus (not the data source picker)."""
    return [v for v in board["templating"]["list"] if v["type"] == "query"]


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


@dataclass(frozen=True)
class LabelValues:
    """``label_values(selector, label)``: /api/v1/label/<label>/values?match[]=selector."""

    selector: str
    label: str


@dataclass(frozen=True)
class QueryResult:
    """``query_result(expr)``: an instant query, the variable's regex applied to each
    series printed as ``{labels} value timestamp``."""

    expr: str


def parse_variable_query(query: str) -> LabelValues | QueryResult:
    if m := _LABEL_VALUES.match(query.strip()):
        return LabelValues(m["selector"].strip(), m["label"])
    if m := _QUERY_RESULT.match(query.strip()):
        return QueryResult(m["expr"].strip())
    raise ValueError(f"not a Prometheus variable query Grafana knows: {query!r}")


def variable_regex(variable: Mapping[str, Any]) -> re.Pattern[str] | None:
    """A variable's ``/regex/`` (Grafana keeps the first group of each match)."""
    regex = str(variable.get("regex") or "")
    if not regex:
        return None
    if not (regex.startswith("/") and regex.endswith("/")):
        raise ValueError(f"variable {variable['name']}: regex {regex!r} is not /.../")
    return re.compile(regex[1:-1])


def used_variables(expr: str) -> set[str]:
    """The names ``expr`` refers to; ``$1``-style references (label_replace's) are not
    variables."""
    return {a or b for a, b in _VARIABLE.findall(expr) if not (a or b).isdigit()}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with every variable replaced by ``values`` (then `BUILTINS`); a variable
    with no value is an error, not left for Prometheus to choke on."""

    def one(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name.isdigit():
            return m[0]
        if name in values:
            return values[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise KeyError(f"no value for ${name} in {expr!r}")

    return _VARIABLE.sub(one, expr)
