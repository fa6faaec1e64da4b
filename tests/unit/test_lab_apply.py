"""``weft lab apply -f`` / ``delete -f`` on a lab plan (`weft.lab.apply`): Services
created and updated, routes kept with their conditions, bad objects refused whole, and
the lab's discovery model attaching routes to their parent services."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from controlplane.discovery.lab import attached, lab_routes
from weft.lab import apply as lab_apply
from weft.lab import workloads
from weft.lab.plan import plan_lab
from weft.lab.state import LabPaths, LabState

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
        ({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"}},
         "not supported"),
        ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}},
         "spec is missing"),
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


def _deployment(**spec: object) -> dict:
    template = {
        "metadata": {"labels": {"app": "web", "weft.io/capture": "enabled"},
                     "annotations": {"weft.io/opaque-ports": "6379"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "web:1",
                "command": ["python3", "-m", "http.server"], "args": ["$(PORT)", "$$(PORT)"],
                "env": [{"name": "PORT", "value": "8000"},
                        {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "AT", "value": "$(ME)@$(PORT) $(NOPE)"},
                        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"containerPort": 8000}, {"containerPort": 53, "protocol": "UDP"}],
            }],
        },
    }  # fmt: skip
    body = {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": template}
    body.update(spec)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"}, "spec": body}  # fmt: skip


def test_a_deployment_becomes_pods_spread_over_the_nodes() -> None:
    plan, _, lines = lab_apply.apply(_plan(), [], [_deployment()])
    pods = [p for p in plan.pods if p.owner == "Deployment shop/web"]
    assert [(p.name, p.node) for p in pods] == [
        ("web-1", "node-1"), ("web-2", "node-2"), ("web-3", "node-3")]  # fmt: skip
    assert len({p.ip for p in plan.pods}) == len(plan.pods)  # no address twice
    web1 = pods[0]
    assert web1.namespace == "shop" and web1.service_account == "web" and web1.ports == (8000,)
    assert plan.captured(web1) and web1.annotations == {"weft.io/opaque-ports": "6379"}
    (c,) = web1.containers
    assert c.argv == ("python3", "-m", "http.server", "8000", "$(PORT)")
    env = dict(c.env)
    assert env["ME"] == "web-1" and env["IP"] == web1.ip
    assert env["AT"] == "web-1@8000 $(NOPE)"  # undefined references stay as written
    assert "shop" in plan.namespaces
    assert lines[0].startswith("deployment.apps/web created (3 replicas: web-1 on node-1")
    assert "image web:1 not pulled" in lines[1]


def test_scaling_keeps_the_surviving_replicas_and_delete_removes_them() -> None:
    plan, routes, _ = lab_apply.apply(_plan(), [], [_deployment()])
    before = {p.name: p for p in plan.pods}
    plan, routes, lines = lab_apply.apply(plan, routes, [_deployment(replicas=5)])
    after = {p.name: p for p in plan.pods}
    for name in ("web-1", "web-2", "web-3"):
        assert after[name] == before[name]  # same node, address, everything
    assert after["web-4"].node == "node-1" and after["web-5"].node == "node-2"
    assert "configured" in lines[0]
    plan, routes, _ = lab_apply.apply(plan, routes, [_deployment(replicas=1)])
    assert [p.name for p in plan.pods if p.owner] == ["web-1"]
    plan, routes, lines = lab_apply.delete(plan, routes, [_deployment()])
    assert not [p for p in plan.pods if p.owner] and lines == ["deployment.apps/web deleted"]
    assert {p.name for p in plan.pods} == {p.name for p in _plan().pods}  # demo pods stay


def test_a_deployment_pod_round_trips_through_the_state_file(tmp_path: Path) -> None:
    plan, _, _ = lab_apply.apply(_plan(), [], [_deployment()])
    state = LabState(plan, "ready", LabPaths(tmp_path, None, tmp_path))
    again = LabState.from_json(state.to_json())
    assert again.plan.pods == plan.pods


def test_a_pod_name_already_taken_is_refused() -> None:
    doc = _deployment()
    doc["metadata"]["name"] = "echo"  # the demo has echo-1..echo-3
    with pytest.raises(lab_apply.ApplyError, match="pod name echo-1 is taken"):
        lab_apply.apply(_plan(), [], [doc])


def _container(**fields: object) -> dict:
    doc = _deployment()
    doc["spec"]["template"]["spec"]["containers"][0].update(fields)
    return doc


@pytest.mark.parametrize(
    ("doc", "text"),
    [
        (_container(command=None), "needs `command`"),
        (_container(command="python3"), "must be a list"),
        (_container(env=[{"name": "X", "value": 3}]), "must be a string"),
        (_container(env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}}]),
         "fieldRef"),
        (_container(ports=[{"containerPort": 0}]), "not a port"),
        (_container(name="App_1"), "DNS label"),
        (_container(workingDir="rel/dir"), "absolute"),
        (_deployment(replicas=-1), "not a count"),
        (_deployment(replicas=True), "not a count"),
        (_deployment(selector={"matchLabels": {"app": "other"}}), "does not match"),
        (_deployment(selector={"matchExpressions": [{"key": "a"}]}), "matchExpressions"),
        (_deployment(selector=None), "selector is required"),
        (_deployment(replicas=10_000), "exceed"),
    ],
)  # fmt: skip
def test_bad_deployments_are_refused_with_the_field(doc, text: str) -> None:
    with pytest.raises(lab_apply.ApplyError, match=text):
        lab_apply.apply(_plan(), [], [_docs("canary.yaml")[0], doc])


def test_the_deployment_example_applies() -> None:
    plan, _, lines = lab_apply.apply(plan_lab("t", nodes=2), [], _docs("deployment.yaml"))
    assert [(p.name, p.node) for p in plan.pods] == [
        ("hello-1", "node-1"), ("hello-2", "node-2"), ("hello-3", "node-1"), ("curl-1", "node-1")
    ]  # fmt: skip
    assert all(p.strict for p in plan.pods if p.name.startswith("hello"))
    assert any("ResolvedRefs: True" in line for line in lines), lines
    assert workloads.process_name(plan.pods[0], plan.pods[0].containers[0]) == "hello-1"


def test_a_policy_that_selects_nothing_is_applied_and_said_so() -> None:
    """A selector matching no pod (a typo, or pods to come) is not an error, but is said;
    so is a route target that does not exist yet."""

    def doc(name: str, spec: dict) -> dict:
        return {"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "default"}, "spec": spec}  # fmt: skip

    docs = [doc("typo", {"selector": {"matchLabels": {"app": "ecoh"}}}),
            doc("echo-ok", {"selector": {"matchLabels": {"app": "echo"}}}),
            doc("no-route", {"targetRefs": [{"group": "gateway.networking.k8s.io",
                                             "kind": "HTTPRoute", "name": "later"}]})]  # fmt: skip
    _, stored, lines = lab_apply.apply(_plan(), [], docs, now="T0")
    assert len(stored) == 3  # all applied
    assert "  AuthorizationPolicy default/typo: selects no pod of the lab yet" in lines
    assert not any("echo-ok" in line and "selects no" in line for line in lines)
    assert any("default/no-route: targets no route" in line for line in lines), lines
