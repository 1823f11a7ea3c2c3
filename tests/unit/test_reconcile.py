"""The sweep with the in-memory store and scripted clients (no I/O)."""

from collections.abc import Sequence

from bridge.models import Observation, Snapshot
from bridge.platforms.base import Outcome, PlatformClient, ReadFailed, WriteRequest
from bridge.reconcile import sweep
from bridge.store.memory import MemoryStore
from tests.mappings import mapping

MAPPING = mapping(("shoptet", "metakocka"))
T0 = 1_000.0


class Showing(PlatformClient):
    """A platform that shows fixed statuses and counts its batch reads."""

    def __init__(self, name: str, shows: dict[str, str]) -> None:
        self.name = name  # type: ignore[misc]
        self.shows = shows
        self.batches = 0

    async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
        self.batches += 1
        return {
            r: Snapshot(self.name, r, r, self.shows[r]) if r in self.shows else None for r in refs
        }

    async def read(self, ref: str) -> Snapshot | None:
        raise AssertionError("the sweep reads in batches")

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        raise AssertionError("the sweep reads known refs")

    async def write(self, request: WriteRequest) -> Outcome:
        raise AssertionError("the sweep never writes itself")

    async def aclose(self) -> None:
        pass


class RacingStore(MemoryStore):
    """The first commit loses a race: the order changes just before it (a poll got there)."""

    def __init__(self) -> None:
        super().__init__()
        self.races = 1

    async def commit_observation(self, observation: Observation) -> bool:
        if self.races and not observation.hints and observation.audit:
            self.races -= 1
            await super().commit_observation(
                Observation(
                    (),
                    "shoptet",
                    "A1",
                    T0,
                    order_key="A1",
                    native_status="2",
                    expected_version=observation.expected_version,
                )
            )
            return False
        return await super().commit_observation(observation)


async def linked(store: MemoryStore, key: str, agreed: str, shoptet: str, mk: str) -> None:
    await store.commit_observation(
        Observation(
            (),
            "shoptet",
            key,
            T0,
            order_key=key,
            native_status=shoptet,
            new_canonical=agreed,
            sightings=(Snapshot("metakocka", key, key, mk),),
        )
    )


async def test_a_lagging_platform_gets_a_repair_and_a_dry_run_changes_nothing() -> None:
    store = MemoryStore()
    await linked(store, "A1", "shipped", "3", "in_progress")
    await linked(store, "B2", "paid", "2", "in_progress")
    clients = {
        "shoptet": Showing("shoptet", {"A1": "3", "B2": "2"}),
        "metakocka": Showing("metakocka", {"A1": "in_progress", "B2": "in_progress"}),
    }
    dry = await sweep(store, clients, MAPPING, dry_run=True)
    assert (dry.checked, len(dry.drifted), dry.repaired) == (2, 1, 0)
    assert await store.pending_deliveries() == 0
    report = await sweep(store, clients, MAPPING)
    assert report.repaired == 1
    order = await store.load_order("A1")
    assert order is not None and order.pending == {"metakocka": "shipped"}
    assert clients["shoptet"].batches == 2  # one batch read per platform and page


async def test_an_order_that_changed_while_read_is_judged_again() -> None:
    store = RacingStore()
    await linked(store, "A1", "shipped", "3", "in_progress")
    clients = {
        "shoptet": Showing("shoptet", {"A1": "3"}),
        "metakocka": Showing("metakocka", {"A1": "in_progress"}),
    }
    report = await sweep(store, clients, MAPPING)
    assert report.repaired == 1
    assert store.races == 0
