"""The socket tier's asyncio harness: each test body runs on a fresh loop of each kind
(asyncio's own and uvloop, which the agent may run on) and fails if it leaks tasks
(STYLE.md 10); `wait` bounds anything awaited, so that a bug shows as a failure, not a
hang.

A module whose tests take ``run`` gets the fixture from ``tests/sockets/conftest.py``;
one that needs another bound builds its own on `run_guarded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

T = TypeVar("T")
Body = Callable[[], Coroutine[Any, Any, None]]

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
WAIT = 10.0
"""Generous bound for anything awaited; only a hang ever reaches it."""


def run_guarded(
    factory: Callable[[], asyncio.AbstractEventLoop], body: Body, timeout: float
) -> None:
    """``body`` on a fresh loop from ``factory``, within ``timeout`` seconds; then no task
    may be left running."""

    async def guarded() -> None:
        async with asyncio.timeout(timeout):
            await body()
        await assert_no_leaked_tasks()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(guarded())


async def assert_no_leaked_tasks() -> None:
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if leaked:
        for task in leaked:
            task.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail("tasks leaked: " + ", ".join(sorted(t.get_name() for t in leaked)))


async def wait(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, WAIT)
