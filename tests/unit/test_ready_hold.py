"""Holding connections until the agent is ready (nodeagent.proxy.hold), on socketpairs:
nothing is admitted early, order is kept, deadlines and the bound reset, shutdown
resets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from nodeagent.proxy.hold import ReadyHold


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def _conn(pairs: list) -> tuple[socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    pairs.append((ours, peer))
    return ours, peer


def _was_reset(peer: socket.socket) -> bool:
    peer.settimeout(1)
    try:
        return peer.recv(1) == b""
    except ConnectionResetError:
        return True


async def test_nothing_is_admitted_before_open_then_all_in_arrival_order(pairs):
    hold = ReadyHold("outbound", deadline=10)
    admitted: list[str] = []
    for i in range(3):
        hold.take(_conn(pairs)[0], f"peer-{i}", lambda c, p: admitted.append(p))
    assert admitted == []
    assert (hold.stats.held, hold.stats.held_peak) == (3, 3)
    hold.open()
    assert admitted == ["peer-0", "peer-1", "peer-2"]
    hold.take(_conn(pairs)[0], "later", lambda c, p: admitted.append(p))
    assert admitted[-1] == "later"  # open: straight through
    assert (hold.stats.held, hold.stats.served) == (0, 3)


async def test_a_connection_held_past_the_deadline_is_reset(pairs):
    hold = ReadyHold("outbound", deadline=0.3)
    ours, peer = _conn(pairs)
    hold.take(ours, "early", lambda c, p: pytest.fail("must not be admitted"))
    await _until(lambda: hold.stats.refused_deadline == 1)
    assert _was_reset(peer)
    # One that arrives now has its own, later, deadline.
    late, late_peer = _conn(pairs)
    hold.take(late, "late", lambda c, p: pytest.fail("must not be admitted"))
    assert hold.stats.held == 1
    await _until(lambda: hold.stats.refused_deadline == 2)
    assert _was_reset(late_peer)
    assert hold.stats.held == 0


async def _until(check) -> None:
    """Poll ``check``: the hold's own timer is what is under test, so no event to wait on."""
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_beyond_the_bound_new_arrivals_are_reset_at_once(pairs):
    hold = ReadyHold("tunnel", deadline=10, max_held=2)
    for _ in range(2):
        hold.take(_conn(pairs)[0], "p", lambda c, p: None)
    ours, peer = _conn(pairs)
    hold.take(ours, "third", lambda c, p: None)
    assert _was_reset(peer)
    assert (hold.stats.refused_full, hold.stats.held) == (1, 2)
    hold.close()


async def test_shutdown_before_ready_resets_what_is_held(pairs):
    hold = ReadyHold("outbound", deadline=10)
    ours, peer = _conn(pairs)
    hold.take(ours, "p", lambda c, p: pytest.fail("must not be admitted"))
    hold.close()
    assert _was_reset(peer)
    assert (hold.stats.refused_shutdown, hold.stats.held) == (1, 0)


async def test_an_admit_that_raises_costs_only_its_connection(pairs):
    hold = ReadyHold("outbound", deadline=10)
    admitted: list[str] = []

    def admit(conn: socket.socket, peer: str) -> None:
        if peer == "bad":
            raise RuntimeError("bug")
        admitted.append(peer)

    bad, bad_peer = _conn(pairs)
    hold.take(bad, "bad", admit)
    hold.take(_conn(pairs)[0], "good", admit)
    hold.open()
    assert admitted == ["good"]
    assert _was_reset(bad_peer)
