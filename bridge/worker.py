"""The worker: turns stored hints into decisions, one order at a time, many in parallel.

For each (platform, ref) with pending hints: read the order's current status from the platform
(or take the status a poll page already showed), map and decide (:func:`bridge.policy.decide`),
and commit the verdict with the desired writes — atomically, together with consuming the
hints. A crash before the commit leaves the hints in place; their lease runs out and another
pass does the same work again, which is harmless because it starts from a fresh read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from bridge.mapping import StatusMapping
from bridge.metrics import Metrics
from bridge.models import (
    AuditEntry,
    HintBatch,
    Observation,
    OrderState,
    PlatformState,
    Problem,
    ProblemKind,
    Snapshot,
)
from bridge.platforms.base import PlatformClient, ReadFailed
from bridge.policy import decide
from bridge.reads import CoalescingReader
from bridge.store.base import Store

log = logging.getLogger("bridge.worker")

MAX_DECISION_ATTEMPTS = 5


def _older_than_last_write(batch: HintBatch, order: OrderState | None) -> bool:
    """Was the poll page taken before the bridge's last write to that platform landed?"""
    mine = order.platforms.get(batch.platform) if order else None
    if mine is None or mine.last_written_at is None or batch.observed_at is None:
        return False
    return batch.observed_at < mine.last_written_at


def _with_sightings(
    order: OrderState | None, order_key: str, sightings: list[Snapshot]
) -> OrderState | None:
    """The order as the decision should see it: stored state plus what was just read."""
    if not sightings:
        return order
    base = order or OrderState(order_key, None, 0)
    platforms = dict(base.platforms)
    for s in sightings:
        known = platforms.get(s.platform, PlatformState())
        platforms[s.platform] = replace(known, ref=s.ref, last_seen=s.native_status)
    return replace(base, platforms=platforms)


