"""Authorization policies (`weft.policy`): parsing with the bad field named, Istio's
matching semantics table-driven, the evaluation order (DENY, AUDIT, ALLOW, default), the
defaults, audit mode, L4 versus L7, path normalisation — and properties of the matcher."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.identity import SpiffeId
from weft.policy import (
    MESH_DEFAULT,
    DefaultPolicy,
    PathError,
    Policy,
    PolicyError,
    Request,
    compile_for,
    default_policy,
    normalize_path,
    parse_policy,
    parse_principal,
)

WEB = SpiffeId.workload("shop", "web")
ADMIN = SpiffeId.workload("ops", "admin")
FOREIGN = SpiffeId("other.example", "/ns/shop/sa/web")


def _policy(spec: dict[str, Any], name: str = "p", ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip


def _set(*specs: dict[str, Any], default: DefaultPolicy = DefaultPolicy.ALL_AUTHENTICATED):
    policies = [parse_policy(_policy(s, f"p{i}")) for i, s in enumerate(specs)]
    return compile_for("shop", "payments-1", {"app": "payments"}, policies, default)


def _req(
    source: SpiffeId | None = WEB,
    method: str | None = "GET",
    path: str | None = "/",
    port: int = 8080,
    ip: str = "10.244.1.5",
    headers: dict[str, str] | None = None,
) -> Request:
    return Request(source, ip, port, method, path, headers or {})


ALLOW_WEB_GET_PUBLIC = {
    "selector": {"matchLabels": {"app": "payments"}},
    "rules": [{"from": [{"source": {"principals": [str(WEB)]}}],
               "to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]}],
}  # fmt: skip


def test_per_route_allow_of_get_public_while_post_admin_is_denied() -> None:
    ps = _set(ALLOW_WEB_GET_PUBLIC)
    assert ps.evaluate(_req(path="/public/a")).allowed
    assert ps.evaluate(_req(path="/public")).allowed  # the segment prefix includes itself
    denied = ps.evaluate(_req(method="POST", path="/admin"))
    assert not denied.allowed and denied.policy == "shop/p0" and "no rule" in denied.reason
    assert not ps.evaluate(_req(path="/publicity")).allowed  # not a segment of /public
    assert not ps.evaluate(_req(source=ADMIN, path="/public/a")).allowed


def test_deny_wins_over_allow_on_the_same_request() -> None:
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/public/secret"]}}]}]}
    ps = _set(ALLOW_WEB_GET_PUBLIC, deny)
    d = ps.evaluate(_req(path="/public/secret"))
    assert not d.allowed and d.policy == "shop/p1" and d.rule == 0
    assert ps.evaluate(_req(path="/public/other")).allowed


@pytest.mark.parametrize(
    ("default", "source", "allowed"),
    [
        (DefaultPolicy.ALL_UNAUTHENTICATED, None, True),
        (DefaultPolicy.ALL_AUTHENTICATED, None, False),
        (DefaultPolicy.ALL_AUTHENTICATED, FOREIGN, True),
        (DefaultPolicy.CLUSTER_AUTHENTICATED, WEB, True),
        (DefaultPolicy.CLUSTER_AUTHENTICATED, FOREIGN, False),
        (DefaultPolicy.CLUSTER_AUTHENTICATED, None, False),
        (DefaultPolicy.DENY, WEB, False),
    ],
)
def test_defaults_decide_when_no_allow_policy_applies(default, source, allowed) -> None:
    d = _set(default=default).evaluate(_req(source=source))
    assert d.allowed is allowed and d.policy == f"default:{default.value}"


def test_audit_default_lets_everything_through_and_marks_the_would_be_denials() -> None:
    ps = _set(ALLOW_WEB_GET_PUBLIC, default=DefaultPolicy.AUDIT)
    d = ps.evaluate(_req(method="POST", path="/admin"))
    assert d.allowed and d.would_deny and "shop/p0" in d.audited
    ok = ps.evaluate(_req(path="/public/x"))
    assert ok.allowed and not ok.would_deny
    plain = _set(default=DefaultPolicy.AUDIT).evaluate(_req(source=None))
    assert plain.allowed and plain.would_deny  # all-authenticated would refuse plaintext


def test_audit_action_records_matches_without_deciding() -> None:
    audit = {"action": "AUDIT", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}
    ps = _set(audit)
    d = ps.evaluate(_req(method="DELETE"))
    assert d.allowed and d.audited == ("shop/p0",) and not d.would_deny
    assert ps.evaluate(_req(method="GET")).audited == ()


def test_policy_without_rules_denies_all_and_empty_rule_allows_all() -> None:
    assert not _set({"rules": []}).evaluate(_req()).allowed
    assert _set({"rules": [{}]}).evaluate(_req(source=None)).allowed  # plaintext too


def test_selector_and_namespace_scope_which_workloads_a_policy_applies_to() -> None:
    other_app = parse_policy(_policy({"selector": {"matchLabels": {"app": "ledger"}},
                                      "rules": []}))  # fmt: skip
    other_ns = parse_policy(_policy({"rules": []}, ns="ops"))
    ps = compile_for("shop", "payments-1", {"app": "payments"}, [other_app, other_ns])
    assert ps.allow == () and ps.evaluate(_req()).policy == "default:all-authenticated"


def test_per_route_policies_apply_only_to_requests_of_that_route() -> None:
    policy = parse_policy(_policy({
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                        "name": "admin"}],
        "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}],
    }))  # fmt: skip
    ps = compile_for("shop", "payments-1", {}, [policy], routes=["shop/admin"])
    on_route = Request(WEB, "10.244.1.5", 8080, "GET", "/", {}, route="shop/admin")
    assert not ps.evaluate(on_route).allowed
    assert ps.evaluate(Request(ADMIN, "10.244.1.5", 8080, "GET", "/", {},
                               route="shop/admin")).allowed  # fmt: skip
    assert ps.evaluate(Request(WEB, "10.244.1.5", 8080, "GET", "/", {}, route="shop/x")).allowed
    # A connection: per-route policies wait for the requests.
    assert ps.evaluate(Request(WEB, "10.244.1.5", 8080), will_carry_http=True).allowed
    assert compile_for("shop", "ledger-1", {}, [policy]).allow == ()  # not its route


def test_l4_versus_l7_for_rules_with_http_fields() -> None:
    ps = _set(ALLOW_WEB_GET_PUBLIC)
    conn = Request(WEB, "10.244.1.5", 8080)
    assert ps.evaluate(conn, will_carry_http=True).allowed  # each request judged later
    assert not ps.evaluate(conn, will_carry_http=False).allowed  # opaque TCP cannot GET
    deny_get = {"action": "DENY",
                "rules": [{"from": [{"source": {"namespaces": ["shop"]}}],
                           "to": [{"operation": {"methods": ["GET"]}}]}]}  # fmt: skip
    ps = _set(deny_get)
    assert ps.evaluate(conn, will_carry_http=True).allowed
    assert not ps.evaluate(conn).allowed  # opaque: judged on its other fields (stricter)


def test_ports_ip_blocks_and_plaintext_sources() -> None:
    allow = {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.2.0/24"]}}],
                        "to": [{"operation": {"ports": ["8080", 9090]}}]}]}  # fmt: skip
    ps = _set(allow)
    assert ps.evaluate(_req(source=None, ip="10.244.2.7")).allowed
    assert not ps.evaluate(_req(source=None, ip="10.244.3.7")).allowed
    assert not ps.evaluate(_req(source=None, ip="10.244.2.7", port=22)).allowed
    assert ps.evaluate(_req(source=None, ip="10.244.2.7", port=9090)).allowed


def test_headers_never_grant_identity() -> None:
    ps = _set({"rules": [{"from": [{"source": {"principals": [str(WEB)]}}]}]})
    headers = {"x-forwarded-client-cert": f"URI={WEB}", "weft-identity": str(WEB)}
    spoof = _req(source=None, headers=headers)
    assert not ps.evaluate(spoof).allowed


def test_header_operations_match_exact_and_prefix_values() -> None:
    ps = _set({"rules": [{"to": [{"operation": {"headers": [
        {"name": "X-Tenant", "values": ["acme", "beta-*"]}]}}]}]})  # fmt: skip
    assert ps.evaluate(_req(headers={"x-tenant": "acme"})).allowed
    assert ps.evaluate(_req(headers={"x-tenant": "beta-2"})).allowed
    assert not ps.evaluate(_req(headers={"x-tenant": "acme2"})).allowed
    assert not ps.evaluate(_req()).allowed


@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        (SpiffeId.workload("shop", "web"), True),
        (SpiffeId("cluster.local", "/ns/shop/sa/web2"), False),
        (SpiffeId("cluster.local", "/ns/shopx/sa/web"), False),
    ],
)
def test_identities_are_compared_exactly(caller: SpiffeId, allowed: bool) -> None:
    ps = _set({"rules": [{"from": [{"source": {"principals": [str(WEB)]}}]}]})
    assert ps.evaluate(_req(source=caller)).allowed is allowed


@pytest.mark.parametrize(
    ("pattern", "identity", "matches"),
    [
        ("*", "spiffe://cluster.local/ns/a/sa/b", True),
        ("spiffe://cluster.local/ns/shop/*", "spiffe://cluster.local/ns/shop/sa/web", True),
        ("spiffe://cluster.local/ns/shop/*", "spiffe://cluster.local/ns/shopping/sa/web", False),
        ("spiffe://cluster.local/*", "spiffe://cluster.local/ns/a/sa/b", True),
        ("spiffe://cluster.local/*", "spiffe://cluster.localx/ns/a/sa/b", False),
        ("*/ns/shop/sa/web", "spiffe://other.example/ns/shop/sa/web", True),
        ("*/ns/shop/sa/web", "spiffe://cluster.local/ns/xshop/sa/web", False),
        ("cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/web", True),
    ],
)
def test_principal_patterns(pattern: str, identity: str, matches: bool) -> None:
    assert parse_principal(pattern, "t").matches(identity) is matches


@pytest.mark.parametrize(
    "pattern",
    [
        "spiffe://Cluster.local/ns/shop/sa/web",  # SPIFFE trust domains are lowercase
        "spiffe://cluster.local./ns/shop/sa/web",  # trailing dot
        "spiffe://cluster.local/ns/shop/sa/w%65b",  # percent-encoding
        "spiffe://cluster.local/ns/shop/sa/web/",
        "spiffe://cluster.local/ns/sh*p/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web*",  # not at a path boundary
        "spiffe://cluster.local/weft/node/n1",  # nodes are not callers
        "spiffe://cluster.local/ns/shop",
        "*/foo",
        "",
    ],
)
def test_invalid_identity_patterns_are_refused(pattern: str) -> None:
    spec = {"rules": [{"from": [{"source": {"principals": [pattern]}}]}]}
    with pytest.raises(PolicyError):
        parse_policy(_policy(spec))


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ({"selectr": {}}, "unknown field 'selectr'"),
        ({"action": "allow"}, "spec.action"),
        ({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}, "unknown field 'principal'"),
        ({"rules": [{"from": [{"source": {}}]}]}, "is empty"),
        ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, "not a port"),
        ({"rules": [{"to": [{"operation": {"ports": [True]}}]}]}, "not a port"),
        ({"rules": [{"to": [{"operation": {"methods": ["GET POST"]}}]}]}, "not an HTTP method"),
        ({"rules": [{"to": [{"operation": {"paths": ["/a*"]}}]}]}, "a prefix"),
        ({"rules": [{"to": [{"operation": {"paths": ["/a/../b"]}}]}]}, "normal form"),
        ({"rules": [{"to": [{"operation": {"paths": ["relative"]}}]}]}, "exact"),
        ({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}, "not an address"),
        ({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]}, "'sa' or 'ns/sa'"),
        ({"targetRefs": [{"group": "", "kind": "Service", "name": "x"}]}, "only gateway"),
        ({"selector": {"matchLabels": {"a": "b"}},
          "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                          "name": "x"}]}, "not both"),
        ({"rules": [{}] * 65}, "at most 64"),
    ],
)  # fmt: skip
def test_bad_policies_are_refused_with_the_field(spec: dict[str, Any], text: str) -> None:
    with pytest.raises(PolicyError, match=text):
        parse_policy(_policy(spec))


def test_a_selector_matching_nothing_is_valid_and_applies_to_nobody() -> None:
    p = parse_policy(_policy({"selector": {"matchLabels": {"app": "nobody"}}, "rules": []}))
    assert compile_for("shop", "payments-1", {"app": "payments"}, [p]).allow == ()


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b", "/a/b"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2E/admin", "/admin"),
        ("/public%2f..%2fadmin", "/admin"),
        ("/public\\..\\admin", "/admin"),
        ("/admin/", "/admin/"),
        ("/admin?x=/public", "/admin"),
        ("/a/b/..", "/a/"),
        ("/", "/"),
        ("/%41dmin", "/Admin"),
    ],
)
def test_paths_are_judged_in_normal_form(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", ["/..", "/a/../..", "/%zz", "/%", "/a%00b", "relative", "/%ff"])
def test_paths_without_a_normal_form_are_refused(raw: str) -> None:
    with pytest.raises(PathError):
        normalize_path(raw)
    ps = _set({"rules": [{}]}, default=DefaultPolicy.ALL_UNAUTHENTICATED)
    assert not ps.evaluate(_req(path=raw)).allowed  # denied whatever the policies say


def test_path_tricks_do_not_reach_a_denied_path() -> None:
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}
    ps = _set(deny, {"rules": [{}]})
    for trick in ("/admin", "//admin", "/./admin", "/x/../admin", "/%61dmin",
                  "/public/%2e%2e/admin", "/admin/", "/ADMIN"):  # fmt: skip
        allowed = ps.evaluate(_req(path=trick)).allowed
        assert allowed is (trick == "/ADMIN"), trick  # paths are case-sensitive


def test_unknown_default_values_fail_closed() -> None:
    assert default_policy(None) is DefaultPolicy.ALL_AUTHENTICATED
    assert default_policy("cluster-authenticated") is DefaultPolicy.CLUSTER_AUTHENTICATED
    assert default_policy("Deny") is DefaultPolicy.DENY
    assert default_policy("allow-all") is DefaultPolicy.DENY


# -- properties ----------------------------------------------------------------------------

_segment = st.text(alphabet="abc.%2e/\\", min_size=0, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(_segment, max_size=6).map(lambda parts: "/" + "/".join(parts)))
def test_normalisation_is_idempotent_and_leaves_no_dot_segments(raw: str) -> None:
    try:
        once = normalize_path(raw)
    except PathError:
        return
    assert normalize_path(once) == once
    assert "//" not in once and "/./" not in once and "/../" not in once
    assert not once.endswith(("/.", "/.."))


_names = st.sampled_from(["a", "b", "web", "shop"])


@settings(max_examples=300, deadline=None)
@given(ns=_names, sa=_names, pns=_names, psa=_names)
def test_an_exact_principal_matches_exactly_its_identity(ns, sa, pns, psa) -> None:
    pattern = parse_principal(f"spiffe://cluster.local/ns/{pns}/sa/{psa}", "t")
    identity = str(SpiffeId.workload(ns, sa))
    assert pattern.matches(identity) is ((ns, sa) == (pns, psa))
    ns_wild = parse_principal(f"spiffe://cluster.local/ns/{pns}/*", "t")
    assert ns_wild.matches(identity) is (ns == pns)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    path=st.sampled_from(["/", "/public", "/public/a", "/admin", "/admin/x"]),
    caller=st.sampled_from([WEB, ADMIN, None]),
)
def test_adding_a_deny_policy_never_allows_more(method, path, caller) -> None:
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}
    base = _set(ALLOW_WEB_GET_PUBLIC)
    more = _set(ALLOW_WEB_GET_PUBLIC, deny)
    req = _req(source=caller, method=method, path=path)
    assert not (more.evaluate(req).allowed and not base.evaluate(req).allowed)


_PATHS = ["/a", "/a/*", "/a/b", "/a/b/*", "*", "/c/*", "/"]
_operation = st.fixed_dictionaries(
    {},
    optional={
        "methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2),
        "paths": st.lists(st.sampled_from(_PATHS), min_size=1, max_size=3),
    },
).filter(bool)
_rule = st.fixed_dictionaries(
    {},
    optional={
        "from": st.just([{"source": {"principals": [str(WEB)]}}]),
        "to": st.lists(_operation.map(lambda o: {"operation": o}), min_size=1, max_size=2),
    },
)
_spec = st.fixed_dictionaries(
    {"action": st.sampled_from(["ALLOW", "DENY"]), "rules": st.lists(_rule, max_size=3)}
)


def _naive(ps, req: Request):
    """The documented order as a plain scan (what the path index must agree with)."""
    path = normalize_path(req.path or "/")
    for p in ps.deny:
        for i, rule in enumerate(p.rules):
            if rule.matches(req, path, True):
                return (False, p.key, i)
    if ps.allow:
        for p in ps.allow:
            for i, rule in enumerate(p.rules):
                if rule.matches(req, path, True):
                    return (True, p.key, i)
        return (False, ps.allow[0].key, None)
    return (req.source is not None, "default:all-authenticated", None)


@settings(max_examples=400, deadline=None)
@given(
    specs=st.lists(_spec, max_size=6),
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(["/", "/a", "/a/", "/a/b", "/a/b/c", "/ab", "/c", "/c/d", "/x"]),
    caller=st.sampled_from([WEB, ADMIN]),
)
def test_the_path_index_decides_as_a_plain_scan_would(specs, method, path, caller) -> None:
    ps = _set(*specs)
    req = _req(source=caller, method=method, path=path)
    d = ps.evaluate(req)
    assert (d.allowed, d.policy, d.rule) == _naive(ps, req)


def test_policies_that_would_deny_a_plaintext_caller_make_a_pod_strict() -> None:
    """Plaintext to a permissive pod does not pass the proxy: a pod whose policies would
    deny some plaintext caller is made strict, not left open behind its policies."""
    from weft.mesh import InboundMode, enforced_inbound_mode
    from weft.policy import restricts_plaintext

    def pol(spec: dict) -> Policy:
        meta = {"name": "p", "namespace": "shop"}
        return parse_policy({"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
                             "metadata": meta, "spec": spec})  # fmt: skip

    web = {"source": {"principals": ["spiffe://cluster.local/ns/shop/sa/web"]}}
    allow_web = pol({"rules": [{"from": [web]}]})
    deny_admin = pol({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]})
    deny_web = pol({"action": "DENY", "rules": [{"from": [web]}]})
    deny_block = pol(
        {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}
    )
    audit = pol({"action": "AUDIT", "rules": [{}]})
    routed = pol({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                  "name": "r"}], "rules": [{"from": [web]}]})  # fmt: skip
    assert restricts_plaintext([allow_web]) and restricts_plaintext([deny_admin])
    assert restricts_plaintext([deny_block])
    assert not restricts_plaintext([]) and not restricts_plaintext([deny_web, audit, routed])
    permissive = InboundMode.PERMISSIVE
    assert enforced_inbound_mode(permissive, MESH_DEFAULT, False, [allow_web]) is InboundMode.STRICT
    assert enforced_inbound_mode(permissive, MESH_DEFAULT, False, [deny_web]) is permissive
