"""The retry stage's decisions for one request (sans-I/O): may this failed attempt be
tried again, and how is each answer counted.

A failed attempt is retried only when all of these hold, checked in this order (the
first that fails names the ``outbound_http_retry_skipped_total`` reason):

1. the request is safe to send again: an idempotent method (RFC 9110 §9.2.2) — a 503 or
   a timeout does not prove that a POST had no effect (``not-idempotent``);
2. every body byte sent so far is still held (`REPLAY_LIMIT`; ``body-too-large``);
3. the request has retries left (``weft.io/retry-limit``; ``limit``);
4. the retry budget allows one more (``budget``): retries in the last 10 s are at most
   20 % of the requests in them plus 100 (10 per second over the window) — so when every
   replica fails, load grows by at most that much instead of by the retry limit. The
   budget is the Gateway API route's when a route matched the request (each route of a
   service has its own), else the service's.

The budget is spent (3-4) only when 1-2 hold, so a request that could never be retried
does not use it up for the others.
"""

from __future__ import annotations

from nodeagent.proxy.retry import RetryBudget
from nodeagent.retrymetrics import RETRIED, SKIPPED, RetryMetrics
from weft.traffic import RetryPolicy

REPLAY_LIMIT = 64 * 1024
"""Request body bytes held for a retry; a larger body is sent once (Linkerd's bound)."""


class Retrying:
    """One request's retry state under ``policy``."""

    __slots__ = ("budget", "metrics", "policy", "retries", "route", "service")

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget,
        metrics: RetryMetrics,
        service: str,
        route: str = "",
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.metrics = metrics
        self.service = service
        self.route = route
        """The Gateway API route the request matched (``ns/name``), for the counters."""
        self.retries = 0

    @property
    def left(self) -> bool:
        """Whether another attempt is possible at all (for a per-try timeout, and
        for holding the body)."""
        return self.retries < self.policy.limit

    def retryable_status(self, status: int) -> bool:
        return status in self.policy.http_statuses

    def retryable_grpc(self, grpc_status: str) -> bool:
        return grpc_status.isdigit() and int(grpc_status) in self.policy.grpc_codes

    def allow(self, *, idempotent: bool, replayable: bool, reason: str) -> bool:
        """Whether an attempt that failed for ``reason`` (``status``, ``timeout``) is
        tried again; counted either way. True spends one retry of the budget."""
        why = None
        if not idempotent:
            why = "not-idempotent"
        elif not replayable:
            why = "body-too-large"
        elif not self.left:
            why = "limit"
        elif not self.budget.try_retry():
            why = "budget"
        if why is not None:
            self.metrics.count(SKIPPED, self.service, why, self.route)
            return False
        self.retries += 1
        self.metrics.count(RETRIED, self.service, reason, self.route)
        return True
