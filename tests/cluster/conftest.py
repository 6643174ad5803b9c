"""Shared by the cluster tests: async tests on asyncio, and a clock the test moves."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A clock that stands still until the test sets `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
