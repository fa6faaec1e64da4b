"""The lab registry source: the lab's state file, polled, turned into the model.

``weft lab`` writes one JSON state file atomically (write a sibling, rename) and rewrites
it when labels change.  Polling its identity — inode, mtime, size — every ``interval`` is
the whole watch: a rename always brings a new inode, so no change is missed between two
polls, and a poll costs one ``stat``.  inotify would save the polling but not the re-read,
and its watches die with the directory; a lab is a handful of pods.

Each change re-reads the whole file and hands the full view to
:meth:`DiscoveryStore.replace`, which turns it into deltas — the lab has no event stream
to preserve, and diffing full views is what makes a missed poll harmless.

Differences from Kubernetes, on purpose: the lab has no readiness (every pod is ready
and every selected pod an endpoint), no named target ports, and the demo's pods carry
what would be annotations (inbound mode, opaque ports, default inbound policy) as
*labels* (pods of applied Deployments have real annotations, which win).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from controlplane.discovery.model import (
    DiscoveryStore,
    Endpoint,
    InboundMode,
    Service,
    ServicePort,
    Workload,
    WorkloadPort,
    opaque_ports,
)
from weft.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from weft.lab.plan import endpoints as selected_pods
from weft.lab.state import LabState, StateError, load_state
from weft.mesh import enforced_inbound_mode, open_to_plaintext
from weft.policy import (
    DefaultPolicy,
    Policy,
    PolicyError,
    applicable,
    parse_policy,
    workload_default,
)
from weft.routes import Route, RouteError, backend_services, parse_route
from weft.traffic import LastValid

log = logging.getLogger("weft.discovery.lab")

DEFAULT_INTERVAL = 0.25
"""Seconds between polls: a label change reaches the store within this."""


def lab_uid(lab: str, namespace: str, pod: str) -> str:
    """A lab pod's stable UID: readable in logs, unique across labs sharing a machine."""
    return f"lab/{lab}/{namespace}/{pod}"


def lab_model(
    state: LabState,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    traffic: LastValid | None = None,
    rejected: dict[str, str] | None = None,
    mesh_default: DefaultPolicy | None = None,
) -> tuple[list[Workload], list[Service]]:
    """Workloads and services of a lab, as discovery models them. ``traffic`` keeps each
    service's last valid retry/timeout policy across calls (a source's); ``rejected``
    holds what was said about rejected routes and policies; ``mesh_default`` is the
    control plane's ``--default-inbound-policy`` (None: not set)."""
    plan = state.plan
    traffic = traffic if traffic is not None else LastValid()
    rejected = rejected if rejected is not None else {}
    routes = lab_routes(state, rejected)
    policies = lab_policies(state, rejected)
    workloads: list[Workload] = []
    uids: dict[str, str] = {}
    node_ips = {n.name: n.ip for n in plan.nodes}
    # The routes whose backends each pod is behind: a policy targeting one applies to it.
    routes_of: dict[str, set[str]] = {}
    if any(p.target_routes for p in policies):
        for route in routes:
            wanted = backend_services(route)
            for svc in plan.services:
                if f"{svc.namespace}/{svc.name}" in wanted:
                    for pod in selected_pods(plan.pods, svc):
                        routes_of.setdefault(pod.name, set()).add(route.key)
    for pod in plan.pods:
        try:
            identity = SpiffeId.workload(pod.namespace, pod.service_account, trust_domain)
        except IdentityError as e:
            # One bad pod must not hide the others; the lab validates names, so this is
            # a hand-edited state file.
            log.warning("lab pod %s/%s skipped: %s", pod.namespace, pod.name, e)
            continue
        uid = lab_uid(plan.name, pod.namespace, pod.name)
        uids[pod.name] = uid
        meta = {**pod.labels, **pod.annotations}
        default, explicit = workload_default(
            meta, plan.namespace_annotations.get(pod.namespace, {}), mesh_default
        )
        mine = applicable(pod.namespace, pod.labels, policies, routes_of.get(pod.name, ()))
        mode = enforced_inbound_mode(pod.inbound_mode, default, explicit, mine)
        # Only a strict pod has a filter to open (the field is absent otherwise).
        opened = mode is InboundMode.STRICT and open_to_plaintext(pod.inbound_mode, default,
                                                                    explicit)  # fmt: skip
        workloads.append(
            Workload(
                uid=uid,
                name=pod.name,
                namespace=pod.namespace,
                node=pod.node,
                ips=(pod.ip,),
                service_account=pod.service_account,
                identity=identity,
                captured=plan.captured(pod),
                inbound_mode=mode,
                ports=tuple(WorkloadPort(port) for port in pod.ports),
                ready=True,
                node_ip=node_ips.get(pod.node, ""),
                # Demo pods have no annotations: their labels stand in (as for inbound
                # mode); a Deployment's pods carry real ones, which win.
                opaque_ports=opaque_ports(meta),
                default_policy=default,
                policies=mine,
                open_to_plaintext=opened,
            )
        )
    services = [
        Service(
            name=svc.name,
            namespace=svc.namespace,
            vips=(svc.vip,),
            ports=tuple(
                ServicePort(
                    port=p.port, target_port=p.target_port, protocol=p.protocol, name=p.name
                )
                for p in svc.ports
            ),
            endpoints=tuple(
                sorted(
                    (
                        Endpoint(address=pod.ip, workload_uid=uids[pod.name], ready=True)
                        for pod in selected_pods(plan.pods, svc)
                        if pod.name in uids
                    ),
                    key=lambda e: e.address,
                )
            ),
            opaque_ports=opaque_ports(svc.annotations),
            traffic=traffic.policy(f"{svc.namespace}/{svc.name}", svc.annotations),
            routes=attached(f"{svc.namespace}/{svc.name}", routes),
        )
        for svc in plan.services
    ]
    return workloads, services


