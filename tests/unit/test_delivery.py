"""Delivery decisions with the in-memory store and a scripted client (no I/O)."""

import pytest

from bridge.delivery import MAX_CONFLICTS, Dispatcher
from bridge.metrics import Metrics
from bridge.models import DesiredWrite, Observation, Snapshot
from bridge.platforms import PLATFORMS
from bridge.platforms.base import Outcome, PlatformClient, WriteRequest
from bridge.retry import RetryPolicy
from bridge.store.memory import MemoryStore
from tests.mappings import mapping

MAPPING = mapping(("shoptet", "metakocka"))
T0 = 1_000.0


class ScriptedClient(PlatformClient):
    name = "shoptet"

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        self.sent: list[WriteRequest] = []

    async def read(self, ref: str) -> Snapshot | None:
        raise AssertionError("delivery never reads")

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        raise AssertionError("delivery never reads")

    async def write(self, request: WriteRequest) -> Outcome:
        self.sent.append(request)
        return self.outcomes.pop(0)

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def setup(
    outcomes: list[Outcome], horizon: float = 3600
) -> tuple[Dispatcher, MemoryStore, ScriptedClient, Clock]:
    store = MemoryStore()
    await store.open()
    await store.commit_observation(
        Observation(
            hints=(),
            platform="metakocka",
            ref="400000000001",
            observed_at=T0,
            order_key="2026000042",
            native_status="shipped",
            new_canonical="shipped",
            desired=(DesiredWrite("shoptet", "shipped", "3"),),
        )
    )
    client = ScriptedClient(outcomes)
    clock = Clock()
    dispatcher = Dispatcher(
        store,
        {"shoptet": client},
        {"shoptet": PLATFORMS["shoptet"]},
        MAPPING,
        Metrics(),
        retry=RetryPolicy(base_seconds=1, cap_seconds=10, horizon_seconds=horizon),
        clock=clock,
    )
    return dispatcher, store, client, clock


async def consume_hints(store: MemoryStore, clock: Clock) -> None:
    """What the worker does with the re-read hints, in short."""
    for batch in await store.claim_hints({"shoptet": 10}, clock.now, 1):
        await store.commit_observation(
            Observation(
                hints=(batch.hint,), platform="shoptet", ref=batch.ref, observed_at=clock.now
            )
        )


async def drain(dispatcher: Dispatcher, clock: Clock, steps: int = 20, step: float = 60) -> None:
    for _ in range(steps):
        await dispatcher.deliver_due("shoptet")
        clock.now += step


async def test_done_records_the_write() -> None:
    dispatcher, store, client, _clock = await setup([Outcome("done")])
    assert await dispatcher.deliver_due("shoptet") == 1
    order = await store.load_order("2026000042")
    assert order is not None and order.platforms["shoptet"].last_written == "3"
    assert client.sent[0].native == "3"
    assert client.sent[0].options == MAPPING.target_for("shoptet", "shipped").options
    assert await store.pending_deliveries() == 0


async def test_a_warning_is_audited_but_the_write_counts() -> None:
    dispatcher, store, _, _ = await setup([Outcome("done", warning="document-not-generated: x")])
    await dispatcher.deliver_due("shoptet")
    kinds = [a.kind for a in await store.list_audit("2026000042")]
    assert "write_warning" in kinds and "written" in kinds
    assert await store.pending_deliveries() == 0


@pytest.mark.parametrize("kind", ["retry", "not_found"])
async def test_transient_failures_wait_and_try_again(kind: str) -> None:
    dispatcher, store, client, clock = await setup([Outcome(kind, reason="x"), Outcome("done")])
    await dispatcher.deliver_due("shoptet")
    assert await store.pending_deliveries() == 1
    assert await dispatcher.deliver_due("shoptet") == 0  # not due yet
    due = await store.next_delivery_at("shoptet")
    assert due is not None and T0 < due <= T0 + 1
    clock.now = due
    assert await dispatcher.deliver_due("shoptet") == 1
    assert await store.pending_deliveries() == 0
    assert len(client.sent) == 2


async def test_retry_after_is_obeyed() -> None:
    dispatcher, store, _, _ = await setup([Outcome("retry", reason="429", retry_after=42.0)])
    await dispatcher.deliver_due("shoptet")
    assert await store.next_delivery_at("shoptet") == T0 + 42.0


