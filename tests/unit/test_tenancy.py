"""Each pod's share of in-flight requests (`nodeagent.proxy.http.tenancy`): the noisy
pod's next request is refused overloaded, the others' are not, and every share taken is
given back exactly once — on the fast path, the general one, a cancel, a re-send."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

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
