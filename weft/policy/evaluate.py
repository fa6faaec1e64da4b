"""Judging a request or a connection against the policies of one workload."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from weft.identity import DEFAULT_TRUST_DOMAIN
from weft.policy.model import (
    MESH_DEFAULT,
    Action,
    Decision,
    DefaultPolicy,
    Policy,
    Request,
    Rule,
)
from weft.policy.paths import PathError, normalize_path


def _first_match(policy: Policy, req: Request, path: str | None, http: bool) -> int | None:
    for i, rule in enumerate(policy.rules):
        if rule.matches(req, path, http):
            return i
    return None


Entry = tuple[Policy, int, Rule]
"""A rule, with its policy and its index there."""


class _PathIndex:
    """The rules of some policies, by the paths they can match: a rule each of whose
    operations lists ``paths`` can only match a request with one of those paths, so it
    is filed under each (exact path, or a ``/a/*`` prefix's base) and looked at only for
    such requests; every other rule is looked at always. `candidates` keeps the
    policies' order (policy by policy, rule by rule), so the first match is the one a
    plain scan would find."""

    def __init__(self, policies: tuple[Policy, ...]) -> None:
        self.policies = policies
        self._always: list[tuple[int, Entry]] = []
        self._exact: dict[str, list[tuple[int, Entry]]] = {}
        self._prefix: dict[str, list[tuple[int, Entry]]] = {}
        order = 0
        for p in policies:
            for i, rule in enumerate(p.rules):
                item = (order, (p, i, rule))
                order += 1
                pats = [pp.text for o in rule.operations for pp in o.paths]
                if not rule.operations or any(not o.paths for o in rule.operations) \
                        or "*" in pats:  # fmt: skip
                    self._always.append(item)
                    continue
                for text in dict.fromkeys(pats):
                    if text.endswith("/*"):
                        self._prefix.setdefault(text[:-2], []).append(item)
                    else:
                        self._exact.setdefault(text, []).append(item)
        self._routed = any(p.target_routes for p in policies)
        self._keyed = bool(self._exact or self._prefix)
        self._always_entries = tuple(e for _, e in self._always)

    def applicable(self, route: str | None) -> list[Policy]:
        return [p for p in self.policies if not p.target_routes or route in p.target_routes]

    def applies(self, route: str | None) -> bool:
        if not self._routed:
            return bool(self.policies)
        return bool(self.applicable(route))

    def candidates(self, path: str | None, route: str | None) -> Sequence[Entry]:
        hits: list[list[tuple[int, Entry]]] | None = None
        if path is not None and self._keyed:
            hit = self._exact.get(path)
            if hit:
                hits = [hit]
            prefix = self._prefix
            if prefix:
                hit = prefix.get("")
                if hit:
                    hits = [*(hits or ()), hit]
                i = 0
                while True:
                    i = path.find("/", i + 1)
                    hit = prefix.get(path if i < 0 else path[:i])
                    if hit:
                        hits = [*(hits or ()), hit]
                    if i < 0:
                        break
        if hits is None:
            entries: Sequence[Entry] = self._always_entries
        else:
            found = [item for hit in hits for item in hit]
            if self._always or len(hits) > 1:
                found += self._always
                found.sort(key=lambda item: item[0])
            entries = [e for _, e in found]
        if self._routed:
            entries = [e for e in entries
                       if not e[0].target_routes or route in e[0].target_routes]  # fmt: skip
        return entries


@dataclass(frozen=True)
class PolicySet:
    """The policies that apply to one workload, and its default, ready to evaluate."""

    workload: str
    """``ns/name`` — for logs."""
    default: DefaultPolicy = MESH_DEFAULT
    deny: tuple[Policy, ...] = ()
    audit: tuple[Policy, ...] = ()
    allow: tuple[Policy, ...] = ()
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @cached_property
    def trivial(self) -> bool:
        """No policy applies: each request of a connection would be judged as the
        connection was (a default looks only at the caller), so requests are not judged."""
        return not (self.deny or self.audit or self.allow)

    @cached_property
    def has_header_rules(self) -> bool:
        return any(o.headers for p in (*self.deny, *self.audit, *self.allow) for r in p.rules
                   for o in r.operations)  # fmt: skip

    @cached_property
    def has_route_policies(self) -> bool:
        """Some policy targets a Gateway API route: requests are judged with the route
        they matched (`Request.route`)."""
        return any(p.target_routes for p in (*self.deny, *self.audit, *self.allow))

    @property
    def has_http_rules(self) -> bool:
        return any(r.has_http for p in (*self.deny, *self.allow) for r in p.rules) or any(
            p.target_routes for p in (*self.deny, *self.allow)
        )

    @cached_property
    def _index(self) -> tuple[_PathIndex, _PathIndex, _PathIndex]:
        return _PathIndex(self.deny), _PathIndex(self.audit), _PathIndex(self.allow)

    def evaluate(self, req: Request, *, will_carry_http: bool = False) -> Decision:
        """Judge ``req``: a request (``req.is_http``) fully, or a connection (L4).

        For a connection, ``will_carry_http`` says each of its requests will be judged
        too, so an ALLOW rule with HTTP fields may allow the connection; per-route
        policies are then left to the requests."""
        decision = self._request(req) if req.is_http else self._connection(req, will_carry_http)
        if self.default is not DefaultPolicy.AUDIT or decision.allowed:
            return decision
        return Decision(True, decision.policy, decision.rule, decision.reason,
                        (*decision.audited, decision.policy), would_deny=True)  # fmt: skip

    def _request(self, req: Request) -> Decision:
        """A request: only the rules its path can match are looked at (`_PathIndex`), in
        their policies' order, so a hundred path-scoped policies cost a few lookups."""
        path = None
        if req.path is not None:
            try:
                path = normalize_path(req.path)
            except PathError as e:
                return Decision(False, "path", reason=str(e))
        deny, audit, allow = self._index
        route = req.route
        if self.deny:
            for p, i, rule in deny.candidates(path, route):
                if rule.matches(req, path, True):
                    return self._verdict(False, p, i)
        audited: tuple[str, ...] = ()
        if self.audit:
            audited = tuple(dict.fromkeys(
                p.key for p, _, rule in audit.candidates(path, route)
                if rule.matches(req, path, True)
            ))  # fmt: skip
        if allow.applies(route):
            for p, i, rule in allow.candidates(path, route):
                if rule.matches(req, path, True):
                    if audited:
                        return Decision(True, p.key, i, "allowed by policy", audited)
                    return self._verdict(True, p, i)
            names = ", ".join(p.key for p in allow.applicable(req.route))
            return Decision(False, allow.applicable(req.route)[0].key, None,
                            f"no rule of {names} allows it", audited)  # fmt: skip
        return self._default(req, audited)

    def _verdict(self, allowed: bool, p: Policy, i: int) -> Decision:
        """The decision "rule ``i`` of ``p`` decided", made once (decisions are values)."""
        cache = self._verdicts
        d = cache.get((allowed, p.key, i))
        if d is None:
            reason = "allowed by policy" if allowed else "denied by policy"
            d = cache[(allowed, p.key, i)] = Decision(allowed, p.key, i, reason)
        return d

    @cached_property
    def _verdicts(self) -> dict[tuple[bool, str, int], Decision]:
        return {}

    def _connection(self, req: Request, will_carry_http: bool) -> Decision:
        """A connection (L4): per-route policies wait for the requests; a rule with HTTP
        fields waits for them too if the connection will carry HTTP that is judged
        (ALLOW: may allow; DENY: skipped), else it cannot allow (opaque TCP cannot meet
        a method or path) and a DENY judges on its other fields."""
        for p in self.deny:
            if p.target_routes:
                continue
            for i, rule in enumerate(p.rules):
                if rule.has_http and will_carry_http:
                    continue  # judged on each request
                if rule.matches(req, None, False):
                    return Decision(False, p.key, i, "denied by policy")
        audited = tuple(p.key for p in self.audit if not p.target_routes
                        and _first_match(p, req, None, False) is not None)  # fmt: skip
        allows = [p for p in self.allow if not p.target_routes]
        # A route's ALLOW may let this caller's requests on that route in, whatever the
        # workload's own policies say of the connection: then its requests decide.
        per_route = will_carry_http and any(
            rule.matches(req, None, False)
            for p in self.allow if p.target_routes for rule in p.rules
        )  # fmt: skip
        if allows:
            for p in allows:
                for i, rule in enumerate(p.rules):
                    if rule.has_http and not will_carry_http:
                        continue  # opaque TCP cannot satisfy an HTTP condition
                    if rule.matches(req, None, False):
                        return Decision(True, p.key, i, "allowed by policy", audited)
            if not per_route:
                names = ", ".join(p.key for p in allows)
                return Decision(False, allows[0].key, None, f"no rule of {names} allows it",
                                audited)  # fmt: skip
        if per_route:
            return Decision(True, "per-route", None, "judged per request", audited)
        return self._default(req, audited)

    def _default(self, req: Request, audited: tuple[str, ...]) -> Decision:
        d = self.default
        name = f"default:{d.value}"
        if d is DefaultPolicy.ALL_UNAUTHENTICATED:
            return Decision(True, name, None, "", audited)
        if d is DefaultPolicy.DENY:
            return Decision(False, name, None, "the default inbound policy is deny", audited)
        if req.source is None:
            return Decision(False, name, None, "the caller is not authenticated (plaintext)",
                            audited)  # fmt: skip
        domain = req.source.trust_domain
        if d is DefaultPolicy.CLUSTER_AUTHENTICATED and domain != self.trust_domain:
            why = f"the caller is of trust domain {domain}, not {self.trust_domain}"
            return Decision(False, name, None, why, audited)
        return Decision(True, name, None, "", audited)


def restricts_plaintext(policies: Iterable[Policy]) -> bool:
    """Whether ``policies`` (those of one workload) would deny some caller without a mesh
    identity: an ALLOW policy that selects the workload (no plaintext caller can match
    one yet: ``ipBlocks`` are not judged for plaintext), or a DENY rule that a plaintext
    caller could match. Plaintext to a permissive pod does not pass the proxy, so such a
    pod is made strict rather than let those callers past its policies."""
    for p in policies:
        if p.target_routes:
            continue  # a plaintext caller matched no route
        if p.action is Action.ALLOW:
            return True
        if p.action is Action.DENY:
            for rule in p.rules:
                if not rule.sources or any(
                    not s.principals and s.namespaces is None and s.service_accounts is None
                    for s in rule.sources
                ):
                    return True
    return False


def applicable(
    namespace: str,
    labels: Mapping[str, str],
    policies: Iterable[Policy],
    routes: Iterable[str] = (),
) -> tuple[Policy, ...]:
    """The policies that apply to a workload of ``namespace`` with ``labels``: its
    namespace's whose selector matches, and the per-route ones of ``routes`` (the routes
    whose backends include it), by name — what the control plane sends with it."""
    mine = set(routes)
    return tuple(sorted(
        (p for p in policies if p.selects(namespace, labels) or (p.target_routes & mine)),
        key=lambda p: p.key,
    ))  # fmt: skip


def policy_set(
    workload: str,
    policies: Iterable[Policy],
    default: DefaultPolicy = MESH_DEFAULT,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> PolicySet:
    """``policies`` (those that apply to ``workload``) ready to evaluate."""
    chosen = tuple(policies)
    by = {a: tuple(p for p in chosen if p.action is a) for a in Action}
    return PolicySet(workload, default, by[Action.DENY], by[Action.AUDIT], by[Action.ALLOW],
                     trust_domain)  # fmt: skip


def compile_for(
    namespace: str,
    name: str,
    labels: Mapping[str, str],
    policies: Iterable[Policy],
    default: DefaultPolicy = MESH_DEFAULT,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    routes: Iterable[str] = (),
) -> PolicySet:
    """The `PolicySet` of workload ``namespace/name`` (`applicable`, then `policy_set`)."""
    chosen = applicable(namespace, labels, policies, routes)
    return policy_set(f"{namespace}/{name}", chosen, default, trust_domain)
