"""The lab's state on disk: one JSON file per lab, written atomically.

Other processes read it — ``weft lab status``/``exec``/``logs`` now, the control plane's
lab registry later — so it is the single source of truth for what a lab contains, and
its schema is versioned.  ``down`` does not trust it alone: it also finds a crashed lab's
leftovers by name (namespace prefix, cgroup root, pin directory), because a crash can
happen before the state file records what was made.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weft.files import write_json_atomic as write_json_atomic
from weft.lab.plan import ContainerPlan, LabPlan, NodePlan, PodPlan, ServicePlan, ServicePort

SCHEMA_VERSION = 1
RUN_ROOT = Path(os.environ.get("WEFT_RUN_DIR", "/run/weft"))
"""tmpfs: a lab does not survive a reboot (its namespaces do not either)."""
BPFFS_ROOT = Path("/sys/fs/bpf")


class StateError(RuntimeError):
    """The state file is missing or unreadable."""


@dataclass
class ProcessRecord:
    """A process the lab started; ``start_time`` guards against PID reuse when stopping it."""

    name: str
    pid: int
    start_time: int
    argv: list[str]
    log: str
    where: str
    """The pod or node it runs in."""


@dataclass
class LabPaths:
    state_dir: Path
    cgroup_root: Path | None
    bpffs_dir: Path

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def pod_dir(self, pod: str) -> Path:
        return self.state_dir / "pods" / pod


def lab_paths(name: str, cgroup2_mount: str | None) -> LabPaths:
    return LabPaths(
        state_dir=RUN_ROOT / "lab" / name,
        cgroup_root=Path(cgroup2_mount) / f"weft-lab-{name}" if cgroup2_mount else None,
        bpffs_dir=BPFFS_ROOT / f"weft-lab-{name}",
    )


@dataclass
class LabState:
    plan: LabPlan
    phase: str
    """``creating`` while ``up`` runs, ``ready`` after, ``failed`` if ``up`` gave up."""
    paths: LabPaths
    created_at: float = field(default_factory=time.time)
    processes: list[ProcessRecord] = field(default_factory=list)
    controlplane_args: list[str] = field(default_factory=list)
    """Extra ``weft controlplane`` flags (``--leaf-lifetime 30s``), kept for restarts."""
    agent_args: list[str] = field(default_factory=list)
    """Extra ``weft agent`` flags for every node's agent, kept for restarts."""
    routes: list[dict[str, Any]] = field(default_factory=list)
    """Gateway API route objects applied with ``weft lab apply -f`` (as given)."""
    policies: list[dict[str, Any]] = field(default_factory=list)
    """``AuthorizationPolicy`` objects applied with ``weft lab apply -f`` (as given)."""
    traces: dict[str, Any] | None = None
    """``weft lab up --traces``: the OTLP receiver the agents export to —
    ``collector`` (``host:port``), ``netns`` (where it listens), ``sample_rate`` (the
    agents' ``--trace-sample-rate``); None: no tracing."""

    def pod(self, name: str) -> PodPlan:
        for p in self.plan.pods:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.plan.pods) or "none"
        raise KeyError(f"no pod {name!r} in lab {self.plan.name!r} (pods: {known})")

    def pod_cgroup(self, pod: PodPlan) -> Path | None:
        root = self.paths.cgroup_root
        return root / pod.node / pod.name if root else None

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "version": SCHEMA_VERSION,
            "name": plan.name,
            "phase": self.phase,
            "created_at": self.created_at,
            "paths": {
                "state_dir": str(self.paths.state_dir),
                "cgroup_root": str(self.paths.cgroup_root) if self.paths.cgroup_root else None,
                "bpffs_dir": str(self.paths.bpffs_dir),
            },
            "namespaces": [
                {
                    "name": ns,
                    "labels": labels,
                    "annotations": plan.namespace_annotations.get(ns, {}),
                }
                for ns, labels in plan.namespaces.items()
            ],
            "nodes": [{**asdict(n), "netns": plan.netns(n.name)} for n in plan.nodes],
            "pods": [
                {
                    "name": p.name,
                    "node": p.node,
                    "ip": p.ip,
                    "netns": plan.netns(p.name),
                    "namespace": p.namespace,
                    "service_account": p.service_account,
                    "labels": p.labels,
                    "captured": plan.captured(p),
                    "strict": p.strict,
                    "app": p.app,
                    "ports": list(p.ports),
                    "annotations": p.annotations,
                    "containers": [
                        {
                            "name": c.name,
                            "argv": list(c.argv),
                            "env": [list(kv) for kv in c.env],
                            "working_dir": c.working_dir,
                            "ports": list(c.ports),
                        }
                        for c in p.containers
                    ],
                    "owner": p.owner,
                    "cgroup": str(self.pod_cgroup(p)) if self.pod_cgroup(p) else None,
                }
                for p in plan.pods
            ],
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": s.vip,
                    "ports": [asdict(port) for port in s.ports],
                    "selector": s.selector,
                    "annotations": s.annotations,
                }
                for s in plan.services
            ],
            "processes": [asdict(p) for p in self.processes],
            "controlplane_args": list(self.controlplane_args),
            "agent_args": list(self.agent_args),
            "routes": self.routes,
            "policies": self.policies,
            "traces": self.traces,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        version = data.get("version")
        if version != SCHEMA_VERSION:
            raise StateError(
                f"lab state schema version {version!r} is not {SCHEMA_VERSION}; "
                "this lab was made by another weft version: run `weft lab down` and `up` again"
            )
        plan = LabPlan(
            name=data["name"],
            nodes=tuple(
                NodePlan(
                    name=n["name"],
                    index=n["index"],
                    ip=n["ip"],
                    pod_cidr=n["pod_cidr"],
                    gateway=n["gateway"],
                )
                for n in data["nodes"]
            ),
            pods=tuple(
                PodPlan(
                    name=p["name"],
                    node=p["node"],
                    ip=p["ip"],
                    namespace=p["namespace"],
                    service_account=p["service_account"],
                    labels=dict(p["labels"]),
                    app=p["app"],
                    ports=tuple(p["ports"]),
                    annotations=dict(p.get("annotations") or {}),
                    containers=tuple(
                        ContainerPlan(
                            name=c["name"],
                            argv=tuple(c["argv"]),
                            env=tuple((k, v) for k, v in c.get("env", [])),
                            working_dir=c.get("working_dir"),
                            ports=tuple(c.get("ports", [])),
                        )
                        for c in p.get("containers") or []
                    ),
                    owner=p.get("owner"),
                )
                for p in data["pods"]
            ),
            services=tuple(
                ServicePlan(
                    name=s["name"],
                    namespace=s["namespace"],
                    vip=s["vip"],
                    ports=tuple(ServicePort(**port) for port in s["ports"]),
                    selector=dict(s["selector"]),
                    annotations=dict(s.get("annotations") or {}),
                )
                for s in data["services"]
            ),
            namespaces={ns["name"]: dict(ns["labels"]) for ns in data["namespaces"]},
            namespace_annotations={ns["name"]: dict(ns["annotations"])
                                   for ns in data["namespaces"] if ns.get("annotations")},
        )  # fmt: skip
        paths = data["paths"]
        return cls(
            plan=plan,
            phase=data["phase"],
            paths=LabPaths(
                state_dir=Path(paths["state_dir"]),
                cgroup_root=Path(paths["cgroup_root"]) if paths["cgroup_root"] else None,
                bpffs_dir=Path(paths["bpffs_dir"]),
            ),
            created_at=data["created_at"],
            processes=[ProcessRecord(**p) for p in data["processes"]],
            controlplane_args=[str(a) for a in data.get("controlplane_args", [])],
            agent_args=[str(a) for a in data.get("agent_args", [])],
            routes=[r for r in data.get("routes", []) if isinstance(r, dict)],
            policies=[p for p in data.get("policies", []) if isinstance(p, dict)],
            traces=data["traces"] if isinstance(data.get("traces"), dict) else None,
        )

    def save(self) -> None:
        write_json_atomic(self.paths.state_file, self.to_json())


def load_state(state_file: Path) -> LabState:
    try:
        text = state_file.read_text()
    except FileNotFoundError:
        raise StateError(f"no lab state at {state_file}: is the lab up? (`weft lab up`)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StateError(
            f"lab state {state_file} is corrupt ({e}); `weft lab down` cleans up"
        ) from None
    try:
        return LabState.from_json(data)
    except (KeyError, TypeError) as e:
        raise StateError(
            f"lab state {state_file} lacks field {e}; `weft lab down` cleans up"
        ) from None
