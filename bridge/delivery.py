"""Delivery: drives each platform to the desired status, within the platform's limits.

One loop per target platform claims due writes from the store's outbox, sends them (batched
where the platform has a batch call, concurrently up to its connection limit), and records
each outcome. The store's lease on a row guarantees one write in flight per order and
platform; the row's version makes sure that when the desire changed during a write, the newest
status is the one delivered next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from bridge.mapping import StatusMapping
from bridge.metrics import Metrics
from bridge.models import AuditEntry, Delivery, NewHint
from bridge.platforms.base import Outcome, PlatformClient, PlatformSpec, WriteRequest
from bridge.retry import RetryPolicy
from bridge.store.base import Store

log = logging.getLogger("bridge.delivery")

# A 409 means the order changed under the write: re-read first, write again soon after.
CONFLICT_RETRY_SECONDS = 2.0
# After this many attempts ending in 409 the write is dead-lettered for a person to look at.
MAX_CONFLICTS = 3
# How long a write waits for the worker to look at news from its target first, each time, and
# at most for one piece of news (counted from when it arrived).
NEWS_WAIT_SECONDS = 0.2
NEWS_HOLD_MAX_SECONDS = 30.0


class Dispatcher:
    def __init__(
        self,
        store: Store,
        clients: Mapping[str, PlatformClient],
        specs: Mapping[str, PlatformSpec],
        mapping: StatusMapping,
        metrics: Metrics,
        *,
        retry: RetryPolicy,
        lease_seconds: float = 120.0,
        idle_seconds: float = 1.0,
        on_hint: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clients = clients
        self._specs = specs
        self._mapping = mapping
        self._metrics = metrics
        self._retry = retry
        self._lease = lease_seconds
        self._idle = idle_seconds
        self._on_hint = on_hint
        self._clock = clock
        self.wake = {name: asyncio.Event() for name in clients}

    def notify(self) -> None:
        for event in self.wake.values():
            event.set()

    async def run(self, platform: str) -> None:
        """Deliver to one platform until cancelled."""
        wake = self.wake[platform]
        while True:
            try:
                sent = await self.deliver_due(platform)
            except Exception:
                log.exception("delivery to %s failed; trying again shortly", platform)
                sent = 0
            if sent:
                continue
            timeout = self._idle
            try:
                due = await self._store.next_delivery_at(platform)
            except Exception:
                due = None
            if due is not None:
                timeout = min(timeout, max(0.0, due - self._clock()))
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
            wake.clear()

    async def deliver_due(self, platform: str) -> int:
        """Send every write due now to ``platform`` (one claim's worth); returns how many."""
        spec = self._specs[platform]
        client = self._clients[platform]
        # Wait for the platform's rate limit first: what becomes due meanwhile joins the claim.
        await client.wait_ready()
        claimed = await self._store.claim_deliveries(
            platform, spec.write_batch, self._clock(), self._lease
        )
        if not claimed:
            return 0
        claimed = await self._hold_back_for_news(claimed)
        if not claimed:
            return 0
        requests = [
            WriteRequest(
                d.order_key,
                d.native,
                d.ref,
                self._mapping.target_for(platform, d.canonical).options,
            )
            if d.canonical in self._mapping.statuses
            else None
            for d in claimed
        ]
        sendable = [(d, r) for d, r in zip(claimed, requests, strict=True) if r is not None]
        for d, r in zip(claimed, requests, strict=True):
            if r is None:
                await self._store.fail_delivery(
                    d, f"status {d.canonical!r} is no longer in the mapping", self._clock()
                )
        outcomes = await self._send(client, spec, [r for _, r in sendable])
        for (delivery, _), outcome in zip(sendable, outcomes, strict=True):
            await self._record(delivery, outcome)
        return len(claimed)

    async def _hold_back_for_news(self, claimed: list[Delivery]) -> list[Delivery]:
        """Postpone writes to orders with news from that same platform the worker has not
        judged yet (a hint that came after the bridge last saw the order there).

        Someone may just have changed the order there; the worker decides on that first (it may
        make this write moot), instead of the write overwriting a change it never saw. The hold
        is not an attempt, and it is bounded: news the worker has not judged within
        ``NEWS_HOLD_MAX_SECONDS`` (a platform it cannot read) holds nothing back any more.
        """
        if not claimed:
            return claimed
        now = self._clock()
        news = await self._store.orders_with_news(
            claimed[0].platform,
            [(d.order_key, d.ref or d.order_key) for d in claimed],
            since=now - NEWS_HOLD_MAX_SECONDS,
        )
        ready = []
        for delivery in claimed:
            if delivery.order_key in news:
                await self._store.postpone_delivery(
                    delivery, now + NEWS_WAIT_SECONDS, "news pending", now
                )
            else:
                ready.append(delivery)
        return ready

    async def _send(
        self, client: PlatformClient, spec: PlatformSpec, requests: Sequence[WriteRequest]
    ) -> list[Outcome]:
        if type(client).write_many is not PlatformClient.write_many:
            return await client.write_many(requests)
        # No batch call: one request each, as many at once as the platform allows (the
        # client's own semaphore enforces its connection limit).
        return list(await asyncio.gather(*(client.write(r) for r in requests)))

    async def _record(self, delivery: Delivery, outcome: Outcome) -> None:
        store, now = self._store, self._clock()
        platform, key = delivery.platform, delivery.order_key
        self._metrics.writes.labels(platform, outcome.kind).inc()
        detail = {
            "native": delivery.native,
            "canonical": delivery.canonical,
            "attempt": delivery.attempts + 1,
        }
        if outcome.kind == "done":
            audit = [AuditEntry(key, platform, "written", detail, now)]
            if outcome.warning:
                log.warning(
                    "%s order %s: written with a warning: %s", platform, key, outcome.warning
                )
                audit.append(
                    AuditEntry(
                        key, platform, "write_warning", {**detail, "warning": outcome.warning}, now
                    )
                )
            await store.complete_delivery(delivery, now, audit)
            if outcome.learned_ref:
                await store.learn_ref(key, platform, outcome.learned_ref)
            log.info(
                "%s order %s: wrote %s (%s)", platform, key, delivery.native, delivery.canonical
            )
            return
        if outcome.kind == "permanent":
            log.error(
                "%s order %s: write of %s failed for good: %s",
                platform,
                key,
                delivery.native,
                outcome.reason,
            )
            await store.fail_delivery(delivery, outcome.reason, now)
            return
        if outcome.kind == "conflict" and delivery.attempts + 1 >= MAX_CONFLICTS:
            reason = f"the order kept changing under the write ({outcome.reason})"
            log.error("%s order %s: %s", platform, key, reason)
            await store.fail_delivery(delivery, reason, now)
            return
        if outcome.kind == "conflict":
            # Re-read the target through the normal path; the write is retried after that.
            await store.add_hints([NewHint(platform, delivery.ref or key, "write_conflict", now)])
            self._on_hint()
            await store.retry_delivery(delivery, now + CONFLICT_RETRY_SECONDS, outcome.reason, now)
            return
        # retry / not_found: wait and try again, until the horizon runs out.
        what = "order not found" if outcome.kind == "not_found" else "failed"
        if outcome.kind == "not_found" and delivery.attempts == 0:
            # Visible from the first time: the order may never arrive on that platform.
            await store.record_audit([AuditEntry(key, platform, "target_missing", detail, now)])
        if self._retry.gives_up(delivery.first_try_at, now):
            reason = f"gave up after {delivery.attempts + 1} attempts: {what}: {outcome.reason}"
            log.error("%s order %s: %s", platform, key, reason)
            await store.fail_delivery(delivery, reason, now)
            return
        wait = outcome.retry_after
        if wait is None:
            wait = self._retry.delay(delivery.attempts + 1)
        log.warning(
            "%s order %s: write %s (%s); next try in %.1fs",
            platform,
            key,
            what,
            outcome.reason,
            wait,
        )
        await store.retry_delivery(delivery, now + wait, f"{what}: {outcome.reason}", now)