def lab_routes(state: LabState, rejected: dict[str, str]) -> list[Route]:
    """The lab's accepted routes (``weft lab apply -f``); the others are logged with
    their reason, as a Kubernetes controller would write it into their status — once
    per change: ``rejected`` (the caller's, kept across calls) holds what was said."""
    out = []
    for obj in state.routes:
        key = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('namespace', 'default')}/" \
              f"{(obj.get('metadata') or {}).get('name')}"  # fmt: skip
        try:
            out.append(parse_route(obj))
            rejected.pop(key, None)
        except RouteError as e:
            if rejected.get(key) != str(e):
                log.warning("%s not accepted (%s): %s", key, e.reason, e)
                rejected[key] = str(e)
    return out


def lab_policies(state: LabState, rejected: dict[str, str]) -> list[Policy]:
    """The lab's valid AuthorizationPolicies (``weft lab apply -f`` checks them, so a bad
    one here is a hand-edited state file: logged once and left out)."""
    out = []
    for obj in state.policies:
        meta = obj.get("metadata") or {}
        key = f"AuthorizationPolicy {meta.get('namespace', 'default')}/{meta.get('name')}"
        try:
            parsed = parse_policy(obj)
        except PolicyError as e:
            if rejected.get(key) != str(e):
                log.warning("%s not accepted: %s", key, e)
                rejected[key] = str(e)
            continue
        rejected.pop(key, None)
        out.append(parsed)
    return out


def attached(service: str, routes: list[Route]) -> tuple[Route, ...]:
    """The routes with ``service`` among their parents, by key (a stable order)."""
    return tuple(sorted((r for r in routes if any(p == service for p, _ in r.parents)),
                        key=lambda r: (r.kind, r.key)))  # fmt: skip


class LabSource:
    """Keeps a :class:`DiscoveryStore` equal to a lab state file."""

    def __init__(
        self,
        state_file: Path,
        store: DiscoveryStore,
        *,
        interval: float = DEFAULT_INTERVAL,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        mesh_default: DefaultPolicy | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"poll interval must be > 0, got {interval}")
        self.state_file = state_file
        self.store = store
        self.interval = interval
        self.trust_domain = trust_domain
        self.mesh_default = mesh_default
        self.traffic = LastValid()
        self.rejected_routes: dict[str, str] = {}
        self._seen: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.state_file)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def poll(self) -> bool:
        """Re-read the state file if it changed since the last poll; True if it was read.

        An unreadable file keeps the last good state (agents keep working) and is not
        retried until it changes again, so a corrupt file logs once, not every poll.
        """
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            # Off the loop: a bench-sized lab state is megabytes of JSON.
            state = await asyncio.to_thread(load_state, self.state_file)
        except StateError as e:
            log.warning("lab state unreadable, keeping the last state: %s", e)
            return False
        workloads, services = lab_model(
            state, self.trust_domain, self.traffic, self.rejected_routes, self.mesh_default
        )
        deltas = self.store.replace(workloads, services)
        if deltas:
            log.info(
                "lab %s: %d change(s), revision %d",
                state.plan.name,
                len(deltas),
                self.store.revision,
            )
        self.store.mark_synced()
        return True

    async def run(self) -> None:
        """Poll forever.  Waits (and says so once) while the state file does not exist."""
        waiting_logged = False
        while True:
            if self._stamp() is None and not waiting_logged:
                log.info("waiting for lab state at %s (is the lab up?)", self.state_file)
                waiting_logged = True
            await self.poll()
            await asyncio.sleep(self.interval)
