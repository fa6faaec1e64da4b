"""Gateway API route status for mesh (GAMMA) routes, sans-I/O: what ``status.parents``
of an HTTPRoute or GRPCRoute should say, and whether that needs a write at all.

The Gateway API's status is per parent: ``status.parents[]`` holds one entry per
``parentRef`` *per controller* (``controllerName``), each with its own conditions.  Weft
owns the entries of the Service parents it serves, named `CONTROLLER_NAME`; entries of
other controllers (a Gateway implementation sharing the route) are kept as found.  The
conditions are `weft.routes.conditions` — the same judgement that decides whether the
route is attached — written once per Service parent, with ``observedGeneration`` the
route's ``metadata.generation`` and a ``lastTransitionTime`` that changes only when that
condition's status does (the Kubernetes convention, ``meta.SetStatusCondition``).

**Why a comparison, not a cache of what was written.**  The desired list is computed from
the object as last seen (its ``status`` included) and written only if it differs.  The
watch event our own write causes carries exactly what we wrote, so it compares equal and
writes nothing: no write storm, and nothing to forget after a restart.  `StatusPlanner`
adds only what the comparison cannot know: a write in flight (the object we hold is the
one we just patched, whose event has not come back yet) and a write that failed for
good at one resourceVersion (403, 404, 409: retried when the object changes).

The same planner writes Weft's own objects' ``status.conditions`` (AuthorizationPolicy:
`conditions_judgement`): what is route-specific is only the judgement (`Judge`).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from weft.routes import Condition, conditions

CONTROLLER_NAME = "weft.io/mesh-controller"
"""``controllerName`` of Weft's entries in ``status.parents`` (a domain-prefixed path, as
the Gateway API requires); the one place it is defined."""

JSON = dict[str, Any]


def rfc3339(t: float) -> str:
    """Seconds precision, UTC, as ``metav1.Time`` serialises."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def service_parent_refs(obj: Mapping[str, Any]) -> list[JSON]:
    """The route's Service ``parentRefs`` as status ``parentRef``s: group ``""``, kind
    Service, the name, and namespace, sectionName and port only where the spec gives them
    (the status must echo the reference, not a defaulted copy of it)."""
    refs: list[JSON] = []
    spec = obj.get("spec")
    parents = spec.get("parentRefs") if isinstance(spec, Mapping) else None
    for p in parents if isinstance(parents, list) else ():
        if not isinstance(p, Mapping) or p.get("kind") != "Service":
            continue
        if p.get("group", "") not in ("", "core") or not isinstance(p.get("name"), str):
            continue
        ref: JSON = {"group": "", "kind": "Service", "name": p["name"]}
        for key in ("namespace", "sectionName", "port"):
            if p.get(key) is not None:
                ref[key] = p[key]
        if ref not in refs:
            refs.append(ref)
    return refs


def _generation(obj: Mapping[str, Any]) -> int:
    meta = obj.get("metadata")
    gen = meta.get("generation") if isinstance(meta, Mapping) else None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else 0


def _existing(obj: Mapping[str, Any]) -> list[Any]:
    status = obj.get("status")
    parents = status.get("parents") if isinstance(status, Mapping) else None
    return list(parents) if isinstance(parents, list) else []


def _ours(entry: Any, controller: str) -> bool:
    return isinstance(entry, Mapping) and entry.get("controllerName") == controller


