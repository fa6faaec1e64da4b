"""``weft policy check`` against a lab's state: the verdict and the deciding policy for
a request or a connection, as the destination's agent would judge it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from click.testing import CliRunner

import weft.lab.state as lab_state
from weft.cli import cli
from weft.lab import apply as lab_apply
from weft.lab.plan import plan_lab
from weft.lab.state import LabState, lab_paths

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "policy.yaml"


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(lab_state, "RUN_ROOT", tmp_path)
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    plan, objects, _ = lab_apply.apply(plan_lab("t", nodes=2, demo=True), [], docs)
    state = LabState(plan, "ready", lab_paths("t", None), policies=objects)
    state.save()
    return "t"


def _check(lab: str, *args: str) -> tuple[int, Any]:
    got = CliRunner().invoke(cli, ["policy", "check", "--lab", lab, "-n", "shop", "-o", "json",
                                   *args])  # fmt: skip
    return got.exit_code, json.loads(got.output) if got.output.startswith("[") else got.output


def test_an_allowed_request_names_the_allowing_rule(lab: str) -> None:
    code, rows = _check(lab, "--from", "ns/shop/sa/web", "--to", "svc/payments",
                        "--method", "POST", "--path", "/charge")  # fmt: skip
    assert code == 0 and {r["workload"] for r in rows} == {"shop/payments-1", "shop/payments-2"}
    assert all(r["request"]["policy"] == "shop/payments-from-web" for r in rows)
    assert rows[0]["request"]["rule"] == 0 and rows[0]["default"] == "cluster-authenticated"


def test_denials_name_the_policy_and_exit_1(lab: str) -> None:
    code, rows = _check(lab, "--from", "shop/web", "--to", "pod/payments-1",
                        "--method", "GET", "--path", "/public/%2e%2e/admin")  # fmt: skip
    assert code == 1 and rows[0]["request"]["policy"] == "shop/no-admin"
    code, rows = _check(lab, "--from", "shop/batch", "--to", "pod/payments-1", "--method", "GET",
                        "--path", "/public/x")  # fmt: skip
    assert code == 1 and not rows[0]["connection"]["allowed"]
    code, rows = _check(lab, "--from", "plaintext", "--to", "pod/payments-2")
    assert code == 1 and rows[0]["connection"]["policy"] == "strict inbound (eBPF)"


def test_unknown_targets_and_callers_are_usage_errors(lab: str) -> None:
    code, out = _check(lab, "--from", "shop/web", "--to", "svc/nope")
    assert code == 2 and "no service shop/nope" in str(out)
    code, out = _check(lab, "--from", "spiffe://Bad/ns/a/sa/b", "--to", "svc/payments")
    assert code == 2
