"""What only the SQLite store has: a file, a schema version, pragmas, real write failures."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.models import AuditEntry, DesiredWrite, HintRef, NewHint, Observation, Problem
from bridge.store import sqlite as sqlite_module
from bridge.store.base import StoreUnavailable
from bridge.store.sqlite import SchemaTooNew, SQLiteStore

T0 = 1_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "nested" / "bridge.sqlite3"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(str(path), busy_timeout=0.05)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def hints(n: int, ref: str = "A1") -> list[NewHint]:
    return [NewHint("shoptet", ref, "order:update", T0 + i) for i in range(n)]


async def on_store_thread(store: SQLiteStore, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """Reach the store's own connection, on the one thread allowed to touch it."""
    assert store._conn is not None
    return await store._call(fn, store._conn)


def schema(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    conn.close()
    return rows


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    return version


async def test_everything_survives_close_and_reopen(path: Path) -> None:
    first = SQLiteStore(str(path))
    await first.open()
    await first.add_hints(hints(2) + hints(1, "B2"))
    [a1, _] = await first.claim_hints({"shoptet": 10}, T0, 30)
    assert await first.commit_observation(
        Observation(
            hints=(a1.hint,),
            platform="shoptet",
            ref="A1",
            observed_at=T0,
            order_key="A1",
            native_status="2",
            new_canonical="paid",
            desired=(DesiredWrite("metakocka", "paid", "P"),),
            audit=(AuditEntry("A1", "shoptet", "decided", {"to": "paid"}, T0),),
            problems=(Problem("unmapped_status", "A1", "bitrix24", "no stage"),),
        )
    )
    await first.learn_ref("A1", "metakocka", "mk-1")
    await first.set_watermark("metakocka.orders", "w1")
    before = (
        await first.load_order("A1"),
        await first.list_audit(),
        await first.list_problems(),
    )
    await first.close()

    second = SQLiteStore(str(path))
    await second.open()
    try:
        assert (
            await second.load_order("A1"),
            await second.list_audit(),
            await second.list_problems(),
        ) == before
        assert await second.pending_hints() == 1
        assert await second.get_watermark("metakocka.orders") == "w1"
        assert await second.find_order_key("metakocka", "mk-1") == "A1"
        [delivery] = await second.claim_deliveries("metakocka", 10, T0, 30)
        assert (delivery.native, delivery.ref) == ("P", "mk-1")
    finally:
        await second.close()


async def test_open_creates_parent_directories_and_migrates(path: Path) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    await store.close()

    assert user_version(path) == len(sqlite_module._migrations()) >= 1


async def test_migrations_are_idempotent(path: Path) -> None:
    schemas = []
    for i in range(3):
        store = SQLiteStore(str(path))
        await store.open()
        await store.add_hints(hints(1, f"R{i}"))
        await store.close()
        schemas.append(schema(path))

    assert schemas[0] == schemas[1] == schemas[2]

    assert user_version(path) == len(sqlite_module._migrations())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM hints").fetchone() == (3,)
    conn.close()


async def test_connection_pragmas(store: SQLiteStore) -> None:
    def pragmas(conn: sqlite3.Connection) -> dict[str, Any]:
        names = ["journal_mode", "synchronous", "foreign_keys", "busy_timeout"]
        return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

    assert await on_store_thread(store, pragmas) == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "busy_timeout": 50,
    }


