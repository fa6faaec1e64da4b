"""The TCP forward stage: serve one accepted connection as opaque bytes.

Open the upstream leg through the ``connect`` seam (for the mesh: resolve, balance,
failover and dial, composed in `nodeagent.proxy.upstream`), then join the two legs with
a `Relay`. While the upstream connects, the client is not read (see `Relay`): its bytes
wait in the kernel, where TCP pushes back on the app, not in our memory. A failed or
timed-out connect resets the client (a FIN right after a successful connect would look
like a server that answered with nothing). Cancellation (the shutdown deadline) resets
both legs.
"""

from __future__ import annotations

import asyncio
import logging

from nodeagent.proxy.relay import Relay
from nodeagent.proxy.stage import (
    Accepted,
    OutboundConfig,
    ProxyStats,
    Upstream,
    UpstreamConnector,
)

log = logging.getLogger("weft.proxy")


class TcpForward:
    def __init__(
        self, connect: UpstreamConnector, config: OutboundConfig, stats: ProxyStats
    ) -> None:
        self.connect = connect
        self.config = config
        self.stats = stats

    async def __call__(self, accepted: Accepted) -> None:
        relay = Relay(
            label=f"outbound {accepted.label}",
            high_water=self.config.high_water,
            low_water=self.config.low_water,
            idle_timeout=self.config.idle_timeout,
            meter=self.stats,
        )
        self.stats.active += 1
        try:
            await self._connect_and_relay(relay, accepted)
        except asyncio.CancelledError:
            state = "relaying" if relay.connected else "connecting"
            log.info(
                "outbound %s: still %s at the shutdown deadline; resetting", accepted.label, state
            )
            relay.abort("proxy shut down")
            await relay.wait_closed()
            raise
        finally:
            self.stats.active -= 1

    async def _connect_and_relay(self, relay: Relay, accepted: Accepted) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: relay.client, accepted.conn)
        except OSError as exc:
            # Only if the client vanished while being wrapped; the transport closes it.
            log.info("%s: client connection unusable (%s)", relay.label, exc)
            return
        timeout = self.config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                opened = await self.connect(
                    accepted.client, accepted.original_destination, lambda: relay.upstream
                )
            if not relay.connected:
                raise RuntimeError(
                    "the upstream connector returned without attaching the relay's protocol"
                )
        except Exception as exc:  # any failure of the pluggable seam fails this connection
            self.stats.upstream_failed += 1
            expected = isinstance(exc, (OSError, TimeoutError))
            why = (
                f"timed out after {timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.warning(
                "%s: upstream connect failed (%s); resetting the client",
                relay.label,
                why,
                exc_info=None if expected else exc,
            )
            relay.abort(f"upstream connect failed ({why})")
            await relay.wait_closed()
            return
        log.debug("%s: relaying", relay.label)
        done = None
        if isinstance(opened, Upstream):
            if opened.meter is not None:
                relay.add_meter(opened.meter)
            done = opened.done
        try:
            await relay.wait_closed()
        finally:
            if done is not None:
                done()
        log.debug(
            "%s: closed (%s); %d bytes out, %d bytes in",
            relay.label,
            relay.close_reason,
            relay.bytes_out,
            relay.bytes_in,
        )
