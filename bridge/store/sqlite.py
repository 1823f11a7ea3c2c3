"""The embedded store: one SQLite file in WAL mode.

All sqlite3 work runs on one dedicated thread, which owns the connection: the event loop never
blocks on disk, the connection is never shared between threads, and calls are serialised
without a lock. Storing webhooks' hints goes to the head of that thread's queue: a webhook's
200 waits for the one call in progress at most, never for the worker's backlog. Write
transactions start with ``BEGIN IMMEDIATE`` so that another process on the same file makes us
wait (``busy_timeout``) instead of failing half-way through.

The schema lives in ``sql/sqlite/NNN_*.sql``; ``PRAGMA user_version`` records how many of
those files have been applied.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

import orjson

from bridge.groupcommit import GroupCommit
from bridge.models import (
    AuditEntry,
    Delivery,
    HintBatch,
    HintRef,
    NewHint,
    Observation,
    OrderState,
    PlatformState,
    Problem,
    StoredProblem,
)
from bridge.store.base import Store, StoreUnavailable

__all__ = ["SQLiteStore", "SchemaTooNew"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class SchemaTooNew(RuntimeError):
    """The database was written by a newer bridge than this one; refusing to touch it."""


# -- statements ------------------------------------------------------------------------------

# One pending hint per (platform, ref, by_key): news for it is merged in. The newest news
# decides what was observed (a webhook, which shows no status, means "read it"); in DO UPDATE,
# bare column names are the stored row's values.
_ADD_HINT = """
INSERT INTO hints (platform, ref, by_key, event, received_at, observed, observed_at, order_key,
                   due_at)
VALUES (:platform, :ref, :by_key, :event, :at, :observed, :observed_at, :order_key, :at)
ON CONFLICT (platform, ref, by_key) DO UPDATE SET
    -- A look-up asks the same question however often it is asked: no news, no second look.
    seq = seq + 1 - excluded.by_key,
    event = excluded.event,
    observed = CASE WHEN excluded.received_at >= received_at
                    THEN excluded.observed ELSE observed END,
    observed_at = CASE WHEN excluded.received_at >= received_at
                       THEN excluded.observed_at ELSE observed_at END,
    received_at = max(received_at, excluded.received_at),
    order_key = coalesce(excluded.order_key, order_key)
"""

# Through the (platform, due_at) index: the cost is the rows taken, not the rows waiting.
_CLAIM_HINTS = """
UPDATE hints SET due_at = :until
WHERE id IN (
    SELECT id FROM hints WHERE platform = :platform AND due_at <= :now
    ORDER BY due_at, id LIMIT :limit
)
RETURNING id, seq, ref, by_key, observed, observed_at, order_key
"""

_RELEASE_HINT = "UPDATE hints SET due_at = ? WHERE id = ?"
_CONSUME_HINT = "DELETE FROM hints WHERE id = :id AND seq = :seq"
# News merged into the hint while it was judged: it is due again at once.
_REARM_HINT = "UPDATE hints SET due_at = :now WHERE id = :id"
_COUNT_HINTS = "SELECT count(*) FROM hints"
_COUNT_ORDER_HINTS = "SELECT count(*) FROM hints WHERE platform = ? AND ref = ?"
_NEWS_FOR = """
SELECT 1 FROM hints
WHERE platform = :platform AND ref = :ref AND by_key = 0
  AND received_at > :since
  AND received_at > coalesce((SELECT last_seen_at FROM platform_states
                              WHERE order_key = :key AND platform = :platform), -1)
"""
_SEEN_STATUS = (
    "SELECT last_seen FROM platform_states WHERE platform = ? AND ref = ? AND last_seen IS NOT NULL"
)

_FIND_ORDER_KEY = "SELECT order_key FROM platform_states WHERE platform = ? AND ref = ?"
_SELECT_ORDER = "SELECT canonical, version FROM orders WHERE order_key = ?"
_SELECT_ORDER_VERSION = "SELECT version FROM orders WHERE order_key = ?"
_LIST_ORDER_KEYS = """
SELECT order_key FROM orders
WHERE order_key > :after
  AND (:since IS NULL OR EXISTS (
        SELECT 1 FROM platform_states AS s
        WHERE s.order_key = orders.order_key AND s.last_seen_at >= :since))