class ConditionLike(Protocol):
    """A judged condition: `weft.routes.Condition`, `StatusCondition`."""

    @property
    def type(self) -> str: ...
    @property
    def status(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...


@dataclass(frozen=True)
class StatusCondition:
    """A condition of an object that is not a route (its reason is not a Gateway API
    one)."""

    type: str
    status: bool
    reason: str
    message: str


def condition_json(c: ConditionLike, generation: int, previous: Mapping[str, Any] | None,
                   now: str) -> JSON:  # fmt: skip
    """``c`` as a ``metav1.Condition``; the transition time of ``previous`` (the same
    type, as found) is kept while the status stays the same."""
    status = "True" if c.status else "False"
    since = now
    if previous is not None and previous.get("status") == status:
        since = str(previous.get("lastTransitionTime") or now)
    return {
        "type": c.type,
        "status": status,
        "reason": str(c.reason),
        "message": c.message[:32768],  # the API's limit for a condition message
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def desired_parents(
    obj: Mapping[str, Any],
    judged: Sequence[Condition],
    now: str,
    controller: str = CONTROLLER_NAME,
) -> list[Any]:
    """``status.parents`` as it should be: other controllers' entries as found, in their
    order, then ours, one per Service parent (in ``parentRefs`` order)."""
    existing = _existing(obj)
    generation = _generation(obj)
    previous = {
        json.dumps(e.get("parentRef"), sort_keys=True): e for e in existing if _ours(e, controller)
    }
    ours = []
    for ref in service_parent_refs(obj):
        before = previous.get(json.dumps(ref, sort_keys=True)) or {}
        by_type = {
            c.get("type"): c for c in before.get("conditions") or () if isinstance(c, Mapping)
        }
        ours.append({
            "parentRef": ref,
            "controllerName": controller,
            "conditions": [condition_json(c, generation, by_type.get(c.type), now)
                           for c in judged],
        })  # fmt: skip
    return [e for e in existing if not _ours(e, controller)] + ours


def status_update(
    obj: Mapping[str, Any],
    services: Collection[str],
    now: str,
    controller: str = CONTROLLER_NAME,
) -> list[Any] | None:
    """The new ``status.parents`` of route ``obj`` given the Services that exist
    (``ns/name``), or None if what it carries already says that."""
    _, judged = conditions(obj, dict.fromkeys(services))
    wanted = desired_parents(obj, judged, now, controller)
    return None if wanted == _existing(obj) else wanted


def _fingerprint(parents: list[Any], controller: str) -> str:
    """``parents`` without our transition times: the same judgement computed a second
    later has the same fingerprint."""
    bare = [
        {**e, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                             for c in e["conditions"]]}
        if _ours(e, controller) else e
        for e in parents
    ]  # fmt: skip
    return json.dumps(bare, sort_keys=True)


def status_patch(resource_version: str, status: JSON) -> JSON:
    """A JSON merge patch of the status subresource.  A merge patch replaces lists whole,
    so a route's carries the entire ``parents`` list — other controllers' entries
    included, as read — and every patch the ``resourceVersion`` it was computed from: if
    anyone wrote in between, the API server answers 409 instead of letting this overwrite
    their entries."""
    return {"metadata": {"resourceVersion": resource_version}, "status": status}


def conditions_judgement(
    obj: Mapping[str, Any], judged: Sequence[ConditionLike], now: str
) -> tuple[JSON, str] | None:
    """The `Judge` of an object whose ``status.conditions`` are Weft's: ``judged`` as
    ``metav1.Condition``s (transition times kept while a status stays), conditions of
    other types kept as found; None if the object already says it."""
    status = obj.get("status")
    found = status.get("conditions") if isinstance(status, Mapping) else None
    existing = list(found) if isinstance(found, list) else []
    by_type = {c.get("type"): c for c in existing if isinstance(c, Mapping)}
    generation = _generation(obj)
    ours = [condition_json(c, generation, by_type.get(c.type), now) for c in judged]
    types = {c.type for c in judged}
    others = [c for c in existing if not (isinstance(c, Mapping) and c.get("type") in types)]
    wanted = ours + others
    if wanted == existing:
        return None
    bare = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in ours] + others
    return {"conditions": wanted}, json.dumps(bare, sort_keys=True)


def route_judgement(
    obj: Mapping[str, Any], services: Collection[str], now: str,
    controller: str = CONTROLLER_NAME,
) -> tuple[JSON, str] | None:  # fmt: skip
    """The `Judge` of routes: the ``status`` to write (``parents``) and its fingerprint,
    or None if the route already says it."""
    parents = status_update(obj, services, now, controller)
    return None if parents is None else ({"parents": parents}, _fingerprint(parents, controller))


