"""The store contract (bridge.store.base): every test runs against MemoryStore and SQLiteStore."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.models import (
    AuditEntry,
    Delivery,
    DesiredWrite,
    HintBatch,
    HintRef,
    NewHint,
    Observation,
    OrderState,
    PlatformState,
    Problem,
)
from bridge.store.base import Store
from bridge.store.memory import MemoryStore
from bridge.store.sqlite import SQLiteStore

T0 = 1_000.0
LEASE = 30.0
MK = "metakocka"
BX = "bitrix24"


def hint(
    ref: str = "A1",
    observed: str | None = None,
    platform: str = "shoptet",
    *,
    at: float = T0,
    order_key: str | None = None,
    by_key: bool = False,
) -> NewHint:
    return NewHint(
        platform=platform,
        ref=ref,
        event="lookup" if by_key else "order:update",
        received_at=at,
        observed=observed,
        order_key=order_key,
        by_key=by_key,
    )


ALL = {"shoptet": 10, MK: 10, BX: 10}


def verdict(
    hints: tuple[HintRef, ...] = (),
    *,
    key: str | None = "A1",
    platform: str = "shoptet",
    ref: str = "A1",
    at: float = T0,
    native: str | None = "paid",
    version: int = 0,
    canonical: str | None = None,
    desired: tuple[DesiredWrite, ...] = (),
    supersede: tuple[str, ...] = (),
    audit: tuple[AuditEntry, ...] = (),
    problems: tuple[Problem, ...] = (),
    follow_up: tuple[NewHint, ...] = (),
) -> Observation:
    return Observation(
        hints=hints,
        platform=platform,
        ref=ref,
        observed_at=at,
        order_key=key,
        native_status=native,
        expected_version=version,
        new_canonical=canonical,
        desired=desired,
        supersede=supersede,
        audit=audit,
        problems=problems,
        follow_up=follow_up,
    )


async def version_of(store: Store, key: str) -> int:
    order = await store.load_order(key)
    return 0 if order is None else order.version


async def desire(
    store: Store, native: str, *, key: str = "A1", target: str = MK, at: float = T0
) -> None:
    """Commit a verdict that wants ``target`` to show ``native`` for order ``key``."""
    want = (DesiredWrite(target, f"c-{native}", native),)
    ok = await store.commit_observation(
        verdict(key=key, ref=key, at=at, version=await version_of(store, key), desired=want)
    )
    assert ok


async def supersede(store: Store, target: str, *, key: str = "A1", at: float = T0) -> None:
    ok = await store.commit_observation(
        verdict(key=key, ref=key, at=at, version=await version_of(store, key), supersede=(target,))
    )
    assert ok


async def claim_one(store: Store, now: float, platform: str = MK) -> Delivery:
    claimed = await store.claim_deliveries(platform, 10, now, LEASE)
    assert len(claimed) == 1, claimed
    return claimed[0]


# -- inbox ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[0], [1], [3, 2], [1, 0, 5]])
async def test_add_hints_counts_every_order_once(store: Store, sizes: list[int]) -> None:
    for size in sizes:
        await store.add_hints([hint(f"R{i}") for i in range(size)])
    assert await store.pending_hints() == max(sizes)


async def test_one_pending_hint_per_order_and_platform_however_much_news(store: Store) -> None:
    await store.add_hints([hint("A1"), hint("B2"), hint("A1")])
    await store.add_hints([hint("C3"), hint("B2"), hint("A1", platform=MK), hint("A1")])

    assert await store.pending_hints() == 4
    assert await store.pending_hints("shoptet", "A1") == 1
    batches = await store.claim_hints(ALL, T0, LEASE)

    assert [(b.platform, b.ref, b.hint.seq, b.observed) for b in batches] == [
        ("shoptet", "A1", 3, None),
        ("shoptet", "B2", 2, None),
        ("shoptet", "C3", 1, None),
        (MK, "A1", 1, None),
    ]
    assert len({b.hint.id for b in batches}) == 4


async def test_claims_take_each_platform_up_to_its_own_limit_oldest_first(store: Store) -> None:
    await store.add_hints([hint("A1", at=T0 + 2), hint("B2", at=T0), hint("C3", at=T0 + 1)])
    await store.add_hints([hint("M1", platform=MK, at=T0), hint("M2", platform=MK, at=T0)])

    first = await store.claim_hints({"shoptet": 2, MK: 1}, T0 + 5, LEASE)
    second = await store.claim_hints({"shoptet": 2}, T0 + 5, LEASE)

    assert [(b.platform, b.ref) for b in first] == [
        ("shoptet", "B2"),
        ("shoptet", "C3"),
        (MK, "M1"),
    ]
    assert [(b.platform, b.ref) for b in second] == [("shoptet", "A1")]
    assert await store.claim_hints({"shoptet": 0, MK: 0}, T0 + 1_000, LEASE) == []
    assert await store.claim_hints({}, T0 + 1_000, LEASE) == []


async def test_a_hint_is_not_due_before_it_arrived(store: Store) -> None:
    await store.add_hints([hint("A1", at=T0 + 10)])
    assert await store.claim_hints(ALL, T0, LEASE) == []
    assert len(await store.claim_hints(ALL, T0 + 10, LEASE)) == 1


@pytest.mark.parametrize(
    ("news", "expected"),
    [
        # (observed, received at) in the order they came
        ([(None, T0), (None, T0 + 1)], (None, None)),
        ([("new", T0), (None, T0 + 1)], (None, None)),  # a webhook after a page: read it
        ([(None, T0), ("paid", T0 + 1)], ("paid", T0 + 1)),  # a page asked for after it
        ([(None, T0 + 5), ("paid", T0 + 1)], (None, None)),  # a page asked for before it
        ([("new", T0), ("paid", T0 + 1)], ("paid", T0 + 1)),
        ([("paid", T0 + 1), ("new", T0)], ("paid", T0 + 1)),  # an older page came late
    ],
)
async def test_the_newest_news_decides_what_was_observed(
    store: Store, news: list[tuple[str | None, float]], expected: tuple[str | None, float | None]
) -> None:
    for seen, at in news:
        await store.add_hints([hint("A1", seen, at=at)])
    [batch] = await store.claim_hints(ALL, T0 + 10, LEASE)
    assert (batch.observed, batch.observed_at) == expected


async def test_a_hint_keeps_the_order_key_its_source_showed(store: Store) -> None:
    await store.add_hints([hint("900", "shipped", MK, order_key="K1")])
    await store.add_hints([hint("900", None, MK, at=T0 + 1)])  # shows no key: keeps K1
    [batch] = await store.claim_hints(ALL, T0 + 1, LEASE)
    assert batch.order_key == "K1"


async def test_a_look_up_is_its_own_hint_and_asking_again_is_no_news(store: Store) -> None:
    await store.add_hints([hint("K1", platform=BX), hint("K1", platform=BX, by_key=True)])
    await store.add_hints([hint("K1", platform=BX, by_key=True, at=T0 + 1)])

    batches = await store.claim_hints(ALL, T0 + 1, LEASE)

    assert sorted((b.by_key, b.hint.seq) for b in batches) == [(False, 1), (True, 1)]


async def test_claimed_hints_are_leased_until_the_lease_runs_out(store: Store) -> None:
    await store.add_hints([hint("A1"), hint("A1")])
    [batch] = await store.claim_hints(ALL, T0, LEASE)

    assert await store.claim_hints(ALL, T0 + LEASE - 0.001, LEASE) == []
    # The worker died: at the end of its lease the same hint goes to the next one.
    assert await store.claim_hints(ALL, T0 + LEASE, LEASE) == [batch]
    assert await store.pending_hints() == 1


async def test_news_during_a_lease_waits_for_it_and_survives_its_commit(store: Store) -> None:
    await store.add_hints([hint("A1")])
    [batch] = await store.claim_hints(ALL, T0, LEASE)
    await store.add_hints([hint("A1", at=T0 + 1), hint("B2", at=T0 + 1)])

    during = await store.claim_hints(ALL, T0 + 1, LEASE)
    assert [b.ref for b in during] == ["B2"]
    # The verdict on the first read cannot have seen the news: the hint stays, due at once.
    assert await store.commit_observation(verdict((batch.hint,), at=T0 + 2))
    [again] = await store.claim_hints(ALL, T0 + 2, LEASE)
    assert (again.ref, again.hint) == ("A1", HintRef(batch.hint.id, 2))
    assert await store.commit_observation(verdict((again.hint,), version=1, at=T0 + 3))
    assert await store.pending_hints("shoptet", "A1") == 0


async def test_release_defers_hints_until_retry_at(store: Store) -> None:
    await store.add_hints([hint("A1"), hint("A1", "paid")])
    [batch] = await store.claim_hints(ALL, T0, LEASE)

    await store.release_hints([batch.hint], T0 + 60)

    assert await store.claim_hints(ALL, T0 + 59, LEASE) == []
    assert await store.claim_hints(ALL, T0 + 60, LEASE) == [batch]


async def test_committing_consumes_exactly_the_given_hints(store: Store) -> None:
    await store.add_hints([hint("A1"), hint("B2")])
    [a, _] = await store.claim_hints(ALL, T0, LEASE)

    assert await store.commit_observation(verdict((a.hint,)))

    assert await store.pending_hints() == 1
    later = await store.claim_hints(ALL, T0 + LEASE, LEASE)
    assert [b.ref for b in later] == ["B2"]


async def test_a_verdict_stores_its_follow_up_hints_with_it(store: Store) -> None:
    look_up = hint("A1", platform=BX, by_key=True, at=T0 + 1)
    assert not await store.commit_observation(verdict(version=7, follow_up=(look_up,)))
    assert await store.pending_hints() == 0  # a stale verdict stores nothing
    assert await store.commit_observation(verdict(follow_up=(look_up,)))
    [batch] = await store.claim_hints(ALL, T0 + 1, LEASE)
    assert (batch.platform, batch.ref, batch.by_key) == (BX, "A1", True)


async def test_news_is_what_came_after_the_bridge_last_saw_the_order(store: Store) -> None:
    assert await store.commit_observation(verdict(key="A1", ref="A1", at=T0 + 5))
    assert await store.commit_observation(verdict(key="B2", ref="B2", at=T0 + 5))
    await store.add_hints(
        [
            hint("A1", at=T0 + 4),  # before the last sighting: judged already
            hint("B2", at=T0 + 6),  # after it: news
            hint("C3", at=T0 + 6),  # an order never seen there: news
            hint("D4", at=T0 + 6, by_key=True),  # a look-up is no news
        ]
    )
    targets = [("A1", "A1"), ("B2", "B2"), ("C3", "C3"), ("D4", "D4"), ("E5", "E5")]

    assert await store.orders_with_news("shoptet", targets, since=0) == {"B2", "C3"}
    assert await store.orders_with_news(MK, targets, since=0) == set()
    # News older than `since` no longer counts.
    assert await store.orders_with_news("shoptet", targets, since=T0 + 6) == set()
    assert await store.orders_with_news("shoptet", [], since=0) == set()


async def test_seen_statuses_tell_what_the_bridge_last_saw_by_ref(store: Store) -> None:
    assert await store.commit_observation(verdict(key="A1", ref="X1", native="2"))
    assert await store.commit_observation(verdict(key="B2", ref="X2", native=None))

    assert await store.seen_statuses("shoptet", ["X1", "X2", "X3"]) == {"X1": "2"}
    assert await store.seen_statuses(MK, ["X1"]) == {}
    assert await store.seen_statuses("shoptet", []) == {}


# -- orders ----------------------------------------------------------------------------------


async def test_unknown_order_and_ref(store: Store) -> None:
    assert await store.load_order("nope") is None
    assert await store.find_order_key("shoptet", "nope") is None


async def test_commit_creates_the_order_and_links_the_ref(store: Store) -> None:
    await store.add_hints([hint("X-1")])
    [batch] = await store.claim_hints(ALL, T0, LEASE)

    ok = await store.commit_observation(
        verdict((batch.hint,), key="A1", ref="X-1", native="2", canonical="paid", at=T0 + 1)
    )

    assert ok
    assert await store.load_order("A1") == OrderState(
        "A1", "paid", 1, {"shoptet": PlatformState("X-1", "2", T0 + 1)}
    )
    assert await store.find_order_key("shoptet", "X-1") == "A1"
    assert await store.pending_hints() == 0


async def test_every_commit_bumps_the_version_and_keeps_canonical_unless_set(
    store: Store,
) -> None:
    assert await store.commit_observation(verdict(canonical="paid", native="2"))
    assert await store.commit_observation(verdict(version=1, native="3", at=T0 + 1))
    assert await store.commit_observation(verdict(version=2, canonical="shipped", at=T0 + 2))

    order = await store.load_order("A1")
    assert order is not None
    assert (order.canonical, order.version) == ("shipped", 3)
    assert order.platforms["shoptet"] == PlatformState("A1", "paid", T0 + 2)


async def test_commit_without_a_native_status_keeps_what_was_last_seen(store: Store) -> None:
    assert await store.commit_observation(verdict(native="2"))
    assert await store.commit_observation(verdict(version=1, native=None, at=T0 + 5))

    order = await store.load_order("A1")
    assert order is not None
    assert order.platforms["shoptet"] == PlatformState("A1", "2", T0)


@pytest.mark.parametrize(("commits_before", "expected_version"), [(0, 1), (1, 0), (1, 2), (2, 1)])
async def test_a_stale_version_changes_nothing(
    store: Store, commits_before: int, expected_version: int
) -> None:
    for version in range(commits_before):
        assert await store.commit_observation(verdict(version=version, canonical="new"))
    await store.add_hints([hint("A1")])
    [batch] = await store.claim_hints(ALL, T0, LEASE)
    before = await store.load_order("A1")

    ok = await store.commit_observation(
        verdict(
            (batch.hint,),
            version=expected_version,
            canonical="paid",
            desired=(DesiredWrite(MK, "paid", "P"),),
            audit=(AuditEntry("A1", "shoptet", "decided", {}, T0),),
            problems=(Problem("unmapped_status", "A1", MK, "no"),),
        )
    )

    assert not ok
    assert await store.load_order("A1") == before
    assert await store.pending_hints() == 1
    assert await store.pending_deliveries() == 0
    assert await store.list_audit() == []
    assert await store.list_problems() == []


async def test_concurrent_commits_each_get_their_own_outcome(store: Store) -> None:
    # Concurrent commits may share a transaction (SQLite's group commit): a conflict in one
    # must undo that one alone, and the others must still land.
    await store.add_hints([hint("A1"), hint("B2"), hint("C3")])
    batches = {b.ref: b for b in await store.claim_hints(ALL, T0, LEASE)}

    outcomes = await asyncio.gather(
        store.commit_observation(verdict((batches["A1"].hint,), canonical="paid")),
        # Stale: A1 is at version 0 until the first one lands, then at 1; never at 5.
        store.commit_observation(verdict(key="A1", version=5, canonical="cancelled")),
        store.commit_observation(
            verdict((batches["B2"].hint,), key="B2", ref="B2", canonical="shipped")
        ),
        store.commit_observation(
            verdict((batches["C3"].hint,), key="C3", ref="C3", canonical="new", native="x")
        ),
    )

    assert outcomes == [True, False, True, True]
    assert await store.pending_hints() == 0
    assert [(o.canonical, o.version) for o in await orders(store, "A1", "B2", "C3")] == [
        ("paid", 1),
        ("shipped", 1),
        ("new", 1),
    ]


async def test_of_two_concurrent_commits_at_one_version_exactly_one_lands(store: Store) -> None:
    first, second = await asyncio.gather(
        store.commit_observation(verdict(canonical="paid", native="2")),
        store.commit_observation(verdict(canonical="cancelled", native="9")),
    )

    assert sorted([first, second]) == [False, True]
    order = await store.load_order("A1")
    assert order is not None
    assert order.version == 1
    assert order.canonical == ("paid" if first else "cancelled")


async def orders(store: Store, *keys: str) -> list[Any]:
    loaded = [await store.load_order(key) for key in keys]
    assert all(order is not None for order in loaded)
    return loaded


async def test_commit_without_an_order_key_records_only_audit_and_problems(
    store: Store,
) -> None:
    await store.add_hints([hint("X-9")])
    [batch] = await store.claim_hints(ALL, T0, LEASE)
    entry = AuditEntry(None, "shoptet", "no_order_key", {"ref": "X-9"}, T0)
    problem = Problem("no_order_key", None, "shoptet", "order has no code", ref="X-9")

    ok = await store.commit_observation(
        verdict((batch.hint,), key=None, ref="X-9", audit=(entry,), problems=(problem,))
    )

    assert ok
    assert await store.pending_hints() == 0
    assert await store.find_order_key("shoptet", "X-9") is None
    assert await store.list_audit() == [entry]
    [stored] = await store.list_problems()
    assert (stored.kind, stored.order_key, stored.ref, stored.created_at) == (
        "no_order_key",
        None,
        "X-9",
        T0,
    )


async def test_a_ref_seen_on_another_order_moves_its_link(store: Store) -> None:
    assert await store.commit_observation(verdict(key="A1", ref="X"))
    assert await store.commit_observation(verdict(key="B2", ref="X", at=T0 + 1))

    assert await store.find_order_key("shoptet", "X") == "B2"
    a1 = await store.load_order("A1")
    assert a1 is not None
    # The old order keeps what it saw; only the link is gone.
    assert a1.platforms["shoptet"] == PlatformState(None, "paid", T0)


async def test_a_new_ref_for_the_same_order_replaces_the_old_one(store: Store) -> None:
    assert await store.commit_observation(verdict(ref="X"))
    assert await store.commit_observation(verdict(ref="Y", version=1))

    assert await store.find_order_key("shoptet", "X") is None
    assert await store.find_order_key("shoptet", "Y") == "A1"


# -- desired writes (outbox) ----------------------------------------------------------------


async def test_a_new_desire_is_pending_and_due_when_observed(store: Store) -> None:
    await desire(store, "P", at=T0)

    assert await store.pending_deliveries() == 1
    assert await store.next_delivery_at(MK) == T0
    assert await store.claim_deliveries(MK, 10, T0 - 0.001, LEASE) == []
    assert await claim_one(store, T0) == Delivery(
        order_key="A1",
        platform=MK,
        canonical="c-P",
        native="P",
        version=1,
        attempts=0,
        first_try_at=T0,
        ref=None,
        last_error=None,
    )


async def test_the_same_native_status_leaves_a_pending_row_alone(store: Store) -> None:
    await desire(store, "P")
    first = await claim_one(store, T0)
    await store.retry_delivery(first, T0 + 100, "timeout", T0 + 1)

    await desire(store, "P", at=T0 + 10)

    assert await store.next_delivery_at(MK) == T0 + 100
    again = await claim_one(store, T0 + 100)
    assert (again.version, again.attempts, again.first_try_at, again.last_error) == (
        1,
        1,
        T0,
        "timeout",
    )


async def test_another_native_status_rearms_the_row(store: Store) -> None:
    await desire(store, "P")
    first = await claim_one(store, T0)
    await store.retry_delivery(first, T0 + 100, "timeout", T0 + 1)

    await desire(store, "Q", at=T0 + 10)

    assert await store.next_delivery_at(MK) == T0 + 10
    assert await claim_one(store, T0 + 10) == Delivery(
        "A1", MK, "c-Q", "Q", version=2, attempts=0, first_try_at=T0 + 10, ref=None
    )


@pytest.mark.parametrize("outcome", ["complete", "fail"])
async def test_a_finished_row_is_rearmed_even_for_the_same_status(
    store: Store, outcome: str
) -> None:
    await desire(store, "P")
    first = await claim_one(store, T0)
    if outcome == "complete":
        await store.complete_delivery(first, T0 + 1)
    else:
        await store.fail_delivery(first, "rejected", T0 + 1)
    assert await store.pending_deliveries() == 0

    await desire(store, "P", at=T0 + 10)

    again = await claim_one(store, T0 + 10)
    assert (again.version, again.attempts, again.last_error) == (2, 0, None)


async def test_a_new_desire_keeps_the_lease_of_the_write_in_flight(store: Store) -> None:
    await desire(store, "P")
    await claim_one(store, T0)

    await desire(store, "Q", at=T0 + 1)

    # No second write for this order and platform while the first is out.
    assert await store.claim_deliveries(MK, 10, T0 + 1, LEASE) == []
    # Claimable once the lease of the write in flight ends, not before.
    assert await store.next_delivery_at(MK) == T0 + LEASE
    later = await claim_one(store, T0 + LEASE)
    assert (later.native, later.version) == ("Q", 2)


Outcome = Callable[[Store, Delivery, float], Awaitable[None]]
OUTCOMES: dict[str, Outcome] = {
    "complete": lambda store, d, now: store.complete_delivery(d, now),
    "retry": lambda store, d, now: store.retry_delivery(d, now + 500, "timeout", now),
    "fail": lambda store, d, now: store.fail_delivery(d, "rejected", now),
}


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
async def test_reporting_a_stale_version_keeps_the_newest_desire(
    store: Store, outcome: str
) -> None:
    await desire(store, "P")
    stale = await claim_one(store, T0)
    await desire(store, "Q", at=T0 + 1)

    await OUTCOMES[outcome](store, stale, T0 + 2)

    assert await store.pending_deliveries(MK) == 1
    assert await store.list_problems() == []
    # The lease is gone, so the newer desire goes out at once.
    assert await claim_one(store, T0 + 2) == Delivery(
        "A1", MK, "c-Q", "Q", version=2, attempts=0, first_try_at=T0 + 1, ref=None
    )


async def test_a_stale_completion_still_records_what_was_written(store: Store) -> None:
    await desire(store, "P")
    stale = await claim_one(store, T0)
    await desire(store, "Q", at=T0 + 1)

    await store.complete_delivery(stale, T0 + 2)

    order = await store.load_order("A1")
    assert order is not None
    assert order.platforms[MK] == PlatformState(None, "P", T0 + 2, "P", T0 + 2)


async def test_supersede_drops_the_pending_write(store: Store) -> None:
    await desire(store, "P")
    await desire(store, "R", target=BX)

    await supersede(store, MK, at=T0 + 1)

    assert await store.pending_deliveries(MK) == 0
    assert await store.pending_deliveries(BX) == 1
    assert await store.next_delivery_at(MK) is None
    assert await store.claim_deliveries(MK, 10, T0 + 1, LEASE) == []


async def test_a_superseded_write_in_flight_reports_back_harmlessly(store: Store) -> None:
    await desire(store, "P")
    in_flight = await claim_one(store, T0)
    await supersede(store, MK, at=T0 + 1)

    await store.fail_delivery(in_flight, "rejected", T0 + 2)
    await store.retry_delivery(in_flight, T0 + 3, "timeout", T0 + 2)

    assert await store.list_problems() == []
    assert await store.pending_deliveries() == 0
    await desire(store, "P", at=T0 + 5)
    again = await claim_one(store, T0 + 5)
    assert (again.native, again.attempts) == ("P", 0)


async def test_supersede_without_a_pending_row_changes_nothing(store: Store) -> None:
    await supersede(store, MK)
    await desire(store, "P")
    done = await claim_one(store, T0)
    await store.complete_delivery(done, T0 + 1)

    await supersede(store, MK, at=T0 + 2)

    assert await store.pending_deliveries() == 0
    order = await store.load_order("A1")
    assert order is not None
    assert order.platforms[MK].last_written == "P"


# -- deliveries -----------------------------------------------------------------------------


async def test_claim_deliveries_takes_the_longest_waiting_due_rows_of_one_platform(
    store: Store,
) -> None:
    await desire(store, "P", key="K1", at=T0 + 2)
    await desire(store, "P", key="K2", at=T0)
    await desire(store, "P", key="K3", at=T0 + 1)
    await desire(store, "P", key="K4", at=T0 + 3)
    await desire(store, "P", key="K5", at=T0, target=BX)

    first = await store.claim_deliveries(MK, 2, T0 + 2.5, LEASE)
    second = await store.claim_deliveries(MK, 10, T0 + 2.5, LEASE)

    assert [d.order_key for d in first] == ["K2", "K3"]
    assert [d.order_key for d in second] == ["K1"]  # K4 is not due yet
    assert [d.order_key for d in await store.claim_deliveries(BX, 10, T0, LEASE)] == ["K5"]


async def test_rows_due_at_the_same_time_go_in_order_of_their_last_change(store: Store) -> None:
    await desire(store, "P", key="K1")
    await desire(store, "P", key="K2")
    k1, k2 = await store.claim_deliveries(MK, 10, T0, LEASE)
    await store.retry_delivery(k1, T0 + 50, "timeout", T0 + 3)
    await store.retry_delivery(k2, T0 + 50, "timeout", T0 + 2)

    first = await store.claim_deliveries(MK, 1, T0 + 50, LEASE)
    both = await store.claim_deliveries(MK, 10, T0 + 50 + LEASE, LEASE)

    assert [d.order_key for d in first] == ["K2"]
    assert [d.order_key for d in both] == ["K2", "K1"]


async def test_a_delivery_lease_expires(store: Store) -> None:
    await desire(store, "P")
    first = await claim_one(store, T0)

    assert await store.claim_deliveries(MK, 10, T0 + LEASE - 0.001, LEASE) == []
    assert await claim_one(store, T0 + LEASE) == first


async def test_a_delivery_carries_the_learned_ref_of_its_target(store: Store) -> None:
    await desire(store, "P", key="K1")
    await desire(store, "P", key="K2")
    await store.learn_ref("K1", MK, "mk-1")
    await store.learn_ref("K2", BX, "bx-2")  # another platform's ref is not ours

    k1, k2 = await store.claim_deliveries(MK, 10, T0, LEASE)

    assert (k1.ref, k2.ref) == ("mk-1", None)


async def test_complete_records_the_write_and_finishes_the_row(store: Store) -> None:
    await store.learn_ref("A1", MK, "mk-1")
    await desire(store, "P")
    delivery = await claim_one(store, T0)
    entry = AuditEntry("A1", MK, "written", {"native": "P", "took": 0.25}, T0 + 1)

    await store.complete_delivery(delivery, T0 + 1, [entry])

    assert await store.pending_deliveries() == 0
    assert await store.next_delivery_at(MK) is None
    assert await store.claim_deliveries(MK, 10, T0 + 1_000, LEASE) == []
    order = await store.load_order("A1")
    assert order is not None
    assert order.platforms[MK] == PlatformState("mk-1", "P", T0 + 1, "P", T0 + 1)
    assert await store.list_audit("A1") == [entry]


async def test_retry_counts_the_attempt_and_waits(store: Store) -> None:
    await desire(store, "P")
    delivery = await claim_one(store, T0)

    await store.retry_delivery(delivery, T0 + 60, "503 from MetaKocka", T0 + 1)

    assert await store.pending_deliveries(MK) == 1
    assert await store.next_delivery_at(MK) == T0 + 60
    assert await store.claim_deliveries(MK, 10, T0 + 59, LEASE) == []
    again = await claim_one(store, T0 + 60)
    assert (again.version, again.attempts, again.first_try_at, again.last_error) == (
        1,
        1,
        T0,
        "503 from MetaKocka",
    )


async def test_fail_dead_letters_the_row_with_a_problem(store: Store) -> None:
    await store.learn_ref("A1", MK, "mk-1")
    await desire(store, "P")
    delivery = await claim_one(store, T0)

    await store.fail_delivery(delivery, "status P does not exist", T0 + 1)

    assert await store.pending_deliveries() == 0
    assert await store.claim_deliveries(MK, 10, T0 + 1_000, LEASE) == []
    [problem] = await store.list_problems()
    assert (
        problem.kind,
        problem.order_key,
        problem.platform,
        problem.reason,
        problem.canonical,
        problem.ref,
        problem.created_at,
    ) == ("delivery_failed", "A1", MK, "status P does not exist", "c-P", "mk-1", T0 + 1)


async def test_next_delivery_at_and_pending_counts(store: Store) -> None:
    assert await store.next_delivery_at(MK) is None
    assert await store.pending_deliveries() == 0
    await desire(store, "P", key="K1", at=T0 + 5)
    await desire(store, "P", key="K2", at=T0 + 2)
    await desire(store, "P", key="K3", at=T0, target=BX)
    await claim_one(store, T0 + 2)  # K2, now leased until T0 + 2 + LEASE

    # A leased row counts from the end of its lease: K1 is the earliest claimable.
    assert await store.next_delivery_at(MK) == T0 + 5
    assert await store.next_delivery_at(BX) == T0
    assert await store.next_delivery_at("shoptet") is None
    assert await store.pending_deliveries() == 3
    assert await store.pending_deliveries(MK) == 2
    assert await store.pending_deliveries("shoptet") == 0


# -- learned refs ---------------------------------------------------------------------------


async def test_learn_ref_links_a_platform_reference(store: Store) -> None:
    await desire(store, "P")
    await store.learn_ref("A1", MK, "mk-1")

    assert await store.find_order_key(MK, "mk-1") == "A1"
    order = await store.load_order("A1")
    assert order is not None
    assert order.platforms[MK] == PlatformState(ref="mk-1")
    assert order.version == 1  # a learned ref is not a verdict


async def test_learn_ref_keeps_what_was_seen_and_written(store: Store) -> None:
    await desire(store, "P")
    await store.complete_delivery(await claim_one(store, T0), T0 + 1)

    await store.learn_ref("A1", MK, "mk-1")

    order = await store.load_order("A1")
    assert order is not None
    assert order.platforms[MK] == PlatformState("mk-1", "P", T0 + 1, "P", T0 + 1)


async def test_learn_ref_moves_the_link_and_replaces_the_old_ref(store: Store) -> None:
    await store.learn_ref("A1", MK, "mk-1")
    await store.learn_ref("B2", MK, "mk-1")
    await store.learn_ref("B2", MK, "mk-2")

    assert await store.find_order_key(MK, "mk-1") is None
    assert await store.find_order_key(MK, "mk-2") == "B2"
    a1 = await store.load_order("A1")
    assert a1 is not None
    assert a1.platforms[MK].ref is None


async def test_learn_ref_before_the_first_verdict(store: Store) -> None:
    await store.learn_ref("A1", MK, "mk-1")

    assert await store.find_order_key(MK, "mk-1") == "A1"
    assert await store.load_order("A1") == OrderState(
        "A1", None, 0, {MK: PlatformState(ref="mk-1")}
    )
    # Still a new order for the worker: version 0.
    assert await store.commit_observation(verdict(canonical="paid", version=0))


# -- problems, watermarks, audit ------------------------------------------------------------


async def test_problems_are_listed_newest_first(store: Store) -> None:
    for i, at in enumerate([T0 + 1, T0, T0 + 1, T0 + 2]):
        problem = Problem("unmapped_status", f"K{i}", "shoptet", f"status {i}", ref=f"R{i}")
        assert await store.commit_observation(verdict(key=None, at=at, problems=(problem,)))

    problems = await store.list_problems()
    limited = await store.list_problems(limit=2)

    assert [p.order_key for p in problems] == ["K3", "K2", "K0", "K1"]
    assert [p.order_key for p in limited] == ["K3", "K2"]
    assert len({p.id for p in problems}) == 4
    assert (problems[0].reason, problems[0].ref, problems[0].canonical) == ("status 3", "R3", None)


async def test_watermarks(store: Store) -> None:
    assert await store.get_watermark("metakocka.orders") is None
    await store.set_watermark("metakocka.orders", "2024-05-01T10:00:00+02:00")
    await store.set_watermark("shoptet.orders", "a")
    await store.set_watermark("metakocka.orders", "2024-05-01T10:05:00+02:00")

    assert await store.get_watermark("metakocka.orders") == "2024-05-01T10:05:00+02:00"
    assert await store.get_watermark("shoptet.orders") == "a"


async def test_audit_is_newest_first_per_order_and_overall(store: Store) -> None:
    def entry(key: str | None, at: float, n: int) -> AuditEntry:
        return AuditEntry(key, "shoptet", "seen", {"n": n}, at)

    # Written out of time order, and with ties: time decides, then the later record.
    batches = [
        (entry("A1", T0 + 2, 0), entry("B2", T0 + 1, 1)),
        (entry("A1", T0 + 1, 2), entry(None, T0 + 3, 3)),
        (entry("A1", T0 + 2, 4),),
    ]
    for audit in batches:
        assert await store.commit_observation(verdict(key=None, audit=audit))

    overall = await store.list_audit()
    a1 = await store.list_audit("A1")

    assert [e.detail["n"] for e in overall] == [3, 4, 0, 2, 1]
    assert [e.detail["n"] for e in a1] == [4, 0, 2]
    assert [e.detail["n"] for e in await store.list_audit(limit=2)] == [3, 4]
    assert await store.list_audit("nobody") == []


async def test_audit_detail_round_trips_as_json(store: Store) -> None:
    detail: dict[str, Any] = {"from": "2", "to": None, "ids": [1, 2], "nested": {"ok": True}}
    entry = AuditEntry("A1", None, "decided", detail, T0)
    assert await store.commit_observation(verdict(audit=(entry,)))

    detail["to"] = "changed after the commit"

    assert await store.list_audit("A1") == [
        AuditEntry("A1", None, "decided", {**detail, "to": None}, T0)
    ]


# -- property: no news lost, none judged twice ------------------------------------------------

REFS = [("shoptet", "A1"), ("shoptet", "B2"), (MK, "A1"), (MK, "9")]

hint_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.lists(st.tuples(st.sampled_from(REFS), st.sampled_from([None, "s1", "s2"]))),
        ),
        st.tuples(st.just("claim"), st.integers(0, 3)),
        st.tuples(st.just("commit"), st.integers(0, 5)),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 10.0, LEASE])),
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=hint_ops)
def test_every_piece_of_news_is_judged_after_it_came(
    store_factory: Callable[[Path], Store], ops: list[tuple[Any, ...]]
) -> None:
    """A model: per order, how many hints came (``news``) and how many of them a claim saw. A
    commit consumes the hint only if no news came after its claim; otherwise it stays."""

    async def scenario(store: Store) -> None:
        now = T0
        news: dict[tuple[str, str], int] = {}
        judged: dict[tuple[str, str], int] = {}  # news covered by a committed verdict
        held: list[tuple[HintBatch, float, int]] = []  # live workers: batch, lease, news seen

        for op, arg in ops:
            if op == "add":
                await store.add_hints(
                    [NewHint(p, r, "order:update", now, seen) for (p, r), seen in arg]
                )
                for ref, _ in arg:
                    news[ref] = news.get(ref, 0) + 1
            elif op == "claim":
                limits = {"shoptet": arg, MK: arg}
                batches = await store.claim_hints(limits, now, LEASE)
                assert all(sum(b.platform == p for b in batches) <= n for p, n in limits.items())
                live = {(b.platform, b.ref) for b, until, _ in held if until > now}
                for batch in batches:
                    key = (batch.platform, batch.ref)
                    assert key not in live, "an order leased to a live worker was handed out"
                    assert news.get(key, 0) > judged.get(key, 0), "nothing new to judge"
                held = [h for h in held if h[1] > now]  # expired holders are dead workers
                held += [(b, now + LEASE, news[(b.platform, b.ref)]) for b in batches]
            elif op in ("commit", "release") and held:
                batch, until, seen = held.pop(arg % len(held))
                if until <= now:
                    continue
                key = (batch.platform, batch.ref)
                if op == "commit":
                    assert await store.commit_observation(
                        verdict((batch.hint,), key=None, ref=batch.ref, platform=batch.platform)
                    )
                    judged[key] = max(judged.get(key, 0), seen)
                else:
                    await store.release_hints([batch.hint], now)
            elif op == "tick":
                now += arg
            waiting = {k for k, n in news.items() if n > judged.get(k, 0)}
            for platform, ref in REFS:
                expected = int((platform, ref) in waiting)
                assert await store.pending_hints(platform, ref) == expected, (platform, ref)

        # Every worker dies; whatever is left is claimed and judged once more.
        now += LEASE
        while batches := await store.claim_hints({"shoptet": 2, MK: 2}, now, LEASE):
            for batch in batches:
                key = (batch.platform, batch.ref)
                assert news[key] > judged.get(key, 0)
                assert await store.commit_observation(
                    verdict((batch.hint,), key=None, ref=batch.ref, platform=batch.platform)
                )
                judged[key] = news[key]
        assert judged == {k: n for k, n in news.items() if n}
        assert await store.pending_hints() == 0

    with tempfile.TemporaryDirectory() as directory:
        store = store_factory(Path(directory))

        async def main() -> None:
            await store.open()
            try:
                await scenario(store)
            finally:
                await store.close()

        asyncio.run(main())


# -- property: the fake and SQLite agree on any sequence of outbox operations ---------------

outbox_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("desire"),
            st.sampled_from(["A1", "B2"]),
            st.sampled_from([MK, BX]),
            st.sampled_from(["P", "Q"]),
        ),
        st.tuples(st.just("supersede"), st.sampled_from(["A1", "B2"]), st.sampled_from([MK, BX])),
        st.tuples(st.just("claim"), st.sampled_from([MK, BX]), st.integers(1, 2)),
        st.tuples(
            st.just("report"), st.sampled_from(["complete", "retry", "fail"]), st.integers(0, 5)
        ),
        st.tuples(st.just("learn"), st.sampled_from(["A1", "B2"]), st.sampled_from(["r1", "r2"])),
        st.tuples(st.just("link"), st.sampled_from(["A1", "B2"]), st.sampled_from(["x", "y"])),
        st.tuples(st.just("tick"), st.sampled_from([1.0, LEASE])),
    ),
    max_size=20,
)


async def apply(store: Store, op: tuple[Any, ...], now: float, held: list[Delivery]) -> Any:
    """Run one operation; return everything it lets us observe."""
    kind = op[0]
    if kind == "desire":
        _, key, target, native = op
        await desire(store, native, key=key, target=target, at=now)
    elif kind == "supersede":
        await supersede(store, op[2], key=op[1], at=now)
    elif kind == "claim":
        claimed = await store.claim_deliveries(op[1], op[2], now, LEASE)
        held.extend(claimed)
        return claimed
    elif kind == "report" and held:
        delivery = held.pop(op[2] % len(held))
        await OUTCOMES[op[1]](store, delivery, now)
    elif kind == "learn":
        await store.learn_ref(op[1], MK, op[2])
    elif kind == "link":
        key = op[1]
        await store.commit_observation(
            verdict(key=key, ref=op[2], version=await version_of(store, key), at=now)
        )
    return None


async def observe(store: Store) -> Any:
    return (
        [await store.load_order(key) for key in ("A1", "B2")],
        [await store.find_order_key(p, r) for p in ("shoptet", MK) for r in ("x", "y", "r1", "r2")],
        [await store.next_delivery_at(p) for p in (MK, BX)],
        await store.pending_deliveries(),
        await store.list_problems(),
        await store.list_audit(),
    )


@settings(max_examples=40, deadline=None)
@given(ops=outbox_ops)
def test_memory_and_sqlite_agree(ops: list[tuple[Any, ...]]) -> None:
    async def main(directory: str) -> None:
        stores: list[Store] = [MemoryStore(), SQLiteStore(str(Path(directory) / "b.sqlite3"))]
        for store in stores:
            await store.open()
        try:
            now = T0
            held: list[list[Delivery]] = [[], []]
            for op in ops:
                if op[0] == "tick":
                    now += op[1]
                    continue
                results = [await apply(s, op, now, h) for s, h in zip(stores, held, strict=True)]
                assert results[0] == results[1], op
                assert await observe(stores[0]) == await observe(stores[1]), op
        finally:
            for store in stores:
                await store.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(main(directory))


# -- additions: pending writes in the order state, per-order hint counts, audit outside commits


async def test_load_order_shows_pending_writes(store: Store) -> None:
    await store.commit_observation(
        verdict(canonical="paid", desired=(DesiredWrite(MK, "paid", "in_progress"),))
    )
    order = await store.load_order("A1")
    assert order is not None and order.pending == {MK: "in_progress"}
    [delivery] = await store.claim_deliveries(MK, 10, T0, LEASE)
    await store.complete_delivery(delivery, T0 + 1)
    order = await store.load_order("A1")
    assert order is not None and order.pending == {}


async def test_pending_hints_for_one_order(store: Store) -> None:
    await store.add_hints([hint("A1"), hint("A1"), hint("B2"), hint("A1", platform=MK)])
    assert await store.pending_hints() == 3
    assert await store.pending_hints("shoptet", "A1") == 1
    assert await store.pending_hints(MK, "A1") == 1
    assert await store.pending_hints("shoptet", "C3") == 0


async def test_a_batch_carries_when_its_observation_was_made(store: Store) -> None:
    await store.add_hints(
        [
            NewHint(MK, "7", "poll", T0, "shipped"),
            NewHint(MK, "7", "poll", T0 + 5, "completed"),
            NewHint(MK, "7", "order:update", T0 + 9, None),
        ]
    )
    [batch] = await store.claim_hints(ALL, T0 + 10, LEASE)
    # The webhook came after the pages: what it announced is unknown, so it is read.
    assert (batch.observed, batch.observed_at) == (None, None)


async def test_a_batch_carries_when_its_newest_page_was_asked_for(store: Store) -> None:
    await store.add_hints(
        [
            NewHint(MK, "7", "order:update", T0, None),
            NewHint(MK, "7", "poll", T0 + 5, "completed"),
            NewHint(MK, "7", "poll", T0 + 3, "shipped"),
        ]
    )
    [batch] = await store.claim_hints(ALL, T0 + 10, LEASE)
    assert (batch.observed, batch.observed_at) == ("completed", T0 + 5)


async def test_record_audit_outside_a_commit(store: Store) -> None:
    entry = AuditEntry("A1", MK, "target_missing", {"native": "shipped"}, T0)
    await store.record_audit([entry])
    assert await store.list_audit("A1") == [entry]


async def test_list_order_keys_pages_in_key_order_and_filters_by_activity(store: Store) -> None:
    for i, key in enumerate(["C3", "A1", "B2", "D4"]):
        await store.commit_observation(verdict(key=key, ref=key, at=T0 + i * 100, canonical="paid"))
    assert await store.list_order_keys() == ["A1", "B2", "C3", "D4"]
    assert await store.list_order_keys(limit=2) == ["A1", "B2"]
    assert await store.list_order_keys(after="B2") == ["C3", "D4"]
    # seen at T0 (C3), T0+100 (A1), T0+200 (B2), T0+300 (D4)
    assert await store.list_order_keys(seen_since=T0 + 150) == ["B2", "D4"]
