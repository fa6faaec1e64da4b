"""The agent's side of its proxy workers: spawn, feed, watch, replace, scrape, drain.

The agent keeps what is the node's — eBPF capture, the control-plane connection,
certificates, discovery — and runs N worker processes (`nodeagent.workers.worker`) that
each serve the whole data path on their own event loop and their own core.  They share
the listening ports (15001, 15008) through ``SO_REUSEPORT``, so the kernel spreads new
connections over them, and each looks original destinations up in the pinned map.

Each worker is fed over its channel (`nodeagent.workers.channel`): first its config,
then the mesh as a discovery snapshot of the agent's state, the certificate files
(`nodeagent.workers.certs`) and the node's addresses; after that every discovery message
the agent applies, in order, and certificate, address and tap changes as they happen
(checked every `WATCH_INTERVAL`).  A worker listens only once it has all of that, so it
never judges a connection against empty state.

A worker that exits (crash, kill) is replaced with backoff; the others' connections are
untouched, and with ``net.ipv4.tcp_migrate_req`` (set by the agent) the connections
waiting in the dead worker's accept queue move to another worker's instead of being
reset.  What the dead worker had accepted is lost with it: a process's sockets die with
it.  ``/metrics`` merges every worker's text with the agent's (`aggregate.merge`);
``/debug/state`` lists the workers with what each last reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeagent.certtypes import CertSource
from nodeagent.meshstate import MeshState
from nodeagent.tap import TapEvent, TapHub
from nodeagent.workers.aggregate import merge
from nodeagent.workers.certs import CertMessage
from nodeagent.workers.channel import Channel, ChannelError, Kind
from weft.identity import SpiffeId
from weft.meshwire import snapshot_payload

log = logging.getLogger("weft.agent.workers")

WATCH_INTERVAL = 0.25
"""Seconds between checks of certificates, node addresses and tap subscribers."""
SCRAPE_TIMEOUT = 2.0
"""Seconds a worker has to answer a metrics scrape; a worker that does not is left out
of that scrape (and counted in ``weft_worker_scrape_failures``)."""
START_TIMEOUT = 60.0
"""Seconds a worker may take from spawn to listening before it is replaced."""
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
"""A worker that ran this long resets its replacement backoff."""
MIGRATE_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


class Certificates(CertSource, Protocol):
    """What the supervisor needs of the agent's certificate manager."""

    @property
    def identities(self) -> frozenset[SpiffeId]: ...


@dataclass
class WorkerProcess:
    index: int
    pid: int = 0
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    started: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    listening: bool = False
    last_exit: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    scrape_failures: int = 0
    pending: dict[int, asyncio.Future[str]] = field(default_factory=dict)


def enable_accept_queue_migration(path: str = MIGRATE_SYSCTL) -> str | None:
    """Turn on ``tcp_migrate_req`` in this network namespace (the node's): when one
    listener of a ``SO_REUSEPORT`` group closes, its queued connections go to another.
    Returns why it could not, or None."""
    try:
        with open(path, "w") as f:
            f.write("1")
        return None
    except OSError as e:
        return f"{path}: {e.strerror} (kernel 5.14 or later, and root in the node's netns)"


