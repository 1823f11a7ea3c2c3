import asyncio
from collections.abc import Sequence

import pytest

from bridge.inbox import Inbox
from bridge.models import NewHint
from bridge.store.base import StoreUnavailable
from bridge.store.memory import MemoryStore


class CountingStore(MemoryStore):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.fail = fail

    async def add_hints(self, hints: Sequence[NewHint]) -> None:
        self.calls.append(len(hints))
        await asyncio.sleep(0.01)  # a commit takes a while; others arrive meanwhile
        if self.fail:
            raise OSError("disk full")
        await super().add_hints(hints)


def hint(ref: str) -> NewHint:
    return NewHint("shoptet", ref, "order:update", 0.0)


async def test_a_lone_hint_is_written_at_once() -> None:
    store = CountingStore()
    woken = []
    inbox = Inbox(store, on_stored=lambda: woken.append(1))
    await inbox.add([hint("1")])
    assert store.calls == [1]
    assert await store.pending_hints() == 1
    assert woken == [1]


async def test_concurrent_hints_share_commits() -> None:
    store = CountingStore()
    inbox = Inbox(store)
    await asyncio.gather(*(inbox.add([hint(str(i))]) for i in range(100)))
    assert await store.pending_hints() == 100
    assert sum(store.calls) == 100
    assert len(store.calls) <= 3  # the first alone, then everyone who arrived meanwhile
    assert inbox.batches == len(store.calls)


async def test_a_failed_commit_fails_every_waiter_and_stores_nothing() -> None:
    store = CountingStore(fail=True)
    inbox = Inbox(store)
    results = await asyncio.gather(
        *(inbox.add([hint(str(i))]) for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert await MemoryStore.pending_hints(store) == 0


async def test_the_inbox_recovers_after_a_failure() -> None:
    store = CountingStore(fail=True)
    inbox = Inbox(store)
    with pytest.raises(StoreUnavailable):
        await inbox.add([hint("1")])
    store.fail = False
    await inbox.add([hint("2")])
    assert await store.pending_hints() == 1


async def test_nothing_to_add_touches_nothing() -> None:
    store = CountingStore()
    await Inbox(store).add([])
    assert store.calls == []
