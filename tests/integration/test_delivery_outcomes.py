"""Delivery handles every documented answer of the platforms it writes to.

Each Shoptet test starts from an order both platforms agree on, primes the Shoptet simulator
with one outcome, then changes the order in MetaKocka so the bridge has to write to Shoptet.
The MetaKocka tests go the other way (a change in Shoptet written to MetaKocka), with the
poller off so that nothing but the write can meet the primed failure.

The Shoptet simulator is served behind a recorder that notes when each request arrived and
when its answer left (``Timeline``), so the tests can check waits and overlaps from what
really happened on the wire, not from the bridge's own account.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

import bridge.delivery as delivery_module
import bridge.platforms.shoptet as shoptet_module
from bridge.mapping import StatusMapping
from bridge.models import DesiredWrite, Observation
from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread, serve_in_loop
from bridge.sandbox.shoptet import ShoptetSimulator
from bridge.service import Bridge
from bridge.store.sqlite import SQLiteStore
from tests.integration.conftest import (
    MAPPING,
    MK,
    SHOPTET,
    World,
    agreed_on,
    audit_has,
    eventually,
    mapping_with,
    settle,
)

pytestmark = pytest.mark.integration

CODE = "2026000042"
FAST = {"metakocka_poll_interval_seconds": 0.1}


# --- the wire ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """One request as the simulator's side saw it (``time.time()`` values; 0.0: not yet).

    ``start`` is taken after the request arrived and ``end`` before the first byte of the
    answer leaves, so the client sent it before ``start`` and cannot have seen the answer
    before ``end``: a wait measured from ``end`` to the next ``start`` is never overstated,
    and two spans that overlap did overlap.
    """

    method: str
    path: str
    status: int
    start: float
    end: float


class Timeline:
    """Every HTTP request to the simulator behind it, with its arrival and answer times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[Span] = []

    def arrive(self, method: str, path: str) -> Span:
        span = Span(method, path, 0, time.time(), 0.0)
        with self._lock:
            self.spans.append(span)
        return span

    def answer(self, span: Span, status: int) -> None:
        done = Span(span.method, span.path, status, span.start, time.time())
        with self._lock:
            self.spans[next(i for i, s in enumerate(self.spans) if s is span)] = done

    def of(self, method: str | None = None, path: str | None = None) -> list[Span]:
        """The answered requests, in order of arrival."""
        with self._lock:
            spans = sorted((s for s in self.spans if s.end), key=lambda s: s.start)
        return [
            s
            for s in spans
            if (method is None or s.method == method) and (path is None or s.path == path)
        ]

    def max_in_flight(self, spans: list[Span] | None = None) -> int:
        """The most requests that were ever on the simulator's side at one moment."""
        spans = self.of() if spans is None else spans
        # At equal times an answer leaving sorts before a request arriving.
        edges = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans])
        level = peak = 0
        for _, step in edges:
            level += step
            peak = max(peak, level)
        return peak

    def arrived(self, method: str, path: str, *, in_flight: bool = False) -> int:
        """How many such requests have arrived (only those not answered yet: ``in_flight``)."""
        with self._lock:
            return sum(
                1
                for s in self.spans
                if s.method == method and s.path == path and not (in_flight and s.end)
            )


class _Switch:
    """A long-lived server whose app each test plugs in; optionally timing every request."""

    def __init__(self) -> None:
        self.target: Any = None
        self.timeline: Timeline | None = None
        self._idle = Starlette()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or self.target is None:
            await self._idle(scope, receive, send)
            return
        timeline = self.timeline
        if timeline is None or scope["type"] != "http":
            await self.target(scope, receive, send)
            return
        span = timeline.arrive(scope["method"], scope["path"])

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                timeline.answer(span, message["status"])
            await send(message)

        await self.target(scope, receive, recording_send)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[_Switch, str, _Switch, str]]:
    shoptet, metakocka = _Switch(), _Switch()
    with ServerThread(shoptet) as s, ServerThread(metakocka) as m:
        yield shoptet, s.url, metakocka, m.url


@dataclass
class Sims:
    world: World
    timeline: Timeline


MakeSims = Callable[..., Sims]


