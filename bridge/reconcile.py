"""Drift repair: compare what every platform shows with the agreed status, and fix it.

Webhooks get lost (Bitrix24 never re-sends, Shoptet gives up after three tries, MetaKocka has
none) and people change statuses while the bridge is down. A sweep reads the orders the bridge
knows on every platform — in batches where the platform has a batch read — and commits what
:func:`bridge.policy.reconcile` decides, through the same store path as every other decision:
the delivery loops then do the writing, with their limits and retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bridge.mapping import StatusMapping
from bridge.models import AuditEntry, Observation, OrderState, Snapshot
from bridge.platforms.base import PlatformClient, ReadFailed
from bridge.policy import Verdict, reconcile
from bridge.ratelimit import LOW, priority
from bridge.store.base import Store

log = logging.getLogger("bridge.reconcile")

PAGE = 200  # orders per store page; reads go out in the platforms' own batch sizes


@dataclass(frozen=True, slots=True)
class Drift:
    order_key: str
    agreed: str | None
    shown: dict[str, str]  # platform -> native status it shows
    new_agreed: str | None
    writes: dict[str, str]  # platform -> native status it is to get
    reason: str


@dataclass
class SweepReport:
    checked: int = 0
    drifted: list[Drift] = field(default_factory=list)
    unreadable: dict[str, int] = field(default_factory=dict)  # platform -> orders not read
    repaired: int = 0
    dry_run: bool = True


async def sweep(
    store: Store,
    clients: Mapping[str, PlatformClient],
    mapping: StatusMapping,
    *,
    platforms: Iterable[str] | None = None,
    seen_since: float | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int], None] = lambda checked: None,
    clock: Callable[[], float] = time.time,
) -> SweepReport:
    """Check every known order (or those seen since ``seen_since``) on ``platforms``."""
    chosen = sorted(set(platforms or mapping.platforms) & set(clients) & mapping.platforms)
    report = SweepReport(dry_run=dry_run)
    after: str | None = None
    while keys := await store.list_order_keys(after, PAGE, seen_since):
        after = keys[-1]
        orders = [o for k in keys if (o := await store.load_order(k)) is not None]
        shown = await _read_all(clients, chosen, orders, report)
        for order in orders:
            current = shown.get(order.order_key, {})
            if not current:
                continue
            report.checked += 1
            shown_now = {p: n for p, (n, _) in current.items()}
            unrepaired: Drift | None = None
            for _attempt in range(3):
                unrepaired = None
                verdict = reconcile(mapping, order, shown_now)
                if verdict.kind in ("same", "unmapped"):
                    break
                drift = Drift(
                    order.order_key,
                    order.canonical,
                    shown_now,
                    verdict.agreed,
                    {w.platform: w.native for w in verdict.writes},
                    verdict.reason,
                )
                if dry_run:
                    report.drifted.append(drift)
                    break
                if await _repair(store, order, current, verdict, drift, clock()):
                    report.drifted.append(drift)
                    report.repaired += 1
                    break
                # The order changed while it was read (a poll or a webhook got there first):
                # judge again against its new state, with what the platforms showed.
                unrepaired = drift
                fresh = await store.load_order(order.order_key)
                if fresh is None:
                    break
                order = fresh
            if unrepaired is not None:  # reported, left for the next sweep
                report.drifted.append(unrepaired)
        on_progress(report.checked)
    return report


async def _read_all(
    clients: Mapping[str, PlatformClient],
    platforms: list[str],
    orders: list[OrderState],
    report: SweepReport,
) -> dict[str, dict[str, tuple[str, str]]]:
    """order key -> platform -> (native status, ref), for every order found there."""
    shown: dict[str, dict[str, tuple[str, str]]] = {}
    for platform in platforms:
        refs = {
            state.ref: order.order_key
            for order in orders
            if (state := order.platforms.get(platform)) is not None and state.ref
        }
        if not refs:
            continue
        with priority(LOW):  # background work: after the writes and look-ups waiting
            results = await clients[platform].read_many(list(refs))
        for ref, result in results.items():
            if isinstance(result, ReadFailed):
                report.unreadable[platform] = report.unreadable.get(platform, 0) + 1
            elif isinstance(result, Snapshot) and result.native_status:
                shown.setdefault(refs[ref], {})[platform] = (result.native_status, ref)
    return shown


async def _repair(
    store: Store,
    order: OrderState,
    current: dict[str, tuple[str, str]],
    verdict: Verdict,
    drift: Drift,
    now: float,
) -> bool:
    """Commit the sweep's verdict like any other; False when the order changed meanwhile."""
    source = sorted(current)[0]
    native, ref = current[source]
    detail = {
        "agreed_before": drift.agreed,
        "agreed": drift.new_agreed,
        "shown": drift.shown,
        "writes": drift.writes,
        "reason": drift.reason,
    }
    committed = await store.commit_observation(
        Observation(
            hints=(),
            platform=source,
            ref=ref,
            observed_at=now,
            order_key=order.order_key,
            native_status=native,
            expected_version=order.version,
            new_canonical=verdict.agreed if verdict.agreed != order.canonical else None,
            sightings=tuple(
                Snapshot(p, r, order.order_key, n) for p, (n, r) in current.items() if p != source
            ),
            desired=verdict.writes,
            supersede=verdict.supersede,
            audit=(AuditEntry(order.order_key, None, "sweep_repair", detail, now),),
        )
    )
    if committed:
        log.info("order %s drifted (%s): repairing", order.order_key, drift.reason)
    return committed
