"""Every store test runs once per implementation, so the fake cannot drift from the real thing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.store.base import Store
from bridge.store.memory import MemoryStore
from bridge.store.sqlite import SQLiteStore

StoreFactory = Callable[[Path], Store]

FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda directory: MemoryStore(),
    "sqlite": lambda directory: SQLiteStore(str(directory / "bridge.sqlite3")),
}


@pytest.fixture(params=sorted(FACTORIES))
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds an unopened store of one kind in a given directory (for hypothesis tests, which
    need a fresh store per example)."""
    factory: StoreFactory = FACTORIES[request.param]
    return factory


@pytest.fixture
async def store(store_factory: StoreFactory, tmp_path: Path) -> AsyncIterator[Store]:
    opened = store_factory(tmp_path)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