@pytest.fixture
def make_sims(servers: tuple[_Switch, str, _Switch, str], tmp_path: Path) -> Iterator[MakeSims]:
    """Fresh simulators on this module's servers; Shoptet's keyword arguments may be given."""
    shoptet_switch, shoptet_url, mk_switch, mk_url = servers
    made: list[ShoptetSimulator] = []

    def make(**shoptet_kwargs: Any) -> Sims:
        assert not made, "one world per test"
        kwargs: dict[str, Any] = {"webhook_retry_delay": 0.2, "lock_seconds": 0.05}
        kwargs.update(shoptet_kwargs)
        shoptet = ShoptetSimulator(**kwargs)
        made.append(shoptet)
        metakocka = MetaKockaSimulator()
        timeline = Timeline()
        shoptet_switch.target, shoptet_switch.timeline = shoptet.app, timeline
        mk_switch.target = metakocka.app
        return Sims(World(shoptet, shoptet_url, metakocka, mk_url, tmp_path), timeline)

    try:
        yield make
    finally:
        shoptet_switch.target = shoptet_switch.timeline = mk_switch.target = None
        for shoptet in made:
            shoptet.close()


@pytest.fixture
def sims(make_sims: MakeSims) -> Sims:
    return make_sims()


@contextlib.asynccontextmanager
async def serve(
    world: World,
    *,
    mapping: StatusMapping = MAPPING,
    run_pollers: bool = True,
    register_webhook: bool = True,
    **overrides: Any,
) -> AsyncIterator[Bridge]:
    """A real bridge over real HTTP, Shoptet's order:update webhook pointed at it."""
    bridge = Bridge(
        world.settings(**{**FAST, **overrides}), mapping=mapping, run_pollers=run_pollers
    )
    async with serve_in_loop(bridge.app) as url:
        world.bridge, world.bridge_url = bridge, url
        if register_webhook:
            world.shoptet.register_webhook("order:update", f"{url}/webhooks/shoptet")
        yield bridge


async def agreed_order(world: World, code: str = CODE, canonical: str = "new") -> str:
    """An order both platforms show and the bridge has linked (found by the poller)."""
    mk_id = world.add_order(code, canonical)
    await eventually(lambda: agreed_on(world, code, canonical), what=f"{code} agreed")
    return mk_id


async def agreed_through_shoptet(world: World, code: str = CODE) -> None:
    """With the poller off: the order is linked by a change in Shoptet written to MetaKocka."""
    world.add_order(code, "new")
    world.shoptet.set_status_as_person(code, SHOPTET["paid"])
    await eventually(lambda: world.mk_status(code) == MK["paid"], what="MetaKocka paid")
    await eventually(lambda: agreed_on(world, code, "paid"))
    await settle(world, 0.1)


def patch_statuses(world: World, code: str = CODE) -> list[int]:
    return [r.status for r in world.shoptet_patches(code)]


async def problems(world: World, kind: str = "delivery_failed") -> list[Any]:
    assert world.bridge is not None
    return [p for p in await world.bridge.store.list_problems() if p.kind == kind]


def delivery_row(world: World, code: str, platform: str) -> dict[str, Any]:
    """The outbox row as stored (read-only; the store has no call that shows last_error)."""
    path = world.tmp / "bridge.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT * FROM deliveries WHERE order_key = ? AND platform = ?", (code, platform)
        ).fetchone()
    assert row is not None, f"no delivery row for {code} on {platform}"
    return dict(row)


# --- Shoptet: answers that mean "later" --------------------------------------------------------


async def test_429_waits_for_retry_after_then_writes_once(sims: Sims) -> None:
    world = sims.world
    async with serve(world):
        mk_id = await agreed_order(world)
        world.shoptet.fail_next(1, 429, "PATCH")  # the JSON 429, with Retry-After as an HTTP date
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["shipped"], within=6)
        await settle(world, 0.2)
    assert patch_statuses(world) == [429, 200]
    throttled = world.shoptet_patches(CODE)[0]
    retry_at = email.utils.parsedate_to_datetime(throttled.response_headers["retry-after"])
    _, second = sims.timeline.of("PATCH", f"/api/orders/{CODE}/status")
    assert second.start >= retry_at.timestamp(), "retried before the Retry-After date"