async def test_a_missing_order_is_made_visible_at_once() -> None:
    dispatcher, store, _, _ = await setup([Outcome("not_found", reason="order-not-found")])
    await dispatcher.deliver_due("shoptet")
    assert "target_missing" in [a.kind for a in await store.list_audit("2026000042")]


async def test_permanent_failures_are_dead_lettered_with_the_reason() -> None:
    dispatcher, store, client, clock = await setup(
        [Outcome("permanent", reason='Invalid statusId "3".')]
    )
    await drain(dispatcher, clock)
    [problem] = await store.list_problems()
    assert problem.kind == "delivery_failed" and "Invalid statusId" in problem.reason
    assert len(client.sent) == 1


async def test_the_horizon_ends_the_retries() -> None:
    dispatcher, store, client, clock = await setup(
        [Outcome("retry", reason="503")] * 100, horizon=300
    )
    await drain(dispatcher, clock)
    [problem] = await store.list_problems()
    assert problem.reason.startswith("gave up after")
    assert 3 <= len(client.sent) <= 7  # every minute, for five minutes


async def test_a_conflict_rereads_the_target_then_writes() -> None:
    dispatcher, store, client, clock = await setup(
        [Outcome("conflict", reason="409"), Outcome("done")]
    )
    await dispatcher.deliver_due("shoptet")
    assert await store.pending_hints("shoptet", "2026000042") == 1  # the re-read is queued
    await drain(dispatcher, clock, steps=2, step=5)
    assert len(client.sent) == 1  # the write waits for the worker to look first
    await consume_hints(store, clock)
    await drain(dispatcher, clock)
    assert await store.pending_deliveries() == 0
    assert len(client.sent) == 2


async def test_conflicts_that_never_end_are_dead_lettered() -> None:
    dispatcher, store, client, clock = await setup([Outcome("conflict", reason="409")] * 10)
    for _ in range(10):
        await dispatcher.deliver_due("shoptet")
        for batch in await store.claim_hints({"shoptet": 10}, clock.now, 1):  # re-reads
            await store.commit_observation(
                Observation(
                    hints=(batch.hint,),
                    platform="shoptet",
                    ref=batch.ref,
                    observed_at=clock.now,
                )
            )
        clock.now += 60
    assert len(client.sent) == MAX_CONFLICTS
    [problem] = await store.list_problems()
    assert "kept changing" in problem.reason


async def test_news_holds_a_write_back_for_a_while_not_for_ever() -> None:
    dispatcher, store, client, clock = await setup([Outcome("done")])
    from bridge.models import NewHint

    await store.add_hints([NewHint("shoptet", "2026000042", "order:update", clock.now)])
    await store.learn_ref("2026000042", "shoptet", "2026000042")
    await drain(dispatcher, clock, steps=5, step=5)
    assert client.sent == []  # 25 s: the worker may still get to it
    await drain(dispatcher, clock, steps=2, step=5)
    assert len(client.sent) == 1  # news left unjudged for 30 s holds nothing back
    assert await store.pending_deliveries() == 0
    [row] = [d for d in [await store.load_order("2026000042")] if d]
    assert row.platforms["shoptet"].last_written == "3"


async def test_news_the_bridge_has_seen_since_holds_nothing_back() -> None:
    dispatcher, store, client, clock = await setup([Outcome("done")])
    from bridge.models import NewHint, Snapshot

    await store.add_hints([NewHint("shoptet", "2026000042", "order:update", clock.now - 1)])
    # A read after that webhook came: what it announced is known already.
    order = await store.load_order("2026000042")
    assert order is not None
    await store.commit_observation(
        Observation(
            hints=(),
            platform="metakocka",
            ref="400000000001",
            observed_at=clock.now,
            order_key="2026000042",
            native_status="shipped",
            expected_version=order.version,
            sightings=(Snapshot("shoptet", "2026000042", "2026000042", "-1"),),
        )
    )
    await dispatcher.deliver_due("shoptet")
    assert len(client.sent) == 1


async def test_news_from_the_target_holds_the_write_back() -> None:
    dispatcher, store, client, _clock = await setup([Outcome("done")])
    from bridge.models import NewHint

    await store.add_hints([NewHint("shoptet", "2026000042", "order:update", T0)])
    await store.learn_ref("2026000042", "shoptet", "2026000042")
    await dispatcher.deliver_due("shoptet")
    assert client.sent == []
    assert await store.pending_deliveries() == 1
