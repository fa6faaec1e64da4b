"""Deployments in the lab (``weft lab apply -f``), sans-I/O.

A Deployment (``apps/v1``) becomes ``spec.replicas`` pods named ``<deployment>-<k>``,
spread over the nodes round-robin (replica k on node ``(k-1) mod nodes``), each with the
template's labels, annotations and ``serviceAccountName`` (the pod's mesh identity) and
one process per container. The lab runs no images: a container is its ``command`` +
``args`` run on the host's filesystem inside the pod's network namespace, cgroup and
hosts file — so ``command`` is required, and ``image`` is only noted. ``env`` takes
``value`` and the ``fieldRef`` paths a pod's own facts answer (name, namespace, IP, node,
service account); ``$(VAR)`` in ``command``/``args``/``env`` expands as Kubernetes expands
it. A re-applied Deployment keeps each surviving replica's node and address (scaling adds
or removes the highest-numbered ones); what else changed applies in place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weft.lab.plan import (
    MAX_PODS_PER_NODE,
    ContainerPlan,
    LabPlan,
    PlanError,
    PodPlan,
    free_pod_ip,
)

API_VERSION = "apps/v1"
KIND = "Deployment"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
MAX_NAME = 55
"""Pod names are ``<deployment>-<k>`` and must stay DNS labels (63)."""
FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "status.podIP",
    "spec.nodeName",
    "spec.serviceAccountName",
)
_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class DeploymentError(ValueError):
    """A Deployment the lab cannot run, with the field that says why."""


@dataclass(frozen=True)
class _EnvVar:
    name: str
    value: str | None
    field_path: str | None


@dataclass(frozen=True)
class _Container:
    name: str
    command: tuple[str, ...]
    env: tuple[_EnvVar, ...]
    working_dir: str | None
    ports: tuple[int, ...]
    image: str | None


@dataclass(frozen=True)
class Deployment:
    namespace: str
    name: str
    replicas: int
    labels: dict[str, str]
    annotations: dict[str, str]
    service_account: str
    containers: tuple[_Container, ...]

    @property
    def owner(self) -> str:
        return f"{KIND} {self.namespace}/{self.name}"

    def pod_name(self, k: int) -> str:
        return f"{self.name}-{k}"

    @property
    def images(self) -> list[str]:
        return [c.image for c in self.containers if c.image]


def _strings(value: Any, where: str) -> dict[str, str]:
    value = value if value is not None else {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise DeploymentError(f"{where} must map strings to strings")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DeploymentError(f"{where} must be a list")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    if not all(isinstance(x, str) for x in items):
        raise DeploymentError(f"{where} must be a list of strings")
    return tuple(items)


def _env(raw: Any, where: str) -> _EnvVar:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise DeploymentError(f"{where}.name is missing")
    name = raw["name"]
    if not ENV_NAME.match(name):
        raise DeploymentError(f"{where}.name {name!r} is not a valid environment variable name")
    source = raw.get("valueFrom")
    if source is None:
        value = raw.get("value", "")
        if not isinstance(value, str):
            raise DeploymentError(f"{where}.value must be a string (quote numbers in YAML)")
        return _EnvVar(name, value, None)
    ref = source.get("fieldRef") if isinstance(source, dict) else None
    path = ref.get("fieldPath") if isinstance(ref, dict) else None
    if path not in FIELD_PATHS:
        raise DeploymentError(
            f"{where}.valueFrom: the lab answers only fieldRef fieldPath "
            f"{', '.join(FIELD_PATHS)} (no Secrets, ConfigMaps or resource fields)"
        )
    return _EnvVar(name, None, str(path))


def _container(raw: Any, where: str) -> _Container:
    if not isinstance(raw, dict):
        raise DeploymentError(f"{where} is not an object")
    name = raw.get("name")
    if not isinstance(name, str) or not DNS_LABEL.match(name):
        raise DeploymentError(f"{where}.name {name!r} is not a DNS label")
    command = _str_list(raw.get("command"), f"{where}.command")
    if not command:
        raise DeploymentError(
            f"{where} ({name}): the lab runs no images, so a container needs `command` "
            "(the program to run on this machine, e.g. [python3, -m, http.server, '8080'])"
        )
    args = _str_list(raw.get("args"), f"{where}.args")
    raw_env = _list(raw.get("env"), f"{where}.env")
    env = tuple(_env(e, f"{where}.env[{i}]") for i, e in enumerate(raw_env))
    ports = []
    for i, p in enumerate(_list(raw.get("ports"), f"{where}.ports")):
        port = p.get("containerPort") if isinstance(p, dict) else None
        if not (isinstance(port, int) and 0 < port < 65536):
            raise DeploymentError(f"{where}.ports[{i}].containerPort {port!r} is not a port")
        if (p.get("protocol") or "TCP") == "TCP":
            ports.append(port)
    working_dir = raw.get("workingDir")
    if working_dir is not None and not str(working_dir).startswith("/"):
        raise DeploymentError(f"{where}.workingDir must be an absolute path")
    image = raw.get("image")
    return _Container(name, command + args, env, working_dir and str(working_dir), tuple(ports),
                      image if isinstance(image, str) else None)  # fmt: skip


def parse(obj: Mapping[str, Any], where: str) -> Deployment:
    """The parts of a Deployment the lab runs; `DeploymentError` names the bad field."""
    meta = obj.get("metadata") or {}
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not DNS_LABEL.match(name) or len(name) > MAX_NAME:
        raise DeploymentError(
            f"{where}: metadata.name {name!r} must be a DNS label of at most {MAX_NAME} "
            "characters in the lab (pods are <name>-<k>)"
        )
    if not isinstance(ns, str) or not DNS_LABEL.match(ns):
        raise DeploymentError(f"{where}: metadata.namespace {ns!r} is not a DNS label")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise DeploymentError(f"{where}: spec is missing")
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise DeploymentError(f"{where}: spec.replicas {replicas!r} is not a count")
    selector = spec.get("selector")
    if not isinstance(selector, dict):
        raise DeploymentError(f"{where}: spec.selector is required (apps/v1)")
    if selector.get("matchExpressions"):
        raise DeploymentError(f"{where}: spec.selector.matchExpressions is not supported in the "
                              "lab; use matchLabels")  # fmt: skip
    match = _strings(selector.get("matchLabels"), f"{where}: spec.selector.matchLabels")
    template = spec.get("template")
    if not isinstance(template, dict):
        raise DeploymentError(f"{where}: spec.template is missing")
    tmeta = template.get("metadata") or {}
    labels = _strings(tmeta.get("labels"), f"{where}: spec.template.metadata.labels")
    annotations = _strings(tmeta.get("annotations"),
                           f"{where}: spec.template.metadata.annotations")  # fmt: skip
    if not match or any(labels.get(k) != v for k, v in match.items()):
        raise DeploymentError(f"{where}: spec.selector does not match the template's labels "
                              f"(selector {match}, labels {labels})")  # fmt: skip
    pod = template.get("spec")
    if not isinstance(pod, dict):
        raise DeploymentError(f"{where}: spec.template.spec is missing")
    sa = pod.get("serviceAccountName") or pod.get("serviceAccount") or "default"
    if not isinstance(sa, str) or not DNS_LABEL.match(sa):
        raise DeploymentError(f"{where}: serviceAccountName {sa!r} is not a DNS label")
    raw = _list(pod.get("containers"), f"{where}: spec.template.spec.containers")
    if not raw:
        raise DeploymentError(f"{where}: spec.template.spec.containers is empty")
    containers = tuple(
        _container(c, f"{where}: spec.template.spec.containers[{i}]") for i, c in enumerate(raw)
    )
    names = [c.name for c in containers]
    if len(set(names)) != len(names):
        raise DeploymentError(f"{where}: container names repeat ({', '.join(names)})")
    return Deployment(ns, name, replicas, labels, annotations, sa, containers)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined variable is replaced, ``$$`` is a
    literal ``$``, anything else stays as written."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        var = m.group(1)
        return env[var] if var in env else m.group(0)

    return _REF.sub(one, text)


def _resolve(c: _Container, facts: Mapping[str, str]) -> ContainerPlan:
    env: dict[str, str] = {}
    for var in c.env:
        value = facts[var.field_path] if var.field_path else expand(var.value or "", env)
        env[var.name] = value
    return ContainerPlan(
        name=c.name,
        argv=tuple(expand(a, env) for a in c.command),
        env=tuple(env.items()),
        working_dir=c.working_dir,
        ports=c.ports,
    )


def pods(plan: LabPlan, d: Deployment) -> tuple[PodPlan, ...]:
    """The pods of ``d`` in ``plan`` as it should be: existing replicas keep their node and
    address, new ones go round-robin; `DeploymentError` if a name or address is taken."""
    if not plan.nodes:
        raise DeploymentError(f"{d.owner}: the lab has no nodes")
    if d.replicas > MAX_PODS_PER_NODE * len(plan.nodes):
        raise DeploymentError(f"{d.owner}: {d.replicas} replicas exceed the lab's pod "
                              f"addresses ({MAX_PODS_PER_NODE} per node)")  # fmt: skip
    mine = {p.name: p for p in plan.pods if p.owner == d.owner}
    others = {p.name: p for p in plan.pods if p.owner != d.owner}
    taken = {p.ip for p in others.values()}
    out: list[PodPlan] = []
    for k in range(1, d.replicas + 1):
        name = d.pod_name(k)
        if name in others:
            who = others[name].owner or "the lab's own layout"
            raise DeploymentError(f"{d.owner}: pod name {name} is taken ({who}); "
                                  "rename the Deployment")  # fmt: skip
        if name in {n.name for n in plan.nodes}:
            raise DeploymentError(f"{d.owner}: pod name {name} is a node's name")
        old = mine.get(name)
        node = plan.node(old.node) if old else plan.nodes[(k - 1) % len(plan.nodes)]
        try:
            ip = old.ip if old and old.ip not in taken else free_pod_ip(node, taken)
        except PlanError as e:
            raise DeploymentError(f"{d.owner}: {e}") from None
        taken.add(ip)
        facts = {
            "metadata.name": name,
            "metadata.namespace": d.namespace,
            "status.podIP": ip,
            "spec.nodeName": node.name,
            "spec.serviceAccountName": d.service_account,
        }
        containers = tuple(_resolve(c, facts) for c in d.containers)
        out.append(
            PodPlan(
                name=name,
                node=node.name,
                ip=ip,
                namespace=d.namespace,
                service_account=d.service_account,
                labels=dict(d.labels),
                app=None,
                ports=tuple(sorted({p for c in containers for p in c.ports})),
                annotations=dict(d.annotations),
                containers=containers,
                owner=d.owner,
            )
        )
    return tuple(out)


def without(plan_pods: Sequence[PodPlan], owner: str) -> tuple[PodPlan, ...]:
    return tuple(p for p in plan_pods if p.owner != owner)


def process_name(pod: PodPlan, container: ContainerPlan) -> str:
    """What ``weft lab logs/stop/start`` call a container's process: the pod's name, or
    ``<pod>/<container>`` when the pod has several."""
    return pod.name if len(pod.containers) == 1 else f"{pod.name}/{container.name}"