# -- which objects to write, and when (the I/O is the caller's) -----------------------------


@dataclass(frozen=True)
class StatusObject:
    """What the planner needs of one object as last seen (a route, a policy)."""

    resource: str
    """The plural: ``httproutes``, ``grpcroutes``, ``authorizationpolicies``."""
    namespace: str
    name: str
    resource_version: str
    obj: Mapping[str, Any]
    """The object: kind, metadata (generation), spec and status."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.resource, self.namespace, self.name)


RouteObject = StatusObject

Judge = Callable[[StatusObject, str], "tuple[JSON, str] | None"]
"""An object and the time now (RFC 3339) -> the ``status`` it should carry (what the
merge patch sets) and a fingerprint of that judgement without transition times, or None
if the object already carries it."""


@dataclass(frozen=True)
class StatusWrite:
    target: StatusObject
    patch: JSON
    fingerprint: str
    """The judgement without transition times (the planner's memory of it)."""


class WriteOutcome(StrEnum):
    OK = "ok"
    FORBIDDEN = "forbidden"
    """403: no RBAC for ``<routes>/status``; retried when the route changes."""
    GONE = "gone"
    """404: deleted meanwhile; its DELETED event follows."""
    CONFLICT = "conflict"
    """409: changed meanwhile; the event with the new version brings a retry."""
    ERROR = "error"
    """Anything else (connection, 5xx): retried after a delay."""


class StatusPlanner:
    """Decides the status writes for a set of objects of one kind (routes; policies);
    remembers only writes in flight or failed: the resourceVersion and the judgement they
    were computed from.

    ``plan`` is idempotent: called again with the same objects (and, for routes, the same
    Services) after the writes landed (their events applied), it returns nothing.
    """

    def __init__(
        self,
        controller: str = CONTROLLER_NAME,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.retry_after = retry_after
        self.clock = clock
        self._held: dict[tuple[str, str, str], tuple[str, str, float]] = {}
        """route key -> (resourceVersion, fingerprint, not before): do not write the same
        judgement of the same version again before that time (inf: until it changes)."""

    def plan(self, routes: Iterable[StatusObject], services: Collection[str]) -> list[StatusWrite]:
        """Routes' writes, judged against the Services that exist (``ns/name``)."""
        controller = self.controller
        return self.plan_with(
            routes, lambda r, now: route_judgement(r.obj, services, now, controller)
        )

    def plan_with(self, objects: Iterable[StatusObject], judge: Judge) -> list[StatusWrite]:
        """The writes ``judge`` asks for, less those in flight or failed at that version."""
        now = self.clock()
        stamp = rfc3339(now)
        writes = []
        seen = set()
        for r in objects:
            seen.add(r.key)
            judged = judge(r, stamp)
            held = self._held.get(r.key)
            if held is not None and held[0] != r.resource_version:
                del self._held[r.key]  # the object moved on: whatever failed may not now
                held = None
            if judged is None:
                continue
            write = StatusWrite(r, status_patch(r.resource_version, judged[0]), judged[1])
            if held is not None and held[1] == write.fingerprint and now < held[2]:
                continue
            writes.append(write)
        for key in self._held.keys() - seen:
            del self._held[key]  # deleted objects
        return writes

    def sent(self, write: StatusWrite) -> None:
        """``write`` is on its way: not again from the same version until its event."""
        self._held[write.target.key] = (write.target.resource_version, write.fingerprint, math.inf)

    def done(self, write: StatusWrite, outcome: WriteOutcome) -> None:
        """How ``write`` went.  OK: its event will move the route on.  403, 404, 409: wait
        for the route to change (or the judgement to).  Other errors: retry later."""
        until = self.clock() + self.retry_after if outcome is WriteOutcome.ERROR else math.inf
        self._held[write.target.key] = (write.target.resource_version, write.fingerprint, until)

    def next_retry(self) -> float | None:
        """Seconds until the earliest timed retry, or None."""
        times = [t for _, _, t in self._held.values() if t != math.inf]
        return max(0.0, min(times) - self.clock()) if times else None
