"""One proxy worker process: the node's whole data path on its own event loop.

Started by the agent (`nodeagent.workers.supervisor`) as
``python -m nodeagent.workers.worker --fd N --index I`` with its channel end inherited
as descriptor N.  It builds the same stages the agent builds in single-process mode
(`nodeagent.agent.Agent`: outbound accept -> protocol switch -> resolve -> balance ->
dial, and the tunnel server), but with no eBPF programs (it opens the pinned
original-destination map by path), no control-plane connection (discovery and the
certificate files come over the channel) and no admin port (the agent's answers for
the node).  It listens — joining the ``SO_REUSEPORT`` groups of 15001 and 15008 — only
once it holds the mesh, the certificates and the node's addresses.

It stops, draining its connections for the configured drain time, when the agent says
so, when the agent goes away (the channel closes; ``PR_SET_PDEATHSIG`` covers an agent
killed outright) or on SIGTERM.  It exits 1 when the state it was fed does not follow
(a discovery gap): the agent replaces it with a fresh snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import sys
from typing import Any

from prometheus_client import disable_created_metrics, generate_latest

from nodeagent.agent import LISTEN_BACKLOG, Agent, AgentConfig
from nodeagent.ebpf.loader import CaptureError, PinnedDestinations
from nodeagent.meshstate import StreamGap
from nodeagent.tap import Subscription, TapFilter
from nodeagent.workers.certs import CertMessage, SharedCerts
from nodeagent.workers.channel import Channel, ChannelError, Kind
from weft.meshwire import MeshWireError, decode_message

log = logging.getLogger("weft.worker")

STATS_INTERVAL = 1.0
"""Seconds between the counters a worker reports (``/debug/state``, ``weft_worker_*``)."""
TAP_BATCH = 100
_OFFLOAD_BYTES = 1 << 20
"""Discovery messages larger than this are decoded off the event loop."""
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


class Worker:
    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.index = index
        self.certs = SharedCerts()
        self.agent: Agent | None = None
        self.stop = asyncio.Event()
        self._have = {"mesh": False, "certs": False, "addrs": False}
        self._state = asyncio.Event()
        self._tap: Subscription | None = None
        self._tap_pump: asyncio.Task[None] | None = None
        self.code = 0

    async def run(self) -> int:
        channel = await Channel.open(self.sock)
        kind, body = await channel.recv()
        if kind is not Kind.CONFIG:
            raise ChannelError(f"expected the config first, got {kind.name}")
        cfg: AgentConfig = pickle.loads(body)  # the agent's own, over a private socketpair
        agent = self.agent = Agent(cfg)
        try:
            agent.destinations = PinnedDestinations.open(cfg.pin_dir)
        except CaptureError as e:
            log.error("worker %d: %s", self.index, e)
            return 1
        agent.open_tunnel_path(self.certs)
        proxy = agent.build_outbound()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        feed = asyncio.create_task(self._feed(channel), name="feed")
        tasks: set[asyncio.Task[Any]] = {feed}
        try:
            ready = asyncio.create_task(self._state.wait())
            await asyncio.wait({ready, feed}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                return self.code or 1
            outbound = agent.bind_outbound()
            outbound.listen(LISTEN_BACKLOG)
            tunnel = agent.bind_tunnel(listen=True)
            for hold in agent.holds.values():
                hold.open()
            tasks.add(asyncio.create_task(proxy.serve(outbound), name="outbound-listener"))
            assert agent.tunnel_server is not None
            tasks.add(
                asyncio.create_task(agent.tunnel_server.serve(tunnel), name="tunnel-listener")
            )
            if agent.trace_exporter is not None:
                tasks.add(asyncio.create_task(agent._export_traces(), name="trace-export"))
            tasks.add(asyncio.create_task(self._report(channel), name="stats"))
            tasks.add(asyncio.create_task(self._prune(), name="prune"))
            channel.send(Kind.LISTENING, json.dumps({"pid": os.getpid()}).encode())
            log.info("worker %d (pid %d): serving", self.index, os.getpid())
            stop = asyncio.create_task(self.stop.wait(), name="stop")
            done, _ = await asyncio.wait(tasks | {stop}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.get_name() != "feed" and t.exception() is not None:
                    log.error("worker %d: %s failed: %r", self.index, t.get_name(),
                              t.exception(), exc_info=t.exception())  # fmt: skip
                    self.code = 1
            stop.cancel()
        finally:
            await self._drain(cfg.drain_seconds)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            channel.close()
        return self.code

    async def _drain(self, seconds: float) -> None:
        agent = self.agent
        assert agent is not None
        if self._tap is not None:
            agent.tap.unsubscribe(self._tap)
        if agent.proxy is not None:
            await agent.proxy.close(seconds)
        if agent.tunnel_server is not None:
            await agent.tunnel_server.close(seconds)
        if agent.tunnel_client is not None:
            await agent.tunnel_client.close()
        if agent.trace_exporter is not None:
            with contextlib.suppress(Exception):
                await agent.trace_exporter.close()

    # -- the channel ---------------------------------------------------------------------

    async def _feed(self, channel: Channel) -> None:
        agent = self.agent
        assert agent is not None
        try:
            while True:
                kind, body = await channel.recv()
                if kind is Kind.MESH:
                    if len(body) > _OFFLOAD_BYTES:
                        msg = await asyncio.to_thread(decode_message, body)
                    else:
                        msg = decode_message(body)
                    agent.mesh.apply(msg)
                    self._got("mesh")
                elif kind is Kind.CERTS:
                    self.certs.update(CertMessage.decode(body))
                    self._got("certs")
                elif kind is Kind.ADDRS:
                    agent.node_addresses.current = set(json.loads(body))
                    self._got("addrs")
                elif kind is Kind.TAP:
                    self._set_tap(channel, body == b"1")
                elif kind is Kind.SCRAPE:
                    request = int(json.loads(body)["id"])
                    text = generate_latest(agent.registry)
                    channel.send(Kind.METRICS, request.to_bytes(4, "big") + text)
                elif kind is Kind.DRAIN:
                    log.info("worker %d: the agent asked to drain", self.index)
                    self.stop.set()
                else:
                    raise ChannelError(f"the agent sent {kind.name}, which only workers send")
        except ChannelError as e:
            log.info("worker %d: channel to the agent closed (%s); draining", self.index, e)
            self.stop.set()
        except (StreamGap, MeshWireError) as e:
            log.error("worker %d: discovery state from the agent does not follow (%s); "
                      "exiting so the agent starts a fresh worker", self.index, e)  # fmt: skip
            self.code = 1
            self.stop.set()

    def _got(self, what: str) -> None:
        self._have[what] = True
        if all(self._have.values()):
            self._state.set()

    def _set_tap(self, channel: Channel, on: bool) -> None:
        agent = self.agent
        assert agent is not None
        if on and self._tap is None:
            self._tap = agent.tap.subscribe(TapFilter())
            self._tap_pump = asyncio.create_task(self._pump_tap(channel, self._tap))
        elif not on and self._tap is not None:
            agent.tap.unsubscribe(self._tap)
            self._tap = None

    async def _pump_tap(self, channel: Channel, sub: Subscription) -> None:
        while True:
            event = await sub.get()
            if event is None:
                return
            batch = [dataclasses.asdict(event)]
            while len(batch) < TAP_BATCH and (more := sub.take()) is not None:
                batch.append(dataclasses.asdict(more))
            with contextlib.suppress(ChannelError):
                channel.send(Kind.TAP_EVENTS, json.dumps(batch).encode())

    async def _report(self, channel: Channel) -> None:
        agent = self.agent
        assert agent is not None and agent.proxy is not None
        while True:
            s = agent.proxy.stats
            stats = {
                "proxy": vars(s),
                "accepted": s.accepted,
                "active": s.active,
                "requests": agent.outbound_http.requests + agent.inbound_http.requests,
                "tunnel_accepted": agent.tunnel_server.stats.accepted
                if agent.tunnel_server is not None
                else 0,
                "rss_bytes": _rss_bytes(),
                "mesh_revision": agent.mesh.revision,
                "certificates": self.certs.snapshot(),
            }
            with contextlib.suppress(ChannelError):
                channel.send(Kind.STATS, json.dumps(stats).encode())
            await asyncio.sleep(STATS_INTERVAL)

    async def _prune(self) -> None:
        agent = self.agent
        assert agent is not None
        seen = 0
        while True:
            seen = await agent.mesh.wait_change(seen)
            agent.prune_data_path()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _harden() -> None:
    """Die with the agent, and be undumpable: no core file with keys in it, no ptrace
    or /proc/<pid>/mem by other processes of the same user."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weft-worker", description=__doc__.split("\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="the channel's descriptor")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    _harden()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {args.index}]: %(message)s",
    )
    disable_created_metrics()  # type: ignore[no-untyped-call]  # the agent's merge sums samples; creation times do not add
    sock = socket.socket(fileno=args.fd)
    try:
        import uvloop

        return uvloop.run(Worker(sock, args.index).run())
    except ImportError:  # pragma: no cover
        return asyncio.run(Worker(sock, args.index).run())


if __name__ == "__main__":
    sys.exit(main())
