"""Retry and timeout policy from Service annotations (`weft.traffic`), its wire form,
the last-valid rule, and the retry stage's decisions (`Retrying`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.discovery.kube import ClusterView, parse_service
from nodeagent.proxy.http.retries import Retrying
from nodeagent.proxy.retry import RetryBudget
from nodeagent.retrymetrics import RETRIED, SKIPPED, RetryMetrics
from weft.mesh import Service
from weft.meshwire import MeshWireError, decode_service, decode_traffic, encode_service
from weft.traffic import (
    DEFAULT,
    LastValid,
    RetryPolicy,
    TrafficError,
    TrafficOverride,
    TrafficPolicy,
    compact_statuses,
    parse_duration,
    parse_override,
    parse_statuses,
    parse_traffic,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300ms", 0.3), ("2s", 2.0), ("1m30s", 90.0), ("1.5s", 1.5), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "1 s", "1sec", "-1s", "1s2", "ms300"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_statuses() -> None:
    assert parse_statuses("5xx") == frozenset(range(500, 600))
    assert parse_statuses("gateway-error") == {502, 503, 504}
    assert parse_statuses("429, 500-502") == {429, 500, 501, 502}
    for bad in ("6xx", "99", "600", "503-500", "abc", ","):
        with pytest.raises(ValueError):
            parse_statuses(bad)


@given(st.frozensets(st.integers(100, 599), min_size=1))
def test_compact_statuses_round_trips(statuses: frozenset[int]) -> None:
    assert parse_statuses(compact_statuses(statuses)) == statuses


def test_annotations_weft_and_linkerd() -> None:
    p = parse_traffic({
        "weft.io/retry-http": "gateway-error",
        "retry.linkerd.io/grpc": "unavailable,deadline-exceeded",
        "retry.linkerd.io/limit": "2",
        "weft.io/retry-timeout": "250ms",
        "timeout.linkerd.io/request": "2s",
        "unrelated": "x",
    })  # fmt: skip
    assert p.retry == RetryPolicy(frozenset({502, 503, 504}), frozenset({14, 4}), 2, 0.25)
    assert p.request_timeout == 2.0
    assert not p.plain
    # Weft's key wins over Linkerd's twin.
    both = {"weft.io/retry-limit": "3", "retry.linkerd.io/limit": "5"}
    assert parse_traffic(both).retry.limit == 3
    assert parse_traffic({}) == DEFAULT and DEFAULT.plain


def test_invalid_annotations_name_every_bad_key() -> None:
    with pytest.raises(TrafficError) as e:
        parse_traffic({
            "weft.io/retry-http": "7xx",
            "weft.io/retry-limit": "11",
            "weft.io/retry-grpc": "sometimes",
            "weft.io/timeout-request": "0s",
            "weft.io/retry-timeout": "2s",
        })  # fmt: skip
    keys = [p.split(":")[0] for p in e.value.problems]
    assert keys == [
        "weft.io/retry-http", "weft.io/retry-grpc", "weft.io/retry-limit",
        "weft.io/timeout-request",
    ]  # fmt: skip


def test_last_valid_policy_stays_while_annotations_are_invalid() -> None:
    lv = LastValid()
    good = lv.policy("ns/a", {"weft.io/retry-http": "5xx"})
    assert good.retry.http_statuses
    assert lv.policy("ns/a", {"weft.io/retry-http": "5xy"}) == good
    assert lv.rejected["ns/a"] and lv.rejections == 1
    assert lv.policy("ns/a", {"weft.io/retry-http": "5xy"}) == good  # not counted again
    assert lv.rejections == 1
    assert lv.policy("ns/a", {}) == DEFAULT and "ns/a" not in lv.rejected
    assert lv.policy("ns/new", {"weft.io/retry-limit": "x"}) == DEFAULT  # nothing valid yet


def _service(traffic: TrafficPolicy) -> Service:
    return Service(name="a", namespace="ns", vips=("10.96.0.1",), ports=(), endpoints=(),
                   traffic=traffic)  # fmt: skip


def test_wire_round_trip_and_default_omitted() -> None:
    policy = parse_traffic({
        "weft.io/retry-http": "5xx,429", "weft.io/retry-grpc": "unavailable",
        "weft.io/retry-limit": "3", "weft.io/retry-timeout": "100ms",
        "weft.io/timeout-request": "1s", "weft.io/failure-accrual": "consecutive",
        "weft.io/failure-accrual-consecutive-jitter-ratio": "0.25",
    })  # fmt: skip
    assert policy.accrual is not None and policy.accrual.jitter == 0.25
    wire = json.loads(json.dumps(encode_service(_service(policy))))
    assert decode_service(wire, "s") == _service(policy)
    assert "traffic" not in encode_service(_service(DEFAULT))
    assert decode_service(encode_service(_service(DEFAULT)), "s").traffic == DEFAULT


@pytest.mark.parametrize(
    "bad",
    [
        {"retry_limit": 99},
        {"retry_limit": 1, "retry_http": "700"},
        {"retry_limit": 1, "retry_grpc": [0]},
        {"retry_limit": 1, "retry_timeout": -1},
        {"retry_limit": True},
        {"retry_limit": 1, "timeout_request": "1s"},
        {"retry_limit": 1, "accrual": [0, 1.0, 2.0, 0.5]},
        {"retry_limit": 1, "accrual": [3, 2.0, 1.0, 0.5]},
        {"retry_limit": 1, "accrual": [3, 1.0, 2.0, 1.5]},
        {"retry_limit": 1, "accrual": [3, 1.0, 2.0]},
    ],
)
def test_wire_rejects_bad_policies(bad: dict) -> None:
    with pytest.raises(MeshWireError):
        decode_traffic(bad, "s.traffic")


def _svc_object(annotations: dict[str, str]) -> dict:
    return {
        "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "1",
                     "annotations": annotations},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80, "targetPort": 8080}]},
    }  # fmt: skip


def test_kubernetes_service_annotations_keep_the_last_valid_policy() -> None:
    view = ClusterView()
    view.apply("services", "ADDED", parse_service(_svc_object({"weft.io/retry-http": "5xx"})))
    svc = view.service("shop/web")
    assert svc is not None and svc.traffic.retry.http_statuses == frozenset(range(500, 600))
    view.apply("services", "MODIFIED",
               parse_service(_svc_object({"weft.io/retry-http": "five hundreds"})))  # fmt: skip
    again = view.service("shop/web")
    assert again is not None and again.traffic == svc.traffic
    assert "shop/web" in view.traffic.rejected
    view.apply("services", "DELETED", parse_service(_svc_object({})))
    assert view.service("shop/web") is None
    assert "shop/web" not in view.traffic.rejected


def _retrying(limit: int = 2, budget: RetryBudget | None = None) -> tuple[Retrying, RetryMetrics]:
    metrics = RetryMetrics()
    policy = RetryPolicy(http_statuses=frozenset({503}), limit=limit)
    return Retrying(policy, budget or RetryBudget(), metrics, "ns/a"), metrics


def test_retry_decisions_in_order() -> None:
    r, m = _retrying(limit=2)
    assert r.retryable_status(503) and not r.retryable_status(500)
    assert not r.allow(idempotent=False, replayable=True, reason="status")
    assert not r.allow(idempotent=True, replayable=False, reason="status")
    assert r.allow(idempotent=True, replayable=True, reason="status")
    assert r.allow(idempotent=True, replayable=True, reason="timeout")
    assert not r.left
    assert not r.allow(idempotent=True, replayable=True, reason="status")
    assert (m.get(SKIPPED, "ns/a", "not-idempotent"), m.get(SKIPPED, "ns/a", "body-too-large"),
            m.get(SKIPPED, "ns/a", "limit")) == (1, 1, 1)  # fmt: skip
    assert m.get(RETRIED, "ns/a", "status") == m.get(RETRIED, "ns/a", "timeout") == 1


def test_a_request_that_cannot_be_retried_does_not_spend_the_budget() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10)  # one retry in all
    r, _ = _retrying(budget=budget)
    assert not r.allow(idempotent=False, replayable=True, reason="status")
    assert r.allow(idempotent=True, replayable=True, reason="status")
    r2, m = _retrying(budget=budget)
    assert not r2.allow(idempotent=True, replayable=True, reason="status")
    assert m.get(SKIPPED, "ns/a", "budget") == 1


def test_a_route_overrides_only_the_keys_it_sets() -> None:
    service = parse_traffic({
        "weft.io/retry-http": "5xx", "weft.io/retry-limit": "3",
        "weft.io/timeout-request": "2s", "weft.io/failure-accrual": "consecutive",
    })  # fmt: skip
    override = parse_override({"weft.io/retry-grpc": "unavailable", "retry.linkerd.io/limit": "1",
                               "weft.io/retry-timeout": "100ms", "unrelated": "x"})  # fmt: skip
    assert override == TrafficOverride(grpc_codes=frozenset({14}), limit=1, per_try_timeout=0.1)
    policy = override.apply(service)
    assert policy.retry == RetryPolicy(
        http_statuses=frozenset(range(500, 600)), grpc_codes=frozenset({14}), limit=1,
        per_try_timeout=0.1,
    )  # fmt: skip
    assert policy.request_timeout == 2.0  # the Service's: the route did not set it
    assert policy.accrual == service.accrual
    # A limit of 0 turns the Service's retries off for the route's requests.
    off = parse_override({"weft.io/retry-limit": "0"})
    assert off is not None and off.apply(service).retry.limit == 0
    assert TrafficOverride(request_timeout=0.5).apply(DEFAULT).request_timeout == 0.5


def test_a_route_without_the_keys_has_no_override() -> None:
    assert parse_override({}) is None
    assert parse_override({"kubectl.kubernetes.io/last-applied-configuration": "{}"}) is None


def test_invalid_route_annotations_name_every_bad_key() -> None:
    with pytest.raises(TrafficError) as err:
        parse_override({"weft.io/retry-limit": "11", "weft.io/timeout-request": "soon",
                        "weft.io/failure-accrual": "consecutive"})  # fmt: skip
    problems = err.value.problems
    assert len(problems) == 3
    assert any(p.startswith("weft.io/retry-limit: 11 is not within") for p in problems)
    assert any("set it on the Service" in p for p in problems)