async def test_423_locked_is_retried_after_the_lock_and_succeeds(
    sims: Sims, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shoptet's lock lasts ~5 s and its 423 carries no Retry-After; shorten the bridge's wait.
    monkeypatch.setattr(shoptet_module, "LOCKED_RETRY_SECONDS", 0.3)
    world = sims.world
    async with serve(world):
        mk_id = await agreed_order(world)
        world.shoptet.fail_next(1, 423, "PATCH")
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["shipped"])
        await settle(world, 0.2)
    assert patch_statuses(world) == [423, 200]
    first, second = sims.timeline.of("PATCH", f"/api/orders/{CODE}/status")
    assert second.start - first.end >= 0.3, "retried before the lock could have expired"


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retried_with_backoff_and_succeeds(sims: Sims, status: int) -> None:
    world = sims.world
    async with serve(world):
        mk_id = await agreed_order(world)
        world.shoptet.fail_next(2, status, "PATCH")
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["shipped"])
        await eventually(lambda: audit_has(world, "written", native="3"))
        await settle(world, 0.2)
        assert await audit_has(world, "written", native="3", attempt=3)
        assert await problems(world) == []
    assert patch_statuses(world) == [status, status, 200]
    one, two, three = sims.timeline.of("PATCH", f"/api/orders/{CODE}/status")
    # RetryPolicy(base 0.05 s): the n-th wait is at least half of 0.05 * 2**(n-1).
    assert two.start - one.end >= 0.025
    assert three.start - two.end >= 0.05


async def test_the_retry_horizon_dead_letters_with_gave_up(sims: Sims) -> None:
    world = sims.world
    async with serve(world, retry_horizon_seconds=0.3) as bridge:
        mk_id = await agreed_order(world)
        world.shoptet.set_down(True)
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: problems(world), what="a dead letter")
        [problem] = await problems(world)
        assert problem.order_key == CODE and problem.platform == "shoptet"
        assert problem.canonical == "shipped"
        assert problem.reason.startswith("gave up after ")
        assert "system-maintenance" in problem.reason
        tries = len(world.shoptet_patches(CODE))
        assert tries >= 2  # it did retry before giving up
        assert await bridge.store.pending_deliveries() == 0
        world.shoptet.set_down(False)
        await settle(world, 0.35)
        assert len(world.shoptet_patches(CODE)) == tries  # a dead letter is never tried again
    assert world.shoptet_status(CODE) == SHOPTET["new"]
    assert set(patch_statuses(world)) == {503}


# --- Shoptet: answers that mean "done" ---------------------------------------------------------


async def test_document_not_generated_counts_as_written_with_a_warning(sims: Sims) -> None:
    world = sims.world
    world.shoptet.document_error_statuses = {SHOPTET["shipped"]}  # its delivery note fails
    async with serve(world) as bridge:
        mk_id = await agreed_order(world)
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: audit_has(world, "write_warning"), what="a write warning")
        entry = next(a for a in await bridge.store.list_audit(CODE) if a.kind == "write_warning")
        assert "document-not-generated" in entry.detail["warning"]
        assert await audit_has(world, "written", native="3", attempt=1)
        await settle(world, 0.3)
        assert await bridge.store.pending_deliveries() == 0
        assert await problems(world) == []
    assert patch_statuses(world) == [200]
    [patch] = world.shoptet_patches(CODE)
    assert patch.response_json()["errors"][0]["errorCode"] == "document-not-generated"
    assert world.shoptet_status(CODE) == SHOPTET["shipped"]
    assert world.mk_changes() == []  # the echo of the write is not sent back


# --- Shoptet: answers that need a decision -----------------------------------------------------


async def test_404_order_not_in_shoptet_yet_is_retried_until_it_appears(
    make_sims: MakeSims,
) -> None:
    # Without Shoptet's lock after a write: the quick first retries would meet a 423 instead.
    world = make_sims(lock_seconds=0.0).world
    async with serve(world) as bridge:
        # The order reaches MetaKocka first; Shoptet does not have it (yet).
        world.mk_ids[CODE] = world.metakocka.add_order(CODE, MK["paid"])
        await eventually(lambda: len(world.shoptet_patches(CODE)) >= 3, what="three PATCHes")
        assert set(patch_statuses(world)) == {404}
        # Recorded as a pending delivery that keeps the reason, not dead-lettered.
        row = delivery_row(world, CODE, "shoptet")
        assert row["state"] == "pending"
        assert row["native"] == str(SHOPTET["paid"])
        assert row["attempts"] >= 2
        assert row["last_error"].startswith("order not found: order-not-found")
        assert await problems(world) == []
        assert await bridge.store.pending_deliveries("shoptet") == 1
        # The order arrives in Shoptet: the next retry lands.
        world.shoptet.add_order(CODE, SHOPTET["new"])
        await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["paid"])
        await eventually(lambda: _no_pending(bridge))
    assert patch_statuses(world)[-1] == 200
    assert patch_statuses(world).count(200) == 1


