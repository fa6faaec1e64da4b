"""The protocol switch stage: decide how an accepted connection is served.

For each accepted connection it *peeks* at the first bytes the client sends
(`nodeagent.proxy.http.detect`; ``MSG_PEEK``, so nothing is consumed and a connection
served as opaque TCP loses no byte) and hands it to the server for what it found:

* ``opaque_port`` — the destination port is known to be server-first or binary
  (`DEFAULT_OPAQUE_PORTS`, plus ``weft.io/opaque-ports``): opaque at once, no waiting;
* ``http1`` — an HTTP/1.x request line: the HTTP server (per-request balancing);
* ``h2`` — the HTTP/2 preface: the HTTP/2 server when one is configured, else opaque;
* ``tls`` — the app's own TLS (a ClientHello): opaque;
* ``timeout`` — nothing (or not enough to tell) within ``detect_timeout``: opaque, so a
  server-first protocol on an unlisted port waits at most that long for its greeting;
* ``opaque`` — anything else; ``closed`` — the client closed before sending a byte.

Each result is counted (`decisions`; ``weft_protocol_detect_total{result}``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from nodeagent.proxy.http.detect import DEFAULT_OPAQUE_PORTS, MAX_REQUEST_LINE, Detected, detect
from nodeagent.proxy.listener import Address, reset_socket
from nodeagent.proxy.stage import Accepted, ConnectionServer

OPAQUE = "opaque"
HTTP1 = "http1"
H2 = "h2"

DEFAULT_DETECT_TIMEOUT = 1.0
_POLL = 0.005  # seconds between peeks while a partial request line sits in the kernel

OpaquePorts = Callable[[Address], bool]
"""Whether the destination is configured opaque (the annotation), besides the defaults."""


async def peek(conn: socket.socket, within: float) -> tuple[bytes, bool]:
    """Wait for the client's first bytes and classify them without consuming any:
    returns (bytes peeked, timed out). b"" and False: the client closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    fd = conn.fileno()
    seen = -1
    data = b""
    while True:
        ready = loop.create_future()

        def wake(ready: asyncio.Future[None] = ready) -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            async with asyncio.timeout_at(deadline):
                await ready
        except TimeoutError:
            return data, True
        finally:
            loop.remove_reader(fd)
        try:
            data = conn.recv(MAX_REQUEST_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return b"", False
        if not data:
            return b"", False
        if detect(data) is not Detected.NEED_MORE:
            return data, False
        if len(data) == seen:
            # Readable but nothing new (a partial line waits in the kernel): poll.
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.sleep(_POLL)
            except TimeoutError:
                return data, True
        seen = len(data)


class ProtocolSwitch:
    def __init__(
        self,
        *,
        opaque: ConnectionServer,
        http1: ConnectionServer | None = None,
        h2: ConnectionServer | None = None,
        detect_timeout: float = DEFAULT_DETECT_TIMEOUT,
        opaque_ports: OpaquePorts | None = None,
    ) -> None:
        if detect_timeout <= 0:
            raise ValueError(f"detect_timeout must be positive, got {detect_timeout}")
        self._servers: dict[str, ConnectionServer] = {OPAQUE: opaque}
        if http1 is not None:
            self._servers[HTTP1] = http1
        if h2 is not None:
            self._servers[H2] = h2
        self.detect_timeout = detect_timeout
        self._opaque_ports = opaque_ports
        self.decisions: dict[str, int] = {}

    @property
    def detecting(self) -> bool:
        return len(self._servers) > 1

    async def decide(self, accepted: Accepted) -> tuple[str, str]:
        """(the detection result, the server that serves it)."""
        if not self.detecting:
            return OPAQUE, OPAQUE
        dest = accepted.original_destination
        if dest[1] in DEFAULT_OPAQUE_PORTS or (
            self._opaque_ports is not None and self._opaque_ports(dest)
        ):
            return "opaque_port", OPAQUE
        data, timed_out = await peek(accepted.conn, self.detect_timeout)
        if timed_out:
            return "timeout", OPAQUE
        if not data:
            return "closed", OPAQUE
        found = detect(data)
        if found is Detected.HTTP1 and HTTP1 in self._servers:
            return HTTP1, HTTP1
        if found is Detected.H2:
            return H2, H2 if H2 in self._servers else OPAQUE
        return found.value, OPAQUE

    async def __call__(self, accepted: Accepted) -> None:
        try:
            result, server = await self.decide(accepted)
        except BaseException:
            reset_socket(accepted.conn)  # shutdown while detecting
            raise
        self.decisions[result] = self.decisions.get(result, 0) + 1
        if result == "closed":
            accepted.conn.close()  # nothing to serve: the client left without a byte
            return
        await self._servers[server](accepted)
