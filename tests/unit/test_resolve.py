"""Outbound routing (nodeagent.proxy.resolve) over a MeshState built from a snapshot.

A service VIP becomes its ready endpoints at their target ports (numeric, or named and
resolved per endpoint); any other address is a single direct hop, with its workload when
discovery knows the address.
"""

from __future__ import annotations

import pytest

from nodeagent.meshstate import MeshState
from nodeagent.proxy.resolve import Hop, NoRoute, Resolved, resolve, workload_name
from weft.identity import SpiffeId
from weft.mesh import Endpoint, InboundMode, Service, ServicePort, Workload
from weft.meshwire import SnapshotMsg


def workload(name: str, ip: str) -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace="shop",
        node="node-1",
        ips=(ip,),
        service_account="web",
        identity=SpiffeId.workload("shop", "web"),
        captured=True,
        inbound_mode=InboundMode.STRICT,
    )


WEB1 = workload("web-1", "10.244.1.2")
WEB2 = workload("web-2", "10.244.1.3")
WEB3 = workload("web-3", "10.244.1.4")
STRAY = workload("stray", "10.244.1.6")

WEB = Service(
    name="web",
    namespace="shop",
    vips=("10.96.0.10", "fd00:96::10"),
    ports=(
        ServicePort(80, 8080, name="http"),
        ServicePort(443, "https", name="tls"),
        ServicePort(9000, "admin", name="admin"),
    ),
    endpoints=(
        Endpoint("10.244.1.2", WEB1.uid, True, (("tls", 8443),)),
        Endpoint("10.244.1.3", WEB2.uid, True, (("tls", 9443),)),
        Endpoint("10.244.1.4", WEB3.uid, False, (("tls", 8443), ("admin", 9001))),
        Endpoint("10.244.1.5", None, True),  # not a pod: only numeric target ports
        Endpoint("10.244.1.6", "uid-unknown", True),  # uid not in discovery, address is
    ),
)
DOWN = Service(
    name="down",
    namespace="shop",
    vips=("10.96.0.20",),
    ports=(ServicePort(80, 8080),),
    endpoints=(Endpoint("10.244.1.2", WEB1.uid, False),),
)
EMPTY = Service("empty", "shop", ("10.96.0.30",), (ServicePort(80, 80),), ())


@pytest.fixture
def state() -> MeshState:
    s = MeshState()
    s.apply(SnapshotMsg("e1", 1, (WEB1, WEB2, WEB3, STRAY), (WEB, DOWN, EMPTY)))
    return s


@pytest.mark.parametrize("vip", WEB.vips)
def test_a_vip_resolves_to_its_ready_endpoints_at_the_numeric_target_port(
    state: MeshState, vip: str
) -> None:
    assert resolve(state, (vip, 80)) == Resolved(
        WEB,
        (
            Hop(("10.244.1.2", 8080), WEB1),
            Hop(("10.244.1.3", 8080), WEB2),
            # 10.244.1.4 is not ready.
            Hop(("10.244.1.5", 8080), None),
            Hop(("10.244.1.6", 8080), STRAY),  # found by address when the uid is unknown
        ),
    )


def test_a_named_target_port_resolves_per_endpoint(state: MeshState) -> None:
    # Endpoints without the name do not serve the port.
    assert resolve(state, ("10.96.0.10", 443)) == Resolved(
        WEB, (Hop(("10.244.1.2", 8443), WEB1), Hop(("10.244.1.3", 9443), WEB2))
    )


def test_a_named_port_only_a_not_ready_endpoint_serves_has_no_route(state: MeshState) -> None:
    with pytest.raises(NoRoute, match=r"service shop/web has no ready endpoint for port 9000"):
        resolve(state, ("10.96.0.10", 9000))


@pytest.mark.parametrize(
    ("vip", "error"),
    [
        ("10.96.0.20", r"service shop/down has no ready endpoint for port 80 \(1 endpoint"),
        ("10.96.0.30", r"service shop/empty has no ready endpoint for port 80 \(0 endpoint"),
    ],
)
def test_a_service_without_ready_endpoints_has_no_route(
    state: MeshState, vip: str, error: str
) -> None:
    with pytest.raises(NoRoute, match=error) as info:
        resolve(state, (vip, 80))
    assert isinstance(info.value, ConnectionRefusedError)  # the proxy resets the client


def test_readiness_follows_discovery(state: MeshState) -> None:
    ready = Service("down", "shop", ("10.96.0.20",), (ServicePort(80, 8080),),
                    (Endpoint("10.244.1.2", WEB1.uid, True),))  # fmt: skip
    state.apply(SnapshotMsg("e1", 2, (WEB1,), (ready,)))
    assert resolve(state, ("10.96.0.20", 80)).hops == (Hop(("10.244.1.2", 8080), WEB1),)


def test_a_pod_address_is_a_single_direct_hop(state: MeshState) -> None:
    assert resolve(state, ("10.244.1.3", 8080)) == Resolved(
        None, (Hop(("10.244.1.3", 8080), WEB2),)
    )
    # Even a not-ready pod: readiness is about services, not dialled addresses.
    assert resolve(state, ("10.244.1.4", 1234)) == Resolved(
        None, (Hop(("10.244.1.4", 1234), WEB3),)
    )


@pytest.mark.parametrize("address", [("192.0.2.1", 443), ("10.244.1.5", 8080)])
def test_an_unknown_address_is_a_hop_without_workload(
    state: MeshState, address: tuple[str, int]
) -> None:
    assert resolve(state, address) == Resolved(None, (Hop(address, None),))


def test_an_empty_state_routes_everything_directly() -> None:
    assert resolve(MeshState(), ("10.96.0.10", 80)) == Resolved(
        None, (Hop(("10.96.0.10", 80), None),)
    )


def test_workload_name_for_labels() -> None:
    assert workload_name(WEB1) == ("web-1", "shop")
    assert workload_name(None) == ("unknown", "unknown")
