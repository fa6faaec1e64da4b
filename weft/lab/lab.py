"""``weft lab``: a whole multi-node cluster on one Linux machine.

Nodes and pods are network namespaces (see :mod:`weft.lab.plan` for the address plan),
pods also get a cgroup v2 directory each — the unit the eBPF capture hooks attach to —
and a hosts file that resolves service and pod names.  The lab's description lives in a
JSON state file (:mod:`weft.lab.state`) that other commands and processes read.

Robustness rules:

* ``up`` records state before it makes anything, and on any failure (an exception, or
  Ctrl-C) tears down what it made unless asked to keep it for debugging.
* ``down`` works from names, not only from the state file, so it cleans up after a
  crash at any point of ``up``: namespaces by their ``<lab>-`` prefix, the cgroup root,
  the bpffs pin directory, and processes by record (PID + start time) and by cgroup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from weft.lab import apply as lab_apply
from weft.lab import net, procs, workloads
from weft.lab import sidecar as lab_sidecar
from weft.lab.plan import (
    CONTROLPLANE_IP,
    LabPlan,
    PodPlan,
    ServicePlan,
    endpoints,
    hosts_file,
    netns_name,
    plan_lab,
    validate_lab_name,
)
from weft.lab.state import (
    LabPaths,
    LabState,
    ProcessRecord,
    StateError,
    lab_paths,
    load_state,
)
from weft.mesh import SIDECAR_TUNNEL_PORT
from weft.nsenter import enter_pod, in_netns
from weft.preflight import find_cgroup2_mount

Reporter = Callable[[str], None]
READY_TIMEOUT = 15.0
AGENT_READY_TIMEOUT = 60.0
ADMIN_PORT = 15020
POD_STOP_GRACE = 10.0
"""Seconds a pod's process gets between SIGTERM and SIGKILL (Kubernetes gives 30)."""
POD_RELEASE_TIMEOUT = 5.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(RuntimeError):
    """A lab operation cannot go on; the message says what to do."""


def _quiet(_: str) -> None:
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "weft lab needs root: it creates network namespaces, links and cgroups "
            "(run it with sudo; `weft check` lists what else is needed)"
        )


def cgroup2_mount() -> str | None:
    try:
        return find_cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None


IdentitySetup = Callable[[Path, list[str]], dict[str, str]]
"""Make the lab's CA under ``<state_dir>/ca`` and bootstrap tokens for the given nodes;
return ``{node: token}``.  Injected by the CLI: the shared core must not import the
control plane."""

CA_DIR = "ca"
ANCHOR_FILE = "anchor.pem"
CONTROLPLANE_ADMIN_PORT = 15014
OTLP_PORT = 4318
"""``weft lab up --traces``: the lab's OTLP receiver (`weft.lab.otlp`) listens here on
the control-plane host, where every node's agent reaches it over the fabric."""
OTLP_PROCESS = "otlp"
DEFAULT_TRACE_SAMPLE_RATE = 1.0
"""The lab traces every request that brings no decision of its own (a demo: ``curl``
shows a trace at once); a caller's own sampled/unsampled flag is followed whatever the
rate. A cluster's agents default to 0."""


