"""Judging a request or a connection against the policies of one workload."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
)
from weft.policy.paths import PathError, normalize_path


def _first_match(policy: Policy, req: Request, path: str | None, http: bool) -> int | None:
    for i, rule in enumerate(policy.rules):
        if rule.matches(req, path, http):
            return i
    return None


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
        """No policy applies: every request of a connection is judged as the connection
        was (the default looks only at the caller)."""
        return (
            not (self.deny or self.audit or self.allow) and self.default is not DefaultPolicy.AUDIT
        )

    @cached_property
    def has_header_rules(self) -> bool:
        return any(o.headers for p in (*self.deny, *self.audit, *self.allow) for r in p.rules
                   for o in r.operations)  # fmt: skip

    @property
    def has_http_rules(self) -> bool:
        return any(r.has_http for p in (*self.deny, *self.allow) for r in p.rules) or any(
            p.target_routes for p in (*self.deny, *self.allow)
        )

    def evaluate(self, req: Request, *, will_carry_http: bool = False) -> Decision:
        """Judge ``req``: a request (``req.is_http``) fully, or a connection (L4).

        For a connection, ``will_carry_http`` says each of its requests will be judged
        too, so an ALLOW rule with HTTP fields may allow the connection; per-route
        policies are then left to the requests."""
        decision = self._evaluate(req, will_carry_http)
        if self.default is not DefaultPolicy.AUDIT or decision.allowed:
            return decision
        return Decision(True, decision.policy, decision.rule, decision.reason,
                        (*decision.audited, decision.policy), would_deny=True)  # fmt: skip

    def _evaluate(self, req: Request, will_carry_http: bool) -> Decision:
        http = req.is_http
        path = None
        if http and req.path is not None:
            try:
                path = normalize_path(req.path)
            except PathError as e:
                return Decision(False, "path", reason=str(e))

        def applies(p: Policy) -> bool:
            if not p.target_routes:
                return True
            return http and req.route in p.target_routes

        for p in self.deny:
            if not applies(p):
                continue
            for i, rule in enumerate(p.rules):
                if not http and rule.has_http and will_carry_http:
                    continue  # judged on each request
                if rule.matches(req, path, http):
                    return Decision(False, p.key, i, "denied by policy")
        audited = tuple(p.key for p in self.audit
                        if applies(p) and _first_match(p, req, path, http) is not None)  # fmt: skip
        allows = [p for p in self.allow if applies(p)]
        if allows:
            for p in allows:
                for i, rule in enumerate(p.rules):
                    if not http and rule.has_http and not will_carry_http:
                        continue  # opaque TCP cannot satisfy an HTTP condition
                    if rule.matches(req, path, http):
                        return Decision(True, p.key, i, "allowed by policy", audited)
            names = ", ".join(p.key for p in allows)
            return Decision(False, allows[0].key, None, f"no rule of {names} allows it", audited)
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
