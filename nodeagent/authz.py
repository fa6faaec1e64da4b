"""Authorization at the destination node: the local pods' `weft.policy` policies judged
for every tunnel stream (L4) and every inbound HTTP/1.1 request (L7), where the caller's
identity has just been verified by mTLS.

The control plane sends each workload with its default inbound policy and the policies
that apply to it (`weft.mesh.Workload.policies`); `Authorizer` compiles them once per
workload value (a discovery update brings a new value, so a policy change is in force
for the next stream or request — never a half-applied one: a `PolicySet` is immutable and
swapped whole) and answers:

* `Authorizer.stream` — the tunnel server's ``Authorize`` hook: a denied stream is
  refused ``POLICY_DENIED`` (the client node resets a TCP connection, answers HTTP 403
  ``weft-proxy-error: unauthorized``, gRPC ``PERMISSION_DENIED``). A stream that will
  carry HTTP/1.1 is judged on its L4 fields only, each request is judged in full later;
  HTTP/2 streams are judged as opaque TCP (requests inside them are not judged one by one
  yet, so a rule that needs a method or path cannot allow them: fail closed);
* `Authorizer.request` — the inbound HTTP/1.1 observer's gate: method, normalised path
  and headers.

Counted as ``inbound_tcp_authz_{allow,deny}_total`` and
``inbound_http_authz_{allow,deny}_total`` (Linkerd's names) with the workload, the policy
(``ns/name`` or ``default:<policy>``) and the rule that decided; under the ``audit``
default a would-be denial is allowed, logged and counted in ``..._audit_total`` too.
Denials are logged with the caller, the target and the deciding policy — at most a few
per second, so a denied client in a loop cannot fill the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from nodeagent.proxy.http.message import ROUTE_HEADER
from nodeagent.proxy.http.observe import RequestGate
from nodeagent.proxy.listener import Address, format_address
from nodeagent.proxy.tunnel.hooks import Decision as StreamDecision
from weft.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from weft.mesh import Workload
from weft.policy import Decision, PolicySet, Request, policy_set
from weft.policy.plaintext import Entry as PlainEntry
from weft.policy.plaintext import TooComplex, workload_verdicts

log = logging.getLogger("weft.authz")

HTTP1 = "http/1.1"
H2 = "h2"
MAX_SERIES = 10_000
LOG_PER_SECOND = 5
DECISIONS_PER_WORKLOAD = 4096
MAX_REMEMBERED_PATH = 256
"""Longer paths are judged every time: the memory stays under a few MiB per workload."""
PUBLIC_DENIAL = "an authorization policy denies this request"
ROUTE_HEADER_NAME = ROUTE_HEADER.decode()


_HELP = {
    "allow": "allowed",
    "deny": "denied",
    "audit": "that the audit default let through but the policies would deny",
}


class AuthzMetrics(Collector):
    """The decision counters (a bounded set of series)."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self._counts: dict[tuple[str, str, str, str, int | None], int] = {}

    def count(self, layer: str, verdict: str, workload: str, d: Decision) -> None:
        key = (layer, verdict, workload, d.policy, d.rule)
        n = self._counts.get(key)
        if n is None and len(self._counts) >= self.max_series:
            key = (layer, verdict, "[overflow]", "[overflow]", None)
            n = self._counts.get(key)
        self._counts[key] = (n or 0) + 1

    def value(self, layer: str, verdict: str, **labels: str) -> int:
        """The sum over series matching ``labels`` (tests, /debug/state)."""
        names = ("workload", "policy", "rule")
        return sum(
            n for (la, v, *rest), n in self._counts.items()
            if la == layer and v == verdict
            and all(str(rest[names.index(k)]) == want for k, want in labels.items())
        )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        families: dict[tuple[str, str], CounterMetricFamily] = {}
        items = sorted(self._counts.items(), key=lambda kv: (*kv[0][:4], kv[0][4] or -1))
        for (layer, verdict, workload, policy, rule), n in items:
            fam = families.get((layer, verdict))
            if fam is None:
                what = {
                    "http": "HTTP/1.1 requests",
                    "outbound_http": "HTTP/2 requests (judged on the caller's node)",
                }.get(layer, "connections (tunnel streams)")
                prefix = layer if layer.startswith("outbound") else f"inbound_{layer}"
                fam = families[(layer, verdict)] = CounterMetricFamily(
                    f"{prefix}_authz_{verdict}",
                    f"Inbound {what} {_HELP[verdict]}, by the policy and rule that decided.",
                    labels=["workload", "policy", "rule"],
                )
            fam.add_metric([workload, policy, "" if rule is None else str(rule)], n)
        yield from families.values()