class WorkerSupervisor:
    def __init__(
        self,
        config: Any,
        count: int,
        *,
        mesh: MeshState,
        certs: Certificates | None,
        addresses: Callable[[], set[str]],
        tap: TapHub,
        drain_seconds: float,
        log_level: str = "INFO",
        argv: tuple[str, ...] = (sys.executable, "-m", "nodeagent.workers.worker"),
    ) -> None:
        self._config = pickle.dumps(config)
        self.workers = [WorkerProcess(i) for i in range(count)]
        self.mesh = mesh
        self.certs = certs
        self.addresses = addresses
        self.tap = tap
        self.drain_seconds = drain_seconds
        self.argv = (*argv, "--log-level", log_level.lower())
        self._sent_certs = b""
        self._sent_addrs = b""
        self._sent_tap = False
        self._scrape_id = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening_changed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker slot (each replaces its worker whenever it exits) and wait
        until every worker listens."""
        for w in self.workers:
            task = asyncio.create_task(self._keep(w), name=f"worker-{w.index}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while not all(w.listening for w in self.workers):
            self._listening_changed.clear()
            await self._listening_changed.wait()
        log.info(
            "%d proxy workers listening (pids %s)",
            len(self.workers), ", ".join(str(w.pid) for w in self.workers),
        )  # fmt: skip

    async def watch(self) -> None:
        """Forever: push certificate, address and tap changes to the workers."""
        while True:
            self._push_changes()
            await asyncio.sleep(WATCH_INTERVAL)

    async def drain(self) -> None:
        """Every worker stops accepting, finishes its connections (``drain_seconds``)
        and exits; one that does not in time is killed."""
        self._stopping = True
        for w in self.workers:
            self._send(w, Kind.DRAIN)
        procs = [w.proc for w in self.workers if w.proc is not None]
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs],
                timeout=self.drain_seconds + 5.0,
            )
            for p in procs:
                if p.returncode is None:
                    log.warning("worker pid %d did not stop in time: killing it", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for t in self._tasks:
            t.cancel()
        for w in self.workers:
            if w.channel is not None:
                w.channel.close()

    def stopping(self) -> bool:
        return self._stopping

    # -- feeding -------------------------------------------------------------------------

    def forward_mesh(self, payload: bytes) -> None:
        """A discovery message the agent just applied: to every worker, in order."""
        for w in self.workers:
            self._send(w, Kind.MESH, payload)

    def _push_changes(self) -> None:
        certs = self._cert_message()
        if certs != self._sent_certs:
            self._sent_certs = certs
            for w in self.workers:
                self._send(w, Kind.CERTS, certs)
        addrs = json.dumps(sorted(self.addresses())).encode()
        if addrs != self._sent_addrs:
            self._sent_addrs = addrs
            for w in self.workers:
                self._send(w, Kind.ADDRS, addrs)
        if self.tap.active != self._sent_tap:
            self._sent_tap = self.tap.active
            for w in self.workers:
                self._send(w, Kind.TAP, b"1" if self._sent_tap else b"0")

    def _cert_message(self) -> bytes:
        if self.certs is None:
            return CertMessage(b"", 0, ()).encode()
        return CertMessage.of(self.certs, self.certs.identities).encode()

    def _initial_state(self, w: WorkerProcess) -> None:
        self._send(w, Kind.CONFIG, self._config)
        m = self.mesh
        if m.epoch is not None and m.revision is not None:
            payload = snapshot_payload(
                m.epoch, m.revision, tuple(m.workloads.values()), tuple(m.services.values())
            )
            self._send(w, Kind.MESH, payload)
        self._send(w, Kind.CERTS, self._sent_certs or self._cert_message())
        self._send(w, Kind.ADDRS, json.dumps(sorted(self.addresses())).encode())
        self._send(w, Kind.TAP, b"1" if self.tap.active else b"0")

    def _send(self, w: WorkerProcess, kind: Kind, body: bytes = b"") -> None:
        if w.channel is None:
            return
        try:
            w.channel.send(kind, body)
        except ChannelError as e:
            log.warning("worker %d (pid %d): %s; replacing it", w.index, w.pid, e)
            self._kill(w)

    # -- spawning and watching -----------------------------------------------------------

    async def _keep(self, w: WorkerProcess) -> None:
        """One worker slot, until the agent stops: spawn, watch, replace with backoff."""
        while not self.stopping():
            code: int | None = None
            try:
                proc, channel = await self._spawn(w)
            except OSError as e:
                log.error("worker %d: cannot start %s: %s", w.index, self.argv[0], e)
            else:
                code = await self._watch(w, proc, channel)
            if self.stopping():
                return
            ran = time.monotonic() - w.started
            w.failures_in_a_row = 0 if ran >= STABLE_AFTER else w.failures_in_a_row + 1
            delay = min(BACKOFF_MAX, 0.5 * 2 ** max(0, w.failures_in_a_row - 1))
            log.error(
                "worker %d (pid %d) exited with %s after %.1fs; the other workers keep "
                "serving; replacing it in %.1fs",
                w.index, w.pid, _exit(code), ran, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
            w.restarts += 1

    async def _spawn(self, w: WorkerProcess) -> tuple[asyncio.subprocess.Process, Channel]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        w.started = time.monotonic()
        try:
            fd = theirs.fileno()
            proc = await asyncio.create_subprocess_exec(
                *self.argv, "--fd", str(fd), "--index", str(w.index), pass_fds=(fd,)
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        w.proc, w.pid, w.listening = proc, proc.pid, False
        channel = w.channel = await Channel.open(ours)
        self._initial_state(w)
        log.info("worker %d started (pid %d)", w.index, w.pid)
        return proc, channel

    async def _watch(
        self, w: WorkerProcess, proc: asyncio.subprocess.Process, channel: Channel
    ) -> int:
        """Until the worker exits: it must listen within `START_TIMEOUT`, and a worker
        whose channel breaks (it closed its end, or broke the framing) is killed."""
        reader = asyncio.create_task(self._read(w, channel))
        exited = asyncio.ensure_future(proc.wait())
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not w.listening and not reader.done() and not exited.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("worker %d (pid %d) not listening after %gs: replacing it",
                              w.index, w.pid, START_TIMEOUT)  # fmt: skip
                    self._kill(w)
                    break
                changed = asyncio.ensure_future(self._listening_changed.wait())
                await asyncio.wait({reader, exited, changed}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                changed.cancel()
            await asyncio.wait({reader, exited}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not exited.done():
                # A dying worker's channel closes just before it is reaped; a draining
                # one closes it and exits (drain() bounds that); any other is broken.
                await asyncio.wait({exited}, timeout=2.0)
                if not exited.done() and not self.stopping():
                    why = reader.exception() if not reader.cancelled() else None
                    log.error("worker %d (pid %d): channel broken (%s): replacing it",
                              w.index, w.pid, why)  # fmt: skip
                    self._kill(w)
            code = await exited
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChannelError):
                await reader
            channel.close()
            for fut in w.pending.values():
                if not fut.done():
                    fut.cancel()
            w.pending.clear()
            w.listening = False
            w.channel = None
        w.last_exit = code
        return code

    async def _read(self, w: WorkerProcess, channel: Channel) -> None:
        while True:
            kind, body = await channel.recv()
            if kind is Kind.LISTENING:
                w.listening = True
                self._listening_changed.set()
                log.info("worker %d (pid %d) listening", w.index, w.pid)
            elif kind is Kind.STATS:
                w.stats = json.loads(body)
            elif kind is Kind.METRICS:
                request = int.from_bytes(body[:4], "big")
                fut = w.pending.pop(request, None)
                if fut is not None and not fut.done():
                    fut.set_result(body[4:].decode())
            elif kind is Kind.TAP_EVENTS:
                if self.tap.active:
                    for event in json.loads(body):
                        self.tap.publish(TapEvent(**event))
            else:
                raise ChannelError(f"worker {w.index} sent {kind.name}, which only the agent sends")

    def _kill(self, w: WorkerProcess) -> None:
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGKILL)

    # -- reading -------------------------------------------------------------------------

    async def metrics(self, own: bytes) -> bytes:
        """The node's metrics: ``own`` (the agent's registry) merged with each worker's."""
        self._scrape_id = (self._scrape_id + 1) % (1 << 32)
        asked: list[tuple[WorkerProcess, asyncio.Future[str]]] = []
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w.channel is None or not w.listening:
                continue
            fut: asyncio.Future[str] = loop.create_future()
            w.pending[self._scrape_id] = fut
            self._send(w, Kind.SCRAPE, json.dumps({"id": self._scrape_id}).encode())
            asked.append((w, fut))
        texts = [own.decode()]
        if asked:
            await asyncio.wait([f for _, f in asked], timeout=SCRAPE_TIMEOUT)
        for w, fut in asked:
            if fut.done() and not fut.cancelled():
                texts.append(fut.result())
            else:
                fut.cancel()
                w.pending.pop(self._scrape_id, None)
                w.scrape_failures += 1
        return merge(texts).encode()

    def state(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "index": w.index,
                "pid": w.pid,
                "listening": w.listening,
                "uptime_seconds": round(now - w.started, 1) if w.channel else None,
                "restarts": w.restarts,
                "last_exit": w.last_exit,
                "scrape_failures": w.scrape_failures,
                **{k: v for k, v in w.stats.items() if k != "proxy"},
                "proxy": w.stats.get("proxy"),
            }
            for w in self.workers
        ]

    def proxy_totals(self) -> dict[str, int]:
        """The outbound listeners' counters summed over the workers (last reports)."""
        totals: dict[str, int] = {}
        for w in self.workers:
            for name, value in w.stats.get("proxy", {}).items():
                if isinstance(value, int):
                    totals[name] = totals.get(name, 0) + value
        return totals

    def collector(self) -> Collector:
        return _WorkerCollector(self)


class _WorkerCollector(Collector):
    def __init__(self, sup: WorkerSupervisor) -> None:
        self.sup = sup

    def collect(self) -> Any:
        up = GaugeMetricFamily(
            "weft_worker_up", "1 while the proxy worker listens.", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "weft_worker_restarts", "Proxy workers replaced after they exited.", labels=["worker"]
        )
        accepted = CounterMetricFamily(
            "weft_worker_connections_accepted",
            "Outbound connections each worker accepted (the kernel's SO_REUSEPORT spread; "
            "as of the worker's last report, every second).",
            labels=["worker"],
        )
        requests = CounterMetricFamily(
            "weft_worker_requests",
            "HTTP requests each worker served, both directions (last report).",
            labels=["worker"],
        )
        for w in self.sup.workers:
            i = str(w.index)
            up.add_metric([i], 1 if w.listening else 0)
            restarts.add_metric([i], w.restarts)
            accepted.add_metric([i], w.stats.get("accepted", 0))
            requests.add_metric([i], w.stats.get("requests", 0))
        yield from (up, restarts, accepted, requests)


def _exit(code: int | None) -> str:
    if code is None:
        return "no process (it could not start)"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
