"""Gateway API routes for the mesh (GAMMA): ``HTTPRoute`` and ``GRPCRoute`` objects
(``gateway.networking.k8s.io/v1``) whose ``parentRefs`` name a Service, parsed into
immutable route tables, validated with the Gateway API's own condition vocabulary, and
matched per request — sans-I/O, shared by the control plane (which parses and reports)
and the node agent (which matches).

What a route says, and what Weft does with it:

* ``parentRefs`` of ``kind: Service`` (group ``""``, same namespace unless given): the
  route applies to requests *to that Service* from meshed clients. Other parent kinds
  (Gateways) are not Weft's and are left alone;
* ``rules[].matches`` — ``path`` (``Exact``, ``PathPrefix`` — segment-wise, as the spec
  says: ``/foo`` matches ``/foo`` and ``/foo/bar``, not ``/foobar`` — or
  ``RegularExpression``), ``headers`` and ``queryParams`` (``Exact`` or
  ``RegularExpression``), ``method``; a rule without matches matches everything. GRPCRoute
  matches ``method`` (``service``/``method``) and headers;
* ``rules[].backendRefs`` — Services (and ports) with ``weight`` (default 1): the traffic
  split. A rule whose every weight is 0, or without backends, answers 500 (the spec);
* ``rules[].timeouts`` — ``request`` and ``backendRequest`` (Gateway API durations);
* ``rules[].filters`` — ``RequestHeaderModifier`` and ``ResponseHeaderModifier``.
  Other filters are refused (``Accepted: False``, reason ``UnsupportedValue``) rather than
  half applied;
* ``metadata.annotations`` — the retry and timeout keys of `weft.traffic.ROUTE_KEYS`
  (``weft.io/retry-http``, ...): they override the parent Service's for this route's
  requests (`Rule.traffic`; a rule's ``timeouts`` win over both). An invalid one makes
  the route not accepted, with the reason; the Service's own policy is unaffected.

Precedence between rules of all routes of one Service follows the HTTPRoute spec: an
``Exact`` path before a prefix, a longer prefix before a shorter one, then a method
match, then more header matches, then more query matches; ties go to the older route
(creation time), then to the route name (``ns/name``), then to rule order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from weft.traffic import TrafficError, TrafficOverride, parse_duration, parse_override, traffic_keys

GROUP = "gateway.networking.k8s.io"
MAX_RULES = 64
MAX_MATCHES = 64
MAX_BACKENDS = 16
MAX_REGEX = 1024
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
"""The Gateway API's Duration (GEP-2257)."""
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}$")


class Kind(StrEnum):
    HTTP = "HTTPRoute"
    GRPC = "GRPCRoute"


class Reason(StrEnum):
    """The Gateway API's condition reasons Weft reports."""

    ACCEPTED = "Accepted"
    UNSUPPORTED_VALUE = "UnsupportedValue"
    RESOLVED_REFS = "ResolvedRefs"
    INVALID_KIND = "InvalidKind"
    BACKEND_NOT_FOUND = "BackendNotFound"
    REF_NOT_PERMITTED = "RefNotPermitted"


@dataclass(frozen=True)
class Condition:
    type: str
    """``Accepted`` or ``ResolvedRefs``."""
    status: bool
    reason: Reason
    message: str


class RouteError(ValueError):
    """A route Weft does not accept (``Accepted: False``); ``reason`` is the Gateway API
    condition reason."""

    def __init__(self, message: str, reason: Reason = Reason.UNSUPPORTED_VALUE) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StringMatch:
    """Exact or regular-expression match of a value (a header, a query parameter)."""

    name: str
    value: str
    regex: bool = False

    def matches(self, got: str | None) -> bool:
        if got is None:
            return False
        if self.regex:
            return re.fullmatch(self.value, got) is not None
        return got == self.value


