"""The Grafana dashboards in grafana/: structure Grafana relies on (a data source on every
panel and query, unique ids, panels on the 24-column grid, variables defined before use),
metric names the agents really expose, and — with Debian's promtool when it is installed
— every query parsed as PromQL. tests/lab/test_grafana.py runs the same queries on a
real Prometheus scraping a lab."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import dashboards

ROOT = Path(__file__).resolve().parents[2]
METRICS_DOC = ROOT / "docs" / "metrics.md"
BOARDS = dashboards.boards()
# Sample values for the variables, one set for every dashboard (promtool only parses).
SAMPLE = {"namespace": "default", "workload": "echo-1", "service": "default/echo"}
_SUFFIXES = ("_bucket", "_sum", "_count")
_NAME = re.compile(r"\b([a-z_][a-z0-9_]*)\s*(?=\{|\[)")
_NAME_RE = re.compile(r'__name__=~"([^"]+)"')


def test_there_are_the_four_dashboards():
    assert set(BOARDS) == {
        "weft-mesh.json",
        "weft-workload.json",
        "weft-authz.json",
        "weft-resilience.json",
    }
    uids = [b["uid"] for b in BOARDS.values()]
    titles = [b["title"] for b in BOARDS.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    assert all(re.fullmatch(r"[a-z0-9-]{1,40}", u) for u in uids)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_importable_with_a_prometheus_input(name: str):
    board = BOARDS[name]
    assert board["__inputs"] == [
        {
            "name": "DS_PROMETHEUS",
            "label": "Prometheus",
            "description": board["__inputs"][0]["description"],
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }
    ]
    assert board["id"] is None  # Grafana assigns one on import
    assert board["schemaVersion"] >= 36  # the current schema: panels with datasource refs
    assert "weft" in board["tags"]
    # Provisioning from files does no __inputs substitution: the data source variable
    # of the same name makes ${DS_PROMETHEUS} resolve there too.
    picker = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert picker == [{**picker[0], "name": "DS_PROMETHEUS", "query": "prometheus"}]
    used = {p["type"] for p in dashboards.panels(board)} - {"row"}
    required = {r["id"] for r in board["__requires"] if r["type"] == "panel"}
    assert used == required


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_has_a_datasource_and_queries(name: str):
    board = BOARDS[name]
    ids = [p["id"] for p in dashboards.panels(board)]
    assert len(set(ids)) == len(ids), f"duplicate panel ids in {name}"
    titles = [p["title"] for p in dashboards.panels(board)]
    assert len(set(titles)) == len(titles), f"duplicate panel titles in {name}"
    for panel in dashboards.panels(board):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        where = f"{name}: {panel['title']!r}"
        assert panel["datasource"] == dashboards.DATASOURCE, where
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), where
        for target in panel["targets"]:
            assert target["datasource"] == dashboards.DATASOURCE, where
            assert target["expr"].strip(), where
        assert panel.get("description") is not None, where
        assert panel["fieldConfig"]["defaults"].get("unit") or panel["type"] == "table", where


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_tile_the_grid(name: str):
    """Inside 24 columns and not on top of each other (Grafana would shove them about)."""
    taken: set[tuple[int, int]] = set()
    for panel in dashboards.panels(BOARDS[name]):
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{name}: {panel['title']!r} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_variables_are_defined_before_use(name: str):
    board = BOARDS[name]
    defined = set(dashboards.BUILTINS)
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = dashboards.variable_query(var)
            assert dashboards.used_variables(query) <= defined, var["name"]
            dashboards.parse_variable_query(query)
            dashboards.variable_regex(var)
            assert var["datasource"] == dashboards.DATASOURCE
            if var.get("includeAll"):
                assert var["allValue"] == ".*"  # the queries match it with =~
        defined.add(var["name"])
    for q in dashboards.queries(board):
        assert dashboards.used_variables(q.expr) <= defined, (q.panel, q.expr)
        for multi in (v["name"] for v in dashboards.variables(board) if v.get("multi")):
            # A multi-value variable becomes a regex alternation: only =~ can take it.
            assert not re.search(rf'[^~]="\$\{{?{multi}\b', q.expr), (q.panel, q.expr)


def _metric_names(expr: str) -> set[str]:
    names = {n for n in _NAME.findall(expr) if n not in _PROMQL_WORDS}
    for alternatives in _NAME_RE.findall(expr):
        names |= _expand(alternatives)
    return {_base(n) for n in names}


_PROMQL_WORDS = {"by", "on", "without", "ignoring", "group_left", "group_right", "or", "and"}


def _expand(regex: str) -> set[str]:
    """The names a ``__name__`` regex of the shapes used here matches:
    ``a|b`` and ``(a|b)_x_(c|d)_total``."""
    names: set[str] = set()
    for branch in re.split(r"\|(?![^(]*\))", regex):  # top-level alternatives
        expanded = {""}
        for part in re.split(r"(\([^)]*\))", branch):
            options = part[1:-1].split("|") if part.startswith("(") else [part]
            expanded = {n + o for n in expanded for o in options}
        names |= expanded
    return names


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name.startswith("response_latency_ms"):
            return name.removesuffix(suffix)
    return name


def test_metric_names_are_read_from_name_regexes():
    assert _metric_names('sum(rate({__name__=~"(a|b)_x_(c|d)_total",k="v"}[1m]))') == {
        "a_x_c_total", "a_x_d_total", "b_x_c_total", "b_x_d_total"}  # fmt: skip
    assert _metric_names('{__name__=~"request_total|tcp_open_total"} or up{a="b"}') == {
        "request_total", "tcp_open_total", "up"}  # fmt: skip
    assert _metric_names(
        "histogram_quantile(0.5, sum by (le) (rate(response_latency_ms_bucket{}[1m])))"
    ) == {"response_latency_ms"}


def test_every_metric_is_one_the_docs_describe():
    """The names come from docs/metrics.md (which the agents' tests keep true), so a
    renamed series breaks this test rather than a user's dashboard."""
    doc = METRICS_DOC.read_text()
    documented = set(re.findall(r"`([a-z_][a-z0-9_]*)(?:\{[^`]*\})?`", doc))
    used: set[str] = set()
    for board in BOARDS.values():
        for q in dashboards.queries(board):
            used |= _metric_names(q.expr)
        for var in dashboards.variables(board):
            used |= _metric_names(dashboards.variable_query(var))
    assert "request_total" in used and "inbound_http_authz_deny_total" in used
    unknown = used - documented
    assert not unknown, f"not in docs/metrics.md: {sorted(unknown)}"


def _rule_file(tmp_path: Path) -> tuple[Path, int]:
    lines = ["groups:", "  - name: dashboards", "    rules:"]
    n = 0
    for board in BOARDS.values():
        exprs: list[str] = [q.expr for q in dashboards.queries(board)]
        for var in dashboards.variables(board):
            parsed = dashboards.parse_variable_query(dashboards.variable_query(var))
            exprs.append(
                parsed.selector if isinstance(parsed, dashboards.LabelValues) else parsed.expr
            )
        for expr in exprs:
            n += 1
            text = dashboards.substitute(expr, SAMPLE).replace("\n", " ")
            lines += [
                f"      - record: weft:dashboard:{n}",
                f"        expr: '{text.replace(chr(39), chr(39) * 2)}'",
            ]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text("\n".join(lines) + "\n")
    return path, n


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian's prometheus package)"
)
def test_promtool_parses_every_query(tmp_path: Path):
    """Each query as a recording rule: promtool parses it as Prometheus would."""
    path, n = _rule_file(tmp_path)
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{n} rules found" in proc.stdout, proc.stdout


