"""``weft lab apply -f`` / ``delete -f``: Kubernetes objects into a lab's plan, sans-I/O.

The same YAML a user applies to a cluster: ``Service`` (v1: selector, ports,
annotations — a new one gets the next free address of the lab's service range),
``Deployment`` (``apps/v1``: its replicas become lab pods, `weft.lab.workloads`),
``HTTPRoute`` and ``GRPCRoute`` (``gateway.networking.k8s.io/v1``, kept as objects and
judged by the control plane as Kubernetes' would be: `weft.routes.conditions`). Other
kinds are refused by name. This module only computes the new plan; `weft.lab.lab.Lab`
makes and removes the pods the difference asks for.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from weft import policy
from weft.lab import workloads
from weft.lab.plan import SERVICE_CIDR, LabPlan, PodPlan, ServicePlan, ServicePort
from weft.routes import GROUP, Condition, conditions

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
KINDS = ("Namespace", "Service", workloads.KIND, *ROUTE_KINDS, policy.KIND)
API_VERSIONS = {"Namespace": "v1", "Service": "v1", workloads.KIND: workloads.API_VERSION,
                policy.KIND: policy.API_VERSION}  # fmt: skip
LABELS = {"Namespace": "namespace", "Service": "service", workloads.KIND: "deployment.apps",
          policy.KIND: f"authorizationpolicy.{policy.GROUP}"}  # fmt: skip
"""What ``kubectl`` calls each kind in its output."""


class ApplyError(ValueError):
    """An object the lab cannot take; nothing of the file is applied."""


def _meta(obj: Mapping[str, Any], where: str) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise ApplyError(f"{where}: metadata.name is missing")
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str):
        raise ApplyError(f"{where}: metadata.namespace is not a string")
    return ns, meta["name"]


def _kind(obj: Any, where: str) -> str:
    if not isinstance(obj, dict):
        raise ApplyError(f"{where}: not an object")
    kind, api = obj.get("kind"), obj.get("apiVersion")
    if kind not in KINDS:
        raise ApplyError(f"{where}: kind {kind!r} is not supported by weft lab apply "
                         f"(supported: {', '.join(KINDS)})")  # fmt: skip
    want = API_VERSIONS.get(str(kind), f"{GROUP}/v1")
    if api != want:
        raise ApplyError(f"{where}: {kind} needs apiVersion {want}, not {api!r}")
    return str(kind)


def _service(obj: Mapping[str, Any], old: ServicePlan | None, vip: str, where: str) -> ServicePlan:
    ns, name = _meta(obj, where)
    spec = obj.get("spec") or {}
    meta = obj["metadata"]
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        port, target = p.get("port"), p.get("targetPort", p.get("port"))
        if not (isinstance(port, int) and 0 < port < 65536):
            raise ApplyError(f"{where}: spec.ports[{i}].port {port!r} is not a port")
        if not (isinstance(target, int) and 0 < target < 65536):
            raise ApplyError(f"{where}: spec.ports[{i}].targetPort must be a number in the lab "
                             f"(it has no named container ports)")  # fmt: skip
        ports.append(ServicePort(port, target, str(p.get("name") or f"port-{port}"),
                                 str(p.get("protocol") or "TCP")))  # fmt: skip
    if not ports:
        raise ApplyError(f"{where}: spec.ports is empty")
    selector = spec.get("selector") or {}
    annotations = meta.get("annotations") or {}
    for what, d in (("spec.selector", selector), ("metadata.annotations", annotations)):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
            raise ApplyError(f"{where}: {what} must map strings to strings")
    return ServicePlan(name, ns, old.vip if old else vip, tuple(ports), dict(selector),
                       dict(annotations))  # fmt: skip


def _namespace(obj: Mapping[str, Any], where: str) -> tuple[dict[str, str], dict[str, str]]:
    meta = obj["metadata"]
    if not workloads.DNS_LABEL.match(meta["name"]):
        raise ApplyError(f"{where}: namespace name {meta['name']!r} is not a DNS label")
    out = []
    for what in ("labels", "annotations"):
        d = meta.get(what) or {}
        if not isinstance(d, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in d.items()
        ):
            raise ApplyError(f"{where}: metadata.{what} must map strings to strings")
        out.append(dict(d))
    return out[0], out[1]


def _free_vip(plan: LabPlan, taken: Iterable[str]) -> str:
    used = {s.vip for s in plan.services} | set(taken)
    for n in range(10, SERVICE_CIDR.num_addresses - 1):
        ip = str(SERVICE_CIDR.network_address + n)
        if ip not in used:
            return ip
    raise ApplyError("the lab's service range is full")


def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    ns, name = _meta(obj, "")
    return (str(obj["kind"]), ns, name)


def apply(
    plan: LabPlan, routes: list[dict[str, Any]], docs: Iterable[Any], *, now: str | None = None
) -> tuple[LabPlan, list[dict[str, Any]], list[str]]:
    """``plan`` and ``routes`` with ``docs`` applied (created or replaced), and a line
    per object saying what happened; `ApplyError` and nothing changed if any is bad."""
    stamp = now or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    services = {(s.namespace, s.name): s for s in plan.services}
    by_key = {_key(r): r for r in routes}
    lines: list[str] = []
    new_vips: list[str] = []
    pods = plan.pods
    namespaces = dict(plan.namespaces)
    ns_annotations = dict(plan.namespace_annotations)
    docs = [d for d in docs if d is not None]
    for i, obj in enumerate(docs):
        where = f"document {i + 1}"
        kind = _kind(obj, where)
        ns, name = _meta(obj, where)
        if kind == "Namespace":
            labels, annotations = _namespace(obj, where)
            existed = name in namespaces
            namespaces[name] = labels
            ns_annotations[name] = annotations
            lines.append(f"namespace/{name} {'configured' if existed else 'created'}")
        elif kind == policy.KIND:
            try:
                parsed = policy.parse_policy(obj)
            except policy.PolicyError as e:
                raise ApplyError(f"{where} (authorizationpolicy {ns}/{name}): {e}") from None
            existed = (kind, ns, name) in by_key
            by_key[(kind, ns, name)] = policy.policy_object(parsed)
            lines.append(f"{LABELS[kind]}/{name} {'configured' if existed else 'created'}")
        elif kind == workloads.KIND:
            try:
                d = workloads.parse(obj, where)
                made = workloads.pods(dataclasses.replace(plan, pods=pods), d)
            except workloads.DeploymentError as e:
                raise ApplyError(str(e)) from None
            existed = any(p.owner == d.owner for p in pods)
            pods = (*workloads.without(pods, d.owner), *made)
            namespaces.setdefault(d.namespace, {})
            lines.append(f"deployment.apps/{name} {'configured' if existed else 'created'} "
                         f"({_replicas(made)})")  # fmt: skip
            if d.images:
                lines.append(f"  image {', '.join(d.images)} not pulled: the lab runs each "
                             "container's command on this machine")  # fmt: skip
        elif kind == "Service":
            old = services.get((ns, name))
            vip = "" if old else _free_vip(plan, new_vips)
            svc = _service(obj, old, vip, f"{where} (service {ns}/{name})")
            if not old:
                new_vips.append(svc.vip)
            services[(ns, name)] = svc
            lines.append(f"service/{name} {'configured' if old else 'created'} ({svc.vip})")
        else:
            old_route = by_key.get((kind, ns, name))
            meta = dict(obj["metadata"])
            meta["creationTimestamp"] = (
                (old_route or {}).get("metadata", {}).get("creationTimestamp", stamp)
            )
            stored = {"apiVersion": obj["apiVersion"], "kind": kind, "metadata": meta,
                      "spec": obj.get("spec") or {}}  # fmt: skip
            by_key[(kind, ns, name)] = stored
            lines.append(
                f"{kind.lower()}.{GROUP}/{name} {'configured' if old_route else 'created'}"
            )
    new_plan = dataclasses.replace(
        plan,
        services=tuple(services.values()),
        pods=pods,
        namespaces=namespaces,
        namespace_annotations=ns_annotations,
    )
    keys = {f"{s.namespace}/{s.name}" for s in new_plan.services}
    route_names = {f"{ns}/{name}" for (k, ns, name) in by_key if k in ROUTE_KINDS}
    for obj in docs:
        if obj.get("kind") == policy.KIND:
            # Accepted either way (pods and routes may come later), but said: a typo in
            # a selector is otherwise silent.
            p = policy.parse_policy(obj)
            if p.target_routes and not p.target_routes & route_names:
                lines.append(f"  AuthorizationPolicy {p.key}: targets no route of the lab yet "
                             f"({', '.join(sorted(p.target_routes))})")  # fmt: skip
            elif not p.target_routes and not any(
                p.selects(pod.namespace, pod.labels) for pod in new_plan.pods
            ):
                lines.append(f"  AuthorizationPolicy {p.key}: selects no pod of the lab yet")
        if obj.get("kind") in ROUTE_KINDS:
            _, conds = conditions(by_key[_key(obj)], dict.fromkeys(keys))
            said = "; ".join(_condition(c) for c in conds)
            lines.append(f"  {obj['kind']} {_meta(obj, '')[1]}: {said}")
    return new_plan, list(by_key.values()), lines


def delete(
    plan: LabPlan, routes: list[dict[str, Any]], docs: Iterable[Any]
) -> tuple[LabPlan, list[dict[str, Any]], list[str]]:
    """``plan`` and ``routes`` without the objects ``docs`` name."""
    services = {(s.namespace, s.name): s for s in plan.services}
    by_key = {_key(r): r for r in routes}
    pods = plan.pods
    namespaces = dict(plan.namespaces)
    ns_annotations = dict(plan.namespace_annotations)
    lines = []
    for i, obj in enumerate(d for d in docs if d is not None):
        kind = _kind(obj, f"document {i + 1}")
        ns, name = _meta(obj, f"document {i + 1}")
        gone: object
        if kind == "Namespace":
            used = [f"pod {p.name}" for p in pods if p.namespace == name] + [
                f"service {s.name}" for s in services.values() if s.namespace == name
            ]
            if used:
                raise ApplyError(f"namespace {name} still holds {', '.join(used[:5])}: "
                                 "delete them first (the lab does not cascade)")  # fmt: skip
            gone = namespaces.pop(name, None) is not None
            ns_annotations.pop(name, None)
        elif kind == workloads.KIND:
            owner = f"{kind} {ns}/{name}"
            gone = any(p.owner == owner for p in pods)
            pods = workloads.without(pods, owner)
        elif kind == "Service":
            gone = services.pop((ns, name), None)
        else:
            gone = by_key.pop((kind, ns, name), None)
        label = LABELS.get(kind, f"{kind.lower()}.{GROUP}")
        lines.append(f"{label}/{name} {'deleted' if gone else 'not found'}")
    return (
        dataclasses.replace(
            plan,
            services=tuple(services.values()),
            pods=pods,
            namespaces=namespaces,
            namespace_annotations=ns_annotations,
        ),
        list(by_key.values()),
        lines,
    )


def _replicas(made: tuple[PodPlan, ...]) -> str:
    if not made:
        return "0 replicas"
    where = ", ".join(f"{p.name} on {p.node}" for p in made)
    return f"{len(made)} replica{'s' if len(made) != 1 else ''}: {where}"


def _condition(c: Condition) -> str:
    text = f"{c.type}: {c.status} ({c.reason}"
    return text + (f": {c.message})" if not c.status else ")")
