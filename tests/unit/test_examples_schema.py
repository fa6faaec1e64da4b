"""docs/examples (and every other Gateway API object the repository ships) valid against the
API schemas: HTTPRoute/GRPCRoute against the Gateway API's (tests/gatewayschema.py), the core
kinds (Service, Deployment, ...) against Kubernetes' with kubernetes-validate, as
test_manifests does for daemonset/. Each examples file found is checked, whatever its
name, so an example added later is covered without touching this test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from tests import gatewayschema
from tests.unit.test_manifests import K8S_VERSION

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"


def _yaml_docs(path: Path) -> list[tuple[str, dict[str, Any]]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    where = path.relative_to(ROOT)
    return [(f"{where}:{d.get('kind')}/{d.get('metadata', {}).get('name')}", d) for d in docs]


def _examples() -> list[tuple[str, dict[str, Any]]]:
    return [d for p in sorted(EXAMPLES.glob("*.y*ml")) for d in _yaml_docs(p)]


def _gateway_docs_elsewhere() -> list[tuple[str, dict[str, Any]]]:
    """Gateway API objects in any other YAML file of docs/, tests/ or daemonset/."""
    found = []
    for top in ("docs", "tests", "daemonset"):
        for path in sorted((ROOT / top).rglob("*.y*ml")):
            if "node_modules" in path.parts or path.parent == EXAMPLES:
                continue
            found += [(i, d) for i, d in _yaml_docs(path) if gatewayschema.is_gateway_api(d)]
    return found


def _test_fixtures() -> list[tuple[str, dict[str, Any]]]:
    """The skeletons the route tests build their objects on (each test varies the rules)."""
    from tests.sockets import test_http_routes, test_kube_source
    from tests.unit import test_routes

    rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
              "backendRefs": [{"name": "web", "port": 80, "weight": 9}]}]  # fmt: skip
    grpc_rules = [{"matches": [{"method": {"service": "a.B", "method": "C"}}],
                   "backendRefs": [{"name": "web", "port": 80}]}]  # fmt: skip
    return [
        ("tests/unit/test_routes.py:_route", test_routes._route(rules)),
        ("tests/unit/test_routes.py:_route(GRPCRoute)",
         test_routes._route(grpc_rules, kind="GRPCRoute")),
        ("tests/sockets/test_http_routes.py:_httproute", test_http_routes._httproute(rules)),
        ("tests/sockets/test_kube_source.py:_httproute",
         test_kube_source._httproute("split", rules)),
    ]  # fmt: skip


EXAMPLE_DOCS = _examples()
GATEWAY_DOCS = [
    *[(i, d) for i, d in EXAMPLE_DOCS if gatewayschema.is_gateway_api(d)],
    *_gateway_docs_elsewhere(),
    *_test_fixtures(),
]
CORE_DOCS = [
    (i, d) for i, d in EXAMPLE_DOCS
    if not gatewayschema.is_gateway_api(d) and not str(d.get("apiVersion")).startswith("weft.io/")
]  # fmt: skip
"""Kubernetes' own kinds; Weft's (AuthorizationPolicy) are validated against Weft's CRD
schema by tests/unit/test_manifests.py."""


@pytest.fixture(scope="module")
def gateway_errors() -> dict[str, list[str]]:
    """All the Gateway API objects validated in one Node process."""
    results = gatewayschema.validate([d for _, d in GATEWAY_DOCS])
    return {ident: errs for (ident, _), errs in zip(GATEWAY_DOCS, results, strict=True)}


def test_the_examples_have_routes_of_both_kinds() -> None:
    kinds = {d["kind"] for _, d in EXAMPLE_DOCS if gatewayschema.is_gateway_api(d)}
    assert {"HTTPRoute", "GRPCRoute"} <= kinds, kinds


@pytest.mark.parametrize("ident", [i for i, _ in GATEWAY_DOCS])
def test_gateway_api_object_is_valid(ident: str, gateway_errors: dict[str, list[str]]) -> None:
    assert gateway_errors[ident] == []


@pytest.mark.parametrize("doc", [d for _, d in CORE_DOCS], ids=[i for i, _ in CORE_DOCS])
def test_example_core_object_is_valid_for_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _canary() -> dict[str, Any]:
    """A valid split, in the examples' shape (kept here, so editing them cannot void this)."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "split", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "always"}]}],
                 "backendRefs": [{"name": "echo-canary", "port": 80}]},
                {"backendRefs": [{"name": "echo-stable", "port": 80, "weight": 90},
                                 {"name": "echo-canary", "port": 80, "weight": 10}],
                 "timeouts": {"request": "5s"}},
            ],
        },
    }  # fmt: skip


def _set_weight(r: dict[str, Any]) -> None:
    r["spec"]["rules"][-1]["backendRefs"][0]["weight"] = -1


def _set_path_type(r: dict[str, Any]) -> None:
    r["spec"]["rules"][0]["matches"] = [{"path": {"type": "Bogus", "value": "/"}}]


def _set_timeout(r: dict[str, Any]) -> None:
    r["spec"]["rules"][-1]["timeouts"] = {"request": "2 seconds"}


def _set_filter(r: dict[str, Any]) -> None:
    r["spec"]["rules"][-1]["filters"] = [{"type": "Rewrite"}]


def _drop_spec(r: dict[str, Any]) -> None:
    del r["spec"]


def _set_kind(r: dict[str, Any]) -> None:
    r["kind"] = "HTTPRoutes"


@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        (_set_weight, "/spec/rules/1/backendRefs/0/weight: must be >= 0"),
        (_set_path_type, "/spec/rules/0/matches/0/path/type: must be one of"),
        (_set_timeout, "/spec/rules/1/timeouts/request: must match"),
        (_set_filter, "/spec/rules/1/filters/0/type: must be one of"),
        (_drop_spec, "/: must have spec"),
        (_set_kind, "no Gateway API schema for apiVersion gateway.networking.k8s.io/v1 kind"),
    ],
    ids=["weight -1", "path type Bogus", "duration", "filter type", "no spec", "unknown kind"],
)
def test_the_schemas_reject_a_spoiled_route(spoil: Callable[[dict[str, Any]], None],
                                            error: str) -> None:  # fmt: skip
    route = _canary()
    spoil(route)
    unspoiled, errors = gatewayschema.validate([_canary(), route])
    assert unspoiled == []
    assert any(e.startswith(error) for e in errors), errors
