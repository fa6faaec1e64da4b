"""The node's own IPv4 addresses, as the kernel's routing tables list them.

Strict pods accept new connections only from the node itself (`nodeagent.ebpf`'s
``weft_node_addr``): its proxy and kubelet's probes. On a real cluster those do not
always leave from the address Kubernetes calls the node's (``status.hostIP``): traffic
from the host to a pod is sourced from the address of the interface that routes to it —
the CNI's gateway (kindnet/ptp's per-pod routes use the node address, but the bridge
CNI's ``cni0``, flannel's ``cni0``, Cilium's ``cilium_host`` have their own), and a CNI
may create that interface only when the first pod arrives. So the agent reads every
local address (``/proc/net/fib_trie``: the ``/32 host LOCAL`` entries, as ``ip route
show table local`` prints them) and keeps the map in step (`NodeAddresses`), instead of
trusting one ``NODE_IP``. Loopback is left out (the program accepts 127/8 itself).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("weft.agent")

FIB_TRIE = Path("/proc/net/fib_trie")
MAX_ADDRS = 16
"""The ``weft_node_addr`` map's size (nodeagent/ebpf/capture.c)."""


def local_ipv4(fib_trie: str) -> set[str]:
    """The local (``/32 host LOCAL``) IPv4 addresses in ``/proc/net/fib_trie``'s text,
    loopback excepted. Each address line (``|-- 10.0.0.1``) is followed by its entries'
    lines (``/32 host LOCAL``)."""
    found: set[str] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:].strip()
        elif text.startswith("/32 host LOCAL") and last:
            try:
                addr = ipaddress.IPv4Address(last)
            except ValueError:
                continue
            if not addr.is_loopback:
                found.add(str(addr))
    return found


def read_local_ipv4(path: Path = FIB_TRIE) -> set[str]:
    try:
        return local_ipv4(path.read_text())
    except OSError as e:
        log.warning("cannot read the node's addresses from %s: %s", path, e)
        return set()


class NodeAddresses:
    """The node's addresses strict pods accept: the configured ones (``NODE_IP``, the
    proxy's, ``WEFT_NODE_ADDRS``) and those the kernel lists now. `refresh` says what
    changed; the agent writes it into the map."""

    def __init__(
        self, configured: Iterable[str], read: Callable[[], set[str]] = read_local_ipv4
    ) -> None:
        self.configured = tuple(dict.fromkeys(configured))
        self._read = read
        self.current: set[str] = set(self.configured)

    def wanted(self) -> set[str]:
        detected = self._read()
        wanted = set(self.configured)
        for a in sorted(detected - wanted):
            if len(wanted) >= MAX_ADDRS:
                log.warning("the node has more than %d addresses: %s and later ones are not "
                            "accepted by strict pods", MAX_ADDRS, a)  # fmt: skip
                break
            wanted.add(a)
        return wanted

    def __contains__(self, ip: object) -> bool:
        return ip in self.current
