"""``weft lab apply -f`` / ``delete -f`` on a lab plan (`weft.lab.apply`): Services
created and updated, routes kept with their conditions, bad objects refused whole, and
the lab's discovery model attaching routes to their parent services."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from controlplane.discovery.lab import attached, lab_routes
from weft.lab import apply as lab_apply
from weft.lab.plan import plan_lab

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _plan():
    return plan_lab("t", nodes=3, demo=True)


def _docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def test_the_canary_example_applies() -> None:
    plan, routes, lines = lab_apply.apply(_plan(), [], _docs("canary.yaml"), now="T0")
    names = {s.name: s for s in plan.services}
    assert set(names) == {"echo", "echo-stable", "echo-canary"}
    assert len({s.vip for s in plan.services}) == 3  # each its own address
    assert names["echo-canary"].annotations == {"weft.io/retry-http": "gateway-error"}
    assert names["echo-stable"].selector == {"app": "echo", "track": "stable"}
    assert [r["metadata"]["name"] for r in routes] == ["echo-split"]
    assert any("ResolvedRefs: True" in line for line in lines), lines
    # Applied again: configured, same addresses, creation time kept (rule precedence).
    again, routes2, lines2 = lab_apply.apply(plan, routes, _docs("canary.yaml"), now="T1")
    assert [s.vip for s in again.services] == [s.vip for s in plan.services]
    assert routes2[0]["metadata"]["creationTimestamp"] == "T0"
    assert all("configured" in line for line in lines2 if not line.startswith("  "))


def test_routes_name_missing_backends_and_are_attached_to_their_parent() -> None:
    route = _docs("canary.yaml")[2]
    _, routes, lines = lab_apply.apply(_plan(), [], [route], now="T0")
    assert any("BackendNotFound" in line for line in lines), lines

    class State:
        pass

    state = State()
    state.routes = routes  # type: ignore[attr-defined]
    parsed = lab_routes(state, {})  # type: ignore[arg-type]
    assert [r.name for r in attached("default/echo", parsed)] == ["echo-split"]
    assert attached("default/echo-stable", parsed) == ()


@pytest.mark.parametrize(
    ("doc", "text"),
    [
        ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}},
         "not supported"),
        ({"apiVersion": "v1", "kind": "HTTPRoute", "metadata": {"name": "x"}}, "apiVersion"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {}}, "metadata.name"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
          "spec": {"ports": [{"port": 80, "targetPort": "http"}]}}, "targetPort"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {}}, "empty"),
        ("just text", "not an object"),
    ],
)  # fmt: skip
def test_bad_objects_are_refused_whole(doc, text: str) -> None:
    good = _docs("canary.yaml")[0]
    with pytest.raises(lab_apply.ApplyError, match=text):
        lab_apply.apply(_plan(), [], [good, doc])


def test_delete_removes_what_the_file_names() -> None:
    plan, routes, _ = lab_apply.apply(_plan(), [], _docs("canary.yaml"))
    plan, routes, lines = lab_apply.delete(plan, routes, _docs("canary.yaml"))
    assert [s.name for s in plan.services] == ["echo"] and routes == []
    assert all("deleted" in line for line in lines)
    _, _, lines = lab_apply.delete(plan, routes, _docs("canary.yaml")[:1])
    assert lines == ["service/echo-stable not found"]