ORDER BY order_key
LIMIT :limit
"""
_SELECT_PLATFORM_STATES = """
SELECT platform, ref, last_seen, last_seen_at, last_written, last_written_at
FROM platform_states WHERE order_key = ? ORDER BY platform
"""

_UPSERT_ORDER = """
INSERT INTO orders (order_key, canonical, version) VALUES (:key, :canonical, 1)
ON CONFLICT (order_key) DO UPDATE SET
    canonical = coalesce(excluded.canonical, canonical),
    version = version + 1
"""
_ENSURE_ORDER = """
INSERT INTO orders (order_key, canonical, version) VALUES (?, NULL, 0)
ON CONFLICT (order_key) DO NOTHING
"""

# (platform, ref) names one order: whoever held the reference before loses it.
_UNLINK_REF = (
    "UPDATE platform_states SET ref = NULL WHERE platform = :platform AND ref = :ref "
    "AND order_key <> :key"
)
_UPSERT_SEEN = """
INSERT INTO platform_states (order_key, platform, ref, last_seen, last_seen_at)
VALUES (:key, :platform, :ref, :seen, :seen_at)
ON CONFLICT (order_key, platform) DO UPDATE SET
    ref = excluded.ref,
    last_seen = coalesce(excluded.last_seen, last_seen),
    last_seen_at = coalesce(excluded.last_seen_at, last_seen_at)
"""
_SELECT_PENDING_WRITES = (
    "SELECT platform, native FROM deliveries WHERE order_key = ? AND state = 'pending'"
)
_UPSERT_REF = """
INSERT INTO platform_states (order_key, platform, ref) VALUES (:key, :platform, :ref)
ON CONFLICT (order_key, platform) DO UPDATE SET ref = excluded.ref
"""
_UPSERT_WRITTEN = """
INSERT INTO platform_states (order_key, platform, last_seen, last_seen_at, last_written,
                             last_written_at)
VALUES (:key, :platform, :native, :now, :native, :now)
ON CONFLICT (order_key, platform) DO UPDATE SET
    last_seen = excluded.last_seen,
    last_seen_at = excluded.last_seen_at,
    last_written = excluded.last_written,
    last_written_at = excluded.last_written_at
"""

# A pending row for the same native status is left alone (its retry schedule stands); any
# other row is re-armed. lease_until is deliberately not touched: a write in flight keeps its
# lease, so no second write for this order and platform starts until it reports back.
_UPSERT_DESIRED = """
INSERT INTO deliveries (order_key, platform, canonical, native, version, attempts, first_try_at,
                        next_try_at, lease_until, state, last_error, updated_at)
VALUES (:key, :platform, :canonical, :native, 1, 0, :at, :at, NULL, 'pending', NULL, :at)
ON CONFLICT (order_key, platform) DO UPDATE SET
    canonical = excluded.canonical,
    native = excluded.native,
    version = version + 1,
    attempts = 0,
    first_try_at = excluded.first_try_at,
    next_try_at = excluded.next_try_at,
    state = 'pending',
    last_error = NULL,
    updated_at = excluded.updated_at
WHERE NOT (state = 'pending' AND native = excluded.native)
"""
# The version bump makes an in-flight delivery of the superseded row stale, so reporting back
# only clears its lease instead of marking the row done or dead.
_SUPERSEDE = """
UPDATE deliveries SET state = 'superseded', version = version + 1, updated_at = :at
WHERE order_key = :key AND platform = :platform AND state = 'pending'
"""

_CLAIM_DELIVERIES = """
UPDATE deliveries SET lease_until = :until
WHERE (order_key, platform) IN (
    SELECT order_key, platform FROM deliveries
    WHERE platform = :platform AND state = 'pending' AND next_try_at <= :now
      AND (lease_until IS NULL OR lease_until <= :now)
    ORDER BY next_try_at, updated_at, order_key
    LIMIT :limit
)
RETURNING next_try_at, updated_at, order_key, canonical, native, version, attempts,
          first_try_at, last_error,
          (SELECT ref FROM platform_states AS s
           WHERE s.order_key = deliveries.order_key AND s.platform = deliveries.platform)
"""
_COMPLETE = """
UPDATE deliveries SET state = 'done', lease_until = NULL, updated_at = :now
WHERE order_key = :key AND platform = :platform AND version = :version
"""
_RETRY = """
UPDATE deliveries SET attempts = attempts + 1, next_try_at = :next_try_at, last_error = :error,
                      lease_until = NULL, updated_at = :now
