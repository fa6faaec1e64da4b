"""SO_ORIGINAL_DST, the sidecar's original-destination seam (`nodeagent.proxy.origdst`)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess

import pytest

from nodeagent.proxy.origdst import OriginalDestinationError, parse_sockaddr_in, so_original_dst
from weft.nsenter import in_netns


def _sockaddr_in(ip: str, port: int) -> bytes:
    return (
        struct.pack("<H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_aton(ip)
        + bytes(8)
    )


def test_parse_sockaddr_in() -> None:
    assert parse_sockaddr_in(_sockaddr_in("10.96.0.10", 80)) == ("10.96.0.10", 80)
    assert parse_sockaddr_in(_sockaddr_in("10.244.2.2", 65535)) == ("10.244.2.2", 65535)


@pytest.mark.parametrize(
    "raw", [b"", bytes(15), struct.pack("<H", socket.AF_INET6) + bytes(14)], ids=str
)
def test_parse_refuses_what_is_not_an_ipv4_sockaddr(raw: bytes) -> None:
    with pytest.raises(OriginalDestinationError):
        parse_sockaddr_in(raw)


def test_a_connection_netfilter_did_not_redirect_has_no_other_destination() -> None:
    """Straight to the listener: no conntrack entry (None), or one without NAT whose
    original destination is the listener itself, which the proxy refuses as a loop."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert so_original_dst(accepted) in (None, listener.getsockname())
    finally:
        for s in (accepted, client, listener):
            s.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_the_address_an_nftables_redirect_rewrote_is_recovered() -> None:
    """A scratch network namespace (loopback and a veth pair only) with the sidecar's
    kind of redirect: the app connects to 10.99.0.7:4444, the listener gets it."""
    ns = f"weftod{os.getpid() % 100000}"
    opened: list[socket.socket] = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                    ["ip", "addr", "add", "10.99.0.1/24", "dev", "v0"],
                    ["ip", "link", "set", "v0", "up"],
                    ["ip", "link", "set", "v1", "up"]):  # fmt: skip
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        with in_netns(ns):
            listener = socket.create_server(("127.0.0.1", 0))
        opened.append(listener)
        port = listener.getsockname()[1]
        rules = "\n".join([
            "table ip t {", "  chain o {", "    type nat hook output priority -100;",
            f"    tcp dport 4444 redirect to :{port}", "  }", "}", "",
        ])  # fmt: skip
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules.encode(),
                       check=True)  # fmt: skip
        with in_netns(ns):
            opened.append(socket.create_connection(("10.99.0.7", 4444), timeout=5))
        accepted, _ = listener.accept()
        opened.append(accepted)
        assert so_original_dst(accepted) == ("10.99.0.7", 4444)
    finally:
        for sock in opened:
            sock.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
