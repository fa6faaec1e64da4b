"""Handshake admission (nodeagent.proxy.admission): bounded concurrency, FIFO turns,
bounded queue, queue deadline, and slots never lost to cancellation."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.proxy.admission import Admission, Overloaded


async def _hold(adm: Admission, started: list[int], i: int, release: asyncio.Event) -> None:
    async with adm.slot():
        started.append(i)
        await release.wait()


async def test_at_most_limit_run_and_the_rest_get_turns_in_arrival_order():
    adm = Admission(2)
    started: list[int] = []
    gates = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(_hold(adm, started, i, gates[i])) for i in range(5)]
    await asyncio.sleep(0)
    assert started == [0, 1]
    assert (adm.stats.in_flight, adm.stats.queued) == (2, 3)
    for i in range(5):
        gates[i].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert adm.stats.in_flight <= 2
    await asyncio.gather(*tasks)
    assert started == [0, 1, 2, 3, 4]
    assert (adm.stats.admitted, adm.stats.waited, adm.stats.queued_peak) == (5, 3, 3)
    assert adm.stats.in_flight == adm.stats.queued == 0


async def test_a_full_queue_refuses_at_once():
    adm = Admission(1, max_queued=1)
    release = asyncio.Event()
    started: list[int] = []
    first = asyncio.create_task(_hold(adm, started, 0, release))
    second = asyncio.create_task(_hold(adm, started, 1, release))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="already wait"):
        async with adm.slot():
            pass
    assert adm.stats.refused_full == 1
    release.set()
    await asyncio.gather(first, second)
    assert started == [0, 1]


async def test_a_wait_past_the_queue_deadline_is_refused_and_frees_its_place():
    adm = Admission(1, queue_timeout=0.05)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(adm, [], 0, release))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="waited"):
        async with adm.slot():
            pass
    assert adm.stats.refused_timeout == 1
    assert adm.stats.queued == 0
    release.set()
    await holder
    async with adm.slot():  # the slot is free again: no leak
        assert adm.stats.in_flight == 1
    assert adm.stats.in_flight == 0


async def test_cancelling_a_waiter_loses_no_slot():
    adm = Admission(1)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(adm, [], 0, release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(adm, [], 1, asyncio.Event()))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert (adm.stats.in_flight, adm.stats.queued) == (0, 0)


async def test_a_slot_handed_over_to_a_waiter_being_cancelled_passes_on():
    adm = Admission(1)
    started: list[int] = []
    held = adm.slot()
    await held.__aenter__()
    doomed = asyncio.create_task(_hold(adm, started, 1, asyncio.Event()))
    third = asyncio.create_task(_hold(adm, started, 2, asyncio.Event()))
    await asyncio.sleep(0)
    assert adm.stats.queued == 2
    # Releasing hands the slot to `doomed` (no other task runs in between)...
    await held.__aexit__(None, None, None)
    doomed.cancel()  # ...which is cancelled before it could use it
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.sleep(0)
    assert started == [2]  # the slot went on to the next waiter
    assert adm.stats.in_flight == 1
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert adm.stats.in_flight == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Admission(0)
    with pytest.raises(ValueError):
        Admission(1, queue_timeout=0)