WHERE order_key = :key AND platform = :platform AND version = :version
"""
_POSTPONE = """
UPDATE deliveries SET next_try_at = :next_try_at, last_error = :error, lease_until = NULL,
                      updated_at = :now
WHERE order_key = :key AND platform = :platform AND version = :version
"""
_FAIL = """
UPDATE deliveries SET state = 'dead', last_error = :error, lease_until = NULL, updated_at = :now
WHERE order_key = :key AND platform = :platform AND version = :version
"""
_CLEAR_LEASE = (
    "UPDATE deliveries SET lease_until = NULL WHERE order_key = :key AND platform = :platform"
)
# A leased row is not due before its lease ends, whatever its next_try_at says.
_NEXT_DELIVERY_AT = (
    "SELECT min(max(next_try_at, coalesce(lease_until, 0))) FROM deliveries"
    " WHERE platform = ? AND state = 'pending'"
)
_COUNT_PENDING = "SELECT count(*) FROM deliveries WHERE state = 'pending'"
_COUNT_PENDING_FOR = "SELECT count(*) FROM deliveries WHERE state = 'pending' AND platform = ?"

_INSERT_PROBLEM = """
INSERT INTO problems (kind, order_key, platform, ref, canonical, reason, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_LIST_PROBLEMS = """
SELECT id, kind, order_key, platform, reason, canonical, ref, created_at
FROM problems ORDER BY created_at DESC, id DESC LIMIT ?
"""

_GET_WATERMARK = "SELECT value FROM watermarks WHERE name = ?"
_SET_WATERMARK = (
    "INSERT INTO watermarks (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)

_INSERT_AUDIT = "INSERT INTO audit (at, order_key, platform, kind, detail) VALUES (?, ?, ?, ?, ?)"
_LIST_AUDIT = """
SELECT order_key, platform, kind, detail, at FROM audit ORDER BY at DESC, id DESC LIMIT ?
"""
_LIST_AUDIT_FOR = """
SELECT order_key, platform, kind, detail, at FROM audit WHERE order_key = ?
ORDER BY at DESC, id DESC LIMIT ?
"""


# -- migrations ------------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d+)_\w+\.sql$")


@cache
def _migrations() -> tuple[str, ...]:
    """The migration scripts in order; script ``n`` (1-based) brings the schema to version n."""
    found: dict[int, str] = {}
    folder = resources.files("bridge.store") / "sql" / "sqlite"
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in found:
            raise RuntimeError(f"two SQLite migrations numbered {number}")
        found[number] = entry.read_text(encoding="utf-8")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise RuntimeError(f"SQLite migrations must be numbered 1..n without gaps: {sorted(found)}")
    return tuple(found[n] for n in sorted(found))


def _statements(script: str) -> list[str]:
    # executescript() would commit our open transaction first (Python 3.11), so the script is
    # split into complete statements and run one by one inside the migration's transaction.
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    if pending.strip() and not _only_comments(pending):
        raise RuntimeError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return statements


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in text.splitlines())


# -- the store -------------------------------------------------------------------------------


class _StoreThread:
    """The one thread that runs sqlite3 calls: urgent calls first, the rest in order."""

    URGENT, NORMAL, LAST = 0, 1, 2

    def __init__(self) -> None:
        self._jobs: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name="bridge-sqlite", daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((priority, next(self._order), (future, fn, args)))
        return future

    def shutdown(self) -> None:
        """Finish every queued call, then stop."""
        self._jobs.put((self.LAST, next(self._order), None))
        self._thread.join()

    def _run(self) -> None:
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # its caller was cancelled before it started
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)


