"""Per-service request policy: retries and timeouts, from a Service's annotations.

What the Gateway API does not say (it has ``timeouts`` on an HTTPRoute rule, nothing on
retry conditions or budgets), a Service's annotations do, in Linkerd's shape so existing
annotations carry over (each ``weft.io/`` key also reads its ``*.linkerd.io/`` twin):

=========================  ===============================  ==========================
``weft.io/retry-http``     ``retry.linkerd.io/http``        ``5xx``, ``gateway-error``
                                                            (502-504), statuses and
                                                            ranges: ``503,429,500-504``
``weft.io/retry-grpc``     ``retry.linkerd.io/grpc``        gRPC codes by name:
                                                            ``unavailable,cancelled``
``weft.io/retry-limit``    ``retry.linkerd.io/limit``       retries per request
                                                            (default 1, at most 10)
``weft.io/retry-timeout``  ``retry.linkerd.io/timeout``     per try: ``300ms``, ``2s``
``weft.io/timeout-request`` ``timeout.linkerd.io/request``   the whole request,
                                                            retries included
=========================  ===============================  ==========================

Nothing is retried and nothing times out unless asked (Linkerd's defaults too). Retries
are bounded three ways whatever the annotations say: the limit per request, the
node's retry budget per route (`nodeagent.proxy.retry.RetryBudget`: 20 % of the
requests of the last 10 s plus 100; a Service without routes is one route), and only
requests that are safe to send again.

An HTTPRoute or GRPCRoute may carry the five retry and timeout keys too (`ROUTE_KEYS`,
`parse_override`): each one it sets replaces the Service's value for the requests its
rules match (a rule's own ``timeouts`` still win over both).

Invalid values never half-apply: `parse_traffic` raises `TrafficError` naming every
bad key, and the source that read them keeps the service's last valid policy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("weft.traffic")

RETRY_HTTP_KEY = "weft.io/retry-http"
RETRY_GRPC_KEY = "weft.io/retry-grpc"
RETRY_LIMIT_KEY = "weft.io/retry-limit"
RETRY_TIMEOUT_KEY = "weft.io/retry-timeout"
TIMEOUT_REQUEST_KEY = "weft.io/timeout-request"
ACCRUAL_KEY = "weft.io/failure-accrual"
ACCRUAL_FAILURES_KEY = "weft.io/failure-accrual-consecutive-max-failures"
ACCRUAL_MIN_PENALTY_KEY = "weft.io/failure-accrual-consecutive-min-penalty"
ACCRUAL_MAX_PENALTY_KEY = "weft.io/failure-accrual-consecutive-max-penalty"
ACCRUAL_JITTER_KEY = "weft.io/failure-accrual-consecutive-jitter-ratio"

LINKERD_KEYS = {
    RETRY_HTTP_KEY: "retry.linkerd.io/http",
    RETRY_GRPC_KEY: "retry.linkerd.io/grpc",
    RETRY_LIMIT_KEY: "retry.linkerd.io/limit",
    RETRY_TIMEOUT_KEY: "retry.linkerd.io/timeout",
    TIMEOUT_REQUEST_KEY: "timeout.linkerd.io/request",
    ACCRUAL_KEY: "balancer.linkerd.io/failure-accrual",
    ACCRUAL_FAILURES_KEY: "balancer.linkerd.io/failure-accrual-consecutive-max-failures",
    ACCRUAL_MIN_PENALTY_KEY: "balancer.linkerd.io/failure-accrual-consecutive-min-penalty",
    ACCRUAL_MAX_PENALTY_KEY: "balancer.linkerd.io/failure-accrual-consecutive-max-penalty",
    ACCRUAL_JITTER_KEY: "balancer.linkerd.io/failure-accrual-consecutive-jitter-ratio",
}

DEFAULT_RETRY_LIMIT = 1
MAX_RETRY_LIMIT = 10
MAX_TIMEOUT = 3600.0

GRPC_CODES = {
    "cancelled": 1,
    "unknown": 2,
    "invalid-argument": 3,
    "deadline-exceeded": 4,
    "not-found": 5,
    "already-exists": 6,
    "permission-denied": 7,
    "resource-exhausted": 8,
    "failed-precondition": 9,
    "aborted": 10,
    "out-of-range": 11,
    "unimplemented": 12,
    "internal": 13,
    "unavailable": 14,
    "data-loss": 15,
    "unauthenticated": 16,
}
"""gRPC status codes by the names the annotations use (Linkerd's spelling)."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class TrafficError(ValueError):
    """Annotations that cannot be applied; ``problems`` names each bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class RetryPolicy:
    http_statuses: frozenset[int] = frozenset()
    """Response statuses that are retried (idempotent requests only)."""
    grpc_codes: frozenset[int] = frozenset()
    """gRPC statuses that are retried (any gRPC call: the server said it failed)."""
    limit: int = DEFAULT_RETRY_LIMIT
    per_try_timeout: float | None = None
    """Seconds one attempt may wait for its response head before another is tried."""

    @property
    def enabled(self) -> bool:
        return bool(self.http_statuses or self.grpc_codes) or self.per_try_timeout is not None


@dataclass(frozen=True)
class AccrualPolicy:
    """Request-level circuit breaking (``weft.io/failure-accrual: consecutive``, as
    Linkerd's): ``max_failures`` failed responses in a row eject an endpoint for a
    penalty from ``min_penalty`` doubling to ``max_penalty``, each shortened by up to
    ``jitter`` of itself at random (so that proxies do not probe in step); then one
    request probes it, and its response decides."""

    max_failures: int = 7
    min_penalty: float = 1.0
    max_penalty: float = 60.0
    jitter: float = 0.5


@dataclass(frozen=True)
class TrafficPolicy:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    request_timeout: float | None = None
    """Seconds from the request head to the complete response, every attempt included."""
    accrual: AccrualPolicy | None = None
    """Request-level failure accrual; None: off (connect failures still eject)."""

    @property
    def plain(self) -> bool:
        """Nothing to do per request beyond balancing (the forwarder's fast path)."""
        return not self.retry.enabled and self.request_timeout is None and self.accrual is None


DEFAULT = TrafficPolicy()


@dataclass(frozen=True)
class TrafficOverride:
    """A Gateway API route's own retry and timeout annotations (`ROUTE_KEYS`): each one
    it sets replaces the Service's value for the requests its rules match; the others
    stay the Service's. None: not set on the route."""

    http_statuses: frozenset[int] | None = None
    grpc_codes: frozenset[int] | None = None
    limit: int | None = None
    per_try_timeout: float | None = None
    request_timeout: float | None = None

    def apply(self, policy: TrafficPolicy) -> TrafficPolicy:
        """``policy`` (the Service's) with this route's values in place of its own."""
        r = policy.retry
        retry = RetryPolicy(
            http_statuses=r.http_statuses if self.http_statuses is None else self.http_statuses,
            grpc_codes=r.grpc_codes if self.grpc_codes is None else self.grpc_codes,
            limit=r.limit if self.limit is None else self.limit,
            per_try_timeout=self.per_try_timeout or r.per_try_timeout,
        )
        return TrafficPolicy(
            retry=retry,
            request_timeout=self.request_timeout or policy.request_timeout,
            accrual=policy.accrual,
        )


def parse_duration(text: str) -> float:
    """Seconds in ``300ms``, ``2s``, ``1m30s``, ``1.5s``; ValueError otherwise."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration (e.g. 300ms, 2s, 1m30s)")
    return total


def parse_statuses(text: str) -> frozenset[int]:
    """``5xx``, ``gateway-error``, ``503``, ``500-504``, comma separated."""
    out: set[int] = set()
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item == "gateway-error":
            out.update((502, 503, 504))
            continue
        if len(item) == 3 and item.endswith("xx") and item[0] in "12345":
            base = int(item[0]) * 100
            out.update(range(base, base + 100))
            continue
        low, sep, high = item.partition("-")
        try:
            a, b = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"{item!r} is not a status, a range or 5xx/gateway-error") from None
        if not 100 <= a <= b <= 599:
            raise ValueError(f"{item!r} is not within 100-599")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no status given")
    return frozenset(out)


def parse_grpc_codes(text: str) -> frozenset[int]:
    out: set[int] = set()
    for raw in text.split(","):
        item = raw.strip().lower().replace("_", "-")
        if not item:
            continue
        code = GRPC_CODES.get(item)
        if code is None:
            raise ValueError(f"{item!r} is not a gRPC status name (e.g. unavailable)")
        out.add(code)
    if not out:
        raise ValueError("no gRPC status given")
    return frozenset(out)


def _timeout(text: str) -> float:
    seconds = parse_duration(text)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"{text!r} must be more than 0 and at most 1h")
    return seconds


def _limit(text: str) -> int:
    return _limit_in(text, 0, MAX_RETRY_LIMIT)


def _jitter(text: str) -> float:
    try:
        ratio = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{ratio} is not within 0-1")
    return ratio


def _failures(text: str) -> int:
    return _limit_in(text, 1, 1000)


def _limit_in(text: str, low: int, high: int) -> int:
    try:
        n = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not low <= n <= high:
        raise ValueError(f"{n} is not within {low}-{high}")
    return n


def _accrual_kind(text: str) -> bool:
    kind = text.strip().lower()
    if kind not in ("consecutive", "disabled", "none", "off"):
        raise ValueError(f"{text!r}: use consecutive (or disabled)")
    return kind == "consecutive"


_PARSERS: dict[str, Callable[[str], object]] = {
    RETRY_HTTP_KEY: parse_statuses,
    RETRY_GRPC_KEY: parse_grpc_codes,
    RETRY_LIMIT_KEY: _limit,
    RETRY_TIMEOUT_KEY: _timeout,
    TIMEOUT_REQUEST_KEY: _timeout,
    ACCRUAL_KEY: _accrual_kind,
    ACCRUAL_FAILURES_KEY: _failures,
    ACCRUAL_MIN_PENALTY_KEY: _timeout,
    ACCRUAL_MAX_PENALTY_KEY: _timeout,
    ACCRUAL_JITTER_KEY: _jitter,
}

ROUTE_KEYS = (RETRY_HTTP_KEY, RETRY_GRPC_KEY, RETRY_LIMIT_KEY, RETRY_TIMEOUT_KEY,
              TIMEOUT_REQUEST_KEY)  # fmt: skip
"""The annotations an HTTPRoute or GRPCRoute may carry too (`parse_override`); failure
accrual is the endpoints' state, shared by every route to them: Service only."""


def _parse_values(
    annotations: Mapping[str, str], keys: tuple[str, ...]
) -> tuple[dict[str, object], list[str]]:
    """The parsed values of ``keys`` (a Weft key wins over its Linkerd twin) and the
    problems of those that do not parse."""
    problems: list[str] = []
    values: dict[str, object] = {}
    for key in keys:
        raw = annotations.get(key)
        if raw is None:
            raw = annotations.get(LINKERD_KEYS[key])
        if raw is None:
            continue
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as e:
            problems.append(f"{key}: {e}")
    return values, problems


def parse_traffic(annotations: Mapping[str, str]) -> TrafficPolicy:
    """The policy ``annotations`` ask for; `TrafficError` if any value is invalid."""
    values, problems = _parse_values(annotations, tuple(_PARSERS))
    accrual = None
    if values.get(ACCRUAL_KEY):
        d = AccrualPolicy()
        accrual = AccrualPolicy(
            max_failures=values.get(ACCRUAL_FAILURES_KEY, d.max_failures),  # type: ignore[arg-type]
            min_penalty=values.get(ACCRUAL_MIN_PENALTY_KEY, d.min_penalty),  # type: ignore[arg-type]
            max_penalty=values.get(ACCRUAL_MAX_PENALTY_KEY, d.max_penalty),  # type: ignore[arg-type]
            jitter=values.get(ACCRUAL_JITTER_KEY, d.jitter),  # type: ignore[arg-type]
        )
        if accrual.min_penalty > accrual.max_penalty:
            problems.append(f"{ACCRUAL_MIN_PENALTY_KEY}: more than the max penalty")
    if problems:
        raise TrafficError(problems)
    retry = RetryPolicy(
        http_statuses=values.get(RETRY_HTTP_KEY, frozenset()),  # type: ignore[arg-type]
        grpc_codes=values.get(RETRY_GRPC_KEY, frozenset()),  # type: ignore[arg-type]
        limit=values.get(RETRY_LIMIT_KEY, DEFAULT_RETRY_LIMIT),  # type: ignore[arg-type]
        per_try_timeout=values.get(RETRY_TIMEOUT_KEY),  # type: ignore[arg-type]
    )
    return TrafficPolicy(
        retry=retry,
        request_timeout=values.get(TIMEOUT_REQUEST_KEY),  # type: ignore[arg-type]
        accrual=accrual,
    )


def parse_override(annotations: Mapping[str, str]) -> TrafficOverride | None:
    """A route's override from its annotations (None: it sets none of `ROUTE_KEYS`);
    `TrafficError` naming every bad key, failure accrual keys included (they belong on
    the Service)."""
    values, problems = _parse_values(annotations, ROUTE_KEYS)
    for key in _PARSERS:
        if key not in ROUTE_KEYS and (key in annotations or LINKERD_KEYS[key] in annotations):
            problems.append(f"{key}: failure accrual is per endpoint; set it on the Service")
    if problems:
        raise TrafficError(problems)
    if not values:
        return None
    return TrafficOverride(
        http_statuses=values.get(RETRY_HTTP_KEY),  # type: ignore[arg-type]
        grpc_codes=values.get(RETRY_GRPC_KEY),  # type: ignore[arg-type]
        limit=values.get(RETRY_LIMIT_KEY),  # type: ignore[arg-type]
        per_try_timeout=values.get(RETRY_TIMEOUT_KEY),  # type: ignore[arg-type]
        request_timeout=values.get(TIMEOUT_REQUEST_KEY),  # type: ignore[arg-type]
    )


def traffic_keys(annotations: Mapping[str, str]) -> dict[str, str]:
    """The annotations `parse_traffic` reads (to tell "changed" from "unrelated")."""
    keys = set(LINKERD_KEYS) | set(LINKERD_KEYS.values())
    return {k: v for k, v in annotations.items() if k in keys}


def compact_statuses(statuses: frozenset[int]) -> str:
    """``500-599`` style text of a status set (wire format, logs)."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(statuses):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


class LastValid:
    """Per service, the policy its annotations ask for — or, while they are invalid, the
    last valid one (a typo in an annotation must not drop retries that were working).
    `rejected` holds each service's current problems, for logs and status."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[tuple[str, str], ...], TrafficPolicy]] = {}
        self.rejected: dict[str, tuple[str, ...]] = {}
        self.rejections = 0

    def policy(self, key: str, annotations: Mapping[str, str]) -> TrafficPolicy:
        raw = tuple(sorted(traffic_keys(annotations).items()))
        seen = self._seen.get(key)
        if seen is not None and seen[0] == raw:
            return seen[1]
        try:
            policy = parse_traffic(dict(raw))
        except TrafficError as e:
            kept = seen[1] if seen is not None else DEFAULT
            self.rejected[key] = e.problems
            self.rejections += 1
            log.warning("service %s: annotations rejected (%s); its %s policy stays in force",
                        key, e, "last valid" if seen is not None else "default")  # fmt: skip
            self._seen[key] = (raw, kept)
            return kept
        self.rejected.pop(key, None)
        self._seen[key] = (raw, policy)
        return policy

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)
        self.rejected.pop(key, None)
