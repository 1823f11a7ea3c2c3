"""Polling: finds changes the platform never announced, and feeds them to the worker.

MetaKocka sends no order webhooks, so polling is how the bridge sees changes made there. Each
cycle asks for orders changed since the stored watermark minus an overlap (events and clocks
lag, and offset paging over a moving set can skip rows), stores a hint for every order that
shows something else than the bridge last saw there, and only then moves the watermark to the
cycle's start. A crash mid-cycle repeats the window; the
hints it repeats are harmless.

APScheduler is only the timer: every bit of state lives in the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from bridge.inbox import Inbox
from bridge.metrics import Metrics
from bridge.models import NewHint
from bridge.platforms.base import PlatformClient, ReadFailed
from bridge.ratelimit import LOW, priority
from bridge.store.base import Store

log = logging.getLogger("bridge.poller")


def iso(ts: float) -> str:
    """Poll window bounds: ISO 8601 in UTC with an explicit offset."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def watermark_name(platform: str) -> str:
    return f"poll:{platform}"


class Poller:
    def __init__(
        self,
        store: Store,
        inbox: Inbox,
        client: PlatformClient,
        metrics: Metrics,
        *,
        overlap_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._inbox = inbox
        self._client = client
        self._metrics = metrics
        self._overlap = overlap_seconds
        self._clock = clock

    @property
    def platform(self) -> str:
        return self._client.name

    async def _news(self, page: list[NewHint]) -> list[NewHint]:
        """The page's orders that show something else than the bridge last saw there. The
        overlap shows most orders again, unchanged: they cost nothing (no hint, no read)."""
        shown = [hint.ref for hint in page if hint.observed is not None]
        seen = await self._store.seen_statuses(self.platform, shown) if shown else {}
        return [h for h in page if h.observed is None or seen.get(h.ref) != h.observed]

    async def poll(self) -> int:
        """One cycle; returns how many hints it stored. Never raises (a timer calls it)."""
        name = watermark_name(self.platform)
        started = self._clock()
        try:
            mark = await self._store.get_watermark(name)
            # First run: start from now (minus the overlap) instead of the whole history.
            since_ts = (
                datetime.fromisoformat(mark).timestamp() if mark else started
            ) - self._overlap
            found = 0
            # Background work: pages wait behind writes and look-ups for the platform's slots.
            with priority(LOW):
                async for page in self._client.changes_since(iso(since_ts), iso(started)):
                    news = await self._news(page)
                    if news:
                        await self._inbox.add(news)
                        found += len(news)
            await self._store.set_watermark(name, iso(started))
        except ReadFailed as exc:
            self._metrics.polls.labels(self.platform, "failed").inc()
            log.warning(
                "polling %s failed, the next cycle repeats the window: %s",
                self.platform,
                exc.reason,
            )
            return 0
        except Exception:
            self._metrics.polls.labels(self.platform, "failed").inc()
            log.exception("polling %s failed, the next cycle repeats the window", self.platform)
            return 0
        self._metrics.polls.labels(self.platform, "ok").inc()
        if found:
            self._metrics.hints.labels(self.platform, "poll").inc(found)
            log.info("polling %s: %d changed orders", self.platform, found)
        return found