_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class SQLiteStore(Store):
    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._thread: _StoreThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._observations: GroupCommit[tuple[Observation, list[tuple[Any, ...]]], bool] = (
            GroupCommit(self._commit_observations)
        )

    # -- plumbing ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await self._submit(_StoreThread.NORMAL, fn, *args)

    async def _urgent(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await self._submit(_StoreThread.URGENT, fn, *args)

    async def _submit(self, priority: int, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        if self._thread is None:
            raise RuntimeError("SQLiteStore is not open")
        try:
            result: T = await asyncio.wrap_future(self._thread.submit(priority, fn, args))
        except sqlite3.OperationalError as exc:
            # Locked, read-only, disk full, I/O error: the environment, not the caller.
            raise self._unavailable(exc) from exc
        return result

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite store {self.path}: {exc}")

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("SQLiteStore is not open")
        return self._conn

    def _begin(self) -> sqlite3.Connection:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        return conn

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    # -- life cycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._thread is not None:
            return
        self._thread = _StoreThread()
        try:
            await self._call(self._open)
        except BaseException:
            await self.close()
            raise

    def _open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # what the method says it is.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        self._conn = conn
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        # The version check comes before anything that writes (journal_mode), so a newer
        # database is left exactly as it was.
        self._check_version(conn.execute("PRAGMA user_version").fetchone()[0])
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreUnavailable(f"SQLite store {self.path}: cannot use WAL (got {mode!r})")
        # FULL: a 200 to a webhook promises the hint survives power loss; group commit pays
        # for the extra fsync.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate(conn)

    def _check_version(self, version: int) -> None:
        known = len(_migrations())
        if version > known:
            raise SchemaTooNew(
                f"SQLite store {self.path} has schema version {version}, but this bridge only "
                f"knows versions up to {known}: run a newer bridge, or restore a backup"
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        for number, script in enumerate(_migrations(), start=1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read inside the transaction: another process may have migrated meanwhile.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version >= number:
                    conn.execute("ROLLBACK")
                    continue
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            await asyncio.wrap_future(thread.submit(_StoreThread.NORMAL, self._close, ()))
        finally:
            await asyncio.to_thread(thread.shutdown)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- inbox ------------------------------------------------------------------------------
    async def add_hints(self, hints: Sequence[NewHint]) -> None:
        rows = _hint_rows(hints)
        try:
            await self._urgent(self._add_hints, rows)
        except sqlite3.Error as exc:
            # Whatever went wrong, the webhook must hear 503, never 200-and-drop.
            raise self._unavailable(exc) from exc

    def _add_hints(self, rows: list[dict[str, Any]]) -> None:
        conn = self._begin()
        try:
            conn.executemany(_ADD_HINT, rows)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    async def claim_hints(
        self, limits: Mapping[str, int], now: float, lease_seconds: float
    ) -> list[HintBatch]:
        wanted = {platform: n for platform, n in limits.items() if n > 0}
        if not wanted:
            return []
        rows = await self._call(self._claim_hints, wanted, now, now + lease_seconds)
        batches = [
            HintBatch(
                platform,
                ref,
                HintRef(hint_id, seq),
                observed,
                None if observed_at is None else float(observed_at),
                order_key,
                bool(by_key),
            )
            for platform, (hint_id, seq, ref, by_key, observed, observed_at, order_key) in rows
        ]
        batches.sort(key=lambda batch: batch.hint.id)
        return batches

    def _claim_hints(
        self, limits: dict[str, int], now: float, until: float
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """Every platform's claim in one transaction, without the fsync (see ``_lease``)."""

        def claim() -> list[tuple[str, tuple[Any, ...]]]:
            conn = self._begin()
            try:
                claimed = []
                for platform, limit in limits.items():
                    params = {"platform": platform, "now": now, "until": until, "limit": limit}
                    rows = conn.execute(_CLAIM_HINTS, params)
                    claimed += [(platform, tuple(row)) for row in rows]
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
            return claimed

        return self._without_fsync(claim)

    def _write(self, sql: str, params: dict[str, Any]) -> list[Any]:
        """One statement in its own write transaction, returning its rows (RETURNING)."""
        conn = self._begin()
        try:
            rows = conn.execute(sql, params).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        return rows

    def _lease(self, sql: str, params: dict[str, Any]) -> list[Any]:
        """A claim: ``_write`` without the fsync (see ``_without_fsync``)."""
        return self._without_fsync(lambda: self._write(sql, params))

    def _without_fsync(self, transaction: Callable[[], T]) -> T:
        """A transaction that only takes leases: a lease lost to a power cut costs nothing (the
        work is claimed again), so its commit need not wait for the disk; the next durable
        commit syncs it along."""
        conn = self._db()
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            return transaction()
        finally:
            conn.execute("PRAGMA synchronous = FULL")

    async def release_hints(self, hints: Sequence[HintRef], retry_at: float) -> None:
        await self._call(self._write_many, _RELEASE_HINT, [(retry_at, h.id) for h in hints])

    def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        conn = self._begin()
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    async def pending_hints(self, platform: str | None = None, ref: str | None = None) -> int:
        params: tuple[str, ...] = ()
        sql = _COUNT_HINTS
        if platform is not None and ref is not None:
            sql, params = _COUNT_ORDER_HINTS, (platform, ref)
        count: int = (await self._call(self._read_one, sql, params))[0]
        return count

    async def orders_with_news(
        self, platform: str, targets: Sequence[tuple[str, str]], since: float
    ) -> set[str]:
        if not targets:
            return set()
        return await self._call(self._orders_with_news, platform, list(targets), since)

    def _orders_with_news(
        self, platform: str, targets: list[tuple[str, str]], since: float
    ) -> set[str]:
        conn = self._db()
        news = set()
        for key, ref in targets:
            params = {"platform": platform, "ref": ref, "key": key, "since": since}
            if conn.execute(_NEWS_FOR, params).fetchone():
                news.add(key)
        return news

    async def seen_statuses(self, platform: str, refs: Sequence[str]) -> dict[str, str]:
        if not refs:
            return {}
        return await self._call(self._seen_statuses, platform, list(refs))

    def _seen_statuses(self, platform: str, refs: list[str]) -> dict[str, str]:
        conn = self._db()
        seen = {}
        for ref in refs:
            row = conn.execute(_SEEN_STATUS, (platform, ref)).fetchone()
            if row is not None:
                seen[ref] = row[0]
        return seen

    def _read_one(self, sql: str, params: Sequence[Any]) -> Any:
        return self._db().execute(sql, params).fetchone()

    def _read_all(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self._db().execute(sql, params).fetchall()

    # -- orders -----------------------------------------------------------------------------
    async def find_order_key(self, platform: str, ref: str) -> str | None:
        row = await self._call(self._read_one, _FIND_ORDER_KEY, (platform, ref))
        return None if row is None else str(row[0])

    async def load_order(self, order_key: str) -> OrderState | None:
        return await self._call(self._load_order, order_key)

    def _load_order(self, order_key: str) -> OrderState | None:
        conn = self._db()
        # Two reads must see one snapshot, or a commit in between could pair an old version
        # with new platform states.
        conn.execute("BEGIN")
        try:
            order = conn.execute(_SELECT_ORDER, (order_key,)).fetchone()
            states = conn.execute(_SELECT_PLATFORM_STATES, (order_key,)).fetchall()
            pending = conn.execute(_SELECT_PENDING_WRITES, (order_key,)).fetchall()
        finally:
            conn.execute("COMMIT")
        if order is None:
            return None
        return OrderState(
            order_key=order_key,
            canonical=order[0],
            version=order[1],
            platforms={row[0]: PlatformState(*row[1:]) for row in states},
            pending=dict(pending),
        )

    async def list_order_keys(
        self, after: str | None = None, limit: int = 500, seen_since: float | None = None
    ) -> list[str]:
        params = {"after": after or "", "limit": limit, "since": seen_since}
        rows = await self._call(self._read_named, _LIST_ORDER_KEYS, params)
        return [row[0] for row in rows]

    def _read_named(self, sql: str, params: dict[str, Any]) -> list[Any]:
        return self._db().execute(sql, params).fetchall()

    async def commit_observation(self, observation: Observation) -> bool:
        # Serialised here, on the loop, so a bad detail fails before the transaction starts.
        audit = _audit_rows(observation.audit)
        return await self._observations.submit((observation, audit))

    async def _commit_observations(
        self, items: list[tuple[Observation, list[tuple[Any, ...]]]]
    ) -> list[bool | BaseException]:
        outcomes = await self._call(self._write_observations, items)
        # As _submit does for a whole call: the environment, not the caller.
        return [
            self._unavailable(o) if isinstance(o, sqlite3.OperationalError) else o for o in outcomes
        ]

    def _write_observations(
        self, items: list[tuple[Observation, list[tuple[Any, ...]]]]
    ) -> list[bool | BaseException]:
        """Concurrent observations in one transaction (one fsync), each in its own savepoint:
        one that conflicts or fails is undone alone, and its caller alone hears of it."""
        conn = self._begin()
        outcomes: list[bool | BaseException] = []
        try:
            for obs, audit in items:
                conn.execute("SAVEPOINT observation")
                try:
                    applied = self._apply_observation(conn, obs, audit)
                except Exception as exc:
                    conn.execute("ROLLBACK TO observation")
                    outcomes.append(exc)
                else:
                    if not applied:
                        conn.execute("ROLLBACK TO observation")
                    outcomes.append(applied)
                conn.execute("RELEASE observation")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        return outcomes

    @staticmethod
    def _apply_observation(
        conn: sqlite3.Connection, obs: Observation, audit: list[tuple[Any, ...]]
    ) -> bool:
        key = obs.order_key
        if key is not None:
            row = conn.execute(_SELECT_ORDER_VERSION, (key,)).fetchone()
            if (0 if row is None else row[0]) != obs.expected_version:
                return False
            conn.execute(_UPSERT_ORDER, {"key": key, "canonical": obs.new_canonical})
            sightings = [] if obs.ref is None else [(obs.platform, obs.ref, obs.native_status)]
            sightings += [(s.platform, s.ref, s.native_status) for s in obs.sightings]
            for platform, ref, seen in sightings:
                link = {"key": key, "platform": platform, "ref": ref}
                conn.execute(_UNLINK_REF, link)
                seen_at = None if seen is None else obs.observed_at
                conn.execute(_UPSERT_SEEN, {**link, "seen": seen, "seen_at": seen_at})
            at = obs.observed_at
            if obs.desired:
                conn.executemany(
                    _UPSERT_DESIRED,
                    [
                        {
                            "key": key,
                            "platform": want.platform,
                            "canonical": want.canonical,
                            "native": want.native,
                            "at": at,
                        }
                        for want in obs.desired
                    ],
                )
            if obs.supersede:
                conn.executemany(
                    _SUPERSEDE,
                    [{"key": key, "platform": p, "at": at} for p in obs.supersede],
                )
        if audit:
            conn.executemany(_INSERT_AUDIT, audit)
        if obs.problems:
            conn.executemany(
                _INSERT_PROBLEM, [_problem_row(p, obs.observed_at) for p in obs.problems]
            )
        for hint in obs.hints:
            if conn.execute(_CONSUME_HINT, {"id": hint.id, "seq": hint.seq}).rowcount == 0:
                conn.execute(_REARM_HINT, {"id": hint.id, "now": obs.observed_at})
        if obs.follow_up:
            conn.executemany(_ADD_HINT, _hint_rows(obs.follow_up))
        return True

    # -- outbox -----------------------------------------------------------------------------
    async def claim_deliveries(
        self, platform: str, limit: int, now: float, lease_seconds: float
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        params = {"platform": platform, "now": now, "limit": limit, "until": now + lease_seconds}
        rows = await self._call(self._lease, _CLAIM_DELIVERIES, params)
        rows.sort(key=lambda row: row[:3])  # RETURNING comes in no particular order
        # float(): SQLite 3.40 returns integral REALs as ints from this UPDATE ... RETURNING
        # (the WHERE subquery makes it read through a temporary table without affinity).
        return [
            Delivery(
                order_key=row[2],
                platform=platform,
                canonical=row[3],
                native=row[4],
                version=row[5],
                attempts=row[6],
                first_try_at=float(row[7]),
                last_error=row[8],
                ref=row[9],
            )
            for row in rows
        ]

    async def complete_delivery(
        self, delivery: Delivery, now: float, audit: Sequence[AuditEntry] = ()
    ) -> None:
        await self._call(self._complete_delivery, delivery, now, _audit_rows(audit))

    def _complete_delivery(
        self, delivery: Delivery, now: float, audit: list[tuple[Any, ...]]
    ) -> None:
        conn = self._begin()
        try:
            target = _target(delivery)
            conn.execute(_UPSERT_WRITTEN, {**target, "native": delivery.native, "now": now})
            if conn.execute(_COMPLETE, {**target, "now": now}).rowcount == 0:
                conn.execute(_CLEAR_LEASE, target)
            if audit:
                conn.executemany(_INSERT_AUDIT, audit)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    async def retry_delivery(
        self, delivery: Delivery, next_try_at: float, error: str, now: float
    ) -> None:
        params = {**_target(delivery), "next_try_at": next_try_at, "error": error, "now": now}
        await self._call(self._settle, _RETRY, params, None)

    async def postpone_delivery(
        self, delivery: Delivery, next_try_at: float, reason: str, now: float
    ) -> None:
        params = {**_target(delivery), "next_try_at": next_try_at, "error": reason, "now": now}
        await self._call(self._settle, _POSTPONE, params, None)

    async def fail_delivery(self, delivery: Delivery, reason: str, now: float) -> None:
        problem = Problem(
            kind="delivery_failed",
            order_key=delivery.order_key,
            platform=delivery.platform,
            reason=reason,
            canonical=delivery.canonical,
            ref=delivery.ref,
        )
        params = {**_target(delivery), "error": reason, "now": now}
        await self._call(self._settle, _FAIL, params, _problem_row(problem, now))

    def _settle(self, sql: str, params: dict[str, Any], problem: tuple[Any, ...] | None) -> None:
        """Apply a delivery outcome if the row is still at the delivered version, else only
        drop the lease; record ``problem`` only in the first case."""
        conn = self._begin()
        try:
            if conn.execute(sql, params).rowcount == 0:
                conn.execute(_CLEAR_LEASE, params)
            elif problem is not None:
                conn.execute(_INSERT_PROBLEM, problem)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    async def learn_ref(self, order_key: str, platform: str, ref: str) -> None:
        await self._call(self._learn_ref, {"key": order_key, "platform": platform, "ref": ref})

    def _learn_ref(self, link: dict[str, Any]) -> None:
        conn = self._begin()
        try:
            # The platform state hangs off the order row; a reference may be learned before
            # the first verdict creates it.
            conn.execute(_ENSURE_ORDER, (link["key"],))
            conn.execute(_UNLINK_REF, link)
            conn.execute(_UPSERT_REF, link)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    async def next_delivery_at(self, platform: str) -> float | None:
        at: float | None = (await self._call(self._read_one, _NEXT_DELIVERY_AT, (platform,)))[0]
        return at

    async def pending_deliveries(self, platform: str | None = None) -> int:
        if platform is None:
            row = await self._call(self._read_one, _COUNT_PENDING, ())
        else:
            row = await self._call(self._read_one, _COUNT_PENDING_FOR, (platform,))
        count: int = row[0]
        return count

    # -- problems, watermarks, audit --------------------------------------------------------
    async def list_problems(self, limit: int = 100) -> list[StoredProblem]:
        # max(): SQLite reads a negative LIMIT as "no limit".
        rows = await self._call(self._read_all, _LIST_PROBLEMS, (max(limit, 0),))
        return [StoredProblem(*row) for row in rows]

    async def get_watermark(self, name: str) -> str | None:
        row = await self._call(self._read_one, _GET_WATERMARK, (name,))
        return None if row is None else str(row[0])

    async def set_watermark(self, name: str, value: str) -> None:
        await self._call(self._write_many, _SET_WATERMARK, [(name, value)])

    async def record_audit(self, entries: Sequence[AuditEntry]) -> None:
        if entries:
            await self._call(self._write_many, _INSERT_AUDIT, _audit_rows(entries))

    async def list_audit(self, order_key: str | None = None, limit: int = 100) -> list[AuditEntry]:
        limit = max(limit, 0)
        if order_key is None:
            rows = await self._call(self._read_all, _LIST_AUDIT, (limit,))
        else:
            rows = await self._call(self._read_all, _LIST_AUDIT_FOR, (order_key, limit))
        return [AuditEntry(row[0], row[1], row[2], orjson.loads(row[3]), row[4]) for row in rows]


def _hint_rows(hints: Sequence[NewHint]) -> list[dict[str, Any]]:
    return [
        {
            "platform": h.platform,
            "ref": h.ref,
            "by_key": int(h.by_key),
            "event": h.event,
            "at": h.received_at,
            "observed": h.observed,
            "observed_at": None if h.observed is None else h.received_at,
            "order_key": h.order_key,
        }
        for h in hints
    ]


def _target(delivery: Delivery) -> dict[str, Any]:
    return {"key": delivery.order_key, "platform": delivery.platform, "version": delivery.version}


def _audit_rows(entries: Sequence[AuditEntry]) -> list[tuple[Any, ...]]:
    return [
        (e.at, e.order_key, e.platform, e.kind, orjson.dumps(e.detail).decode()) for e in entries
    ]


def _problem_row(problem: Problem, at: float) -> tuple[Any, ...]:
    return (
        problem.kind,
        problem.order_key,
        problem.platform,
        problem.ref,
        problem.canonical,
        problem.reason,
        at,
    )