class Worker:
    def __init__(
        self,
        store: Store,
        clients: Mapping[str, PlatformClient],
        mapping: StatusMapping,
        metrics: Metrics,
        *,
        concurrency: int = 50,
        lease_seconds: float = 60.0,
        read_retry_seconds: float = 5.0,
        idle_seconds: float = 1.0,
        on_desired: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clients = clients
        # Concurrent reads of one platform share a batch call where the platform has one.
        self._readers = {name: CoalescingReader(client) for name, client in clients.items()}
        self._mapping = mapping
        self._metrics = metrics
        self._concurrency = concurrency
        self._lease = lease_seconds
        self._read_retry = read_retry_seconds
        self._idle = idle_seconds
        self._on_desired = on_desired
        self._clock = clock
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Process hints until cancelled."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                claimed = 0
                free = self._concurrency - len(tasks)
                if free > 0:
                    try:
                        batches = await self._store.claim_hints(free, self._clock(), self._lease)
                    except Exception:
                        log.exception("claiming hints failed; trying again shortly")
                        batches = []
                    claimed = len(batches)
                    for batch in batches:
                        task = asyncio.create_task(self._guarded(batch))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                if claimed and len(tasks) < self._concurrency:
                    continue
                waiter = asyncio.create_task(self.wake.wait())
                try:
                    await asyncio.wait(
                        {waiter, *tasks}, timeout=self._idle, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                self.wake.clear()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _guarded(self, batch: HintBatch) -> None:
        try:
            await self.process(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "processing %s order %s failed; it will be retried", batch.platform, batch.ref
            )
            try:
                await self._store.release_hints(batch.hint_ids, self._clock() + self._read_retry)
            except Exception:
                log.exception("releasing hints failed; their lease will run out instead")

    async def process(self, batch: HintBatch) -> None:
        store, platform, ref = self._store, batch.platform, batch.ref
        client = self._clients.get(platform)
        if client is None:
            await self._consume_with_problem(
                batch, None, "no_order_key", f"{platform} is not configured"
            )
            return
        order_key = await store.find_order_key(platform, ref)
        # A poll page already showed the status: no need to ask again (unless it turns out to
        # be older than the bridge's own latest write there; see below).
        observed = batch.observed if order_key is not None else None
        native = observed
        if native is None:
            read = await self._read(batch, client)
            if read is None:
                return
            native, order_key = read[0], read[1] or order_key
        if order_key is None:
            await self._consume_with_problem(
                batch,
                None,
                "no_order_key",
                f"{platform} order {ref!r} carries no order key to link it by",
            )
            return

        # Never write blind: a platform the bridge has not yet seen with this order is read
        # first, so a first sighting cannot drag a platform that is further along backwards.
        sightings = await self._read_unseen(batch, order_key, await store.load_order(order_key))
        if sightings is None:
            return
        for _ in range(MAX_DECISION_ATTEMPTS):
            order = await store.load_order(order_key)
            if observed is not None and _older_than_last_write(batch, order):
                # Checked against the very state the decision uses: a write that completed
                # after the page was taken would otherwise look like a move backwards.
                read = await self._read(batch, client)
                if read is None:
                    return
                native, observed = read[0], None
                continue
            verdict = decide(
                self._mapping, platform, native, _with_sightings(order, order_key, sightings)
            )
            now = self._clock()
            detail = {
                "ref": ref,
                "native": native,
                "canonical": verdict.canonical,
                "agreed_before": order.canonical if order else None,
                "agreed": verdict.agreed,
                "hints": len(batch.hint_ids),
                "seen_elsewhere": {s.platform: s.native_status for s in sightings},
                "writes": {w.platform: w.native for w in verdict.writes},
                "reason": verdict.reason,
            }
            # A poll overlap or a duplicate webhook showing nothing new since the last look is
            # not worth an audit line, a problem or a warning: the trail keeps what mattered.
            mine = order.platforms.get(platform) if order else None
            # The first echo after a write is news (the write landed); later ones are not.
            repeat = (
                verdict.kind in ("same", "echo", "regress", "behind", "unmapped")
                and mine is not None
                and mine.last_seen == native
                and not (verdict.kind == "echo" and mine.last_seen_at == mine.last_written_at)
            )
            problems: tuple[Problem, ...] = ()
            if verdict.kind == "unmapped" and not repeat:
                problems = (
                    Problem("unmapped_status", order_key, platform, verdict.reason, ref=ref),
                )
            observation = Observation(
                hint_ids=batch.hint_ids,
                platform=platform,
                ref=ref,
                observed_at=now,
                order_key=order_key,
                native_status=native,
                expected_version=order.version if order else 0,
                new_canonical=verdict.agreed if verdict.changes_agreement else None,
                sightings=tuple(sightings),
                desired=verdict.writes,
                supersede=verdict.supersede,
                audit=()
                if repeat
                else (AuditEntry(order_key, platform, verdict.kind, detail, now),),
                problems=problems,
            )
            if await store.commit_observation(observation):
                self._metrics.verdicts.labels(platform, verdict.kind).inc()
                if verdict.kind in ("regress", "unmapped") and not repeat:
                    log.warning("%s order %s: %s", platform, order_key, verdict.reason)
                elif repeat or verdict.kind in ("echo", "same"):
                    log.debug("%s order %s: %s", platform, order_key, verdict.kind)
                else:
                    log.info(
                        "%s order %s: %s (%s)", platform, order_key, verdict.kind, verdict.reason
                    )
                if verdict.writes:
                    self._on_desired()
                return
            # Another worker changed the order between our load and commit: decide again.
        raise RuntimeError(f"order {order_key} kept changing under the worker")

    async def _read(
        self, batch: HintBatch, client: PlatformClient
    ) -> tuple[str, str | None] | None:
        """Read the order on its platform: (native status, order key), or None when handled."""
        try:
            snapshot = await self._readers[batch.platform].read(batch.ref)
        except ReadFailed as exc:
            log.warning("reading %s order %s failed: %s", batch.platform, batch.ref, exc.reason)
            retry_at = self._clock() + (exc.retry_after or self._read_retry)
            await self._store.release_hints(batch.hint_ids, retry_at)
            return None
        if snapshot is None:
            order_key = await self._store.find_order_key(batch.platform, batch.ref)
            await self._consume_with_problem(
                batch, order_key, "order_not_found", f"{batch.platform} has no order {batch.ref!r}"
            )
            return None
        return snapshot.native_status, snapshot.order_key

    async def _read_unseen(
        self, batch: HintBatch, order_key: str, order: OrderState | None
    ) -> list[Snapshot] | None:
        """Read the order on every other platform it has not been seen on; None: try later."""
        sightings = []
        for other in sorted(self._mapping.platforms - {batch.platform}):
            state = order.platforms.get(other) if order else None
            if state is not None and state.last_seen is not None:
                continue
            client = self._clients.get(other)
            if client is None:
                continue
            try:
                snapshot = await client.read_by_key(order_key)
            except ReadFailed as exc:
                log.warning("reading %s order %s failed: %s", other, order_key, exc.reason)
                retry_at = self._clock() + (exc.retry_after or self._read_retry)
                await self._store.release_hints(batch.hint_ids, retry_at)
                return None
            if snapshot is not None:
                sightings.append(snapshot)
        return sightings

    async def _consume_with_problem(
        self, batch: HintBatch, order_key: str | None, kind: ProblemKind, reason: str
    ) -> None:
        log.warning("%s", reason)
        now = self._clock()
        problem = Problem(kind, order_key, batch.platform, reason, ref=batch.ref)
        await self._store.commit_observation(
            Observation(
                hint_ids=batch.hint_ids,
                platform=batch.platform,
                ref=batch.ref,
                observed_at=now,
                audit=(
                    AuditEntry(
                        order_key, batch.platform, kind, {"ref": batch.ref, "reason": reason}, now
                    ),
                ),
                problems=(problem,),
            )
        )
        self._metrics.verdicts.labels(batch.platform, kind).inc()
