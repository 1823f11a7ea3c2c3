"""The worker: turns stored hints into decisions, one order at a time, many in parallel.

For each pending hint: read the order's current status on the hint's platform (or take the
status a poll page already showed), map and decide (:func:`bridge.policy.decide`), and commit
the verdict with the desired writes — atomically, together with consuming the hint. A crash
before the commit leaves the hint in place; its lease runs out and another pass does the same
work again, which is harmless because it starts from a fresh read.

Never write blind, and never wait for a platform that has nothing to do with it: a platform on
which the order has not been seen yet gets no write until its status is known. The verdict
stores a look-up hint for it instead (find the order by its key there), which the worker takes
like any other hint, gathered with others into one call where the platform allows, and decides
on when it is answered. So a platform that is slow, throttled or down holds back only its own
part of an order: every platform has its own share of the worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bridge.mapping import StatusMapping
from bridge.metrics import Metrics
from bridge.models import (
    AuditEntry,
    DesiredWrite,
    HintBatch,
    NewHint,
    Observation,
    OrderState,
    Problem,
    ProblemKind,
)
from bridge.platforms.base import PlatformClient, ReadFailed
from bridge.policy import decide
from bridge.reads import CoalescingReader
from bridge.store.base import Store

log = logging.getLogger("bridge.worker")

MAX_DECISION_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the worker learned of the order on the hint's platform, and how fresh it is."""

    native: str
    ref: str
    # When it was true at the latest: a poll page's time, or when the read was sent.
    taken_at: float
    from_page: bool


