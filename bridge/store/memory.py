"""An in-memory store for unit tests: the same contract as SQLite, nothing durable.

Every method runs to completion without awaiting, so on one event loop each call is atomic,
which is what the transactions of the real stores give. A method validates (and serialises
audit details) before it changes anything, so a failing call changes nothing either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

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
from bridge.store.base import Store

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Hint:
    id: int
    received_at: float  # the newest news merged in
    observed: str | None
    observed_at: float | None
    order_key: str | None
    due_at: float  # claimable from; while leased, the lease's end
    seq: int = 1


@dataclass(slots=True)
class _Order:
    canonical: str | None
    version: int
    platforms: dict[str, PlatformState] = field(default_factory=dict)


@dataclass(slots=True)
class _Row:
    canonical: str
    native: str
    version: int
    attempts: int
    first_try_at: float
    next_try_at: float
    lease_until: float | None
    state: str
    last_error: str | None
    updated_at: float


def _copy_detail(detail: dict[str, Any]) -> bytes:
    # Stored serialised, as the SQL stores do: the caller's dict may change later, and a
    # detail that cannot be serialised must fail here as it would there.
    return orjson.dumps(detail)


class MemoryStore(Store):
    def __init__(self) -> None:
        self._hints: dict[tuple[str, str, bool], _Hint] = {}  # (platform, ref, by_key)
        self._next_hint_id = 1
        self._orders: dict[str, _Order] = {}
        self._links: dict[tuple[str, str], str] = {}  # (platform, ref) -> order_key
        self._rows: dict[tuple[str, str], _Row] = {}  # (order_key, platform) -> desired write
        self._problems: list[StoredProblem] = []
        self._watermarks: dict[str, str] = {}
        self._audit: list[tuple[float, int, AuditEntry, bytes]] = []

    # -- life cycle -------------------------------------------------------------------------
    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # -- inbox ------------------------------------------------------------------------------
    async def add_hints(self, hints: Sequence[NewHint]) -> None:
        for hint in hints:
            self._add_hint(hint)

    def _add_hint(self, hint: NewHint) -> None:
        key = (hint.platform, hint.ref, hint.by_key)
        observed_at = hint.received_at if hint.observed is not None else None
        row = self._hints.get(key)
        if row is None:
            self._hints[key] = _Hint(
                self._next_hint_id,
                hint.received_at,
                hint.observed,
                observed_at,
                hint.order_key,
                hint.received_at,
            )
            self._next_hint_id += 1
            return
        if not hint.by_key:  # a look-up asks the same question however often it is asked
            row.seq += 1
        if hint.received_at >= row.received_at:
            row.observed, row.observed_at = hint.observed, observed_at
            row.received_at = hint.received_at
        if hint.order_key is not None:
            row.order_key = hint.order_key

    async def claim_hints(
        self, limits: Mapping[str, int], now: float, lease_seconds: float
    ) -> list[HintBatch]:
        batches: list[HintBatch] = []
        for platform, limit in limits.items():
            due = sorted(
                (row.due_at, row.id, key)
                for key, row in self._hints.items()
                if key[0] == platform and row.due_at <= now
            )
            for _, _, key in due[: max(limit, 0)]:
                row = self._hints[key]
                row.due_at = now + lease_seconds
                batches.append(
                    HintBatch(
                        platform,
                        key[1],
                        HintRef(row.id, row.seq),
                        row.observed,
                        row.observed_at,
                        row.order_key,
                        key[2],
                    )
                )
        return batches

    def _hint_by_id(self, hint_id: int) -> tuple[tuple[str, str, bool], _Hint] | None:
        for key, row in self._hints.items():
            if row.id == hint_id:
                return key, row
        return None

    async def release_hints(self, hints: Sequence[HintRef], retry_at: float) -> None:
        for hint in hints:
            found = self._hint_by_id(hint.id)
            if found is not None:
                found[1].due_at = retry_at

    async def pending_hints(self, platform: str | None = None, ref: str | None = None) -> int:
        if platform is None or ref is None:
            return len(self._hints)
        return sum(1 for key in self._hints if key[0] == platform and key[1] == ref)

    async def orders_with_news(
        self, platform: str, targets: Sequence[tuple[str, str]], since: float
    ) -> set[str]:
        news = set()
        for order_key, ref in targets:
            row = self._hints.get((platform, ref, False))
            if row is None:
                continue
            order = self._orders.get(order_key)
            state = order.platforms.get(platform) if order else None
            seen_at = state.last_seen_at if state and state.last_seen_at is not None else -1.0
            if row.received_at > max(seen_at, since):
                news.add(order_key)
        return news

    async def seen_statuses(self, platform: str, refs: Sequence[str]) -> dict[str, str]:
        seen = {}
        for ref in refs:
            order_key = self._links.get((platform, ref))
            state = self._orders[order_key].platforms.get(platform) if order_key else None
            if state is not None and state.last_seen is not None:
                seen[ref] = state.last_seen
        return seen

    # -- orders -----------------------------------------------------------------------------
    async def find_order_key(self, platform: str, ref: str) -> str | None:
        return self._links.get((platform, ref))

    async def load_order(self, order_key: str) -> OrderState | None:
        order = self._orders.get(order_key)
        if order is None:
            return None
        pending = {
            platform: row.native
            for (key, platform), row in self._rows.items()
            if key == order_key and row.state == "pending"
        }
        return OrderState(order_key, order.canonical, order.version, dict(order.platforms), pending)

    async def list_order_keys(
        self, after: str | None = None, limit: int = 500, seen_since: float | None = None
    ) -> list[str]:
        keys = []
        for key in sorted(self._orders):
            if after is not None and key <= after:
                continue
            order = self._orders[key]
            if seen_since is not None and not any(
                (state.last_seen_at or 0.0) >= seen_since for state in order.platforms.values()
            ):
                continue
            keys.append(key)
            if len(keys) >= limit:
                break
        return keys

    async def commit_observation(self, observation: Observation) -> bool:
        obs = observation
        key = obs.order_key
        audit = [(entry, _copy_detail(entry.detail)) for entry in obs.audit]
        if key is not None:
            order = self._orders.get(key)
            if (order.version if order else 0) != obs.expected_version:
                return False
            if order is None:
                order = self._orders[key] = _Order(None, 0)
            if obs.new_canonical is not None:
                order.canonical = obs.new_canonical
            order.version += 1

            seen = [] if obs.ref is None else [(obs.platform, obs.ref, obs.native_status)]
            seen += [(s.platform, s.ref, s.native_status) for s in obs.sightings]
            for platform, ref, native in seen:
                self._link(key, platform, ref)
                old = order.platforms.get(platform, PlatformState())
                order.platforms[platform] = PlatformState(
                    ref=ref,
                    last_seen=native if native is not None else old.last_seen,
                    last_seen_at=obs.observed_at if native is not None else old.last_seen_at,
                    last_written=old.last_written,
                    last_written_at=old.last_written_at,
                )

            at = obs.observed_at
            for want in obs.desired:
                row = self._rows.get((key, want.platform))
                if row is None:
                    self._rows[(key, want.platform)] = _Row(
                        want.canonical, want.native, 1, 0, at, at, None, "pending", None, at
                    )
                elif not (row.state == "pending" and row.native == want.native):
                    row.canonical, row.native = want.canonical, want.native
                    row.version += 1
                    row.attempts = 0
                    row.first_try_at = row.next_try_at = row.updated_at = at
                    row.state = "pending"
                    row.last_error = None
            for platform in obs.supersede:
                row = self._rows.get((key, platform))
                if row is not None and row.state == "pending":
                    row.state = "superseded"
                    row.version += 1
                    row.updated_at = at

        self._record_audit(audit)
        for problem in obs.problems:
            self._record_problem(problem, obs.observed_at)
        for hint in obs.hints:
            found = self._hint_by_id(hint.id)
            if found is None:
                continue
            if found[1].seq == hint.seq:
                del self._hints[found[0]]
            else:  # news merged in while it was judged: look again
                found[1].due_at = obs.observed_at
        for follow_up in obs.follow_up:
            self._add_hint(follow_up)
        return True

    # -- outbox -----------------------------------------------------------------------------
    async def claim_deliveries(
        self, platform: str, limit: int, now: float, lease_seconds: float
    ) -> list[Delivery]:
        due = sorted(
            (
                (row.next_try_at, row.updated_at, key[0], row)
                for key, row in self._rows.items()
                if key[1] == platform
                and row.state == "pending"
                and row.next_try_at <= now
                and (row.lease_until is None or row.lease_until <= now)
            ),
            key=lambda item: item[:3],
        )
        claimed = []
        for _, _, order_key, row in due[: max(limit, 0)]:
            row.lease_until = now + lease_seconds
            state = self._orders[order_key].platforms.get(platform)
            claimed.append(
                Delivery(
                    order_key=order_key,
                    platform=platform,
                    canonical=row.canonical,
                    native=row.native,
                    version=row.version,
                    attempts=row.attempts,
                    first_try_at=row.first_try_at,
                    ref=state.ref if state else None,
                    last_error=row.last_error,
                )
            )
        return claimed

    async def complete_delivery(
        self, delivery: Delivery, now: float, audit: Sequence[AuditEntry] = ()
    ) -> None:
        entries = [(entry, _copy_detail(entry.detail)) for entry in audit]
        order = self._orders[delivery.order_key]
        old = order.platforms.get(delivery.platform, PlatformState())
        order.platforms[delivery.platform] = PlatformState(
            old.ref, delivery.native, now, delivery.native, now
        )
        row = self._rows.get((delivery.order_key, delivery.platform))
        if row is not None:
            row.lease_until = None
            if row.version == delivery.version:
                row.state = "done"
                row.updated_at = now
        self._record_audit(entries)

    async def retry_delivery(
        self, delivery: Delivery, next_try_at: float, error: str, now: float
    ) -> None:
        row = self._rows.get((delivery.order_key, delivery.platform))
        if row is None:
            return
        row.lease_until = None
        if row.version == delivery.version:
            row.attempts += 1
            row.next_try_at = next_try_at
            row.last_error = error
            row.updated_at = now

    async def postpone_delivery(
        self, delivery: Delivery, next_try_at: float, reason: str, now: float
    ) -> None:
        row = self._rows.get((delivery.order_key, delivery.platform))
        if row is None:
            return
        row.lease_until = None
        if row.version == delivery.version:
            row.next_try_at = next_try_at
            row.last_error = reason
            row.updated_at = now

    async def fail_delivery(self, delivery: Delivery, reason: str, now: float) -> None:
        row = self._rows.get((delivery.order_key, delivery.platform))
        if row is None:
            return
        row.lease_until = None
        if row.version == delivery.version:
            row.state = "dead"
            row.last_error = reason
            row.updated_at = now
            self._record_problem(
                Problem(
                    kind="delivery_failed",
                    order_key=delivery.order_key,
                    platform=delivery.platform,
                    reason=reason,
                    canonical=delivery.canonical,
                    ref=delivery.ref,
                ),
                now,
            )

    async def learn_ref(self, order_key: str, platform: str, ref: str) -> None:
        order = self._orders.setdefault(order_key, _Order(None, 0))
        self._link(order_key, platform, ref)
        old = order.platforms.get(platform, PlatformState())
        order.platforms[platform] = PlatformState(
            ref, old.last_seen, old.last_seen_at, old.last_written, old.last_written_at
        )

    async def next_delivery_at(self, platform: str) -> float | None:
        due = [
            max(row.next_try_at, row.lease_until or 0.0)
            for key, row in self._rows.items()
            if key[1] == platform and row.state == "pending"
        ]
        return min(due, default=None)

    async def pending_deliveries(self, platform: str | None = None) -> int:
        return sum(
            1
            for key, row in self._rows.items()
            if row.state == "pending" and (platform is None or key[1] == platform)
        )

    # -- problems, watermarks, audit --------------------------------------------------------
    async def list_problems(self, limit: int = 100) -> list[StoredProblem]:
        newest = sorted(self._problems, key=lambda p: (p.created_at, p.id), reverse=True)
        return newest[: max(limit, 0)]

    async def get_watermark(self, name: str) -> str | None:
        return self._watermarks.get(name)

    async def set_watermark(self, name: str, value: str) -> None:
        self._watermarks[name] = value

    async def record_audit(self, entries: Sequence[AuditEntry]) -> None:
        self._record_audit([(entry, _copy_detail(entry.detail)) for entry in entries])

    async def list_audit(self, order_key: str | None = None, limit: int = 100) -> list[AuditEntry]:
        chosen = [
            (at, seq, entry, detail)
            for at, seq, entry, detail in self._audit
            if order_key is None or entry.order_key == order_key
        ]
        chosen.sort(key=lambda item: item[:2], reverse=True)
        return [
            AuditEntry(entry.order_key, entry.platform, entry.kind, orjson.loads(detail), at)
            for at, _, entry, detail in chosen[: max(limit, 0)]
        ]

    # -- helpers ----------------------------------------------------------------------------
    def _link(self, order_key: str, platform: str, ref: str) -> None:
        """Point (platform, ref) at order_key, unlinking whichever order held it before."""
        previous = self._links.get((platform, ref))
        if previous is not None and previous != order_key:
            old = self._orders[previous].platforms[platform]
            self._orders[previous].platforms[platform] = PlatformState(
                None, old.last_seen, old.last_seen_at, old.last_written, old.last_written_at
            )
        order = self._orders[order_key]
        current = order.platforms.get(platform)
        if current is not None and current.ref is not None and current.ref != ref:
            self._links.pop((platform, current.ref), None)
        self._links[(platform, ref)] = order_key

    def _record_audit(self, entries: Sequence[tuple[AuditEntry, bytes]]) -> None:
        for entry, detail in entries:
            self._audit.append((entry.at, len(self._audit), entry, detail))

    def _record_problem(self, problem: Problem, at: float) -> None:
        self._problems.append(
            StoredProblem(
                id=len(self._problems) + 1,
                kind=problem.kind,
                order_key=problem.order_key,
                platform=problem.platform,
                reason=problem.reason,
                canonical=problem.canonical,
                ref=problem.ref,
                created_at=at,
            )
        )
