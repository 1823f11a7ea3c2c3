"""The store: the bridge's only durable state, behind one interface.

Implementations: :mod:`bridge.store.memory` (an in-memory fake for unit tests) and
:mod:`bridge.store.sqlite` (the embedded default). Every method that changes several rows does
so in one transaction, so a crash at any moment leaves either all or none of it.

Times are Unix seconds (floats) passed in by the caller, which keeps the store free of clocks
and makes it testable with a fake clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from bridge.models import (
    AuditEntry,
    Delivery,
    HintBatch,
    HintRef,
    NewHint,
    Observation,
    OrderState,
    StoredProblem,
)


class StoreUnavailable(Exception):
    """The store cannot take writes right now (disk full, locked, connection lost)."""


class Store(ABC):
    # -- life cycle -------------------------------------------------------------------------
    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date (migrations)."""

    @abstractmethod
    async def close(self) -> None: ...

    # -- inbox: hints -----------------------------------------------------------------------
    @abstractmethod
    async def add_hints(self, hints: Sequence[NewHint]) -> None:
        """Store hints durably, all in one transaction. Raises StoreUnavailable on failure.

        There is one pending hint per (platform, ref, by_key): news for an order that already
        has one is merged into it (its ``seq`` goes up; the newest news decides ``observed``,
        so a webhook after a poll page means "read it"; a known order key is kept). However
        often an order is hinted before the worker gets to it, it costs one read.
        """

    @abstractmethod
    async def claim_hints(
        self, limits: Mapping[str, int], now: float, lease_seconds: float
    ) -> list[HintBatch]:
        """Lease up to ``limits[platform]`` due hints of each platform, the longest due first.

        A claimed hint is not due again until its lease runs out (the worker died) or it is
        released. Costs the same however many hints are pending.
        """

    @abstractmethod
    async def release_hints(self, hints: Sequence[HintRef], retry_at: float) -> None:
        """Give leased hints back, to be claimed again no earlier than ``retry_at``."""

    @abstractmethod
    async def pending_hints(self, platform: str | None = None, ref: str | None = None) -> int:
        """How many hints are stored and not yet consumed (for one order, if given)."""

    @abstractmethod
    async def orders_with_news(
        self, platform: str, targets: Sequence[tuple[str, str]], since: float
    ) -> set[str]:
        """Of ``targets`` ((order key, ref) on ``platform``), the order keys with a pending hint
        (not a look-up) received after ``since`` and after the bridge last saw the order there:
        news the worker has not judged yet."""

    @abstractmethod
    async def seen_statuses(self, platform: str, refs: Sequence[str]) -> dict[str, str]:
        """The status the bridge last saw for each of ``refs`` on ``platform`` (refs it never
        saw are left out)."""

    # -- orders -----------------------------------------------------------------------------
    @abstractmethod
    async def find_order_key(self, platform: str, ref: str) -> str | None:
        """The order key that a platform's reference is linked to, if learned."""

    @abstractmethod
    async def load_order(self, order_key: str) -> OrderState | None: ...

    @abstractmethod
    async def list_order_keys(
        self, after: str | None = None, limit: int = 500, seen_since: float | None = None
    ) -> list[str]:
        """Order keys in key order, after ``after``; with ``seen_since``, only orders some
        platform was seen showing at or after that time (the "active" ones, for sweeps)."""

    @abstractmethod
    async def commit_observation(self, observation: Observation) -> bool:
        """Record a worker's verdict and consume its hints, atomically.

        Returns False, changing nothing, when the order's version is no longer
        ``observation.expected_version`` (another worker got there first).

        A consumed hint whose ``seq`` moved on (news merged into it meanwhile) is kept and
        due at once. ``follow_up`` hints are added as ``add_hints`` does.

        For each desired write: if the target has no pending row, or a pending row for another
        native status, the row becomes pending for the new status with attempts reset, the
        version bumped and ``next_try_at = observed_at``; a lease on it is kept, so no second
        write for that order and platform starts while one is in flight. A pending row for the
        same native status is left alone. Platforms in ``supersede`` get their pending row
        (if any) marked superseded, with its version bumped, so a write still in flight for it
        cannot dead-letter or complete it afterwards.
        """

    # -- outbox: deliveries -----------------------------------------------------------------
    @abstractmethod
    async def claim_deliveries(
        self, platform: str, limit: int, now: float, lease_seconds: float
    ) -> list[Delivery]:
        """Lease up to ``limit`` due pending writes for ``platform``, the longest-waiting first."""

    @abstractmethod
    async def complete_delivery(
        self, delivery: Delivery, now: float, audit: Sequence[AuditEntry] = ()
    ) -> None:
        """The write happened: record it as the platform's last written and last seen status.

        The row is done only if its version is still ``delivery.version``; otherwise a newer
        desire arrived meanwhile and the row stays pending (lease cleared) to deliver that one.
        """

    @abstractmethod
    async def retry_delivery(
        self, delivery: Delivery, next_try_at: float, error: str, now: float
    ) -> None:
        """The write failed for now: count the attempt, remember why, try again later.

        If the row's version changed meanwhile, only the lease is cleared (the newer desire is
        due at once).
        """

    @abstractmethod
    async def postpone_delivery(
        self, delivery: Delivery, next_try_at: float, reason: str, now: float
    ) -> None:
        """Hold the write back without counting an attempt (it was not tried), e.g. while the
        worker looks at news from its target first. Versions as for ``retry_delivery``."""

    @abstractmethod
    async def fail_delivery(self, delivery: Delivery, reason: str, now: float) -> None:
        """The write can never succeed: dead-letter it with the reason (a problem record).

        If the row's version changed meanwhile, only the lease is cleared.
        """

    @abstractmethod
    async def learn_ref(self, order_key: str, platform: str, ref: str) -> None:
        """Remember a platform's own reference for an order (e.g. a MetaKocka mk_id)."""

    @abstractmethod
    async def next_delivery_at(self, platform: str) -> float | None:
        """When the earliest pending write for ``platform`` can be claimed (None: nothing
        pending); a leased row counts from the end of its lease."""

    @abstractmethod
    async def pending_deliveries(self, platform: str | None = None) -> int: ...

    # -- problems, watermarks, audit --------------------------------------------------------
    @abstractmethod
    async def list_problems(self, limit: int = 100) -> list[StoredProblem]:
        """Newest first."""

    @abstractmethod
    async def get_watermark(self, name: str) -> str | None: ...

    @abstractmethod
    async def set_watermark(self, name: str, value: str) -> None: ...

    @abstractmethod
    async def record_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Add entries to the audit trail (for events outside a commit, e.g. a missing order)."""

    @abstractmethod
    async def list_audit(self, order_key: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first; all orders when ``order_key`` is None."""
