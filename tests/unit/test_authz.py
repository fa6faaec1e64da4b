"""The destination node's `Authorizer`: streams judged at L4 (HTTP/1.1 streams leave
HTTP conditions to their requests, HTTP/2 and opaque streams cannot satisfy them),
requests in full, policy sets compiled once per workload value and replaced with it,
and the decision counters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from nodeagent.authz import Authorizer, AuthzMetrics
from weft.identity import SpiffeId
from weft.mesh import InboundMode, Workload
from weft.policy import Action, DefaultPolicy, Policy, parse_policy
from weft.policy.plaintext import lookup

WEB = SpiffeId.workload("shop", "web")
OTHER = SpiffeId.workload("shop", "batch")
POD = Workload(
    uid="u1", name="payments-1", namespace="shop", node="n1", ips=("10.244.1.5",),
    service_account="payments", identity=SpiffeId.workload("shop", "payments"), captured=True,
    inbound_mode=InboundMode.STRICT,
)  # fmt: skip
GET_PUBLIC = parse_policy({
    "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "web-get", "namespace": "shop"},
    "spec": {"rules": [{"from": [{"source": {"principals": [str(WEB)]}}],
                        "to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]}]},
})  # fmt: skip
TARGET = ("10.244.1.5", 8000)


def _net_policy(name: str, *sources: list[str]) -> Policy:
    return parse_policy({
        "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"rules": [{"from": [{"source": {"ipBlocks": b}} for b in sources]}]},
    })  # fmt: skip


def test_plaintext_verdicts_are_the_workloads_filter_table_cached_per_value() -> None:
    pod = dataclasses.replace(POD, policies=(_net_policy("batch-net", ["10.244.9.0/24"]),))
    authz, _ = _authz(pod)
    table = authz.plaintext(pod)
    assert table is not None and authz.plaintext(pod) is table
    assert lookup(table, 8000, "10.244.9.7") and not lookup(table, 8000, "10.244.8.7")
    assert authz.plaintext(POD) is None  # no policies: only the node (the filter's default)
    blocks = [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)]
    big = dataclasses.replace(POD, policies=(_net_policy("big", blocks[:200], blocks[200:]),))
    assert authz.plaintext(big) is None  # too complex for the filter: all plaintext refused


def _authz(pod: Workload) -> tuple[Authorizer, list[Workload]]:
    holder = [pod]
    return Authorizer(lambda ip: holder[0] if ip == pod.ips[0] else None), holder


def test_http_streams_wait_for_their_requests_opaque_ones_cannot_satisfy_http_rules() -> None:
    authz, _ = _authz(dataclasses.replace(POD, policies=(GET_PUBLIC,)))
    assert authz.stream(WEB, TARGET, "http/1.1").allowed
    assert authz.stream(WEB, TARGET, "h2").allowed  # its requests judged on the client node
    assert not authz.stream(WEB, TARGET, None).allowed  # opaque (or an unjudged h2 stream)
    assert not authz.stream(OTHER, TARGET, "http/1.1").allowed  # its source never matches
    assert authz.request(WEB, TARGET, "GET", "/public/a", {}).allowed
    assert not authz.request(WEB, TARGET, "POST", "/public/a", {}).allowed
    assert authz.metrics.value("tcp", "deny", policy="shop/web-get") == 2
    assert authz.metrics.value("http", "allow", workload="shop/payments-1") == 1


def test_a_new_workload_value_brings_its_new_policies_at_once() -> None:
    authz, holder = _authz(POD)
    assert authz.stream(OTHER, TARGET, None).allowed  # no policy: all-authenticated
    holder[0] = dataclasses.replace(POD, policies=(GET_PUBLIC,))
    assert not authz.stream(OTHER, TARGET, None).allowed
    holder[0] = dataclasses.replace(POD, default_policy=DefaultPolicy.DENY)
    d = authz.stream(WEB, TARGET, None)
    assert not d.allowed and "default:deny" in d.reason


def test_unknown_targets_are_denied_and_audit_is_counted_apart() -> None:
    authz, _ = _authz(dataclasses.replace(POD, default_policy=DefaultPolicy.AUDIT,
                                          policies=(GET_PUBLIC,)))  # fmt: skip
    assert not authz.stream(WEB, ("10.9.9.9", 80), None).allowed
    assert authz.request(OTHER, TARGET, "GET", "/x", {}).allowed  # audit: let through
    assert authz.metrics.value("http", "audit", policy="shop/web-get") == 1
    names = {m.name for m in authz.metrics.collect()}
    assert {"inbound_http_authz_allow", "inbound_http_authz_audit"} <= names


def _fixed(pod: Workload) -> Callable[[str], Workload | None]:
    return lambda ip: pod


def test_the_counters_are_bounded() -> None:
    m = AuthzMetrics(max_series=2)
    authz = Authorizer(lambda ip: None, metrics=m)
    for i in range(10):
        pod = dataclasses.replace(POD, uid=f"u{i}", name=f"p-{i}", ips=(f"10.0.0.{i}",))
        a = Authorizer(_fixed(pod), metrics=m)
        a.stream(WEB, (pod.ips[0], 80), None)
    assert len(m._counts) <= 3  # two series and the overflow one
    assert authz.metrics is m


def test_http2_requests_are_judged_on_the_callers_node() -> None:
    authz, _ = _authz(dataclasses.replace(POD, policies=(GET_PUBLIC,)))
    asked: list[int] = []

    def headers() -> dict[str, str]:
        asked.append(1)
        return {}

    assert authz.outbound(WEB, TARGET, "GET", "/public/a?x=1", headers) is None
    why = authz.outbound(WEB, TARGET, "POST", "/weft.lab.Echo/Echo", headers)
    assert why is not None and "web-get" not in why  # the caller is not told which policy
    assert asked == []  # no policy reads headers: they are not even built
    assert authz.metrics.value("outbound_http", "deny", policy="shop/web-get") == 1
    names = {m.name for m in authz.metrics.collect()}
    assert {"outbound_http_authz_allow", "outbound_http_authz_deny"} <= names
    bare, _ = _authz(POD)
    assert bare.outbound(OTHER, TARGET, "POST", "/x", headers) is None  # no policy: not judged


def test_a_policy_update_never_judges_a_request_half_applied() -> None:
    """Requests judged while the workload's policies flip between two versions get the
    verdict of one version or the other, whole: the set is compiled from one workload
    value and swapped with it (and remembered decisions are dropped with it)."""
    deny_admin = parse_policy({
        "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]},
    })  # fmt: skip
    old = dataclasses.replace(POD, policies=(GET_PUBLIC,))
    new = dataclasses.replace(POD, policies=(deny_admin,))
    authz, holder = _authz(old)
    for i in range(200):
        holder[0] = old if i % 3 else new
        assert authz.request(WEB, TARGET, "GET", "/public/x", {}).allowed  # by either version
        admin = authz.request(WEB, TARGET, "GET", "/admin/x", {})
        # old: no rule of web-get allows /admin; new: no-admin denies it. Both deny, each
        # naming its own version's policy.
        assert not admin.allowed
        assert admin.policy == ("shop/web-get" if holder[0] is old else "shop/no-admin")
        post = authz.request(WEB, TARGET, "POST", "/public/x", {})
        assert post.allowed is (holder[0] is new)  # only the new version lets POST through


ADMIN_ROUTE = parse_policy({
    "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "admin-web-only", "namespace": "shop"},
    "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                             "name": "admin"}],
             "rules": [{"from": [{"source": {"principals": [str(WEB)]}}]}]},
})  # fmt: skip


def test_per_route_policies_judge_by_the_route_the_callers_node_marked() -> None:
    """On a stream whose OPEN says the client node sets ``weft-route`` (``routed``), the
    header names the route; elsewhere it is not believed (an older client node may pass
    an app's own), and the request matched no route."""
    pod = dataclasses.replace(POD, default_policy=DefaultPolicy.DENY, policies=(ADMIN_ROUTE,))
    authz, _ = _authz(pod)
    assert authz.stream(WEB, TARGET, "http/1.1").allowed  # left to the requests
    assert not authz.stream(OTHER, TARGET, "http/1.1").allowed  # no ALLOW names it
    routed = authz.gate(WEB, TARGET, True)
    assert routed.needs_headers  # the route travels in a header
    admin = {"weft-route": "shop/admin"}
    assert routed.judge("POST", b"/admin/x", admin) is None  # the route's ALLOW
    assert routed.judge("GET", b"/", {}) is not None  # no route: the default (deny)
    other = authz.gate(OTHER, TARGET, True)
    assert other.judge("POST", b"/admin/x", admin) is not None  # not from web
    unmarked = authz.gate(WEB, TARGET, False)
    assert not unmarked.needs_headers
    assert unmarked.judge("POST", b"/admin/x", admin) is not None  # header not believed
    # The caller's node judges HTTP/2 requests with the route it matched.
    assert authz.outbound(WEB, TARGET, "POST", "/admin/x", dict, "shop/admin") is None
    assert authz.outbound(WEB, TARGET, "POST", "/admin/x", dict, None) is not None
    assert authz.outbound(OTHER, TARGET, "POST", "/admin/x", dict, "shop/admin") is not None
    # Decisions are remembered per route: the same path on another route is judged anew.
    assert authz.metrics.value("http", "allow", policy="shop/admin-web-only") == 1
    assert authz.metrics.value("http", "deny", policy="default:deny") == 2


def test_a_route_allow_leaves_the_connection_to_its_requests() -> None:
    """The workload's own ALLOW does not allow batch, a route's does: batch's HTTP
    stream is let through for its requests to be judged (an opaque one is not); a
    caller no ALLOW names is refused at the stream already."""
    ops = parse_policy({
        "apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "ops-batch", "namespace": "shop"},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                 "name": "ops"}],
                 "rules": [{"from": [{"source": {"principals": [str(OTHER)]}}]}]},
    })  # fmt: skip
    authz, _ = _authz(dataclasses.replace(POD, policies=(GET_PUBLIC, ops)))
    assert authz.stream(OTHER, TARGET, "http/1.1").allowed
    assert not authz.stream(OTHER, TARGET, None).allowed
    stranger = SpiffeId.workload("shop", "stranger")
    assert not authz.stream(stranger, TARGET, "http/1.1").allowed
    gate = authz.gate(OTHER, TARGET, True)
    assert gate.judge("GET", b"/public/x", {"weft-route": "shop/rest"}) is not None
    assert gate.judge("POST", b"/anything", {"weft-route": "shop/ops"}) is None
    web = authz.gate(WEB, TARGET, True)
    assert web.judge("GET", b"/public/x", {"weft-route": "shop/rest"}) is None
    assert web.judge("GET", b"/x", {"weft-route": "shop/ops"}) is not None


def test_a_route_deny_applies_only_to_its_route() -> None:
    deny = dataclasses.replace(ADMIN_ROUTE, action=Action.DENY)
    authz, _ = _authz(dataclasses.replace(POD, policies=(deny,)))
    gate = authz.gate(WEB, TARGET, True)
    assert gate.judge("GET", b"/admin", {"weft-route": "shop/admin"}) is not None
    assert gate.judge("GET", b"/admin", {"weft-route": "shop/other"}) is None
    assert gate.judge("GET", b"/admin", {}) is None  # not through the route: default
