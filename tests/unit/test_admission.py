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


async def test_a_noisy_workload_queues_behind_itself_not_in_front_of_others():
    """Issue #18: 50 set-ups of one workload are waiting when another's one arrives; it
    gets the second free slot, not the 51st (round-robin over keys, FIFO within one)."""
    adm = Admission(1)
    order: list[str] = []

    async def one(key: str, i: int) -> None:
        async with adm.slot(key):
            order.append(f"{key}{i}")
            await asyncio.sleep(0)

    noisy = [asyncio.create_task(one("a", i)) for i in range(50)]
    await asyncio.sleep(0)
    quiet = asyncio.create_task(one("b", 0))
    await asyncio.gather(*noisy, quiet)
    # a0 held the slot, a1 was woken before b0 queued, then the keys alternate.
    assert order.index("b0") <= 3, order[:5]
    assert [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(50)]  # FIFO
    assert adm.stats.in_flight == adm.stats.queued == 0


async def test_each_workloads_queue_is_bounded_so_the_noisy_one_is_refused_first():
    adm = Admission(1, max_queued=100, max_queued_per_key=3)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(adm, [], 0, release))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(adm.acquire("noisy")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="3 of them noisy's"):
        await adm.acquire("noisy")
    other = asyncio.create_task(adm.acquire("quiet"))  # still queues
    await asyncio.sleep(0)
    assert adm.queued("quiet") == 1 and adm.stats.refused_by_key == {"noisy": 1}
    release.set()
    await holder
    await asyncio.wait_for(waiting[0], 1)  # the noisy key queued first: its turn
    adm.release()
    await asyncio.wait_for(other, 1)  # then the quiet one's, before noisy's 2nd and 3rd
    assert not waiting[1].done()
    adm.release()
    for t in waiting[1:]:
        await asyncio.wait_for(t, 1)
        adm.release()
    assert adm.stats.in_flight == adm.stats.queued == 0


async def test_cancelled_waiters_of_one_key_leave_no_trace():
    adm = Admission(1)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(adm, [], 0, release))
    await asyncio.sleep(0)
    gone = [asyncio.create_task(adm.acquire("a")) for _ in range(3)]
    await asyncio.sleep(0)
    for t in gone:
        t.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    assert adm.queued("a") == 0 and adm.stats.queued == 0 and not adm._queues
    release.set()
    await holder
    assert adm.stats.in_flight == 0
