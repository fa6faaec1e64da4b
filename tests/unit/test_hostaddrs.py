"""The node's own addresses from /proc/net/fib_trie: every local /32 but loopback, kept
in step as interfaces come and go (a CNI's gateway appears with the first pod)."""

from __future__ import annotations

from pathlib import Path

from nodeagent.hostaddrs import MAX_ADDRS, NodeAddresses, local_ipv4, read_local_ipv4

# The shape of a kubeadm node with the bridge CNI (eth0 node address, cni0 gateway) and
# Cilium's host address: both tables list each local address once or twice.
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.240.0.0/24 2 0 2
        |-- 10.240.0.0
           /24 link UNICAST
        |-- 10.240.0.11
           /32 host LOCAL
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.1
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.240.0.11
        /32 host LOCAL
     |-- 10.0.0.7
        /32 host LOCAL
     |-- 10.240.0.255
        /32 link BROADCAST
"""


def test_local_addresses_are_the_host_local_entries_without_loopback() -> None:
    assert local_ipv4(FIB_TRIE) == {"10.240.0.11", "10.244.1.1", "10.0.0.7"}
    assert local_ipv4("") == set()
    assert local_ipv4("|-- not-an-address\n  /32 host LOCAL\n") == set()


def test_this_machines_own_table_parses() -> None:
    # Real input: whatever this kernel lists (loopback always exists, and is left out).
    assert all(not a.startswith("127.") for a in read_local_ipv4())
    assert read_local_ipv4(Path("/nonexistent/fib_trie")) == set()


def test_configured_addresses_stay_and_detected_ones_follow_the_kernel() -> None:
    seen = [{"10.240.0.11"}]
    addrs = NodeAddresses(("10.240.0.11", "192.0.2.9"), read=lambda: seen[0])
    assert addrs.wanted() == {"10.240.0.11", "192.0.2.9"}
    seen[0] = {"10.240.0.11", "10.244.1.1"}  # the CNI made cni0 with the first pod
    assert addrs.wanted() == {"10.240.0.11", "192.0.2.9", "10.244.1.1"}
    seen[0] = set()  # detection failed: the configured ones are kept
    assert addrs.wanted() == {"10.240.0.11", "192.0.2.9"}
    seen[0] = {f"10.9.0.{i}" for i in range(40)}
    assert len(addrs.wanted()) == MAX_ADDRS  # the map's size bounds it