async def test_a_newer_schema_is_refused_and_left_untouched(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = schema(path)

    store = SQLiteStore(str(path))
    known = len(sqlite_module._migrations())
    with pytest.raises(
        SchemaTooNew, match=rf"schema version 99.*only knows versions up to {known}"
    ):
        await store.open()
    await store.close()

    assert schema(path) == before
    assert user_version(path) == 99
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


async def test_a_migration_is_all_or_nothing_and_later_ones_apply_on_top(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sqlite_module._migrations()
    store = SQLiteStore(str(path))
    await store.open()
    await store.close()

    broken = "CREATE TABLE extra (a INTEGER);\nSELECT * FROM no_such_table;\n"
    monkeypatch.setattr(sqlite_module, "_migrations", lambda: (*real, broken))
    with pytest.raises(StoreUnavailable, match="no_such_table"):
        await SQLiteStore(str(path)).open()
    assert user_version(path) == len(real)
    assert "extra" not in dict(schema(path))

    fixed = "-- adds a table\nCREATE TABLE extra (a INTEGER);\n-- trailing comment\n"
    monkeypatch.setattr(sqlite_module, "_migrations", lambda: (*real, fixed))
    upgraded = SQLiteStore(str(path))
    await upgraded.open()
    await upgraded.close()
    assert user_version(path) == len(real) + 1
    assert "extra" in dict(schema(path))

    # The bridge that only knows the older schema now refuses the file.
    monkeypatch.setattr(sqlite_module, "_migrations", lambda: real)
    with pytest.raises(SchemaTooNew):
        await SQLiteStore(str(path)).open()


async def test_add_hints_while_another_writer_holds_the_lock(
    store: SQLiteStore, path: Path
) -> None:
    await store.add_hints(hints(1))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked") as raised:
            await store.add_hints(hints(3))
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    finally:
        other.execute("ROLLBACK")
        other.close()

    # The store recovers once the lock is gone, and the failed batch left nothing behind.
    await store.add_hints(hints(1, "B2"))
    assert await store.pending_hints() == 2


async def test_add_hints_on_a_full_disk_stores_none_of_the_batch(store: SQLiteStore) -> None:
    await store.add_hints(hints(1))

    def fill_up(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    await on_store_thread(store, fill_up)

    with pytest.raises(StoreUnavailable, match="full") as raised:
        await store.add_hints(
            [h for i in range(2_000) for h in hints(1, f"A-long-reference-{i}-" * 10)]
        )
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert await store.pending_hints() == 1


async def test_add_hints_after_the_connection_is_gone(store: SQLiteStore) -> None:
    await on_store_thread(store, sqlite3.Connection.close)

    with pytest.raises(StoreUnavailable) as raised:
        await store.add_hints(hints(1))
    assert isinstance(raised.value.__cause__, sqlite3.ProgrammingError)


async def test_concurrent_callers_are_serialised(store: SQLiteStore) -> None:
    await asyncio.gather(*(store.add_hints(hints(3, f"R{i}")) for i in range(50)))

    assert await store.pending_hints() == 50  # one per order, however many came
    batches = await store.claim_hints({"shoptet": 100}, T0 + 2, 30)
    assert sorted(b.ref for b in batches) == sorted(f"R{i}" for i in range(50))
    assert {b.hint.seq for b in batches} == {3}


async def test_storing_hints_goes_ahead_of_queued_calls(store: SQLiteStore) -> None:
    # A webhook's 200 waits for its hints' commit: that must not queue behind the worker.
    gate = threading.Event()

    def count_hints(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM hints").fetchone()[0])

    blocker = asyncio.ensure_future(on_store_thread(store, lambda _conn: gate.wait(5)))
    await asyncio.sleep(0.05)  # the store thread is now inside the blocking call
    queued = [asyncio.ensure_future(on_store_thread(store, count_hints)) for _ in range(5)]
    await asyncio.sleep(0.01)  # all five are in the queue
    stored = asyncio.ensure_future(store.add_hints(hints(1)))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(blocker, stored)

    # Queued first, but every one of them ran after the hint was committed.
    assert await asyncio.gather(*queued) == [1, 1, 1, 1, 1]


def observation(key: str, hints: tuple[HintRef, ...] = ()) -> Observation:
    return Observation(
        hints=hints,
        platform="shoptet",
        ref=key,
        observed_at=T0,
        order_key=key,
        native_status="2",
        new_canonical="paid",
        desired=(DesiredWrite("metakocka", "paid", "P"),),
        audit=(AuditEntry(key, "shoptet", "decided", {"to": "paid"}, T0),),
    )


async def test_a_commit_failing_inside_a_group_is_undone_alone(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.add_hints([h for ref in ("A1", "B2", "C3") for h in hints(1, ref)])
    batches = {b.ref: b for b in await store.claim_hints({"shoptet": 10}, T0, 30)}
    apply = SQLiteStore._apply_observation

    def fail_for_b2(conn: sqlite3.Connection, obs: Observation, audit: list[Any]) -> bool:
        applied = apply(conn, obs, audit)  # B2's rows are written, then it fails
        if obs.order_key == "B2":
            raise sqlite3.IntegrityError("B2 broke")
        return applied

    monkeypatch.setattr(SQLiteStore, "_apply_observation", staticmethod(fail_for_b2))
    gate = threading.Event()
    blocker = asyncio.ensure_future(on_store_thread(store, lambda _conn: gate.wait(5)))
    await asyncio.sleep(0.05)
    # Queued behind the blocker, the three commits go as one group.
    commits = [
        asyncio.ensure_future(store.commit_observation(observation(k, (batches[k].hint,))))
        for k in ("A1", "B2", "C3")
    ]
    await asyncio.sleep(0.05)
    gate.set()
    await blocker
    outcomes = await asyncio.gather(*commits, return_exceptions=True)

    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert await store.load_order("B2") is None
    assert await store.pending_hints("shoptet", "B2") == 1
    assert await store.pending_deliveries() == 2
    assert {e.order_key for e in await store.list_audit()} == {"A1", "C3"}


async def test_claims_skip_the_fsync_and_everything_else_keeps_it(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    levels: list[int] = []
    begin = SQLiteStore._begin

    def spying_begin(self: SQLiteStore) -> sqlite3.Connection:
        levels.append(self._db().execute("PRAGMA synchronous").fetchone()[0])
        return begin(self)

    monkeypatch.setattr(SQLiteStore, "_begin", spying_begin)
    await store.add_hints(hints(1))
    assert len(await store.claim_hints({"shoptet": 10}, T0, 30)) == 1
    await store.claim_deliveries("metakocka", 10, T0, 30)

    # 2 = FULL (a webhook's hint survives a power cut), 1 = NORMAL (a lost lease is harmless).
    assert levels == [2, 1, 1]
    pragma = await on_store_thread(store, lambda c: c.execute("PRAGMA synchronous").fetchone())
    assert pragma[0] == 2


async def test_two_stores_on_one_file_never_claim_the_same_hints(path: Path) -> None:
    # Two connections stand in for two processes sharing the file.
    stores = [SQLiteStore(str(path)), SQLiteStore(str(path))]
    for store in stores:
        await store.open()
    try:
        await stores[0].add_hints([h for i in range(40) for h in hints(2, f"R{i}")])
        claims = await asyncio.gather(
            *(s.claim_hints({"shoptet": 3}, T0 + 1, 30) for _ in range(10) for s in stores)
        )
    finally:
        for store in stores:
            await store.close()

    refs = [b.ref for batches in claims for b in batches]
    assert sorted(refs) == sorted(f"R{i}" for i in range(40))


async def test_calls_before_open_fail_clearly(path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        await SQLiteStore(str(path)).pending_hints()
