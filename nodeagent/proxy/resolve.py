"""The resolve stage: where an outbound connection goes.

The *logical* destination (what the app dialled: a service VIP and port, or an
address) becomes its *concrete* candidates: a service's ready endpoints with the target
port resolved (named ports included), or the address itself; each candidate (`Hop`)
carries the pod behind it, which says whether it needs the tunnel.  Pure functions of
the agent's :class:`~nodeagent.meshstate.MeshState`; the stages after it do the I/O.
HTTP routes (the request-aware proxy) slot in here: a route picks the service, this
picks its endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.meshstate import MeshState
from nodeagent.proxy.listener import Address
from weft.mesh import Service, ServicePort, Workload


class NoRoute(ConnectionRefusedError):
    """The connection must not or cannot be made; the message says why.  The outbound
    proxy resets the application's connection."""


class PlaintextRefused(NoRoute):
    """A strict source may not reach a destination outside the mesh in plaintext."""


@dataclass(frozen=True, slots=True)
class Hop:
    address: Address
    """Where to connect: endpoint address and the resolved target port."""
    workload: Workload | None
    """The pod behind it, None when discovery does not know it (outside the mesh)."""


@dataclass(frozen=True, slots=True)
class Resolved:
    service: Service | None
    """The service whose VIP was dialled, or None for a direct address."""
    hops: tuple[Hop, ...]


def resolve(state: MeshState, destination: Address) -> Resolved:
    """The candidate hops for ``destination`` (raises :class:`NoRoute` for a service
    with no ready endpoint serving that port)."""
    target = state.vip(*destination)
    if target is None:
        if state.is_vip(destination[0]):
            raise NoRoute(
                f"{destination[0]} is a service address, but no service serves port "
                f"{destination[1]} on it"
            )
        return Resolved(None, (Hop(destination, state.workload_at(destination[0])),))
    return Resolved(target.service, _hops(state, target.service, target.port))


def resolve_backend(state: MeshState, service: str, port: int) -> Resolved:
    """The candidate hops of a route's backend: ``service`` (``ns/name``) on its service
    port ``port``."""
    svc = state.services.get(service)
    if svc is None:
        raise NoRoute(f"route backend {service} is not a known service")
    for p in svc.ports:
        if p.port == port:
            return Resolved(svc, _hops(state, svc, p))
    raise NoRoute(f"route backend {service} has no port {port}")


def _hops(state: MeshState, svc: Service, port: ServicePort) -> tuple[Hop, ...]:
    hops = []
    for ep in svc.endpoints:
        if not ep.ready:
            continue
        number = svc.target_port(ep, port)
        if number is None:
            continue
        workload = state.workloads.get(ep.workload_uid) if ep.workload_uid else None
        hops.append(Hop((ep.address, number), workload or state.workload_at(ep.address)))
    if not hops:
        raise NoRoute(
            f"service {svc.key} has no ready endpoint for port {port.port} "
            f"({len(svc.endpoints)} endpoint(s) known)"
        )
    return tuple(hops)


def workload_name(w: Workload | None) -> tuple[str, str]:
    """(name, namespace) for metric labels and logs."""
    return (w.name, w.namespace) if w is not None else ("unknown", "unknown")