async def _no_pending(bridge: Bridge) -> bool:
    return await bridge.store.pending_deliveries() == 0


async def test_422_unknown_status_is_dead_lettered_without_retries(sims: Sims) -> None:
    world = sims.world
    mapping = mapping_with("shoptet", "shipped", 99)  # no such status in the e-shop
    async with serve(world, mapping=mapping) as bridge:
        mk_id = await agreed_order(world)
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: problems(world), what="a dead letter")
        [problem] = await problems(world)
        assert problem.order_key == CODE and problem.platform == "shoptet"
        assert problem.canonical == "shipped"
        assert "invalid-request-data" in problem.reason
        assert 'Invalid statusId "99"' in problem.reason
        assert not problem.reason.startswith("gave up")  # at once, not at the horizon
        await settle(world, 0.35)
        assert await bridge.store.pending_deliveries() == 0
    assert patch_statuses(world) == [422]
    assert world.shoptet_status(CODE) == SHOPTET["new"]


async def test_409_conflict_rereads_the_order_then_writes(
    sims: Sims, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "CONFLICT_RETRY_SECONDS", 0.3)  # 2 s in production
    world = sims.world
    async with serve(world):
        mk_id = await agreed_order(world)
        reads_before = len(sims.timeline.of("GET", f"/api/orders/{CODE}"))
        world.shoptet.conflict_next(1)
        world.metakocka.set_status_as_person(mk_id, MK["shipped"])
        await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["shipped"])
        await settle(world, 0.2)
    assert patch_statuses(world) == [409, 200]
    conflict, write = sims.timeline.of("PATCH", f"/api/orders/{CODE}/status")
    rereads = [
        s
        for s in sims.timeline.of("GET", f"/api/orders/{CODE}")[reads_before:]
        if conflict.end <= s.start and s.end <= write.start
    ]
    assert rereads, "the order was not read again between the 409 and the next write"


# --- MetaKocka ---------------------------------------------------------------------------------


async def test_metakocka_quota_exceeded_is_retried(sims: Sims) -> None:
    world = sims.world
    async with serve(world, run_pollers=False):
        await agreed_through_shoptet(world)
        world.metakocka.fail_next(1, "5", "Quote exceeds")
        world.shoptet.set_status_as_person(CODE, SHOPTET["processing"])
        await eventually(lambda: world.mk_status(CODE) == MK["processing"])
        await settle(world, 0.2)
        assert await problems(world) == []
    calls = world.mk_changes(CODE, succeeded=False)
    assert [(c.body["status_code"], c.answer["opr_code"]) for c in calls] == [
        (MK["paid"], "0"),
        (MK["processing"], "5"),
        (MK["processing"], "0"),
    ]


async def test_metakocka_unknown_status_is_dead_lettered(sims: Sims) -> None:
    world = sims.world
    mapping = mapping_with("metakocka", "processing", "bogus_status")
    async with serve(world, mapping=mapping, run_pollers=False) as bridge:
        await agreed_through_shoptet(world)
        world.shoptet.set_status_as_person(CODE, SHOPTET["processing"])
        await eventually(lambda: problems(world), what="a dead letter")
        [problem] = await problems(world)
        assert problem.platform == "metakocka" and problem.canonical == "processing"
        assert "Dinamični šifrant" in problem.reason
        await settle(world, 0.35)
        assert await bridge.store.pending_deliveries() == 0
    refused = [c for c in world.mk_changes(CODE, succeeded=False) if c.answer["opr_code"] != "0"]
    assert [(c.body["status_code"], c.answer["opr_code"]) for c in refused] == [
        ("bogus_status", "1")
    ]
    assert world.mk_status(CODE) == MK["paid"]


async def test_metakocka_unknown_status_named_like_a_transient_error_is_dead_lettered(
    sims: Sims,
) -> None:
    world = sims.world
    mapping = mapping_with("metakocka", "processing", "blocked")
    async with serve(world, mapping=mapping, run_pollers=False):
        await agreed_through_shoptet(world)
        world.shoptet.set_status_as_person(CODE, SHOPTET["processing"])

        def attempts() -> int:
            return len(world.mk_changes(CODE, succeeded=False))

        # Either outcome shows quickly: a dead letter, or a second attempt.
        await eventually(
            lambda: _either(problems(world), lambda: attempts() >= 3), what="an outcome"
        )
        assert await problems(world), "retried instead of dead-lettered"
        assert attempts() == 2  # the first write (paid) and the refused one


