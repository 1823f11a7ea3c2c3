"""The records that flow between ingest, the worker, delivery and the store.

Plain frozen dataclasses: cheap to build on the hot path, easy to compare in tests. Native
statuses are always strings (Shoptet's integer ids included) so that every platform looks the
same to the decision code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class NewHint:
    """A hint that an order may have changed on a platform: a webhook or a poll result."""

    platform: str
    # The platform's own reference of the order (Shoptet code, MetaKocka mk_id); for a
    # look-up (``by_key``), the order key to find the order by.
    ref: str
    event: str  # what produced it: "order:update", "poll", "lookup", ...
    # When it arrived; for a poll page, when the page was asked for (it may show the order as
    # it was at any moment after that).
    received_at: float
    # A status the source already showed us (a poll page). Saves one read; None means "read it".
    observed: str | None = None
    # The order key the source showed alongside (a poll page), if any: saves a read to learn it.
    order_key: str | None = None
    # A look-up: is the order (``ref`` is its order key) on this platform, and in what status?
    by_key: bool = False


@dataclass(frozen=True, slots=True)
class HintRef:
    """A claimed hint: consuming it with a stale ``seq`` (news merged into it meanwhile) keeps
    it, to be looked at again."""

    id: int
    seq: int


@dataclass(frozen=True, slots=True)
class HintBatch:
    """The pending hint of one (platform, ref): every hint for it is merged into one row, so
    however much news piled up, it costs one read."""

    platform: str
    ref: str
    hint: HintRef
    observed: str | None  # the status shown by the newest news, if it showed one
    observed_at: float | None = None  # when that news was received (a poll page's age)
    order_key: str | None = None  # the order key the source showed alongside, if any
    by_key: bool = False  # a look-up by order key (``ref`` is the key)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a platform says about an order right now."""

    platform: str
    ref: str
    order_key: str | None  # the cross-platform key, when the platform holds it
    native_status: str


@dataclass(frozen=True, slots=True)
class PlatformState:
    """What the bridge knows of an order on one platform."""

    ref: str | None = None
    last_seen: str | None = None
    last_seen_at: float | None = None
    last_written: str | None = None
    last_written_at: float | None = None


@dataclass(frozen=True, slots=True)
class OrderState:
    """An order's agreed canonical status and what each platform last showed or got."""

    order_key: str
    canonical: str | None
    version: int
    platforms: dict[str, PlatformState] = field(default_factory=dict)
    # Writes not yet delivered: platform -> native status it is about to get.
    pending: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DesiredWrite:
    """The status one platform should have (one row per order and target; newest wins)."""

    platform: str
    canonical: str
    native: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    order_key: str | None
    platform: str | None
    kind: str
    detail: dict[str, Any]
    at: float


ProblemKind = Literal["unmapped_status", "order_not_found", "delivery_failed", "no_order_key"]


@dataclass(frozen=True, slots=True)
class Problem:
    """Something an operator must see: a dead letter, an unmapped status, a missing order."""

    kind: ProblemKind
    order_key: str | None
    platform: str
    reason: str
    canonical: str | None = None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class StoredProblem:
    id: int
    kind: str
    order_key: str | None
    platform: str
    reason: str
    canonical: str | None
    ref: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Observation:
    """The worker's verdict on one hint batch, committed atomically by the store.

    Either everything in it is recorded and the hints are consumed, or (when the order changed
    under us: ``expected_version`` no longer matches) nothing is and the worker decides again.
    """

    hints: tuple[HintRef, ...]
    platform: str
    # The source's reference; None when the order was not found there (a look-up that missed).
    ref: str | None
    observed_at: float
    order_key: str | None = None  # None: the order could not be identified; only audit/problems
    native_status: str | None = None
    expected_version: int = 0  # the order's version when it was read; 0 for a new order
    new_canonical: str | None = None  # set when the agreed status changes
    # What other platforms showed when read alongside (an order's first sighting).
    sightings: tuple[Snapshot, ...] = ()
    desired: tuple[DesiredWrite, ...] = ()
    # Platforms whose pending write is no longer wanted (they already show the agreed status).
    supersede: tuple[str, ...] = ()
    audit: tuple[AuditEntry, ...] = ()
    problems: tuple[Problem, ...] = ()
    # Hints stored with the verdict (look-ups of the order on platforms not seen yet).
    follow_up: tuple[NewHint, ...] = ()


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed pending write: drive ``platform`` to ``native`` for ``order_key``."""

    order_key: str
    platform: str
    canonical: str
    native: str
    version: int  # bumps whenever the desire changes; completing an old version keeps the new
    attempts: int
    first_try_at: float  # start of the retry horizon
    ref: str | None  # the target platform's learned reference, if any
    last_error: str | None = None
