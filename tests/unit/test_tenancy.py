"""Each pod's share of in-flight requests (`nodeagent.proxy.http.tenancy`): the noisy
pod's next request is refused overloaded, the others' are not, and every share taken is
given back exactly once — on the fast path, the general one, a cancel, a re-send."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from nodeagent.proxy.http import tenancy
from nodeagent.proxy.http.message import ProxyError
from nodeagent.proxy.http.server import Exchange, FastForwarder, ProxyFailure
from nodeagent.proxy.http.tenancy import RequestShares, SharedForwarder


def exchange() -> Exchange:
    return cast(Exchange, object())


def shared(inner: Inner, shares: RequestShares, source: str) -> SharedForwarder:
    return SharedForwarder(cast(FastForwarder, inner), shares, source)


class Inner:
    """A forwarder whose requests end when the test says."""

    def __init__(self, fast: bool = False) -> None:
        self.fast = fast
        self.release = asyncio.Event()
        self.fast_done: list[Any] = []
        self.cancelled: list[object] = []

    def start(self, exchange: object, done: Any) -> bool:
        if self.fast:
            self.fast_done.append((exchange, done))
        return self.fast

    async def forward(self, exchange: object) -> None:
        await self.release.wait()

    def cancel(self, exchange: object) -> None:
        self.cancelled.append(exchange)


async def test_a_noisy_pod_is_refused_overloaded_and_others_go_on() -> None:
    shares = RequestShares(2, name=lambda ip: f"pod {ip}")
    inner = Inner()
    noisy = shared(inner, shares, "10.0.0.1")
    quiet = shared(inner, shares, "10.0.0.2")
    running = [asyncio.create_task(noisy.forward(exchange())) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ProxyFailure) as e:
        await noisy.forward(exchange())
    assert e.value.error is ProxyError.OVERLOADED and "pod 10.0.0.1" in str(e.value)
    other = asyncio.create_task(quiet.forward(exchange()))
    await asyncio.sleep(0)
    assert shares.in_flight == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert shares.refused == {"10.0.0.1": 1}
    inner.release.set()
    await asyncio.gather(*running, other)
    assert shares.in_flight == {}


async def test_the_fast_path_gives_its_share_back_once() -> None:
    shares = RequestShares(1)
    inner = Inner(fast=True)
    fwd = shared(inner, shares, "10.0.0.1")
    ended: list[Any] = []
    ex = exchange()
    assert fwd.start(ex, lambda *a: ended.append(a))
    assert not fwd.start(exchange(), lambda *a: None)  # full: not started
    assert shares.refused == {}  # counted when `forward` answers it
    _, done = inner.fast_done[0]
    done(ex, None, True)  # to be sent again by `forward`
    assert shares.in_flight == {} and ended == [(ex, None, True)]
    fwd.cancel(ex)  # after the end: nothing more to give back
    assert shares.in_flight == {}
    assert fwd.start(ex, lambda *a: None)
    fwd.cancel(ex)
    assert shares.in_flight == {} and inner.cancelled == [ex, ex]


async def test_a_cancelled_general_request_gives_its_share_back() -> None:
    shares = RequestShares(1)
    fwd = shared(Inner(), shares, "10.0.0.1")
    task = asyncio.create_task(fwd.forward(exchange()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert shares.in_flight == {}
    with pytest.raises(ValueError):
        RequestShares(0)


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lag probe never fires during the test (which sets `RequestShares.cap`)."""
    monkeypatch.setattr(tenancy, "TICK", 3600.0)


@pytest.mark.usefixtures("no_probe")
async def test_under_contention_the_busiest_pod_waits_and_a_quiet_one_does_not() -> None:
    """The loop runs late (the cap is down): a pod at the cap waits for one of its own
    requests to end, in order; another pod below the cap starts at once."""
    shares = RequestShares(100)
    shares.cap = 2.0
    inner = Inner()
    noisy = shared(inner, shares, "10.0.0.1")
    quiet = shared(inner, shares, "10.0.0.2")
    first = [asyncio.create_task(noisy.forward(exchange())) for _ in range(2)]
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(noisy.forward(exchange())) for _ in range(3)]
    other = asyncio.create_task(quiet.forward(exchange()))
    await asyncio.sleep(0)
    assert shares.in_flight == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert shares.queued("10.0.0.1") == 3 and shares.waited == {"10.0.0.1": 3}
    assert not shares.may_start("10.0.0.1") and shares.may_start("10.0.0.2")
    assert shares.refused == {}
    first[0].cancel()  # one of its own ends: the oldest waiter takes its share
    await asyncio.sleep(0)
    assert shares.in_flight["10.0.0.1"] == 2 and shares.queued("10.0.0.1") == 2
    waiting[1].cancel()  # a waiter that gives up leaves the queue
    await asyncio.sleep(0)
    assert shares.queued("10.0.0.1") == 1
    inner.release.set()
    await asyncio.gather(first[1], waiting[0], waiting[2], other)
    assert shares.in_flight == {} and shares.queued("10.0.0.1") == 0
    shares.close()


