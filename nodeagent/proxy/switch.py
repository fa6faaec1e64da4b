"""The protocol switch stage: decide how an accepted connection is served.

Today every connection is served as opaque TCP (`nodeagent.proxy.tcp`). The request-aware
proxy adds detection here — an HTTP/1.x request line or the HTTP/2 preface from the
client within a short deadline, server-first and known binary ports opaque — and routes
to an HTTP server instead; the accept stage and the stages after resolve do not change.
Each decision is counted (`decisions`), so the metrics can say how traffic was served.
"""

from __future__ import annotations

from nodeagent.proxy.stage import Accepted, ConnectionServer

OPAQUE = "opaque"


class ProtocolSwitch:
    def __init__(self, *, opaque: ConnectionServer) -> None:
        self._servers: dict[str, ConnectionServer] = {OPAQUE: opaque}
        self.decisions: dict[str, int] = {OPAQUE: 0}

    def decide(self, accepted: Accepted) -> str:
        """The protocol ``accepted`` is served as (today: always opaque TCP)."""
        return OPAQUE

    async def __call__(self, accepted: Accepted) -> None:
        protocol = self.decide(accepted)
        self.decisions[protocol] = self.decisions.get(protocol, 0) + 1
        await self._servers[protocol](accepted)
