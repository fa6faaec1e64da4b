"""Gateway API HTTPRoute/GRPCRoute parsing, validation (status conditions), precedence
and matching (`weft.routes`), on the shipped example and on hand-made objects."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from hypothesis import given
from hypothesis import strategies as st

from weft.routes import (
    Condition,
    HeaderModifier,
    Kind,
    Reason,
    RouteError,
    conditions,
    parse_route,
    table_for,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "routes.yaml"


def _route(rules: list[dict[str, Any]], *, name: str = "r", created: str = "2026-01-01T00:00:00Z",
           kind: str = "HTTPRoute") -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": rules},
    }  # fmt: skip


def test_the_shipped_example_parses_and_resolves() -> None:
    docs = list(yaml.safe_load_all(EXAMPLES.read_text()))
    routes = [parse_route(d) for d in docs]
    assert [r.kind for r in routes] == [Kind.HTTP, Kind.GRPC]
    http = routes[0]
    assert http.parents == (("default/echo", 80),)
    assert table_for("default/echo", routes, 80).entries
    assert not table_for("default/echo", routes[:1], 9090).entries  # another port
    split = http.rules[1]
    assert [(b.name, b.weight) for b in split.backends] == [("echo", 90), ("echo-canary", 10)]
    assert (split.request_timeout, split.backend_timeout) == (2.0, 0.5)
    assert split.request_headers == HeaderModifier(set=(("x-route", "api"),))
    _, conds = conditions(docs[0], {"default/echo": 1, "default/echo-canary": 1})
    assert [(c.type, c.status) for c in conds] == [("Accepted", True), ("ResolvedRefs", True)]


def test_precedence_exact_then_longest_prefix_then_method_then_headers() -> None:
    def rule(backend: str, path: str, kind: str = "PathPrefix", **more: Any) -> dict[str, Any]:
        match = {"path": {"type": kind, "value": path}, **more}
        return {"matches": [match], "backendRefs": [{"name": backend}]}

    rules = [
        rule("a", "/"),
        rule("b", "/api"),
        rule("c", "/api/v1", "Exact"),
        rule("d", "/api", method="POST"),
        rule("e", "/api", headers=[{"name": "X-Canary", "value": "1"}]),
    ]
    table = table_for("shop/web", [parse_route(_route(rules))])

    def to(method: str, path: str, headers: dict[str, str] | None = None) -> str:
        rule = table.match(method, path, headers or {}, {})
        assert rule is not None
        return rule.backends[0].name

    assert to("GET", "/api/v1") == "c"
    assert to("POST", "/api/v2") == "d"
    assert to("GET", "/api/v2", {"x-canary": "1"}) == "e"
    assert to("GET", "/api") == "b"
    assert to("GET", "/apix") == "a"  # prefixes match whole segments
    assert to("GET", "/") == "a"


def test_ties_go_to_the_older_route() -> None:
    same = [{"matches": [{"path": {"value": "/x"}}], "backendRefs": [{"name": "new"}]}]
    old = [{"matches": [{"path": {"value": "/x"}}], "backendRefs": [{"name": "old"}]}]
    routes = [parse_route(_route(same, name="a", created="2026-05-01T00:00:00Z")),
              parse_route(_route(old, name="b", created="2026-01-01T00:00:00Z"))]  # fmt: skip
    rule = table_for("shop/web", routes).match("GET", "/x/1", {}, {})
    assert rule is not None and rule.backends[0].name == "old"


def test_query_and_regex_matches() -> None:
    rules = [{"matches": [{"path": {"type": "RegularExpression", "value": "/u/[0-9]+"},
                           "queryParams": [{"name": "v", "value": "2"}]}],
              "backendRefs": [{"name": "v2"}]}]  # fmt: skip
    table = table_for("shop/web", [parse_route(_route(rules))])
    assert table.match("GET", "/u/42", {}, {"v": "2"}) is not None
    assert table.match("GET", "/u/42", {}, {"v": "1"}) is None
    assert table.match("GET", "/u/4x", {}, {"v": "2"}) is None


def test_weights_split_traffic() -> None:
    refs = [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}]
    rule = parse_route(_route([{"backendRefs": refs}])).rules[0]
    rng = random.Random(3)
    got = Counter(rule.pick(rng.random()).name for _ in range(10_000))  # type: ignore[union-attr]
    assert abs(got["b"] / 10_000 - 0.10) < 0.02, got
    zero = parse_route(_route([{"backendRefs": [{"name": "a", "weight": 0}]}])).rules[0]
    assert zero.pick(0.5) is None  # the spec: answered 500


def test_grpc_methods_become_paths() -> None:
    grpc = _route([{"matches": [{"method": {"service": "pkg.Svc", "method": "Get"}}],
                    "backendRefs": [{"name": "a"}]},
                   {"matches": [{"method": {"service": "pkg.Svc"}}],
                    "backendRefs": [{"name": "b"}]}], kind="GRPCRoute")  # fmt: skip
    table = table_for("shop/web", [parse_route(grpc)])
    assert table.match("POST", "/pkg.Svc/Get", {}, {}).backends[0].name == "a"  # type: ignore[union-attr]
    assert table.match("POST", "/pkg.Svc/Put", {}, {}).backends[0].name == "b"  # type: ignore[union-attr]
    assert table.match("POST", "/other.Svc/Get", {}, {}) is None


def test_header_modifier_sets_adds_and_removes() -> None:
    m = HeaderModifier(set=(("x-a", "1"),), add=(("x-b", "2"),), remove=("x-gone",))
    assert m.apply([("X-A", "0"), ("x-gone", "y"), ("x-b", "1")]) == [
        ("x-b", "1"), ("x-a", "1"), ("x-b", "2"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("rules", "text"),
    [
        ([{"matches": [{"path": {"type": "Glob", "value": "/x"}}]}], "path.type"),
        ([{"matches": [{"path": {"value": "x"}}]}], "starting with /"),
        ([{"matches": [{"path": {"type": "RegularExpression", "value": "(("}}]}], "regular"),
        ([{"matches": [{"method": "FETCH"}]}], "method"),
        ([{"matches": [{"headers": [{"name": "bad name", "value": "1"}]}]}], "header name"),
        ([{"filters": [{"type": "RequestMirror"}]}], "not supported"),
        ([{"timeouts": {"request": "1 second"}}], "duration"),
        ([{"timeouts": {"request": "1s", "backendRequest": "2s"}}], "backendRequest longer"),
        ([{"backendRefs": [{"name": "a", "weight": -1}]}], "weight"),
    ],
)
def test_invalid_routes_are_not_accepted_with_a_reason(rules: list, text: str) -> None:
    with pytest.raises(RouteError, match=text):
        parse_route(_route(rules))
    route, conds = conditions(_route(rules), {})
    assert route is None
    assert conds == [Condition("Accepted", False, Reason.UNSUPPORTED_VALUE, conds[0].message)]


def test_unresolved_backends_are_reported() -> None:
    rules = [{"backendRefs": [{"name": "gone"}]}]
    route, conds = conditions(_route(rules), {"shop/web": 1})
    assert route is not None and conds[1].reason is Reason.BACKEND_NOT_FOUND
    other = [{"backendRefs": [{"name": "a", "namespace": "elsewhere"}]}]
    route, conds = conditions(_route(other), {})
    assert route is not None and conds[1].reason is Reason.REF_NOT_PERMITTED
    assert route.rules[0].backends[0].invalid
    kind = [{"backendRefs": [{"name": "a", "kind": "Pod"}]}]
    _, conds = conditions(_route(kind), {})
    assert conds[0].status and conds[1].reason is Reason.INVALID_KIND


def test_gateway_parents_are_not_ours() -> None:
    obj = _route([{}])
    obj["spec"]["parentRefs"] = [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                  "name": "edge"}]  # fmt: skip
    assert parse_route(obj).parents == ()
    obj["spec"]["parentRefs"] = [{"kind": "Service", "name": "web", "port": 0}]
    with pytest.raises(RouteError, match="port"):
        parse_route(obj)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["spec", "rules", "matches", "path", "type", "value",
                                       "backendRefs", "name", "weight", "filters", "kind",
                                       "metadata", "parentRefs", "headers", "timeouts"]),
                      children, max_size=5),
    max_leaves=30,
))  # fmt: skip
def test_any_object_is_parsed_or_refused_with_a_route_error(obj: Any) -> None:
    if isinstance(obj, dict):
        obj = {**obj, "kind": "HTTPRoute", "metadata": {"name": "x"}}
    try:
        parse_route(obj)
    except RouteError:
        pass


def test_routes_travel_in_the_discovery_stream() -> None:
    from weft.mesh import Service
    from weft.meshwire import decode_service, encode_service

    docs = list(yaml.safe_load_all(EXAMPLES.read_text()))
    routes = tuple(parse_route(d) for d in docs)
    svc = Service("echo", "default", ("10.96.0.1",), (), (), routes=routes)
    wire = json.loads(json.dumps(encode_service(svc)))
    assert decode_service(wire, "s") == svc


def test_route_annotations_override_the_service_policy_per_rule() -> None:
    from weft.traffic import TrafficOverride

    obj = _route([{"backendRefs": [{"name": "web"}]}, {}], kind="GRPCRoute")
    obj["metadata"]["annotations"] = {
        "weft.io/retry-grpc": "unavailable", "timeout.linkerd.io/request": "3s", "team": "shop",
    }  # fmt: skip
    route = parse_route(obj)
    want = TrafficOverride(grpc_codes=frozenset({14}), request_timeout=3.0)
    assert [(r.kind, r.traffic) for r in route.rules] == [(Kind.GRPC, want)] * 2
    # The wire form keeps the keys the agent applies (and only those).
    assert json.loads(route.source)["metadata"]["annotations"] == {
        "weft.io/retry-grpc": "unavailable", "timeout.linkerd.io/request": "3s"}  # fmt: skip
    assert parse_route(json.loads(route.source)) == route
    plain = parse_route(_route([{}]))
    assert plain.rules[0].traffic is None
    assert "annotations" not in json.loads(plain.source)["metadata"]


@pytest.mark.parametrize(
    ("annotations", "text"),
    [
        ({"weft.io/retry-limit": "lots"}, "weft.io/retry-limit: 'lots' is not a whole number"),
        ({"weft.io/retry-http": "6xx"}, "weft.io/retry-http"),
        ({"weft.io/failure-accrual": "consecutive"}, "set it on the Service"),
        ({"weft.io/retry-timeout": 5}, "malformed route"),
    ],
)
def test_invalid_route_annotations_make_the_route_not_accepted(
    annotations: dict[str, Any], text: str
) -> None:
    obj = _route([{}])
    obj["metadata"]["annotations"] = annotations
    route, conds = conditions(obj, {"shop/web": 1})
    assert route is None
    assert conds[0].type == "Accepted" and not conds[0].status
    assert conds[0].reason is Reason.UNSUPPORTED_VALUE
    assert text in conds[0].message
    if text != "malformed route":
        assert conds[0].message.startswith("metadata.annotations: ")


def test_route_annotations_travel_in_the_discovery_stream() -> None:
    from weft.mesh import Service
    from weft.meshwire import decode_service, encode_service

    annotated = _route([{"backendRefs": [{"name": "web"}]}], name="annotated")
    annotated["metadata"]["annotations"] = {"weft.io/retry-http": "503"}
    routes = (parse_route(annotated), parse_route(_route([{}], name="plain")))
    svc = Service("web", "shop", ("10.96.0.1",), (), (), routes=routes)
    wire = json.loads(json.dumps(encode_service(svc)))
    got = decode_service(wire, "s")
    assert got == svc
    assert got.routes[0].rules[0].traffic is not None
    assert got.routes[0].rules[0].traffic.http_statuses == frozenset({503})
    # A route from a control plane that did not send annotations: the Service's policy.
    assert "annotations" not in wire["routes"][1]["metadata"]
    assert got.routes[1].rules[0].traffic is None