def test_readme_names_every_dashboard():
    readme = (ROOT / "grafana" / "README.md").read_text()
    for name, board in BOARDS.items():
        assert name in readme and board["title"] in readme, name


def _board(uid: str) -> dict[str, Any]:
    return next(b for b in BOARDS.values() if b["uid"] == uid)


def test_the_golden_panels_are_there():
    mesh = {q.panel: q.expr for q in dashboards.queries(_board("weft-mesh"))}
    assert 'classification="success"' in mesh["Mesh success rate"]
    assert "histogram_quantile(0.99" in mesh["Latency p99"]
    assert "response_latency_ms_bucket" in mesh["Latency p50"]
    assert "tcp_open_connections" in mesh["Open connections"]
    workload = {q.panel for q in dashboards.queries(_board("weft-workload"))}
    assert {
        "Requests per second by client",
        "Requests per second by authority",
        "Requests by route and backend",
        "Retries by route",
    } <= workload
    authz = " ".join(q.expr for q in dashboards.queries(_board("weft-authz")))
    for layer in ("inbound_http", "inbound_tcp", "outbound_http"):
        assert f"{layer}_authz_allow_total" in authz and f"{layer}_authz_deny_total" in authz
    resilience = " ".join(q.expr for q in dashboards.queries(_board("weft-resilience")))
    for name in (
        "outbound_http_retry_total",
        "outbound_http_retry_skipped_total",
        "outbound_http_timeout_total",
    ):
        assert name in resilience
