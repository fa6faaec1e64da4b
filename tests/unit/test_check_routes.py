"""``weft check`` on a lab that is up: its routes, judged as the control plane judges
them, shown after the host checks; a route not Accepted or not resolved is a warning
with the Gateway API reason, and never changes the exit status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import weft.cli.check as check_cli
from weft.lab import state as lab_state
from weft.lab.plan import plan_lab
from weft.lab.state import LabState, lab_paths
from weft.preflight import CheckResult

GROUP = "gateway.networking.k8s.io"


def _route(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                 "rules": rules},
    }  # fmt: skip


GOOD = _route("good", [{"backendRefs": [{"name": "echo", "port": 8080}]}])
DANGLING = _route("dangling", [{"backendRefs": [{"name": "echo-canary", "port": 8080}]}])
MIRROR = _route("mirror", [{"filters": [{"type": "RequestMirror"}]}])


def test_route_checks_judge_like_the_control_plane() -> None:
    results = check_cli.route_checks([GOOD, DANGLING, MIRROR], {"default/echo"})
    by_name = {r.name: (r, conds) for r, conds in results}
    good, _ = by_name["route HTTPRoute/default/good"]
    assert good.ok and not good.required and good.detail == "Accepted, ResolvedRefs"
    dangling, conds = by_name["route HTTPRoute/default/dangling"]
    assert not dangling.ok and not dangling.required
    assert "ResolvedRefs False (BackendNotFound)" in dangling.detail
    assert "default/echo-canary" in dangling.detail
    assert dangling.hint and "backendRefs" in dangling.hint
    assert [(c.type, c.status) for c in conds] == [("Accepted", True), ("ResolvedRefs", False)]
    mirror, _ = by_name["route HTTPRoute/default/mirror"]
    assert "Accepted False (UnsupportedValue)" in mirror.detail and "RequestMirror" in mirror.detail


@pytest.fixture
def lab_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A lab's state file with a route (as `weft lab apply` leaves it), and the host
    checks and probes replaced by passing ones (no root or bcc needed)."""
    monkeypatch.setattr(lab_state, "RUN_ROOT", tmp_path)
    paths = lab_paths("t", None)
    state = LabState(plan=plan_lab("t", nodes=1, demo=True), phase="ready", paths=paths,
                     routes=[GOOD, DANGLING])  # fmt: skip
    state.save()
    passing = [CheckResult("kernel", True, True, "Linux 6.1 (>= 5.10)")]
    monkeypatch.setattr(check_cli, "run_host_checks", lambda **_: list(passing))
    monkeypatch.setattr(check_cli, "run_probes", lambda *_, **__: [])
    return "t"


def test_check_shows_the_labs_routes(lab_up: str) -> None:
    result = CliRunner().invoke(check_cli.check, ["--lab", lab_up])
    assert result.exit_code == 0, result.output  # warnings only
    out = result.output
    assert "lab t: 2 routes" in out
    assert "route HTTPRoute/default/good" in out and "Accepted, ResolvedRefs" in out
    assert "ResolvedRefs False (BackendNotFound): no such Service: default/echo-canary" in out
    assert "→ create the Service" in out
    assert "(1 warning)" in out


def test_check_json_carries_the_route_conditions(lab_up: str) -> None:
    result = CliRunner().invoke(check_cli.check, ["--lab", lab_up, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    routes = {r["check"]: r["conditions"] for r in report["routes"]}
    resolved = routes["route HTTPRoute/default/dangling"][1]
    assert resolved == resolved | {"type": "ResolvedRefs", "status": "False",
                                   "reason": "BackendNotFound"}  # fmt: skip


def test_check_without_a_lab_shows_no_routes(lab_up: str) -> None:
    result = CliRunner().invoke(check_cli.check, ["--lab", "other"])
    assert result.exit_code == 0, result.output
    assert "route" not in result.output
    report = json.loads(CliRunner().invoke(check_cli.check, ["--lab", "other", "--json"]).output)
    assert "routes" not in report
