"""Route status, sans-I/O (`controlplane.discovery.routestatus`): the ``status.parents``
Weft wants, when it is already there, and the planner's memory of writes in flight or
failed (a fake clock)."""

from __future__ import annotations

import copy
from typing import Any

from controlplane.discovery.routestatus import (
    CONTROLLER_NAME,
    RouteObject,
    StatusPlanner,
    WriteOutcome,
    desired_parents,
    rfc3339,
    status_update,
)
from weft.routes import conditions

GROUP = "gateway.networking.k8s.io"
OTHER = {"parentRef": {"group": GROUP, "kind": "Gateway", "name": "edge"},
         "controllerName": "example.com/gw", "conditions": []}  # fmt: skip


def _route(backend: str = "web", generation: int = 1, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop", "generation": generation},
        "spec": {"parentRefs": [{"group": GROUP, "kind": "Gateway", "name": "edge"},
                                {"kind": "Service", "name": "web", "port": 80},
                                {"kind": "Service", "name": "db", "namespace": "data"}],
                 "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]},
        **({"status": status} if status else {}),
    }  # fmt: skip


def _written(obj: dict[str, Any], parents: list[Any]) -> dict[str, Any]:
    """``obj`` as the API server has it after our write."""
    return {**copy.deepcopy(obj), "status": {"parents": parents}}


def test_one_entry_per_service_parent_after_other_controllers() -> None:
    obj = _route(parents=[OTHER])
    _, judged = conditions(obj, {"shop/web": 1})
    parents = desired_parents(obj, judged, "T0")
    assert parents[0] == OTHER
    assert [p["parentRef"] for p in parents[1:]] == [
        {"group": "", "kind": "Service", "name": "web", "port": 80},
        {"group": "", "kind": "Service", "name": "db", "namespace": "data"},
    ]
    assert {p["controllerName"] for p in parents[1:]} == {CONTROLLER_NAME}
    accepted, resolved = parents[1]["conditions"]
    assert accepted == {"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "accepted", "lastTransitionTime": "T0",
                        "observedGeneration": 1}  # fmt: skip
    assert resolved["status"] == "True" and resolved["reason"] == "ResolvedRefs"


def test_unchanged_judgement_is_no_update_and_transition_times_stay() -> None:
    obj = _route(backend="nope")
    first = status_update(obj, {"shop/web"}, "T0")
    assert first is not None
    stored = _written(obj, first)
    assert status_update(stored, {"shop/web"}, "T1") is None  # our own event: nothing
    # The backend appears: ResolvedRefs flips (new time); Accepted keeps T0.
    second = status_update(stored, {"shop/web", "shop/nope"}, "T2")
    assert second is not None
    accepted, resolved = second[0]["conditions"]
    assert (accepted["lastTransitionTime"], resolved["lastTransitionTime"]) == ("T0", "T2")
    # A new generation with the same judgement: observedGeneration moves, times do not.
    newer = _written(_route(backend="nope", generation=2), second)
    third = status_update(newer, {"shop/web", "shop/nope"}, "T3")
    assert third is not None
    assert {c["observedGeneration"] for c in third[0]["conditions"]} == {2}
    assert {c["lastTransitionTime"] for c in third[0]["conditions"]} == {"T0", "T2"}


def test_dropped_service_parents_lose_their_entries() -> None:
    obj = _route()
    stored = _written(obj, [OTHER, *(status_update(obj, {"shop/web"}, "T0") or [])])
    stored["spec"]["parentRefs"] = [{"group": GROUP, "kind": "Gateway", "name": "edge"}]
    assert status_update(stored, {"shop/web"}, "T1") == [OTHER]


def test_a_route_with_no_service_parent_and_no_entry_needs_nothing() -> None:
    obj = _route()
    obj["spec"]["parentRefs"] = [{"group": GROUP, "kind": "Gateway", "name": "edge"}]
    assert status_update(obj, set(), "T0") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_planner_holds_writes_in_flight_and_failed() -> None:
    clock = Clock()
    planner = StatusPlanner(retry_after=5.0, clock=clock)
    obj = _route()
    r = RouteObject("httproutes", "shop", "r", "7", obj)
    (write,) = planner.plan([r], {"shop/web"})
    assert write.patch["metadata"] == {"resourceVersion": "7"}
    assert write.patch["status"]["parents"][0]["conditions"][0]["lastTransitionTime"] == (
        rfc3339(clock.now))  # fmt: skip
    planner.sent(write)
    clock.now += 1
    assert planner.plan([r], {"shop/web"}) == []  # in flight: its event has not come
    planner.done(write, WriteOutcome.OK)
    # Our event: a new version carrying what we wrote.
    back = RouteObject(
        "httproutes", "shop", "r", "8", _written(obj, write.patch["status"]["parents"])
    )
    assert planner.plan([back], {"shop/web"}) == []
    # A Service goes away: a new judgement of the same version is written.
    (again,) = planner.plan([back], set())
    planner.sent(again)
    planner.done(again, WriteOutcome.CONFLICT)
    clock.now += 3600
    assert planner.plan([back], set()) == []  # 409: only a new version retries
    assert planner.next_retry() is None
    newer = RouteObject("httproutes", "shop", "r", "9", back.obj)
    (retry,) = planner.plan([newer], set())
    planner.sent(retry)
    planner.done(retry, WriteOutcome.ERROR)  # a 5xx: retried after the delay
    assert planner.plan([newer], set()) == []
    assert planner.next_retry() == 5.0
    clock.now += 5
    assert len(planner.plan([newer], set())) == 1
    assert planner.plan([], set()) == [] and planner.next_retry() is None  # deleted: forgotten