@pytest.mark.usefixtures("no_probe")
async def test_at_the_hard_share_a_waiting_pod_is_refused_after_a_delay() -> None:
    shares = RequestShares(3)
    shares.cap = 1.0
    inner = Inner()
    noisy = shared(inner, shares, "10.0.0.1")
    running = [asyncio.create_task(noisy.forward(exchange())) for _ in range(3)]
    await asyncio.sleep(0)  # one in flight, two waiting: its whole share
    assert shares.in_flight == {"10.0.0.1": 1} and shares.queued("10.0.0.1") == 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ProxyFailure) as e:
        await noisy.forward(exchange())
    assert e.value.error is ProxyError.OVERLOADED
    assert loop.time() - started >= tenancy.REFUSAL_DELAY * 0.9
    assert shares.refused == {"10.0.0.1": 1}
    inner.release.set()
    await asyncio.gather(*running)
    shares.close()


@pytest.mark.usefixtures("no_probe")
async def test_a_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenancy, "WAIT_TIMEOUT", 0.05)
    shares = RequestShares(10)
    shares.cap = 1.0
    inner = Inner()
    noisy = shared(inner, shares, "10.0.0.1")
    running = asyncio.create_task(noisy.forward(exchange()))
    await asyncio.sleep(0)
    with pytest.raises(ProxyFailure):
        await noisy.forward(exchange())
    assert shares.refused == {"10.0.0.1": 1} and shares.queued("10.0.0.1") == 0
    inner.release.set()
    await running
    shares.close()


async def test_the_probe_lowers_the_cap_when_the_loop_runs_late_and_raises_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shares = RequestShares(64)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    shares.close()  # drive the ticks by hand
    shares._active = {"10.0.0.1": now[0], "10.0.0.2": now[0]}
    shares._tick(now[0] - 0.010)  # 10 ms late, two pods active
    shares.close()
    assert shares.cap == pytest.approx(64 * tenancy.DECREASE)
    for _ in range(20):
        shares._tick(now[0] - 0.010)
        shares.close()
    assert shares.cap == tenancy.FAIR_FLOOR
    shares._active = {"10.0.0.1": now[0]}  # one pod alone: nobody to protect
    shares._tick(now[0] - 0.010)
    shares.close()
    assert shares.cap > tenancy.FAIR_FLOOR
    shares._active = {"10.0.0.1": now[0], "10.0.0.2": now[0]}
    for _ in range(60):
        shares._tick(now[0])  # on time
        shares.close()
    assert shares.cap == 64


@pytest.mark.usefixtures("no_probe")
async def test_a_waiter_starts_when_the_cap_grows_back() -> None:
    shares = RequestShares(64)
    shares.cap = 1.0
    inner = Inner()
    noisy = shared(inner, shares, "10.0.0.1")
    running = asyncio.create_task(noisy.forward(exchange()))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(noisy.forward(exchange()))
    await asyncio.sleep(0)
    assert shares.queued("10.0.0.1") == 1
    shares.close()
    shares._active = {}
    shares._tick(time.monotonic())  # on time: the cap grows, and it starts
    shares.close()
    await asyncio.sleep(0)
    assert shares.in_flight == {"10.0.0.1": 2} and shares.queued("10.0.0.1") == 0
    inner.release.set()
    await asyncio.gather(running, waiting)


@pytest.mark.usefixtures("no_probe")
async def test_the_cap_binds_the_heavy_starters_not_a_victim_with_many_in_flight() -> None:
    """A victim whose requests take longer under the flood has more in flight, but it
    starts them no faster: the cap binds only pods starting requests at least as fast
    as the mean, so the victim is not made to wait for a lag it did not cause."""
    shares = RequestShares(100)
    for _ in range(400):
        shares.may_start("10.0.0.1")  # the flooder starts many requests
    for _ in range(10):
        shares.may_start("10.0.0.2")  # the victim a few
    shares.in_flight = {"10.0.0.1": 3, "10.0.0.2": 12}
    shares.cap = 8.0
    shares._tick(time.monotonic())  # classify (the loop counts as punctual here)
    shares.cap = 8.0
    assert shares.heavy == {"10.0.0.1"}
    assert shares.may_start("10.0.0.2")  # 12 in flight, over the cap, not heavy: goes
    shares.in_flight["10.0.0.1"] = 8
    assert not shares.may_start("10.0.0.1")  # heavy and at the cap: waits
    shares.close()
