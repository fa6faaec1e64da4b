"""Counts of the outbound proxy's per-request decisions: retries and timeouts.

Series (``_total`` added by the exposition), per destination ``service`` (``ns/name``)
and ``route`` (the Gateway API route the request matched, ``ns/name``; empty when the
service has no routes) — the number of services and routes bounds them, and a cap keeps a
bug from growing them:

* ``outbound_http_retry_total{service,reason}`` — retries sent; ``reason`` is what the
  previous attempt got: ``status`` (a status or gRPC code the policy retries) or
  ``timeout`` (the per-try timeout expired before the response head);
* ``outbound_http_retry_skipped_total{service,reason}`` — failed attempts that were
  *not* retried although the policy asked: ``budget`` (the retry budget — the route's,
  or the service's when it has no routes — is spent: a brownout is not multiplied),
  ``limit`` (``weft.io/retry-limit`` reached),
  ``body-too-large`` (more than `REPLAY_LIMIT` of body was sent), ``not-idempotent``
  (the method may have had an effect: POST, PATCH);
* ``outbound_http_timeout_total{service,kind}`` — ``request`` (``weft.io/timeout-request``,
  a rule's ``timeouts.request`` or a gRPC client's shorter ``grpc-timeout``: answered 504 /
  DEADLINE_EXCEEDED, or reset when the response had started) and ``try`` (a per-try
  timeout);
* ``outbound_http_endpoint_ejections_total{service,reason="failures"}`` — endpoints
  ejected by request-level failure accrual (``weft.io/failure-accrual``);
* ``outbound_http_route_requests_total{service,route,backend}`` — requests to a service
  with Gateway API routes, by the route (``ns/name``, ``[no-match]`` when none matched)
  and the backend service the rule's weights picked (empty when none could be used).

Linkerd's equivalents: ``outbound_http_route_retry_requests_total``,
``..._retry_limit_exceeded_total`` and ``..._retry_overflow_total`` (budget).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

MAX_SERIES = 10_000

RETRIED = "retry"
SKIPPED = "retry_skipped"
TIMEOUT = "timeout"
EJECTED = "ejected"

_FAMILIES = {
    RETRIED: ("outbound_http_retry", "Retries sent, by what the previous attempt got.",
              "reason"),
    SKIPPED: ("outbound_http_retry_skipped", "Failed attempts the policy would retry that "
              "were not retried, by why not.", "reason"),
    TIMEOUT: ("outbound_http_timeout", "Requests (request) and attempts (try) that timed "
              "out.", "kind"),
    EJECTED: ("outbound_http_endpoint_ejections", "Endpoints ejected by request-level "
              "failure accrual.", "reason"),
}  # fmt: skip


class RetryMetrics(Collector):
    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._routes: dict[tuple[str, str, str], int] = {}

    def routed(self, service: str, route: str, backend: str) -> None:
        key = (service, route, backend)
        n = self._routes.get(key)
        if n is None and len(self._routes) >= self.max_series:
            key = ("overflow", "", "")
            n = self._routes.get(key)
        self._routes[key] = (n or 0) + 1

    def routed_count(self, service: str, route: str, backend: str) -> int:
        return self._routes.get((service, route, backend), 0)

    def count(self, family: str, service: str, why: str, route: str = "") -> None:
        key = (family, service, route, why)
        n = self._counts.get(key)
        if n is None and len(self._counts) >= self.max_series:
            key = (family, "overflow", "", why)
            n = self._counts.get(key)
        self._counts[key] = (n or 0) + 1

    def get(self, family: str, service: str, why: str, route: str | None = None) -> int:
        """One series, or (``route`` None) the sum over the service's routes."""
        if route is not None:
            return self._counts.get((family, service, route, why), 0)
        return sum(n for (f, s, _, w), n in self._counts.items()
                   if (f, s, w) == (family, service, why))  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        families = {
            f: CounterMetricFamily(name, doc, labels=["service", "route", label])
            for f, (name, doc, label) in _FAMILIES.items()
        }
        for (family, service, route, why), n in list(self._counts.items()):
            families[family].add_metric([service, route, why], n)
        yield from families.values()
        routes = CounterMetricFamily(
            "outbound_http_route_requests",
            "Requests to services with routes, by route and the backend picked.",
            labels=["service", "route", "backend"],
        )
        for labels, n in list(self._routes.items()):
            routes.add_metric(list(labels), n)
        yield routes