@dataclass(frozen=True)
class Match:
    path_type: str = "PathPrefix"
    """``Exact``, ``PathPrefix`` or ``RegularExpression`` (HTTPRoute); GRPCRoute
    compiles its ``service``/``method`` into an Exact or regex path."""
    path: str = "/"
    method: str | None = None
    headers: tuple[StringMatch, ...] = ()
    """Names lower-cased (header names are case-insensitive)."""
    query: tuple[StringMatch, ...] = ()

    def matches(
        self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path_type == "Exact":
            if path != self.path:
                return False
        elif self.path_type == "PathPrefix":
            prefix = self.path.rstrip("/")
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                return False
        elif re.fullmatch(self.path, path) is None:
            return False
        return all(h.matches(headers.get(h.name)) for h in self.headers) and all(
            q.matches(query.get(q.name)) for q in self.query
        )

    def rank(self) -> tuple[int, int, int, int, int]:
        """Higher is more specific (the spec's precedence), for sorting."""
        exact = 2 if self.path_type == "Exact" else (1 if self.path_type == "PathPrefix" else 0)
        return (exact, len(self.path), self.method is not None, len(self.headers), len(self.query))


@dataclass(frozen=True)
class Backend:
    namespace: str
    name: str
    port: int | None
    weight: int = 1
    invalid: str = ""
    """Why this backend cannot be used (a kind other than Service, another namespace
    without a ReferenceGrant): its share of requests is answered 500, as the spec says."""

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` (name, value) after the modifier: set replaces every value of a
        name, add appends, remove drops (names compared case-insensitively)."""
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        return out + list(self.set) + list(self.add)


@dataclass(frozen=True)
class Rule:
    route: str
    """``ns/name`` of the route it came from (metrics' ``route`` label, logs)."""
    index: int
    matches: tuple[Match, ...]
    backends: tuple[Backend, ...]
    request_timeout: float | None = None
    backend_timeout: float | None = None
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    kind: Kind = Kind.HTTP
    """The kind of the route it came from (with `route`, the retry budget's key)."""
    traffic: TrafficOverride | None = None
    """The route's retry and timeout annotations (None: the Service's apply)."""

    def pick(self, draw: float) -> Backend | None:
        """The backend for a uniform ``draw`` in [0, 1) by weight; None: no weight."""
        total = sum(b.weight for b in self.backends)
        if total <= 0:
            return None
        at = draw * total
        for b in self.backends:
            if at < b.weight:
                return b
            at -= b.weight
        return self.backends[-1]


@dataclass(frozen=True)
class Route:
    kind: Kind
    namespace: str
    name: str
    created: str
    """``metadata.creationTimestamp`` (RFC 3339 sorts as text): the older route wins ties."""
    parents: tuple[tuple[str, int | None], ...]
    """Services (``ns/name``) it attaches to, and the service port (None: every port)."""
    rules: tuple[Rule, ...]
    source: str = field(default="", compare=True, repr=False)
    """The object it was parsed from, reduced to kind, name, namespace, creation time and
    spec (canonical JSON): what the discovery stream carries, re-parsed by the agent
    with this same parser (`route_object`)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RouteTable:
    """All rules attached to one Service, most specific first."""

    service: str
    entries: tuple[tuple[Match, Rule], ...] = field(default_factory=tuple)

    def match(
        self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Rule | None:
        for m, rule in self.entries:
            if m.matches(method, path, headers, query):
                return rule
        return None


def backend_services(route: Route) -> frozenset[str]:
    """The services (``ns/name``) the rules of ``route`` send requests to: the workloads
    behind them are the ones a policy targeting the route applies to."""
    return frozenset(b.service for r in route.rules for b in r.backends if not b.invalid)


def table_for(service: str, routes: Sequence[Route], port: int | None = None) -> RouteTable:
    """The route table of ``service`` (requests to ``port``; None: any): every rule of
    every route that names it as a parent, ordered by the spec's precedence."""
    ranked: list[tuple[tuple[Any, ...], Match, Rule]] = []
    for route in routes:
        if not any(
            parent == service and (p is None or port is None or p == port)
            for parent, p in route.parents
        ):
            continue
        for rule in route.rules:
            for i, m in enumerate(rule.matches):
                r = m.rank()
                # Descending specificity, then older route, then name, then rule order.
                order = (-r[0], -r[1], -r[2], -r[3], -r[4], route.created, route.key,
                         rule.index, i)  # fmt: skip
                ranked.append((order, m, rule))
    ranked.sort(key=lambda t: t[0])
    return RouteTable(service, tuple((m, rule) for _, m, rule in ranked))


# --- parsing --------------------------------------------------------------------------------


def _list(obj: Mapping[str, Any], key: str, where: str, limit: int) -> list[Any]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise RouteError(f"{where}.{key}: expected a list")
    if len(value) > limit:
        raise RouteError(f"{where}.{key}: more than {limit} entries")
    return value


def _duration(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _DURATION.match(value):
        raise RouteError(f"{where}: {value!r} is not a Gateway API duration (e.g. 10s, 500ms)")
    seconds = parse_duration(value)
    return seconds if seconds > 0 else None  # "0s": no timeout (the spec)


def _regex(value: str, where: str) -> str:
    if len(value) > MAX_REGEX:
        raise RouteError(f"{where}: regular expression longer than {MAX_REGEX}")
    try:
        re.compile(value)
    except re.error as e:
        raise RouteError(f"{where}: invalid regular expression ({e})") from None
    return value


def _string_match(m: Any, where: str, *, header: bool) -> StringMatch:
    if not isinstance(m, dict) or not isinstance(m.get("name"), str):
        raise RouteError(f"{where}: expected {{name, value}}")
    name, value, kind = m["name"], m.get("value"), m.get("type", "Exact")
    if not isinstance(value, str):
        raise RouteError(f"{where}.value: expected a string")
    if header and not _HEADER_NAME.match(name):
        raise RouteError(f"{where}.name: {name!r} is not a header name")
    if kind not in ("Exact", "RegularExpression"):
        raise RouteError(f"{where}.type: {kind!r} is not Exact or RegularExpression")
    regex = kind == "RegularExpression"
    if regex:
        _regex(value, f"{where}.value")
    return StringMatch(name.lower() if header else name, value, regex)


def _http_match(m: Any, where: str) -> Match:
    if not isinstance(m, dict):
        raise RouteError(f"{where}: expected an object")
    path = m.get("path") or {}
    ptype, pvalue = path.get("type", "PathPrefix"), path.get("value", "/")
    if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
        raise RouteError(f"{where}.path.type: {ptype!r} is not supported")
    if not isinstance(pvalue, str) or (ptype != "RegularExpression" and not pvalue.startswith("/")):
        raise RouteError(f"{where}.path.value: {pvalue!r} must be a path starting with /")
    if ptype == "RegularExpression":
        _regex(pvalue, f"{where}.path.value")
    method = m.get("method")
    if method is not None and method not in (
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ):  # fmt: skip
        raise RouteError(f"{where}.method: {method!r} is not an HTTP method")
    headers = tuple(
        _string_match(h, f"{where}.headers[{i}]", header=True)
        for i, h in enumerate(_list(m, "headers", where, 16))
    )
    query = tuple(
        _string_match(q, f"{where}.queryParams[{i}]", header=False)
        for i, q in enumerate(_list(m, "queryParams", where, 16))
    )
    return Match(ptype, pvalue, method, headers, query)


def _grpc_match(m: Any, where: str) -> Match:
    if not isinstance(m, dict):
        raise RouteError(f"{where}: expected an object")
    method = m.get("method") or {}
    kind = method.get("type", "Exact")
    service, name = method.get("service"), method.get("method")
    if kind not in ("Exact", "RegularExpression"):
        raise RouteError(f"{where}.method.type: {kind!r} is not Exact or RegularExpression")
    if service is None and name is None:
        path_type, path = "PathPrefix", "/"
    elif kind == "Exact":
        if name is None:
            path_type, path = "PathPrefix", f"/{service}"
        else:
            path_type = "Exact" if service is not None else "RegularExpression"
            path = f"/{service}/{name}" if service is not None else f"/[^/]+/{re.escape(name)}"
    else:
        s = _regex(service or "[^/]+", f"{where}.method.service")
        n = _regex(name or "[^/]+", f"{where}.method.method")
        path_type, path = "RegularExpression", f"/(?:{s})/(?:{n})"
    headers = tuple(
        _string_match(h, f"{where}.headers[{i}]", header=True)
        for i, h in enumerate(_list(m, "headers", where, 16))
    )
    return Match(path_type, path, "POST", headers)


def _modifier(f: Any, where: str) -> HeaderModifier:
    if not isinstance(f, dict):
        raise RouteError(f"{where}: expected an object")

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, h in enumerate(_list(f, key, where, 16)):
            ok = isinstance(h, dict) and isinstance(h.get("value"), str)
            if not (ok and isinstance(h.get("name"), str) and _HEADER_NAME.match(h["name"])):
                raise RouteError(f"{where}.{key}[{i}]: expected {{name, value}}")
            out.append((h["name"].lower(), h["value"]))
        return tuple(out)

    remove = _list(f, "remove", where, 16)
    if not all(isinstance(n, str) and _HEADER_NAME.match(n) for n in remove):
        raise RouteError(f"{where}.remove: expected header names")
    return HeaderModifier(pairs("set"), pairs("add"), tuple(n.lower() for n in remove))


def _backend(b: Any, namespace: str, where: str) -> Backend:
    if not isinstance(b, dict) or not isinstance(b.get("name"), str):
        raise RouteError(f"{where}: expected {{name, port}}")
    ns = b.get("namespace", namespace)
    invalid = ""
    if b.get("group", "") != "" or b.get("kind", "Service") != "Service":
        invalid = f"{Reason.INVALID_KIND}: {where} is not a Service"
    elif ns != namespace:
        # Cross-namespace backends need a ReferenceGrant; not supported yet.
        invalid = f"{Reason.REF_NOT_PERMITTED}: {where} is in another namespace ({ns})"
    port, weight = b.get("port"), b.get("weight", 1)
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        raise RouteError(f"{where}.port: {port!r} is not a port")
    if not (isinstance(weight, int) and not isinstance(weight, bool) and 0 <= weight <= 1_000_000):
        raise RouteError(f"{where}.weight: {weight!r} is not within 0-1000000")
    return Backend(ns, b["name"], port, weight, invalid)


def parse_route(obj: Mapping[str, Any]) -> Route:
    """An HTTPRoute or GRPCRoute object (the API's JSON) as a `Route`; `RouteError`
    (with the condition reason) if Weft cannot apply all of it, whatever the input."""
    if not isinstance(obj, Mapping):
        raise RouteError("expected an object")
    try:
        return _parse_route(obj)
    except (AttributeError, TypeError, KeyError) as e:
        # A field of the wrong shape somewhere the checks above do not look (the API
        # server's schema validation would refuse most of these).
        raise RouteError(f"malformed route ({type(e).__name__}: {e})") from None


def _parse_route(obj: Mapping[str, Any]) -> Route:
    kind_name = obj.get("kind")
    if kind_name not in (Kind.HTTP, Kind.GRPC):
        raise RouteError(f"kind {kind_name!r} is not HTTPRoute or GRPCRoute", Reason.INVALID_KIND)
    kind = Kind(kind_name)
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name")
    if not isinstance(name, str) or not name:
        raise RouteError("metadata.name: missing")
    annotations = traffic_keys(meta.get("annotations") or {})
    try:
        traffic = parse_override(annotations)
    except TrafficError as e:
        raise RouteError(f"metadata.annotations: {e}") from None
    spec = obj.get("spec") or {}
    parents = []
    for i, p in enumerate(_list(spec, "parentRefs", "spec", 32)):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise RouteError(f"spec.parentRefs[{i}]: expected {{kind, name}}")
        if p.get("kind") == "Service" and p.get("group", "") in ("", "core"):
            port = p.get("port")
            if port is not None and not (isinstance(port, int) and 0 < port < 65536):
                raise RouteError(f"spec.parentRefs[{i}].port: {port!r} is not a port")
            parents.append((f"{p.get('namespace', namespace)}/{p['name']}", port))
    rules = []
    for r_i, r in enumerate(_list(spec, "rules", "spec", MAX_RULES) or [{}]):
        where = f"spec.rules[{r_i}]"
        if not isinstance(r, dict):
            raise RouteError(f"{where}: expected an object")
        parse_match = _http_match if kind is Kind.HTTP else _grpc_match
        matches = tuple(
            parse_match(m, f"{where}.matches[{i}]")
            for i, m in enumerate(_list(r, "matches", where, MAX_MATCHES))
        ) or (Match(),)
        backends = tuple(
            _backend(b, namespace, f"{where}.backendRefs[{i}]")
            for i, b in enumerate(_list(r, "backendRefs", where, MAX_BACKENDS))
        )
        request_headers = response_headers = None
        for i, f in enumerate(_list(r, "filters", where, 16)):
            ftype = f.get("type") if isinstance(f, dict) else None
            fwhere = f"{where}.filters[{i}]"
            if ftype == "RequestHeaderModifier":
                request_headers = _modifier(f.get("requestHeaderModifier"), fwhere)
            elif ftype == "ResponseHeaderModifier":
                response_headers = _modifier(f.get("responseHeaderModifier"), fwhere)
            else:
                raise RouteError(f"{fwhere}: filter {ftype!r} is not supported by Weft yet")
        timeouts = r.get("timeouts") or {}
        if kind is Kind.GRPC and timeouts:
            raise RouteError(f"{where}.timeouts: GRPCRoute has no timeouts field")
        request_t = _duration(timeouts.get("request"), f"{where}.timeouts.request")
        backend_t = _duration(timeouts.get("backendRequest"), f"{where}.timeouts.backendRequest")
        if request_t is not None and backend_t is not None and backend_t > request_t:
            raise RouteError(f"{where}.timeouts: backendRequest longer than request")
        rules.append(Rule(f"{namespace}/{name}", r_i, matches, backends, request_t, backend_t,
                          request_headers, response_headers, kind, traffic))  # fmt: skip
    created = str(meta.get("creationTimestamp") or "")
    reduced_meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "creationTimestamp": created,
    }
    if annotations:
        # Only the keys the agent applies; absent when there are none, so a route without
        # them has the same source (and wire form) as before they were read.
        reduced_meta["annotations"] = annotations
    reduced = {
        "apiVersion": f"{GROUP}/v1", "kind": kind.value, "metadata": reduced_meta,
        "spec": {"parentRefs": spec.get("parentRefs") or [], "rules": spec.get("rules") or []},
    }  # fmt: skip
    source = json.dumps(reduced, sort_keys=True, separators=(",", ":"))
    return Route(kind, namespace, name, created, tuple(parents), tuple(rules), source)


def route_object(route: Route) -> dict[str, Any]:
    """The reduced object `parse_route` made ``route`` from (for the wire)."""
    obj: dict[str, Any] = json.loads(route.source)
    return obj


def conditions(
    obj: Mapping[str, Any], services: Mapping[str, object]
) -> tuple[Route | None, list[Condition]]:
    """The route and its status conditions (``Accepted``, ``ResolvedRefs``) given the
    Services that exist (``ns/name`` keys): what the control plane writes back."""
    try:
        route = parse_route(obj)
    except RouteError as e:
        return None, [Condition("Accepted", False, e.reason, str(e))]
    backends = [b for rule in route.rules for b in rule.backends]
    invalid = [b.invalid for b in backends if b.invalid]
    if invalid:
        reason = Reason(invalid[0].split(":", 1)[0])
        resolved = Condition("ResolvedRefs", False, reason, "; ".join(invalid))
    else:
        missing = sorted({b.service for b in backends} - set(services))
        if missing:
            message = f"no such Service: {', '.join(missing)}"
            resolved = Condition("ResolvedRefs", False, Reason.BACKEND_NOT_FOUND, message)
        else:
            resolved = Condition("ResolvedRefs", True, Reason.RESOLVED_REFS, "all backends exist")
    return route, [Condition("Accepted", True, Reason.ACCEPTED, "accepted"), resolved]
