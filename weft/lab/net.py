"""The lab's network plumbing: namespaces, bridges, veths, addresses and routes (pyroute2).

This is the only lab module that talks netlink.  Nothing is created in the host's own
network namespace: the fabric bridge lives in ``<lab>-fabric``, so deleting the lab's
namespaces deletes every link with them and ``ip link`` on the host never sees the lab.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import subprocess
from pathlib import Path

from pyroute2 import NetNS, netns

from weft.lab.plan import CONTROLPLANE_IP, NODE_CIDR, LabPlan, NodePlan, PodPlan
from weft.nsenter import NETNS_RUN_DIR, in_netns

FABRIC = "fabric"
CONTROLPLANE = "cp"
FABRIC_BRIDGE = "br0"
NODE_BRIDGE = "cni0"


class NetError(RuntimeError):
    pass


def list_netns(prefix: str) -> list[str]:
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def create_netns(name: str) -> None:
    if (NETNS_RUN_DIR / name).exists():
        raise NetError(f"network namespace {name!r} already exists")
    netns.create(name)
    with NetNS(name, flags=0) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def remove_netns(name: str) -> None:
    """Delete a named namespace; its links go with it once no process holds it."""
    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    # pyroute2 leaves the file if the unmount raced; make sure the name is gone.
    path = NETNS_RUN_DIR / name
    if path.exists():
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _sysctl(netns_name: str, key: str, value: str) -> None:
    # /proc/sys/net/* resolves against the opener's network namespace.
    with in_netns(netns_name):
        Path("/proc/sys", *key.split(".")).write_text(value)


def build_fabric(plan: LabPlan) -> None:
    name = plan.netns(FABRIC)
    create_netns(name)
    with NetNS(name, flags=0) as ns:
        ns.link("add", ifname=FABRIC_BRIDGE, kind="bridge")
        ns.link("set", index=ns.link_lookup(ifname=FABRIC_BRIDGE)[0], state="up")


def _fabric_host(plan: LabPlan, name: str, port_name: str, ip: str) -> None:
    """A namespace with ``eth0`` plugged into the fabric bridge, addressed ``ip``."""
    create_netns(name)
    with NetNS(plan.netns(FABRIC), flags=0) as fab:
        fab.link("add", ifname=port_name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
        port = fab.link_lookup(ifname=port_name)[0]
        fab.link("set", index=port, master=fab.link_lookup(ifname=FABRIC_BRIDGE)[0])
        fab.link("set", index=port, state="up")
    with NetNS(name, flags=0) as ns:
        eth0 = ns.link_lookup(ifname="eth0")[0]
        ns.addr("add", index=eth0, address=ip, prefixlen=NODE_CIDR.prefixlen)
        ns.link("set", index=eth0, state="up")


def build_controlplane_host(plan: LabPlan) -> None:
    """The control plane's own host on the fabric (like a control-plane node), with
    routes back to every node's pods: sidecar-mode pods talk to it from their own
    addresses, as pods reach a control plane Service on a cluster."""
    name = plan.netns(CONTROLPLANE)
    _fabric_host(plan, name, "cp", CONTROLPLANE_IP)
    with NetNS(name, flags=0) as ns:
        for node in plan.nodes:
            ns.route("add", dst=node.pod_cidr, gateway=node.ip)


def build_node(plan: LabPlan, node: NodePlan) -> None:
    """A node: ``eth0`` on the fabric, ``cni0`` bridge for its pods, routes to peers' pods."""
    name = plan.netns(node.name)
    _fabric_host(plan, name, f"n{node.index}", node.ip)
    pod_net = ipaddress.IPv4Network(node.pod_cidr)
    with NetNS(name, flags=0) as ns:
        ns.link("add", ifname=NODE_BRIDGE, kind="bridge")
        br = ns.link_lookup(ifname=NODE_BRIDGE)[0]
        ns.addr("add", index=br, address=node.gateway, prefixlen=pod_net.prefixlen)
        ns.link("set", index=br, state="up")
        for peer in plan.nodes:
            if peer.name != node.name:
                ns.route("add", dst=peer.pod_cidr, gateway=peer.ip)
    _sysctl(name, "net.ipv4.ip_forward", "1")
    # A restarting agent hands over its listener (SO_REUSEPORT): move connections still in
    # the old listener's accept queue to the new one rather than resetting them (5.14+).
    try:
        _sysctl(name, "net.ipv4.tcp_migrate_req", "1")
    except FileNotFoundError:
        pass


def build_pod(plan: LabPlan, pod: PodPlan) -> None:
    """A pod: ``eth0`` with its /24 address, a veth ``vp<host>`` on the node's ``cni0``
    (``<host>``: the last octet of the pod's address, so unique on the node whenever the
    pod is made — at ``up`` or by ``apply -f``)."""
    name = plan.netns(pod.name)
    node = plan.node(pod.node)
    node_ns = plan.netns(node.name)
    create_netns(name)
    host_side = f"vp{pod.ip.rsplit('.', 1)[1]}"
    with NetNS(node_ns, flags=0) as ns:
        ns.link("add", ifname=host_side, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
        idx = ns.link_lookup(ifname=host_side)[0]
        ns.link("set", index=idx, master=ns.link_lookup(ifname=NODE_BRIDGE)[0])
        ns.link("set", index=idx, state="up")
    prefixlen = ipaddress.IPv4Network(node.pod_cidr).prefixlen
    with NetNS(name, flags=0) as ns:
        eth0 = ns.link_lookup(ifname="eth0")[0]
        ns.addr("add", index=eth0, address=pod.ip, prefixlen=prefixlen)
        ns.link("set", index=eth0, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=node.gateway)
