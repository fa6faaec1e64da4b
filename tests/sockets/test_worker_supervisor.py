"""The worker supervisor against stand-in worker processes (real processes, real
socketpairs; no eBPF, no lab): it feeds each worker, waits until all listen, merges
their metrics with its own, replaces a killed worker, kills one that breaks the channel,
and drains them all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from nodeagent.meshstate import MeshState
from nodeagent.tap import TapHub
from nodeagent.workers.supervisor import WorkerSupervisor

FAKE_WORKER = textwrap.dedent(
    """
    import asyncio, json, os, socket, sys
    from nodeagent.workers.channel import Channel, ChannelError, Kind

    async def main(fd, index, mode):
        ch = await Channel.open(socket.socket(fileno=fd))
        got = []
        while True:
            kind, body = await ch.recv()
            got.append(kind.name)
            if kind is Kind.TAP:  # the last of the initial state
                break
        if mode == "garbage" and index == 1:
            ch._writer.write(b"\\x00\\x00\\x00\\x00\\xfe")  # an unknown frame kind
            await ch.drain()
        ch.send(Kind.LISTENING, json.dumps({"pid": os.getpid()}).encode())
        ch.send(Kind.STATS, json.dumps({"accepted": 10 + index, "got": got}).encode())
        while True:
            try:
                kind, body = await ch.recv()
            except ChannelError:
                return 0
            if kind is Kind.SCRAPE:
                rid = json.loads(body)["id"]
                text = (
                    "# HELP weft_outbound_accepted_total accepted\\n"
                    "# TYPE weft_outbound_accepted_total counter\\n"
                    f"weft_outbound_accepted_total {10 + index}.0\\n"
                )
                ch.send(Kind.METRICS, rid.to_bytes(4, "big") + text.encode())
            elif kind is Kind.DRAIN:
                return 0

    args = sys.argv[1:]
    fd, index = int(args[args.index("--fd") + 1]), int(args[args.index("--index") + 1])
    sys.exit(asyncio.run(main(fd, index, os.environ.get("FAKE_MODE", ""))))
    """
)

OWN = (
    b"# HELP weft_outbound_accepted_total accepted\n"
    b"# TYPE weft_outbound_accepted_total counter\n"
    b"weft_outbound_accepted_total 0.0\n"
    b"# HELP weft_captured_pods pods\n# TYPE weft_captured_pods gauge\nweft_captured_pods 3.0\n"
)


def _supervisor(tmp_path: Path, count: int = 2) -> WorkerSupervisor:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return WorkerSupervisor(
        {"config": "x"},
        count,
        mesh=MeshState(),
        certs=None,
        addresses=lambda: {"10.0.0.1"},
        tap=TapHub("n"),
        drain_seconds=1.0,
        argv=(sys.executable, str(script)),
    )


async def _until(check) -> None:
    """Poll ``check`` (the supervisor's plain attributes) for up to 30 s."""
    async with asyncio.timeout(30.0):
        while not check():  # noqa: ASYNC110 - polling state that has no event of its own
            await asyncio.sleep(0.05)


def test_feeds_merges_replaces_and_drains(tmp_path: Path):
    async def main() -> None:
        sup = _supervisor(tmp_path)
        async with asyncio.timeout(60):
            await sup.start()
        await _until(lambda: all(w.stats for w in sup.workers))
        # Each worker got its config and initial state, in order.
        assert sup.workers[0].stats["got"] == ["CONFIG", "CERTS", "ADDRS", "TAP"]
        merged = (await sup.metrics(OWN)).decode()
        assert "weft_outbound_accepted_total 21.0" in merged  # 0 + 10 + 11
        assert "weft_captured_pods 3.0" in merged
        # A killed worker is replaced; the other keeps its process.
        victim, other = sup.workers[0].pid, sup.workers[1].pid
        os.kill(victim, signal.SIGKILL)
        await _until(lambda: sup.workers[0].listening and sup.workers[0].pid != victim)
        assert sup.workers[0].restarts == 1 and sup.workers[1].pid == other
        assert sup.workers[0].last_exit == -signal.SIGKILL
        state = sup.state()
        assert [s["restarts"] for s in state] == [1, 0] and all(s["listening"] for s in state)
        await sup.drain()
        assert all(w.proc is not None and w.proc.returncode == 0 for w in sup.workers)

    asyncio.run(main())


def test_a_worker_that_breaks_the_channel_is_replaced(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "garbage")

    async def main() -> None:
        sup = _supervisor(tmp_path)
        start = asyncio.create_task(sup.start())
        # Worker 1 breaks the framing at every start: it is killed and replaced, again
        # and again with backoff, while worker 0 listens and serves.
        await _until(lambda: sup.workers[1].restarts >= 2)
        assert sup.workers[0].listening and sup.workers[0].restarts == 0
        assert not start.done()  # the agent is not ready with a worker missing
        start.cancel()
        await sup.drain()

    asyncio.run(main())


def test_a_worker_that_cannot_start_is_retried(tmp_path: Path):
    async def main() -> None:
        sup = _supervisor(tmp_path, count=1)
        sup.argv = (str(tmp_path / "no-such-program"), *sup.argv[1:])
        start = asyncio.create_task(sup.start())
        await _until(lambda: sup.workers[0].restarts >= 1)
        assert not start.done()
        start.cancel()
        await sup.drain()

    asyncio.run(main())


@pytest.fixture(autouse=True)
def _pythonpath(monkeypatch):
    # The stand-in workers import nodeagent from this checkout.
    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
