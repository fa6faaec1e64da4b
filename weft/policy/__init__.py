"""Identity-based authorization: ``AuthorizationPolicy`` (``weft.io/v1alpha1``) objects
parsed, compiled per workload and evaluated per connection and per request — sans-I/O,
shared by the control plane (which validates and distributes) and the node agent (which
enforces at the destination, where the caller's identity is verified).

The shape is Istio's AuthorizationPolicy, which users know::

    apiVersion: weft.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: payments-charge, namespace: shop}
    spec:
      selector: {matchLabels: {app: payments}}   # absent: every workload of the namespace
      # or targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: payments}]
      action: ALLOW                              # ALLOW (default), DENY or AUDIT
      rules:
        - from:
            - source:
                principals: [spiffe://cluster.local/ns/shop/sa/web]
          to:
            - operation: {ports: ["8080"], methods: [POST], paths: [/charge]}

Matching, as in Istio: a policy matches a request when any rule matches; a rule matches
when each of its ``from``, ``to`` matches (absent: anything); ``from``/``to`` match when
any entry matches; an entry matches when every field it sets matches; a field matches
when any value in it matches (and no value of its ``not`` form does). A policy without
rules matches nothing (so an ALLOW policy without rules denies everything); a rule
``{}`` matches everything.

Evaluation order for one request (`PolicySet.evaluate`):

1. a DENY policy that matches denies;
2. AUDIT policies that match are recorded (no effect on the decision);
3. if any ALLOW policy applies to the workload (or the request's route), the request is
   allowed only if one of them matches;
4. otherwise the workload's default inbound policy decides (`DefaultPolicy`).

With the default ``audit``, every deny of steps 1-4 (judged as ``all-authenticated``
would) is turned into an allow that is logged and counted: a way to try policies before
enforcing them.

Sources: ``principals`` (SPIFFE IDs; ``*`` is any authenticated caller, a trailing
``/*`` a prefix at a path boundary such as ``spiffe://cluster.local/ns/shop/*``, a leading
``*/`` any trust domain; Istio's form without ``spiffe://`` is accepted), ``namespaces``
and ``serviceAccounts`` (``sa`` or ``ns/sa``) of authenticated callers, and ``ipBlocks``
(CIDRs of the caller's address: the only way to allow a plaintext caller). Identities are
compared exactly: no case folding, no trailing dot, no percent-decoding (SPIFFE IDs have
none of these, so a caller spelled differently is a different caller). Headers never
grant identity.

Operations: ``ports``, ``methods`` (case-sensitive, as HTTP), ``paths`` (exact, a segment
prefix ``/api/*`` matching ``/api`` and everything under ``/api/``, or ``*``) and
``headers`` (``{name, values}``; a value may end with ``*``). Paths are judged in their
normal form (`normalize_path`): percent-decoded, ``\\`` taken as ``/``, dot segments
removed, repeated slashes merged, query dropped; a path that cannot be normalised (bad
percent-encoding, ``..`` above the root, a NUL) is denied whatever the policies say.
At L4 (a connection, before any request) an HTTP field cannot be judged: an ALLOW rule
with one is taken as "may allow" for a connection that will carry HTTP (each request is
judged again), and as not matching for opaque TCP; a DENY rule with HTTP fields judges
opaque TCP on its other fields alone (more restrictive, as Istio does).
"""

from __future__ import annotations

from weft.policy.evaluate import (
    PolicySet,
    applicable,
    compile_for,
    policy_set,
    restricts_plaintext,
)
from weft.policy.model import (
    API_VERSION,
    DEFAULT_POLICY_KEY,
    GROUP,
    KIND,
    MESH_DEFAULT,
    VERSION,
    Action,
    Decision,
    DefaultPolicy,
    Policy,
    PolicyError,
    Request,
    default_policy,
    refuses_plaintext,
    workload_default,
)
from weft.policy.parse import parse_policy, parse_principal, policy_object
from weft.policy.paths import PathError, normalize_path

__all__ = [
    "API_VERSION",
    "DEFAULT_POLICY_KEY",
    "GROUP",
    "KIND",
    "MESH_DEFAULT",
    "VERSION",
    "Action",
    "Decision",
    "DefaultPolicy",
    "PathError",
    "Policy",
    "PolicyError",
    "PolicySet",
    "Request",
    "applicable",
    "compile_for",
    "default_policy",
    "normalize_path",
    "parse_policy",
    "parse_principal",
    "policy_object",
    "policy_set",
    "refuses_plaintext",
    "restricts_plaintext",
    "workload_default",
]