class Lab:
    def __init__(
        self,
        name: str = "weft",
        report: Reporter = _quiet,
        identity_setup: IdentitySetup | None = None,
    ) -> None:
        self.name = validate_lab_name(name)
        self.report = report
        self.identity_setup = identity_setup
        self.paths: LabPaths = lab_paths(self.name, cgroup2_mount())

    # -- inspection ---------------------------------------------------------------------

    def load(self) -> LabState:
        try:
            return load_state(self.paths.state_file)
        except StateError as e:
            raise LabError(str(e)) from None

    def leftovers(self) -> list[str]:
        """What of this lab exists on the machine, by name (works without a state file)."""
        found: list[str] = []
        if self.paths.state_file.exists():
            found.append(f"state file {self.paths.state_file}")
        found.extend(f"network namespace {n}" for n in net.list_netns(f"{self.name}-"))
        if self.paths.cgroup_root and self.paths.cgroup_root.exists():
            found.append(f"cgroup {self.paths.cgroup_root}")
        if self.paths.bpffs_dir.exists():
            found.append(f"bpffs pins {self.paths.bpffs_dir}")
        return found

    def status(self) -> dict[str, Any]:
        state = self.load()
        data = state.to_json()
        for rec in data["processes"]:
            rec["alive"] = procs.proc_start_time(rec["pid"]) == rec["start_time"]
        for svc, svc_json in zip(state.plan.services, data["services"], strict=True):
            target = svc.ports[0].target_port if svc.ports else None
            svc_json["endpoints"] = [
                {"pod": p.name, "node": p.node, "ip": p.ip, "port": target}
                for p in endpoints(state.plan.pods, svc)
            ]
        return data

    # -- up -------------------------------------------------------------------------------

    def up(
        self,
        nodes: int = 2,
        pods_per_node: int | None = None,
        demo: bool = False,
        replace: bool = False,
        keep_on_failure: bool = False,
        agents: bool = True,
        controlplane_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
        plan: LabPlan | None = None,
        traces: bool = False,
        trace_sample_rate: float = DEFAULT_TRACE_SAMPLE_RATE,
    ) -> LabState:
        """Create the lab; ``plan`` replaces the standard layout (benchmarks use it).
        ``traces``: run the lab's OTLP receiver on the control-plane host and start the
        agents exporting to it, sampling requests without a decision at
        ``trace_sample_rate``."""
        require_root()
        if traces and not agents:
            raise LabError("--traces needs the node agents (they emit the spans): drop --no-agents")
        if not 0.0 <= trace_sample_rate <= 1.0:
            raise LabError(f"--trace-sample-rate must be between 0 and 1, got {trace_sample_rate}")
        if self.paths.cgroup_root is None:
            raise LabError(
                "cgroup v2 is not mounted anywhere: run `make setup`, or "
                "`mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
                " (see `weft check`)"
            )
        existing = self.leftovers()
        if existing:
            if not replace:
                raise LabError(
                    f"lab {self.name!r} already exists ({'; '.join(existing[:3])}"
                    f"{' ...' if len(existing) > 3 else ''}): see `weft lab status`, "
                    "or `weft lab down` first (or `weft lab up --replace`)"
                )
            self.report(f"replacing existing lab {self.name!r}")
            self.down()
        if plan is None:
            plan = plan_lab(self.name, nodes, pods_per_node, demo)
        elif plan.name != self.name:
            raise LabError(f"plan is for lab {plan.name!r}, not {self.name!r}")
        state = LabState(
            plan=plan,
            phase="creating",
            paths=self.paths,
            controlplane_args=list(controlplane_args),
            agent_args=list(agent_args),
            traces={
                "collector": f"{CONTROLPLANE_IP}:{OTLP_PORT}",
                "netns": plan.netns(net.CONTROLPLANE),
                "sample_rate": trace_sample_rate,
            }
            if traces
            else None,
        )
        started = time.monotonic()
        try:
            with _step("writing the state file"):
                state.save()
            self._build(state, agents)
            with _step("finishing"):
                state.phase = "ready"
            state.save()
        except BaseException as e:
            state.phase = "failed"
            try:
                state.save()
            except OSError:
                pass
            if keep_on_failure:
                self.report(f"up failed ({e}); leaving the lab for inspection: `weft lab down`")
            else:
                self.report(f"up failed ({e}); removing what was made")
                self.down()
            raise
        self.report(
            f"lab {self.name!r} ready: {len(plan.nodes)} nodes, {len(plan.pods)} pods, "
            f"{len(plan.services)} services in {time.monotonic() - started:.1f}s"
        )
        return state

    def _build(self, state: LabState, agents: bool) -> None:
        plan = state.plan
        assert self.paths.cgroup_root is not None
        self.report(f"fabric: namespace {plan.netns(net.FABRIC)} with bridge {net.FABRIC_BRIDGE}")
        with _step("building the fabric"):
            net.build_fabric(plan)
        with _step(f"creating cgroup {self.paths.cgroup_root}"):
            self.paths.cgroup_root.mkdir(exist_ok=True)
        for node in plan.nodes:
            self.report(f"{node.name}: {node.ip}, pods {node.pod_cidr}")
            with _step(f"building {node.name}"):
                net.build_node(plan, node)
                (self.paths.cgroup_root / node.name).mkdir(exist_ok=True)
        for pod in plan.pods:
            self._make_pod(state, pod)
        for pod in plan.pods:
            if pod.app == "echo":
                with _step(f"starting echo in {pod.name}"):
                    self._start_echo(state, pod)
        for pod in plan.pods:
            if pod.app == "echo":
                self._wait_listening(state, pod, pod.ports[0])
        if agents and self.identity_setup is not None:
            with _step("starting the control plane"):
                self._start_controlplane(state)
        if state.traces is not None:
            with _step("starting the OTLP receiver"):
                if self.identity_setup is None:
                    net.build_controlplane_host(plan)
                self._spawn_otlp(state)
        if agents:
            for node in plan.nodes:
                with _step(f"starting the agent of {node.name}"):
                    self._start_agent(state, node.name)
            for node in plan.nodes:
                self._wait_agent_ready(state, node.name)
            self._start_sidecars(state, plan.pods)

    def _start_sidecars(self, state: LabState, pods: Sequence[PodPlan]) -> None:
        """Sidecar-mode pods (`weft.lab.sidecar`): the init step's capture, then the
        pod's own proxy, ready before the pod counts as started (needs the control plane)."""
        if self.identity_setup is None:
            return
        for pod in pods:
            if lab_sidecar.is_sidecar(pod):
                with _step(f"starting the sidecar of {pod.name}"):
                    lab_sidecar.start(self, state, pod)
                self.report(f"{pod.name}: sidecar ready (its own proxy, {pod.ip}:15008)")

    def _make_pod(self, state: LabState, pod: PodPlan) -> None:
        """A pod's network namespace, cgroup and hosts file (nothing runs in it yet)."""
        plan = state.plan
        self.report(
            f"{pod.name}: {pod.ip} on {pod.node} ({pod.namespace}/{pod.service_account}"
            f"{', captured' if plan.captured(pod) else ''})"
        )
        with _step(f"building pod {pod.name}"):
            net.build_pod(plan, pod)
            cg = state.pod_cgroup(pod)
            assert cg is not None
            cg.mkdir(exist_ok=True)
            pod_dir = self.paths.pod_dir(pod.name)
            pod_dir.mkdir(parents=True, exist_ok=True)
            (pod_dir / "hosts").write_text(hosts_file(plan, pod))

    def _start_controlplane(self, state: LabState) -> None:
        """CA, bootstrap tokens, the control-plane host and process (``weft controlplane``)."""
        assert self.identity_setup is not None and self.paths.cgroup_root is not None
        nodes = [n.name for n in state.plan.nodes]
        tokens = self.identity_setup(self.paths.state_dir, nodes)
        for node, token in tokens.items():
            path = self.agent_dir(node) / "bootstrap.token"
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
        self.report(f"control plane: CA and bootstrap tokens for {len(tokens)} nodes")
        net.build_controlplane_host(state.plan)
        self._spawn_controlplane(state)

    def _spawn_controlplane(self, state: LabState) -> ProcessRecord:
        assert self.paths.cgroup_root is not None
        cgroup = self.paths.cgroup_root / "weft-controlplane"
        cgroup.mkdir(exist_ok=True)
        netns = state.plan.netns(net.CONTROLPLANE)
        argv = [sys.executable, "-m", "weft.cli", "controlplane", "--lab", self.name]
        rec = procs.spawn(
            name="controlplane",
            argv=[*argv, *state.controlplane_args],
            log_path=self.paths.log_dir / "controlplane.log",
            where=net.CONTROLPLANE,
            preexec=lambda: enter_pod(netns, cgroup, None),
        )
        state.processes.append(rec)
        state.save()
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        while True:
            answer = admin_get(netns, "127.0.0.1", CONTROLPLANE_ADMIN_PORT, "/ready")
            if answer is not None and answer[0] == 200:
                self.report(f"control plane: ready on {CONTROLPLANE_IP}:15010 (pid {rec.pid})")
                return rec
            _still_starting(rec, deadline, "not ready")

    def _spawn_otlp(self, state: LabState) -> ProcessRecord:
        """The lab's OTLP receiver (`weft.lab.otlp`), in the control-plane host's
        namespace and a cgroup of its own; waits until it answers ``/healthz``."""
        assert self.paths.cgroup_root is not None and state.traces is not None
        cgroup = self.paths.cgroup_root / "weft-otlp"
        cgroup.mkdir(exist_ok=True)
        netns = state.plan.netns(net.CONTROLPLANE)
        host, _, port = str(state.traces["collector"]).rpartition(":")
        rec = procs.spawn(
            name=OTLP_PROCESS,
            argv=[sys.executable, "-m", "weft.lab.otlp", "--listen", f"{host}:{port}"],
            log_path=self.paths.log_dir / f"{OTLP_PROCESS}.log",
            where=net.CONTROLPLANE,
            preexec=lambda: enter_pod(netns, cgroup, None),
        )
        state.processes.append(rec)
        state.save()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            answer = admin_get(netns, host, int(port), "/healthz")
            if answer is not None and answer[0] == 200:
                self.report(f"traces: OTLP receiver on {host}:{port} (pid {rec.pid}); "
                            f"spans at http://{host}:{port}/api/traces")  # fmt: skip
                return rec
            _still_starting(rec, deadline, "not listening")

    def traces_get(self, path: str = "/api/traces") -> tuple[int, str] | None:
        """GET the lab's OTLP receiver's JSON API (from inside the control-plane host)."""
        state = self.load()
        if state.traces is None:
            raise LabError(f"lab {self.name!r} runs without traces (`weft lab up --traces`)")
        host, _, port = str(state.traces["collector"]).rpartition(":")
        return admin_get(str(state.traces["netns"]), host, int(port), path)

    def _trace_args(self, state: LabState) -> list[str]:
        if state.traces is None:
            return []
        return ["--trace-collector", str(state.traces["collector"]),
                "--trace-sample-rate", str(state.traces["sample_rate"])]  # fmt: skip

    # -- stopping and starting one process (failure drills) ---------------------------

    def stop_process(self, name: str) -> bool:
        """Stop a process the lab started (an echo replica, the control plane, an
        agent), by its recorded PID; False if it was not running."""
        require_root()
        state = self.load()
        recs = [r for r in state.processes if r.name == name]
        if not recs:
            known = ", ".join(sorted({r.name for r in state.processes}))
            raise LabError(f"no process {name!r} in lab {self.name!r} (known: {known})")
        stopped = any([procs.stop(r, grace=10.0) for r in recs])
        state.processes = [r for r in state.processes if r.name != name]
        state.save()
        self.report(f"{name}: {'stopped' if stopped else 'was not running'}")
        return stopped

    def start_process(self, name: str) -> None:
        """Start again a process stopped with :meth:`stop_process`: an echo pod's app,
        a Deployment pod's container (``POD`` or ``POD/CONTAINER``), the control plane or
        a node's agent."""
        require_root()
        state = self.load()
        if any(r.name == name and procs.is_alive(r) for r in state.processes):
            raise LabError(f"{name} is already running")
        state.processes = [r for r in state.processes if r.name != name]
        if name == "controlplane":
            if self.identity_setup is None:
                raise LabError("this lab runs without a control plane")
            self._spawn_controlplane(state)
            return
        if name == OTLP_PROCESS and state.traces is not None:
            self._spawn_otlp(state)
            return
        node = name.removeprefix("agent-")
        if name.startswith("agent-") and node in {n.name for n in state.plan.nodes}:
            rec = self._start_agent(state, node)
            self._wait_agent_ready(state, node, rec)
            return
        pod_name, _, container = name.partition("/")
        pod = next((p for p in state.plan.pods if p.name == pod_name), None)
        if pod is not None and pod.containers:
            names = {workloads.process_name(pod, c): c.name for c in pod.containers}
            if name not in names:
                raise LabError(f"{name!r}: pod {pod.name} runs {', '.join(names)}")
            self._start_containers(state, pod, only=names[name])
            self.report(self._wait_started(state, pod))
            return
        if pod is None or pod.app != "echo" or container:
            raise LabError(f"{name!r} is not the control plane, an agent or a pod's process")
        self._start_echo(state, pod)
        self._wait_listening(state, pod, pod.ports[0])
        self.report(f"{name}: started")

    def agent_dir(self, node: str) -> Path:
        return self.paths.state_dir / "agents" / node

    def agent_cgroup(self, node: str) -> Path:
        assert self.paths.cgroup_root is not None
        return self.paths.cgroup_root / node / "weft-agent"

    def _start_agent(self, state: LabState, node: str, args: Sequence[str] = ()) -> ProcessRecord:
        """One agent per node, in the node's netns and its own cgroup (never a pod's)."""
        cgroup = self.agent_cgroup(node)
        cgroup.mkdir(exist_ok=True)
        netns = state.plan.netns(node)
        argv = [
            sys.executable, "-m", "weft.cli", "agent", "--lab", self.name, "--node", node,
            *self._trace_args(state), *state.agent_args, *args,
        ]  # fmt: skip
        rec = procs.spawn(
            name=f"agent-{node}",
            argv=argv,
            log_path=self.paths.log_dir / f"agent-{node}.log",
            where=node,
            preexec=lambda: enter_pod(netns, cgroup, None),
        )
        state.processes.append(rec)
        state.save()
        self.report(f"agent-{node}: started (pid {rec.pid}), compiling eBPF")
        return rec

    def _wait_agent_ready(
        self, state: LabState, node: str, rec: ProcessRecord | None = None
    ) -> None:
        """Wait until *this* agent process (by PID) says it is ready.

        During a make-before-break restart two agents share the admin port (SO_REUSEPORT),
        so an answer counts only if it comes from the process we started.
        """
        rec = rec or next(r for r in state.processes if r.name == f"agent-{node}")
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        last = "admin port closed"
        while True:
            answer = admin_get(state.plan.netns(node), "127.0.0.1", ADMIN_PORT, "/debug/state")
            if answer is not None and answer[0] == 200:
                data = json.loads(answer[1])
                if data.get("pid") == rec.pid:
                    if data.get("ready"):
                        self.report(f"agent-{node}: ready (pid {rec.pid})")
                        return
                    last = f"waiting for {', '.join(data.get('waiting_for', []))}"
            _still_starting(rec, deadline, f"not ready after {AGENT_READY_TIMEOUT:.0f}s ({last})")

    def set_labels(self, pod_name: str, changes: dict[str, str | None]) -> PodPlan:
        """Set (value) or remove (None) pod labels; running agents pick the change up."""
        require_root()
        state = self.load()
        try:
            pod = state.pod(pod_name)
        except KeyError as e:
            raise LabError(str(e.args[0])) from None
        new = dataclasses.replace(pod, labels=_changed(pod.labels, changes))
        state.plan = dataclasses.replace(
            state.plan, pods=tuple(new if p.name == pod.name else p for p in state.plan.pods)
        )
        state.save()
        return new

    def annotate_service(self, name: str, changes: dict[str, str | None]) -> ServicePlan:
        """Set (value) or remove (None) annotations of service ``name`` (``ns/name`` or a
        name in any namespace, if unique); the control plane picks the change up."""
        require_root()
        state = self.load()
        ns, _, short = name.rpartition("/")
        found = [s for s in state.plan.services
                 if s.name == short and (not ns or s.namespace == ns)]  # fmt: skip
        if len(found) != 1:
            names = ", ".join(f"{s.namespace}/{s.name}" for s in state.plan.services)
            what = "no" if not found else "more than one"
            raise LabError(f"{what} service {name!r} in lab {state.plan.name} (it has: {names})")
        svc = found[0]
        new = dataclasses.replace(svc, annotations=_changed(svc.annotations, changes))
        state.plan = dataclasses.replace(
            state.plan, services=tuple(new if s is svc else s for s in state.plan.services)
        )
        state.save()
        return new

    def apply_objects(self, docs: list[Any], *, delete: bool = False) -> list[str]:
        """``weft lab apply -f`` (``delete``: ``delete -f``): Namespaces, Services,
        Deployments, Gateway API routes and AuthorizationPolicies into the lab
        (`weft.lab.apply` computes the new plan). Pods a Deployment gains are made,
        captured by their node's agent, and only then their containers start (as a CNI
        plugin holds a pod until its redirection is in place); pods it loses are stopped
        and removed; a changed template restarts its pods' containers in place. Every
        pod's hosts file names the services. Returns a line per object (and per pod
        started)."""
        require_root()
        state = self.load()
        objects = [*state.routes, *state.policies]
        if delete:
            plan, objects, lines = lab_apply.delete(state.plan, objects, docs)
        else:
            plan, objects, lines = lab_apply.apply(state.plan, objects, docs)
        routes = [o for o in objects if o.get("kind") in lab_apply.ROUTE_KINDS]
        policies = [o for o in objects if o.get("kind") not in lab_apply.ROUTE_KINDS]
        old = {p.name: p for p in state.plan.pods}
        new = {p.name: p for p in plan.pods}
        gone = [p for name, p in old.items() if name not in new]
        added = [p for name, p in new.items() if name not in old]
        changed = [p for name, p in new.items()
                   if name in old and old[name].containers != p.containers]  # fmt: skip
        for pod in (*gone, *changed):
            self._stop_pod_processes(state, pod)
        state.plan, state.routes, state.policies = plan, routes, policies
        for pod in added:
            self._make_pod(state, pod)  # before the state says it exists
        state.save()
        self._write_hosts(plan)
        for pod in gone:
            self._remove_pod(state, pod)
        starting = [p for p in (*added, *changed) if p.containers]
        try:
            for pod in starting:
                self._wait_captured(state, pod)
                self._start_containers(state, pod)
            for pod in starting:
                lines.append(self._wait_started(state, pod))
        except LabError as e:
            raise LabError(f"{e}\n(the objects are applied; fix the file and apply it again, "
                           "or `weft lab delete -f` it)") from None  # fmt: skip
        return lines

    def _write_hosts(self, plan: LabPlan) -> None:
        for pod in plan.pods:
            hosts = self.paths.pod_dir(pod.name) / "hosts"
            if hosts.parent.exists():
                # In place: pods have it bind-mounted, and a mount follows the inode.
                with open(hosts, "r+") as f:
                    f.seek(0)
                    f.write(hosts_file(plan, pod))
                    f.truncate()

    def _stop_pod_processes(self, state: LabState, pod: PodPlan) -> None:
        recs = [r for r in state.processes if r.where == pod.name]
        for rec in recs:
            if procs.stop(rec, grace=POD_STOP_GRACE):
                self.report(f"{rec.name}: stopped")
        state.processes = [r for r in state.processes if r not in recs]
        state.save()

    def _agent_running(self, state: LabState, node: str) -> bool:
        return any(r.name == f"agent-{node}" and procs.is_alive(r) for r in state.processes)

    def _remove_pod(self, state: LabState, pod: PodPlan) -> None:
        """Remove a pod the plan no longer has, once its node's agent let go of it."""
        key = f"{pod.namespace}/{pod.name}"
        if self._agent_running(state, pod.node):
            deadline = time.monotonic() + POD_RELEASE_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    captured = agent_state(self.name, pod.node).get("capture") or {}
                except LabError:
                    break
                if key not in (captured.get("captured") or {}):
                    break
                time.sleep(0.1)
        cg = state.pod_cgroup(pod)
        if cg is not None and cg.exists():
            procs.kill_cgroup_tree(cg)
            left = procs.remove_cgroup_tree(cg)
            if left:
                self.report(f"{pod.name}: cgroup {cg} still busy; `weft lab down` removes it")
        net.remove_netns(state.plan.netns(pod.name))
        shutil.rmtree(self.paths.pod_dir(pod.name), ignore_errors=True)
        # Its logs go with it, as kubelet's do (pod names are DNS labels: no dots).
        for log in (*self.paths.log_dir.glob(f"{pod.name}.log"),
                    *self.paths.log_dir.glob(f"{pod.name}.*.log")):  # fmt: skip
            log.unlink(missing_ok=True)
        self.report(f"{pod.name}: removed")

    def _wait_captured(self, state: LabState, pod: PodPlan) -> None:
        """Until the pod's node agent captures it and holds its identity's certificate
        (no-op for an uncaptured pod or a node without a running agent)."""
        if lab_sidecar.is_sidecar(pod):
            self._start_sidecars(state, [pod])  # its sidecar captures it, not the agent
            return
        if not state.plan.captured(pod) or not self._agent_running(state, pod.node):
            return
        key = f"{pod.namespace}/{pod.name}"
        identity = f"/ns/{pod.namespace}/sa/{pod.service_account}"
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        last = "not captured yet"
        while True:
            data = agent_state(self.name, pod.node)
            capture = data.get("capture") or {}
            if key in (capture.get("captured") or {}):
                certs = data.get("certificates")
                if certs is None:
                    return  # capture-only agent: no identities to wait for
                mine = [v for k, v in (certs.get("identities") or {}).items()
                        if k.endswith(identity)]  # fmt: skip
                if any(v.get("valid") for v in mine):
                    return
                last = f"no certificate for {identity} yet" + (
                    f" ({mine[0].get('last_error')})" if mine and mine[0].get("last_error") else ""
                )
            elif key in (capture.get("errors") or {}):
                last = capture["errors"][key]
            if _interrupt_requested is not None:
                raise KeyboardInterrupt(_interrupt_requested)
            if time.monotonic() > deadline:
                raise LabError(f"the agent of {pod.node} did not take pod {pod.name} into the "
                               f"mesh within {AGENT_READY_TIMEOUT:.0f}s: {last}")  # fmt: skip
            time.sleep(0.1)

    def _start_containers(self, state: LabState, pod: PodPlan, only: str | None = None) -> None:
        """Each container's command as a process in the pod (``only``: that container)."""
        base = {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "HOSTNAME": pod.name,
            "WEFT_LAB": self.name,
            "WEFT_POD": pod.name,
            "WEFT_NODE": pod.node,
        }
        for c in pod.containers:
            if only is not None and c.name != only:
                continue
            name = workloads.process_name(pod, c)
            try:
                rec = procs.spawn(
                    name=name,
                    argv=list(c.argv),
                    log_path=self.paths.log_dir / f"{name.replace('/', '.')}.log",
                    where=pod.name,
                    preexec=self._pod_preexec(state, pod),
                    env={**base, **dict(c.env)},
                    cwd=c.working_dir,
                )
            except (OSError, RuntimeError) as e:
                raise LabError(f"{pod.name}: container {c.name}: cannot run "
                               f"{' '.join(c.argv)}: {e}") from None  # fmt: skip
            state.processes.append(rec)
            state.save()

    def _wait_started(self, state: LabState, pod: PodPlan) -> str:
        """Wait for each container's TCP ports to accept; the line that says so."""
        for c in pod.containers:
            name = workloads.process_name(pod, c)
            rec = next((r for r in state.processes if r.name == name), None)
            for port in c.ports if rec is not None else ():
                self._wait_listening(state, pod, port, rec)
        ports = ", ".join(str(p) for p in pod.ports)
        return (f"  pod {pod.name}: running on {pod.node} ({pod.ip}"
                f"{', captured' if state.plan.captured(pod) else ''})"
                + (f", listening on {ports}" if ports else ""))  # fmt: skip

    def restart_agent(self, node: str, args: Sequence[str] = ()) -> None:
        """Replace a node's agent, make-before-break.

        The new agent starts while the old one still serves (both listen with
        SO_REUSEPORT); once the new one is ready, the old one gets SIGTERM, stops
        accepting and drains — with ``tcp_migrate_req`` its not-yet-accepted connections
        move to the new listener instead of being reset.  Pods stay captured throughout
        (attachments and pins are shared).  ``args`` are extra ``weft agent`` flags for the
        new instance (e.g. --no-sockmap), after the lab's own ``agent_args``.
        """
        require_root()
        state = self.load()
        name = f"agent-{node}"
        old = [r for r in state.processes if r.name == name]
        if not old:
            raise LabError(f"no agent for {node!r} in lab {self.name!r}")
        state.processes = [r for r in state.processes if r.name != name]
        rec = self._start_agent(state, node, args)
        try:
            self._wait_agent_ready(state, node, rec)
        finally:
            for r in old:
                procs.stop(r, grace=10.0)

    def _pod_preexec(self, state: LabState, pod: PodPlan) -> Callable[[], None]:
        netns = state.plan.netns(pod.name)
        cgroup = state.pod_cgroup(pod)
        hosts = self.paths.pod_dir(pod.name) / "hosts"
        return lambda: enter_pod(netns, cgroup, hosts)

    def _start_echo(self, state: LabState, pod: PodPlan) -> None:
        # A sidecar-mode pod also declares its sidecar's tunnel port: not the app's.
        ports = [p for p in pod.ports if p != SIDECAR_TUNNEL_PORT]
        argv = [
            sys.executable, "-m", "weft.lab.echo",
            "--pod", pod.name, "--node", pod.node, "--namespace", pod.namespace,
            "--port", str(ports[0]),
            *(("--grpc-port", str(ports[1])) if len(ports) > 1 else ()),
        ]  # fmt: skip
        rec = procs.spawn(
            name=pod.name,
            argv=argv,
            log_path=self.paths.log_dir / f"{pod.name}.log",
            where=pod.name,
            preexec=self._pod_preexec(state, pod),
        )
        state.processes.append(rec)
        state.save()  # recorded before we wait on it, so a crash still knows the PID

    def _wait_listening(
        self, state: LabState, pod: PodPlan, port: int, rec: ProcessRecord | None = None
    ) -> None:
        """Connect from the pod's node until the pod accepts, or fail with its log."""
        deadline = time.monotonic() + READY_TIMEOUT
        rec = rec or next(r for r in state.processes if r.name == pod.name)
        while True:
            with in_netns(state.plan.netns(pod.node)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(1.0)
                sock.connect((pod.ip, port))
                return
            except OSError:
                pass
            finally:
                sock.close()
            _still_starting(
                rec, deadline, f"not listening on {pod.ip}:{port} after {READY_TIMEOUT:.0f}s"
            )

    # -- down -----------------------------------------------------------------------------

    def down(self) -> bool:
        """Remove everything of this lab; True if there was anything to remove."""
        require_root()
        found = False
        cgroup_root = self.paths.cgroup_root
        try:
            state: LabState | None = load_state(self.paths.state_file)
        except StateError:
            state = None
        if state is not None:
            found = True
            cgroup_root = state.paths.cgroup_root or cgroup_root
            stopped = [r.name for r in state.processes if procs.stop(r)]
            if stopped:
                self.report(f"stopped {len(stopped)} processes: {', '.join(stopped)}")
        if cgroup_root is not None and cgroup_root.exists():
            found = True
            killed = procs.kill_cgroup_tree(cgroup_root)
            if killed:
                self.report(f"killed {killed} processes left in {cgroup_root}")
        namespaces = net.list_netns(f"{self.name}-")
        for ns in namespaces:
            net.remove_netns(ns)
        if namespaces:
            found = True
            self.report(f"removed {len(namespaces)} network namespaces (and their links)")
        if cgroup_root is not None and cgroup_root.exists():
            left = procs.remove_cgroup_tree(cgroup_root)
            if left:
                raise LabError(
                    f"could not remove cgroups {', '.join(map(str, left))}: "
                    f"processes still in them ({procs.cgroup_pids(cgroup_root)})"
                )
            self.report(f"removed cgroup tree {cgroup_root}")
        if self.paths.bpffs_dir.exists():
            found = True
            shutil.rmtree(self.paths.bpffs_dir)
            self.report(f"removed pinned maps under {self.paths.bpffs_dir}")
        if self.paths.state_dir.exists():
            found = True
            shutil.rmtree(self.paths.state_dir)
            self.report(f"removed state {self.paths.state_dir}")
        return found

    # -- exec / logs ----------------------------------------------------------------------

    def exec(self, pod_name: str, argv: list[str]) -> NoReturn:
        """Replace this process with ``argv`` running inside the pod."""
        require_root()
        state = self.load()
        if pod_name in {n.name for n in state.plan.nodes}:
            # A node: its network namespace only (like a shell on the node's host network).
            env = dict(os.environ, WEFT_LAB=self.name, WEFT_NODE=pod_name)
            enter_pod(state.plan.netns(pod_name), None, None)
            _exec(argv, env)
        try:
            pod = state.pod(pod_name)
        except KeyError as e:
            raise LabError(str(e.args[0])) from None
        env = dict(os.environ, WEFT_LAB=self.name, WEFT_POD=pod.name, WEFT_NODE=pod.node)
        enter_pod(
            state.plan.netns(pod.name),
            state.pod_cgroup(pod),
            self.paths.pod_dir(pod.name) / "hosts",
        )
        _exec(argv, env)

    def log_path(self, name: str) -> Path:
        state = self.load()
        for rec in state.processes:
            if rec.name == name:
                return Path(rec.log)
        known = ", ".join(r.name for r in state.processes) or "none"
        raise LabError(f"no process {name!r} in lab {self.name!r} (processes: {known})")


def _still_starting(rec: ProcessRecord, deadline: float, timeout_msg: str) -> None:
    """One poll of a starting process: fail with its log if it died or took too long."""
    if _interrupt_requested is not None:
        raise KeyboardInterrupt(_interrupt_requested)
    if not procs.is_alive(rec):
        raise LabError(f"{rec.name} exited during start:\n{_tail(Path(rec.log))}")
    if time.monotonic() > deadline:
        raise LabError(f"{rec.name} {timeout_msg}:\n{_tail(Path(rec.log))}")
    time.sleep(0.05)


_interrupt_requested: str | None = None


def request_interrupt(reason: str) -> None:
    """Ask a running ``up`` to stop at the next step (called from signal handlers).

    A handler must not raise: an exception raised while the interpreter runs an at-fork
    hook (pyroute2 and subprocess fork) is printed and swallowed, and one raised inside
    logging's lock handling can leave the lock held.  ``up`` checks this flag before every
    step and in every wait loop, so it stops within a step (milliseconds).
    """
    global _interrupt_requested
    _interrupt_requested = reason


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Name the step in any low-level error ("[Errno 2] ..." alone helps nobody)."""
    if _interrupt_requested is not None:
        raise KeyboardInterrupt(_interrupt_requested)
    try:
        yield
    except LabError:
        raise
    except Exception as e:
        raise LabError(f"{what}: {e}") from e


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        print(f"weft lab exec: {argv[0]}: command not found", file=sys.stderr)
        os._exit(127)
    except PermissionError:
        print(f"weft lab exec: {argv[0]}: permission denied", file=sys.stderr)
        os._exit(126)


def _changed(values: dict[str, str], changes: dict[str, str | None]) -> dict[str, str]:
    """``values`` with ``changes`` applied: a value sets its key, None removes it."""
    out = dict(values)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def admin_get(netns: str, host: str, port: int, path: str) -> tuple[int, str] | None:
    """GET an agent's admin endpoint from inside its node's namespace (None: no answer)."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body.decode(errors="replace")
    except (IndexError, ValueError):
        return None


def agent_state(lab: str, node: str) -> dict[str, Any]:
    """``/debug/state`` of the agent of ``node`` in lab ``lab``; `LabError` if it does
    not answer 200."""
    answer = admin_get(netns_name(lab, node), "127.0.0.1", ADMIN_PORT, "/debug/state")
    if answer is None or answer[0] != 200:
        raise LabError(f"the agent of {node} did not answer /debug/state: {answer}")
    data: dict[str, Any] = json.loads(answer[1])
    return data


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
