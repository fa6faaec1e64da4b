"""The compiled policy model and its matching: what `weft.policy.parse` builds and
`weft.policy.evaluate` walks."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from weft.identity import SpiffeId

GROUP = "weft.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AuthorizationPolicy"
DEFAULT_POLICY_KEY = "weft.io/default-inbound-policy"


class PolicyError(ValueError):
    """An AuthorizationPolicy that cannot be taken; the message names the field."""


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class DefaultPolicy(StrEnum):
    """What decides when no ALLOW policy applies (Linkerd's names)."""

    ALL_UNAUTHENTICATED = "all-unauthenticated"
    """Everyone, plaintext callers too."""
    ALL_AUTHENTICATED = "all-authenticated"
    """Any caller with a verified mesh identity (of any trust domain the mesh trusts)."""
    CLUSTER_AUTHENTICATED = "cluster-authenticated"
    """Callers with a verified identity of this mesh's own trust domain."""
    DENY = "deny"
    AUDIT = "audit"
    """Allow everything; log and count what ``all-authenticated`` and the policies would
    deny."""


MESH_DEFAULT = DefaultPolicy.ALL_AUTHENTICATED


def default_policy(value: str | None, fallback: DefaultPolicy = MESH_DEFAULT) -> DefaultPolicy:
    """A ``weft.io/default-inbound-policy`` value; unknown values fail closed (``deny``)
    — the operator asked for *something*, and a refusal shows at once."""
    if value is None or value == "":
        return fallback
    try:
        return DefaultPolicy(value)
    except ValueError:
        return DefaultPolicy.DENY


def refuses_plaintext(default: DefaultPolicy) -> bool:
    """Whether ``default`` refuses callers without a mesh identity."""
    return default in (
        DefaultPolicy.ALL_AUTHENTICATED,
        DefaultPolicy.CLUSTER_AUTHENTICATED,
        DefaultPolicy.DENY,
    )


def workload_default(
    pod: Mapping[str, str], namespace: Mapping[str, str], mesh: DefaultPolicy | None = None
) -> tuple[DefaultPolicy, bool]:
    """A workload's default inbound policy — the pod's ``weft.io/default-inbound-policy``
    (annotation or, in the lab, label: ``pod`` holds both), else its namespace's, else
    the mesh's (``mesh``; None: not configured) — and whether anyone set it. A default
    set explicitly that refuses plaintext makes the pod strict (plaintext would otherwise
    reach a permissive pod without passing the proxy); the implicit mesh default keeps
    today's behaviour."""
    raw = pod.get(DEFAULT_POLICY_KEY) or namespace.get(DEFAULT_POLICY_KEY)
    if raw is not None:
        return default_policy(raw), True
    if mesh is not None:
        return mesh, True
    return MESH_DEFAULT, False


@dataclass(eq=False)
class Request:
    """What a decision looks at. ``source`` is the verified identity (None: plaintext);
    ``method``/``path``/``headers`` are None for a connection (L4); ``headers`` names are
    lowercase. (Made for every request judged in full: a plain dataclass, since a frozen
    one costs twice as much to build; nothing changes one once made.)"""

    source: SpiffeId | None
    source_ip: str
    port: int
    method: str | None = None
    path: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    route: str | None = None
    """``ns/name`` of the Gateway API route the request matched (on the caller's node,
    where routes are applied), if any."""

    @property
    def is_http(self) -> bool:
        return self.method is not None

    @cached_property
    def source_text(self) -> str | None:
        return str(self.source) if self.source is not None else None

    @cached_property
    def source_ns_sa(self) -> tuple[str | None, str | None]:
        return _ns_sa(self.source)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str
    """``ns/name`` of the deciding policy, or ``default:<policy>``."""
    rule: int | None = None
    reason: str = ""
    audited: tuple[str, ...] = ()
    """AUDIT policies that matched, and — under the ``audit`` default — the policy that
    would have denied (``allowed`` is then True)."""
    would_deny: bool = False
    """Only under the ``audit`` default: the request would have been denied."""


@dataclass(frozen=True)
class IdentityPattern:
    """A ``principals`` entry: exact, ``*``, ``<prefix>/*`` or ``*/<suffix>``."""

    text: str
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None

    def matches(self, identity: str) -> bool:
        if self.exact is not None:
            return identity == self.exact
        if self.prefix is not None:
            return identity.startswith(self.prefix)
        if self.suffix is not None:
            return identity.endswith(self.suffix)
        return True  # "*": any authenticated caller


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Source:
    principals: tuple[IdentityPattern, ...] = ()
    not_principals: tuple[IdentityPattern, ...] = ()
    namespaces: frozenset[str] | None = None
    not_namespaces: frozenset[str] = frozenset()
    service_accounts: frozenset[str] | None = None
    """``ns/sa``"""
    ip_blocks: tuple[Network, ...] = ()
    not_ip_blocks: tuple[Network, ...] = ()

    @cached_property
    def _exact(self) -> frozenset[str]:
        return frozenset(p.exact for p in self.principals if p.exact is not None)

    @cached_property
    def _patterns(self) -> tuple[IdentityPattern, ...]:
        return tuple(p for p in self.principals if p.exact is None)

    def matches(self, req: Request) -> bool:
        ident = req.source_text
        if self.principals:
            if ident is None:
                return False
            if ident not in self._exact:
                for pattern in self._patterns:
                    if pattern.matches(ident):
                        break
                else:
                    return False
        if ident is not None:
            for pattern in self.not_principals:
                if pattern.matches(ident):
                    return False
        if self.namespaces is None and not self.not_namespaces and self.service_accounts is None \
                and not self.ip_blocks and not self.not_ip_blocks:  # fmt: skip
            return True
        ns, sa = req.source_ns_sa
        if self.namespaces is not None and ns not in self.namespaces:
            return False
        if ns is not None and ns in self.not_namespaces:
            return False
        if self.service_accounts is not None and f"{ns}/{sa}" not in self.service_accounts:
            return False
        if self.ip_blocks or self.not_ip_blocks:
            try:
                addr = ipaddress.ip_address(req.source_ip)
            except ValueError:
                return False
            if self.ip_blocks and not any(addr in b for b in self.ip_blocks):
                return False
            if any(addr in b for b in self.not_ip_blocks):
                return False
        return True


def _ns_sa(source: SpiffeId | None) -> tuple[str | None, str | None]:
    if source is None:
        return None, None
    parts = source.path.split("/")
    return (parts[2], parts[4]) if len(parts) == 5 and parts[1] == "ns" else (None, None)


@dataclass(frozen=True)
class PathPattern:
    text: str

    def matches(self, path: str) -> bool:
        if self.text == "*":
            return True
        if self.text.endswith("/*"):
            base = self.text[:-2]
            return path == base or path.startswith(base + "/")
        return path == self.text


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    values: tuple[str, ...]

    def matches(self, headers: Mapping[str, str]) -> bool:
        got = headers.get(self.name)
        if got is None:
            return False
        return any(got.startswith(v[:-1]) if v.endswith("*") else got == v for v in self.values)


@dataclass(frozen=True)
class Operation:
    ports: frozenset[int] | None = None
    not_ports: frozenset[int] = frozenset()
    methods: frozenset[str] | None = None
    not_methods: frozenset[str] = frozenset()
    paths: tuple[PathPattern, ...] = ()
    not_paths: tuple[PathPattern, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()

    @property
    def has_http(self) -> bool:
        return bool(self.methods is not None or self.not_methods or self.paths
                    or self.not_paths or self.headers)  # fmt: skip

    def matches(self, req: Request, path: str | None, http: bool) -> bool:
        """``http``: judge the HTTP fields (False: a connection, they are not looked at)."""
        if self.ports is not None and req.port not in self.ports:
            return False
        if req.port in self.not_ports:
            return False
        if not http:
            return True
        method = req.method or ""
        if self.methods is not None and method not in self.methods:
            return False
        if method in self.not_methods:
            return False
        if self.paths and not (path is not None and any(p.matches(path) for p in self.paths)):
            return False
        if path is not None and any(p.matches(path) for p in self.not_paths):
            return False
        return all(h.matches(req.headers) for h in self.headers)


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()
    """Empty: any caller."""
    operations: tuple[Operation, ...] = ()
    """Empty: any operation."""

    @cached_property
    def has_http(self) -> bool:
        return any(o.has_http for o in self.operations)

    def matches(self, req: Request, path: str | None, http: bool) -> bool:
        if self.sources:
            for s in self.sources:
                if s.matches(req):
                    break
            else:
                return False
        if not self.operations:
            return True
        for o in self.operations:  # noqa: SIM110 (a loop: this is the hot path)
            if o.matches(req, path, http):
                return True
        return False


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    action: Action
    rules: tuple[Rule, ...]
    selector: dict[str, str] | None = None
    """matchLabels; None with no ``targetRefs``: every workload of the namespace."""
    target_routes: frozenset[str] = frozenset()
    """``ns/name`` of the HTTPRoutes/GRPCRoutes the policy applies to (per-route policy)."""
    source: str = field(default="", repr=False)
    """The object reduced to what was parsed (canonical JSON): its wire form."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace != self.namespace or self.target_routes:
            return False
        return self.selector is None or all(labels.get(k) == v for k, v in self.selector.items())
