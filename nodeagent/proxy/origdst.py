"""The original destination of a connection redirected by netfilter (sidecar mode).

In node mode the eBPF ``sockops`` program records where a captured pod meant to connect
and the node proxy looks it up in a map. In sidecar mode an nftables ``redirect`` in the
pod's own network namespace sends the app's connects to the sidecar's outbound listener,
and conntrack remembers the address it rewrote: ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``
on the accepted socket returns it as a ``struct sockaddr_in``. Both are the same seam of
`nodeagent.proxy.outbound.OutboundProxy` (``original_destination``), so the stages after
the accept do not know which capture brought the connection.

The parse is separate from the syscall (bytes in, address out) so it is tested without
netfilter; a socket conntrack did not rewrite (a connection made straight to the
listener) fails with ``ENOENT`` and has no original destination: the proxy refuses it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv4.h``; Python's socket module does not export it."""
SOCKADDR_IN_SIZE = 16

_SOCKADDR_IN = struct.Struct("!HH4s8x")
"""sa_family (host order on Linux, read separately), port, address, zero padding."""


class OriginalDestinationError(ValueError):
    """The kernel's answer is not an IPv4 socket address."""


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """``struct sockaddr_in`` (as ``getsockopt`` returns it) -> ``(ip, port)``."""
    if len(raw) < SOCKADDR_IN_SIZE:
        raise OriginalDestinationError(f"sockaddr_in is 16 bytes, got {len(raw)}")
    family = int.from_bytes(raw[:2], "little")
    if family != socket.AF_INET:
        raise OriginalDestinationError(f"address family {family}, expected AF_INET")
    _, port, addr = _SOCKADDR_IN.unpack(raw[:SOCKADDR_IN_SIZE])
    return str(ipaddress.IPv4Address(addr)), port


def so_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The address the app connected to before netfilter redirected it, or None if the
    connection was not redirected (conntrack has no NAT for it)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTCONN, errno.ENOPROTOOPT):
            return None
        raise
    try:
        return parse_sockaddr_in(raw)
    except OriginalDestinationError:
        return None