class Authorizer:
    """The local workloads' policy sets, and the two judging hooks."""

    def __init__(
        self,
        workload_at: Callable[[str], Workload | None],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        metrics: AuthzMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workload_at = workload_at
        self.trust_domain = trust_domain
        self.metrics = metrics or AuthzMetrics()
        self._clock = clock
        self._sets: dict[str, _Compiled] = {}
        self._plaintext: dict[str, tuple[Workload, tuple[PlainEntry, ...] | None]] = {}
        self._log_window = (0.0, 0)

    def _compiled(self, target_ip: str) -> _Compiled | None:
        w = self.workload_at(target_ip)
        if w is None:
            return None
        cached = self._sets.get(w.uid)
        if cached is not None and cached.workload is w:
            return cached
        if len(self._sets) >= 4 * MAX_SERIES:  # workloads come and go: start afresh
            self._sets.clear()
        ps = policy_set(f"{w.namespace}/{w.name}", w.policies, w.default_policy,
                        self.trust_domain)  # fmt: skip
        compiled = self._sets[w.uid] = _Compiled(w, ps)
        return compiled

    def plaintext(self, w: Workload) -> tuple[PlainEntry, ...] | None:
        """A strict local pod's plaintext verdicts for its eBPF filter, compiled from
        its policies (`weft.policy.plaintext.workload_verdicts`; cached per workload
        value); None when no plaintext caller may come in (the filter's default: only
        the node), its policies too complex for the filter included."""
        if not w.strict:
            return None  # no filter: nothing to compile or cache
        cached = self._plaintext.get(w.uid)
        if cached is not None and cached[0] is w:
            return cached[1]
        if len(self._plaintext) >= 4 * MAX_SERIES:
            self._plaintext.clear()
        c = self._compiled(w.ips[0]) if w.ips else None
        ps = (
            c.policies
            if c is not None and c.workload is w
            else policy_set(
                f"{w.namespace}/{w.name}", w.policies, w.default_policy, self.trust_domain
            )
        )
        table: tuple[PlainEntry, ...] | None
        try:
            table = workload_verdicts(w, ps)
        except TooComplex as e:
            log.warning("authz: %s/%s refuses all plaintext: its policies are too complex "
                        "for the kernel's filter (%s)", w.namespace, w.name, e)  # fmt: skip
            table = None
        self._plaintext[w.uid] = (w, table)
        return table

    def policies(self, target_ip: str) -> tuple[Workload, PolicySet] | None:
        """The workload at ``target_ip`` and its compiled policies (cached per value)."""
        c = self._compiled(target_ip)
        return (c.workload, c.policies) if c is not None else None

    def stream(self, client: SpiffeId, target: Address, protocol: str | None) -> StreamDecision:
        """The tunnel server's ``Authorize`` hook (the target was located already)."""
        found = self.policies(target[0])
        if found is None:
            return StreamDecision.deny("no workload at the target")
        _, ps = found
        req = Request(client, "", target[1])
        # HTTP/1.1 requests are judged on this node, HTTP/2 ones on the client's (the
        # tunnel server passes "h2" only when the client node says it judges them).
        d = ps.evaluate(req, will_carry_http=protocol in (HTTP1, H2))
        self._record("tcp", ps, d, client, target)
        return StreamDecision(d.allowed, _reason(d))

    def outbound(
        self,
        client: SpiffeId,
        target: Address,
        method: str,
        path: str,
        headers: Callable[[], Mapping[str, str]],
        route: str | None = None,
    ) -> str | None:
        """An HTTP/2 request (gRPC call) on the *caller's* node, for the endpoint chosen
        (``route``: the Gateway API route it matched, ``ns/name``): None to send it, else
        why not (answered 403 / ``PERMISSION_DENIED``). The destination only relays
        HTTP/2 frames, so it judges these streams at L4 and leaves the requests to this
        node, which holds the caller's identity (counted as ``outbound_http_authz_*``)."""
        c = self._compiled(target[0])
        if c is None or c.policies.trivial:
            return None
        d = self.request(client, target, method, path,
                         headers() if c.policies.has_header_rules else {},
                         layer="outbound_http", route=route)  # fmt: skip
        return None if d.allowed else PUBLIC_DENIAL

    def request(
        self,
        client: SpiffeId,
        target: Address,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        layer: str = "http",
        route: str | None = None,
    ) -> Decision:
        """One inbound HTTP request (``headers``: lowercase names; ``route``: the
        Gateway API route it matched on the caller's node, ``ns/name``).

        Decisions are remembered per (caller, port, method, path) while the workload's
        policies stay the same — unless a policy looks at headers — so a busy client's
        requests cost a dictionary lookup; the memory is bounded and starts afresh when
        full (a client walking ever-new paths costs what no memory would)."""
        c = self._compiled(target[0])
        if c is None:
            return Decision(False, "none", reason="no workload at the target")
        return self._judge(c, client, target, method, path, headers, layer, route)

    def _judge(
        self,
        c: _Compiled,
        client: SpiffeId,
        target: Address,
        method: str,
        path: str,
        headers: Mapping[str, str],
        layer: str,
        route: str | None,
    ) -> Decision:
        ps = c.policies
        key = (client, target[1], method, path, route)
        d = c.decisions.get(key) if not ps.has_header_rules else None
        if d is None:
            d = ps.evaluate(Request(client, "", target[1], method, path, headers, route))
            if not ps.has_header_rules and len(path) <= MAX_REMEMBERED_PATH:
                if len(c.decisions) >= DECISIONS_PER_WORKLOAD:
                    c.decisions.clear()
                c.decisions[key] = d
        self._record(layer, ps, d, client, target, method, path)
        return d

    def gate(self, client: SpiffeId, target: Address, routed: bool = False) -> RequestGate:
        """The inbound HTTP/1.1 observer's gate for one stream (`InboundHttp`);
        ``routed``: its requests' ``weft-route`` header may be believed."""
        return _Gate(self, client, target, routed)

    def _record(
        self,
        layer: str,
        ps: PolicySet,
        d: Decision,
        client: SpiffeId,
        target: Address,
        method: str = "",
        path: str = "",
    ) -> None:
        m = self.metrics
        m.count(layer, "allow" if d.allowed else "deny", ps.workload, d)
        if d.would_deny:
            m.count(layer, "audit", ps.workload, d)
        if d.allowed and not d.would_deny:
            return
        if layer == "tcp" and not d.would_deny:
            return  # the tunnel server logs the refused stream, with this reason
        now = self._clock()
        start, n = self._log_window
        if now - start >= 1.0:
            start, n = now, 0
        self._log_window = (start, n + 1)
        if n < LOG_PER_SECOND:
            verb = "would deny (audit mode, allowed)" if d.would_deny else "denied"
            what = f" {method} {path[:200]}" if method else ""
            log.warning(
                "authz: %s %s%s from %s to %s (%s): %s",
                verb, layer, what, client, format_address(target), ps.workload, _reason(d),
            )  # fmt: skip


class _Compiled:
    """One workload value's policy set, and the decisions remembered for it."""

    __slots__ = ("decisions", "policies", "workload")

    def __init__(self, workload: Workload, policies: PolicySet) -> None:
        self.workload = workload
        self.policies = policies
        self.decisions: dict[tuple[SpiffeId, int, str, str, str | None], Decision] = {}


class _Gate:
    """`RequestGate` of one stream: each request judged against the policies in force
    when it arrives (a policy change reaches open connections too). Per-route policies
    look at the ``weft-route`` header the client node set, on streams whose OPEN says it
    did (``routed``); elsewhere a request matched no route, whatever it carries."""

    __slots__ = ("_authz", "_client", "_compiled", "_routed", "_target")

    def __init__(self, authz: Authorizer, client: SpiffeId, target: Address, routed: bool) -> None:
        self._authz = authz
        self._client = client
        self._target = target
        self._routed = routed
        self._compiled: _Compiled | None = None

    @property
    def needs_headers(self) -> bool:
        # Asked as each request begins: the policies found are kept for its `judge`, so
        # a request is judged by the policies in force when it began, looked up once.
        c = self._compiled = self._authz._compiled(self._target[0])
        if c is None:
            return False
        ps = c.policies
        return ps.has_header_rules or (self._routed and ps.has_route_policies)

    def judge(self, method: str, target: bytes, headers: dict[str, str]) -> str | None:
        c, self._compiled = self._compiled, None
        if c is None:
            c = self._authz._compiled(self._target[0])
            if c is None:
                return PUBLIC_DENIAL  # no workload at the target (any more)
        if c.policies.trivial:
            return None  # no policy: the stream's L4 decision holds for each request
        route = headers.get(ROUTE_HEADER_NAME) if self._routed else None
        d = self._authz._judge(c, self._client, self._target, method,
                               target.decode("latin-1"), headers, "http", route)  # fmt: skip
        # The caller learns only that a policy said no; the log names which (and why).
        return None if d.allowed else PUBLIC_DENIAL


def _reason(d: Decision) -> str:
    rule = f" rule {d.rule}" if d.rule is not None else ""
    return f"{d.policy}{rule}: {d.reason}" if d.reason else f"{d.policy}{rule}"