def _maybe_stale(seen: _Seen, order: OrderState | None, platform: str) -> bool:
    """Might this be older than what the bridge already knows of the order there (a sighting
    or a write since it was taken), while saying something else? Then it must not be judged:
    a move "back" that is only old news would drag every platform along."""
    mine = order.platforms.get(platform) if order else None
    if mine is None or mine.last_seen == seen.native:
        return False
    newest = max(mine.last_seen_at or 0.0, mine.last_written_at or 0.0)
    return seen.taken_at < newest


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
        """Process hints until cancelled. Each platform has its own ``concurrency`` hints in
        hand, so one that is slow or throttled never holds up the others."""
        tasks: dict[str, set[asyncio.Task[None]]] = {name: set() for name in self._clients}
        freed = asyncio.Event()

        def finished(platform: str, task: asyncio.Task[None]) -> None:
            tasks[platform].discard(task)
            freed.set()

        try:
            while True:
                limits = {p: self._concurrency - len(held) for p, held in tasks.items()}
                batches = []
                if any(n > 0 for n in limits.values()):
                    try:
                        batches = await self._store.claim_hints(limits, self._clock(), self._lease)
                    except Exception:
                        log.exception("claiming hints failed; trying again shortly")
                for batch in batches:
                    task = asyncio.create_task(self._guarded(batch))
                    tasks[batch.platform].add(task)
                    task.add_done_callback(functools.partial(finished, batch.platform))
                if batches:
                    continue
                woken = asyncio.create_task(self.wake.wait())
                slot = asyncio.create_task(freed.wait())
                try:
                    await asyncio.wait(
                        {woken, slot}, timeout=self._idle, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    woken.cancel()
                    slot.cancel()
                self.wake.clear()
                freed.clear()
        finally:
            everything = [t for held in tasks.values() for t in held]
            for task in everything:
                task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)

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
                await self._store.release_hints([batch.hint], self._clock() + self._read_retry)
            except Exception:
                log.exception("releasing hints failed; their lease will run out instead")

    async def process(self, batch: HintBatch) -> None:
        if batch.by_key:
            await self._look_up(batch)
            return
        store, platform, ref = self._store, batch.platform, batch.ref
        if platform not in self._clients:
            await self._consume_with_problem(
                batch, None, "no_order_key", f"{platform} is not configured"
            )
            return
        order_key = await store.find_order_key(platform, ref) or batch.order_key
        # A poll page already showed the status: no need to ask again (unless it may be older
        # than what the bridge knows since; see _maybe_stale).
        if batch.observed is not None and order_key is not None:
            seen = _Seen(batch.observed, ref, batch.observed_at or 0.0, from_page=True)
        else:
            read = await self._read(batch)
            if read is None:
                return
            seen, shown_key = read
            order_key = shown_key or order_key
        if order_key is None:
            await self._consume_with_problem(
                batch,
                None,
                "no_order_key",
                f"{platform} order {ref!r} carries no order key to link it by",
            )
            return
        await self._decide(batch, order_key, seen)

    async def _look_up(self, batch: HintBatch) -> None:
        """A look-up hint: find the order by its key on the hint's platform, and decide."""
        platform, order_key = batch.platform, batch.ref
        order = await self._store.load_order(order_key)
        state = order.platforms.get(platform) if order else None
        if (state is not None and state.last_seen is not None) or platform not in self._clients:
            await self._consume(batch)  # seen there meanwhile: nothing left to find out
            return
        taken_at = self._clock()
        try:
            snapshot = await self._readers[platform].read_by_key(order_key)
        except ReadFailed as exc:
            await self._retry_later(batch, exc, f"looking up order {order_key}")
            return
        if snapshot is None:
            await self._not_found_by_key(batch, order_key)
            return
        await self._decide(
            batch, order_key, _Seen(snapshot.native_status, snapshot.ref, taken_at, False)
        )

    async def _decide(self, batch: HintBatch, order_key: str, seen: _Seen) -> None:
        store, platform = self._store, batch.platform
        for _ in range(MAX_DECISION_ATTEMPTS):
            order = await store.load_order(order_key)
            if _maybe_stale(seen, order, platform):
                # Checked against the very state the decision uses: read it again, fresh.
                taken_at = self._clock()
                try:
                    snapshot = await self._readers[platform].read(seen.ref)
                except ReadFailed as exc:
                    await self._retry_later(batch, exc, f"reading order {seen.ref}")
                    return
                if snapshot is None:
                    await self._consume_with_problem(
                        batch,
                        order_key,
                        "order_not_found",
                        f"{platform} has no order {seen.ref!r}",
                    )
                    return
                seen = _Seen(snapshot.native_status, seen.ref, taken_at, False)
                continue
            if await self._judge(batch, order_key, order, seen):
                return
            # Another worker changed the order between our load and commit: decide again.
        raise RuntimeError(f"order {order_key} kept changing under the worker")

    def _unknown(self, order: OrderState | None, source: str) -> frozenset[str]:
        """Platforms on which the order's status is not known: never seen there, and no write
        on its way there (a look-up that found nothing leaves one)."""
        unknown = set()
        for other in self._mapping.platforms - {source}:
            if other not in self._clients:
                continue
            state = order.platforms.get(other) if order else None
            if state is not None and state.last_seen is not None:
                continue
            if order is not None and other in order.pending:
                continue
            unknown.add(other)
        return frozenset(unknown)

    async def _judge(
        self, batch: HintBatch, order_key: str, order: OrderState | None, seen: _Seen
    ) -> bool:
        """Decide and commit; False when the order changed under us."""
        platform, native = batch.platform, seen.native
        unknown = self._unknown(order, platform)
        verdict = decide(self._mapping, platform, native, order, unknown)
        now = self._clock()
        detail = {
            "ref": seen.ref,
            "native": native,
            "canonical": verdict.canonical,
            "agreed_before": order.canonical if order else None,
            "agreed": verdict.agreed,
            "looked_up": batch.by_key,
            "unknown": sorted(unknown),
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
                Problem("unmapped_status", order_key, platform, verdict.reason, ref=seen.ref),
            )
        observation = Observation(
            hints=(batch.hint,),
            platform=platform,
            ref=seen.ref,
            observed_at=now,
            order_key=order_key,
            native_status=native,
            expected_version=order.version if order else 0,
            new_canonical=verdict.agreed if verdict.changes_agreement else None,
            desired=verdict.writes,
            supersede=verdict.supersede,
            audit=() if repeat else (AuditEntry(order_key, platform, verdict.kind, detail, now),),
            problems=problems,
            follow_up=tuple(
                NewHint(other, order_key, "lookup", now, by_key=True) for other in sorted(unknown)
            ),
        )
        if not await self._store.commit_observation(observation):
            return False
        self._metrics.verdicts.labels(platform, verdict.kind).inc()
        if verdict.kind in ("regress", "unmapped") and not repeat:
            log.warning("%s order %s: %s", platform, order_key, verdict.reason)
        elif repeat or verdict.kind in ("echo", "same"):
            log.debug("%s order %s: %s", platform, order_key, verdict.kind)
        else:
            log.info("%s order %s: %s (%s)", platform, order_key, verdict.kind, verdict.reason)
        if verdict.writes:
            self._on_desired()
        if unknown:
            self.wake.set()  # the look-ups are waiting
        return True

    async def _not_found_by_key(self, batch: HintBatch, order_key: str) -> None:
        """The order is not on the platform (not yet imported, or never will be). As with a
        write that finds no order, the agreed status is written there and retried as "not
        found" (decision 3), so an order imported later gets it; an operator sees it."""
        platform = batch.platform
        for _ in range(MAX_DECISION_ATTEMPTS):
            order = await self._store.load_order(order_key)
            agreed = order.canonical if order else None
            writes: tuple[DesiredWrite, ...] = ()
            if agreed in self._mapping.statuses and platform not in (
                order.pending if order else {}
            ):
                assert agreed is not None
                target = self._mapping.target_for(platform, agreed)
                writes = (DesiredWrite(platform, agreed, target.native),)
            now = self._clock()
            detail = {
                "by_key": order_key,
                "agreed": agreed,
                "writes": {w.platform: w.native for w in writes},
            }
            committed = await self._store.commit_observation(
                Observation(
                    hints=(batch.hint,),
                    platform=platform,
                    ref=None,
                    observed_at=now,
                    order_key=order_key,
                    expected_version=order.version if order else 0,
                    desired=writes,
                    audit=(AuditEntry(order_key, platform, "target_missing", detail, now),),
                )
            )
            if committed:
                log.info("%s has no order %s (yet)", platform, order_key)
                self._metrics.verdicts.labels(platform, "target_missing").inc()
                if writes:
                    self._on_desired()
                return
        raise RuntimeError(f"order {order_key} kept changing under the worker")

    async def _read(self, batch: HintBatch) -> tuple[_Seen, str | None] | None:
        """Read the order on its platform: what it shows and its order key; None when handled."""
        taken_at = self._clock()
        try:
            snapshot = await self._readers[batch.platform].read(batch.ref)
        except ReadFailed as exc:
            await self._retry_later(batch, exc, f"reading order {batch.ref}")
            return None
        if snapshot is None:
            order_key = await self._store.find_order_key(batch.platform, batch.ref)
            await self._consume_with_problem(
                batch, order_key, "order_not_found", f"{batch.platform} has no order {batch.ref!r}"
            )
            return None
        seen = _Seen(snapshot.native_status, batch.ref, taken_at, from_page=False)
        return seen, snapshot.order_key

    async def _retry_later(self, batch: HintBatch, exc: ReadFailed, what: str) -> None:
        log.warning("%s: %s failed: %s", batch.platform, what, exc.reason)
        retry_at = self._clock() + (exc.retry_after or self._read_retry)
        await self._store.release_hints([batch.hint], retry_at)

    async def _consume(self, batch: HintBatch) -> None:
        await self._store.commit_observation(
            Observation(
                hints=(batch.hint,), platform=batch.platform, ref=None, observed_at=self._clock()
            )
        )

    async def _consume_with_problem(
        self, batch: HintBatch, order_key: str | None, kind: ProblemKind, reason: str
    ) -> None:
        log.warning("%s", reason)
        now = self._clock()
        problem = Problem(kind, order_key, batch.platform, reason, ref=batch.ref)
        await self._store.commit_observation(
            Observation(
                hints=(batch.hint,),
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
