"""The worker's decisions against the in-memory store and scripted platforms (no HTTP)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from bridge.metrics import Metrics
from bridge.models import HintBatch, NewHint, Observation, Snapshot
from bridge.platforms.base import Outcome, PlatformClient, ReadFailed, WriteRequest
from bridge.store.memory import MemoryStore
from bridge.worker import Worker
from tests.mappings import mapping

MAPPING = mapping(("shoptet", "metakocka", "bitrix24"))
NOW = 1_000.0
ALL = {"shoptet": 10, "metakocka": 10, "bitrix24": 10}


class Scripted(PlatformClient):
    """A platform whose orders are a dict: key -> (ref, native status)."""

    def __init__(self, name: str, orders: dict[str, tuple[str, str]] | None = None) -> None:
        self.name = name  # type: ignore[misc]
        self.orders = dict(orders or {})
        self.down = False
        self.reads: list[str] = []
        self.look_ups: list[str] = []

    def _fail(self) -> None:
        if self.down:
            raise ReadFailed(f"{self.name} is down", retry_after=30)

    async def read(self, ref: str) -> Snapshot | None:
        self._fail()
        self.reads.append(ref)
        for key, (r, native) in self.orders.items():
            if r == ref:
                return Snapshot(self.name, ref, key, native)
        return None

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        self._fail()
        self.look_ups.append(order_key)
        found = self.orders.get(order_key)
        return None if found is None else Snapshot(self.name, found[0], order_key, found[1])

    async def read_many_by_key(
        self, keys: Sequence[str]
    ) -> dict[str, Snapshot | ReadFailed | None]:
        return {key: await self.read_by_key(key) for key in keys}

    async def write(self, request: WriteRequest) -> Outcome:
        return Outcome("done")

    async def aclose(self) -> None:
        pass


async def world(
    shoptet: dict[str, tuple[str, str]],
    metakocka: dict[str, tuple[str, str]],
    bitrix24: dict[str, tuple[str, str]],
) -> tuple[Worker, MemoryStore, dict[str, Scripted]]:
    store = MemoryStore()
    await store.open()
    clients = {
        "shoptet": Scripted("shoptet", shoptet),
        "metakocka": Scripted("metakocka", metakocka),
        "bitrix24": Scripted("bitrix24", bitrix24),
    }
    worker = Worker(store, clients, MAPPING, Metrics(), clock=lambda: NOW, read_retry_seconds=5)
    return worker, store, clients


async def work_off(worker: Worker, store: MemoryStore, rounds: int = 5) -> None:
    """Claim and process what is due, a few rounds (look-ups follow their verdicts)."""
    for _ in range(rounds):
        batches: list[HintBatch] = await store.claim_hints(ALL, NOW, 60)
        if not batches:
            return
        for batch in batches:
            await worker.process(batch)


async def test_a_stale_poll_page_changes_nothing_even_where_a_backward_rule_allows_it() -> None:
    # The order is agreed on "shipped"; the bridge read MetaKocka fresh at NOW - 20 (shipped).
    # A poll page asked for at NOW - 30, before a person shipped it, shows "ready_to_ship"
    # (processing). shipped -> processing is an allowed way back, so judged as it stands, the
    # page would drag every platform back to processing, and the next poll forth again.
    worker, store, clients = await world(
        {"K1": ("K1", "3")}, {"K1": ("900", "shipped")}, {"K1": ("7", "S")}
    )
    assert await store.commit_observation(
        Observation(
            hints=(),
            platform="metakocka",
            ref="900",
            observed_at=NOW - 20,
            order_key="K1",
            native_status="shipped",
            new_canonical="shipped",
            sightings=(
                Snapshot("shoptet", "K1", "K1", "3"),
                Snapshot("bitrix24", "7", "K1", "S"),
            ),
        )
    )
    await store.add_hints([NewHint("metakocka", "900", "poll", NOW - 30, "ready_to_ship")])

    await work_off(worker, store)

    order = await store.load_order("K1")
    assert order is not None
    assert order.canonical == "shipped"
    assert order.pending == {}
    assert clients["metakocka"].reads == ["900"]  # it was read again instead of believed


async def test_a_poll_page_newer_than_the_last_sighting_is_judged_without_a_read() -> None:
    worker, store, clients = await world(
        {"K1": ("K1", "3")}, {"K1": ("900", "shipped")}, {"K1": ("7", "S")}
    )
    assert await store.commit_observation(
        Observation(
            hints=(),
            platform="metakocka",
            ref="900",
            observed_at=NOW - 20,
            order_key="K1",
            native_status="shipped",
            new_canonical="shipped",
            sightings=(
                Snapshot("shoptet", "K1", "K1", "3"),
                Snapshot("bitrix24", "7", "K1", "S"),
            ),
        )
    )
    await store.add_hints([NewHint("metakocka", "900", "poll", NOW - 10, "completed")])

    await work_off(worker, store)

    order = await store.load_order("K1")
    assert order is not None and order.canonical == "completed"
    assert order.pending == {"shoptet": "-3", "bitrix24": "F"}
    assert clients["metakocka"].reads == []


async def test_an_unseen_order_is_looked_up_everywhere_and_each_platform_caught_up() -> None:
    worker, store, clients = await world(
        {"K1": ("K1", "2")}, {"K1": ("900", "new_order")}, {"K1": ("7", "N")}
    )
    await store.add_hints([NewHint("shoptet", "K1", "order:update", NOW)])

    await work_off(worker, store, rounds=1)
    order = await store.load_order("K1")
    assert order is not None and order.canonical == "paid"
    assert order.pending == {}  # no write before their status is known
    assert await store.pending_hints() == 2  # the two look-ups

    await work_off(worker, store)
    order = await store.load_order("K1")
    assert order is not None
    assert order.pending == {"metakocka": "in_progress", "bitrix24": "P"}
    assert order.platforms["bitrix24"].ref == "7"  # learned: a write never looks it up again
    assert clients["bitrix24"].look_ups == ["K1"]
    assert [e.kind for e in reversed(await store.list_audit("K1"))] == [
        "advance",
        "catch_up",
        "catch_up",
    ]


async def test_a_platform_that_is_down_holds_back_only_its_own_write() -> None:
    worker, store, clients = await world(
        {"K1": ("K1", "2")}, {"K1": ("900", "new_order")}, {"K1": ("7", "N")}
    )
    clients["bitrix24"].down = True
    await store.add_hints([NewHint("shoptet", "K1", "order:update", NOW)])

    await work_off(worker, store)

    order = await store.load_order("K1")
    assert order is not None
    assert order.pending == {"metakocka": "in_progress"}
    # The look-up on Bitrix24 waits for its retry, not for anything else.
    assert await store.pending_hints("bitrix24", "K1") == 1
    assert await store.claim_hints(ALL, NOW + 4, 60) == []
    [again] = await store.claim_hints(ALL, NOW + 30, 60)
    assert (again.platform, again.by_key) == ("bitrix24", True)


async def test_a_platform_further_along_wins_when_it_is_looked_up() -> None:
    worker, store, _ = await world(
        {"K1": ("K1", "2")}, {"K1": ("900", "shipped")}, {"K1": ("7", "N")}
    )
    await store.add_hints([NewHint("shoptet", "K1", "order:update", NOW)])

    await work_off(worker, store)

    order = await store.load_order("K1")
    assert order is not None and order.canonical == "shipped"
    assert order.pending == {"shoptet": "3", "bitrix24": "S"}


async def test_an_order_missing_on_a_platform_gets_the_agreed_status_written_there() -> None:
    # As a write that finds no order: retried as "not found" until it is imported there.
    worker, store, _ = await world({"K1": ("K1", "2")}, {"K1": ("900", "new_order")}, {})
    await store.add_hints([NewHint("shoptet", "K1", "order:update", NOW)])

    await work_off(worker, store)

    order = await store.load_order("K1")
    assert order is not None
    assert order.pending == {"metakocka": "in_progress", "bitrix24": "P"}
    assert "bitrix24" not in order.platforms or order.platforms["bitrix24"].ref is None
    assert "target_missing" in [e.kind for e in await store.list_audit("K1")]
    # The next news for the order does not look it up again: the write is on its way.
    await store.add_hints([NewHint("shoptet", "K1", "order:update", NOW)])
    await work_off(worker, store)
    assert await store.pending_hints() == 0


async def test_a_poll_page_carrying_the_order_key_needs_no_read() -> None:
    worker, store, clients = await world(
        {"K1": ("K1", "2")}, {"K1": ("900", "in_progress")}, {"K1": ("7", "P")}
    )
    await store.add_hints([NewHint("metakocka", "900", "poll", NOW, "in_progress", "K1")])

    await work_off(worker, store)

    assert clients["metakocka"].reads == []
    order = await store.load_order("K1")
    assert order is not None and order.canonical == "paid"
    assert order.pending == {}


@pytest.mark.parametrize("kind", ["webhook", "poll"])
async def test_news_for_an_order_being_judged_is_judged_again(kind: str) -> None:
    worker, store, clients = await world(
        {"K1": ("K1", "2")}, {"K1": ("900", "in_progress")}, {"K1": ("7", "P")}
    )
    await store.add_hints([NewHint("shoptet", "K1", "order:update", NOW)])
    [batch] = await store.claim_hints(ALL, NOW, 60)
    # While it is read, the order moves on and news of it comes in.
    clients["shoptet"].orders["K1"] = ("K1", "3")
    observed = "3" if kind == "poll" else None
    await store.add_hints([NewHint("shoptet", "K1", kind, NOW, observed)])
    clients["shoptet"].orders["K1"] = ("K1", "2")  # what the first read sees
    await worker.process(batch)
    clients["shoptet"].orders["K1"] = ("K1", "3")

    await work_off(worker, store)

    order = await store.load_order("K1")
    assert order is not None and order.canonical == "shipped"