async def _either(first: Any, second: Callable[[], bool]) -> bool:
    return bool(await first) or second()


# --- limits ------------------------------------------------------------------------------------


async def test_shoptet_never_gets_more_than_3_requests_at_once(sims: Sims) -> None:
    world = sims.world
    codes = [f"20260002{i:02d}" for i in range(9)]
    async with serve(world):
        for code in codes:
            world.add_order(code)
        for code in codes:
            await eventually(lambda code=code: agreed_on(world, code, "new"))
        world.shoptet.set_latency(0.1)
        for code in codes:  # nine changes in one poll
            world.metakocka.set_status_as_person(world.mk_ids[code], MK["shipped"])
        for code in codes:
            await eventually(
                lambda code=code: world.shoptet_status(code) == SHOPTET["shipped"], within=15
            )
        await settle(world, 0.2)
    assert world.shoptet.throttled_count == 0
    assert 429 not in {r.status for r in world.shoptet.requests}
    assert sims.timeline.max_in_flight() == 3  # uses its three connections, never a fourth
    assert len(world.shoptet_patches()) == 9


async def test_never_two_writes_for_one_order_at_once(make_sims: MakeSims) -> None:
    """Two bridges on one store (a second instance during a deploy): only the store's lease
    keeps them from writing one order at once, since each dispatcher alone is sequential."""
    # No lock after a write: the simulator answers 423 only to a write overlapping another.
    sims = make_sims(lock_seconds=0.0)
    world = sims.world
    path = f"/api/orders/{CODE}/status"
    async with serve(world) as first, serve(world, register_webhook=False) as second:
        assert first.store is not second.store
        mk_id = await agreed_order(world)
        world.shoptet.set_latency(0.2)
        for canonical in ("paid", "processing", "shipped"):
            # Each change is made while a write of the one before is on the wire.
            sent = sims.timeline.arrived("PATCH", path)
            world.metakocka.set_status_as_person(mk_id, MK[canonical])
            if canonical != "shipped":
                await eventually(
                    lambda sent=sent: (
                        sims.timeline.arrived("PATCH", path) > sent
                        and sims.timeline.arrived("PATCH", path, in_flight=True) > 0
                    ),
                    within=3,
                    what=f"the write of {canonical} to be in flight",
                )
        await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["shipped"], within=6)
        await settle(world, 0.2)
    writes = sims.timeline.of("PATCH", path)
    assert len(writes) == 3
    assert sims.timeline.max_in_flight(writes) == 1, writes
    assert 423 not in patch_statuses(world)
    assert patch_statuses(world)[-1] == 200


async def test_a_write_leased_elsewhere_does_not_make_delivery_spin(sims: Sims) -> None:
    world = sims.world
    world.add_order(CODE)
    # Another instance decided a write and claimed it, then died with the lease held.
    other = SQLiteStore(str(world.tmp / "bridge.sqlite3"))
    await other.open()
    try:
        now = time.time()
        desired = (DesiredWrite("shoptet", "shipped", str(SHOPTET["shipped"])),)
        assert await other.commit_observation(
            Observation(
                hints=(),
                platform="metakocka",
                ref=world.mk_ids[CODE],
                observed_at=now,
                order_key=CODE,
                native_status=MK["shipped"],
                new_canonical="shipped",
                desired=desired,
            )
        )
        assert len(await other.claim_deliveries("shoptet", 1, now, 120.0)) == 1
    finally:
        await other.close()
    async with serve(world, run_pollers=False) as bridge:
        claims = 0
        claim = bridge.store.claim_deliveries

        async def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal claims
            claims += 1
            return await claim(*args, **kwargs)

        bridge.store.claim_deliveries = counting  # type: ignore[method-assign]
        await asyncio.sleep(0.5)  # a measuring window: ~10 idle checks of 0.05 s are expected
    assert world.shoptet_patches() == []  # the lease is respected...
    assert claims <= 40, f"{claims} claims in 0.5 s"  # ...but it must be waited for calmly
