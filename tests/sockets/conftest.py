"""Socket tier: real sockets on 127.0.0.1, every asyncio body on both loops (`tests.loops`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.loops import LOOP_FACTORIES, Body, run_guarded


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[[Body], None]:
    """Run a test body on a fresh loop of each kind; fail it if it leaks tasks."""
    factory = LOOP_FACTORIES[request.param]
    return lambda body: run_guarded(factory, body, timeout=60)
