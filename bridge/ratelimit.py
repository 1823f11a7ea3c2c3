"""A client-side leaky bucket, mirroring the one a platform enforces.

Bitrix24 counts every request into a bucket that drains at a fixed rate and refuses requests
when it overflows. Keeping our own copy of that bucket, shared by everything that talks to the
portal, means the bridge waits *before* sending instead of collecting refusals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class LeakyBucket:
    """``burst`` requests at once, then ``rate`` per second.

    ``acquire`` reserves a slot and sleeps until it is safe to send. Reservations are made in
    arrival order under a lock, so concurrent callers queue fairly instead of all waking at once.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._level = 0.0  # requests counted in the bucket as of self._at
        self._at = clock()
        self._lock = asyncio.Lock()

    def _drain(self, now: float) -> None:
        self._level = max(0.0, self._level - (now - self._at) * self.rate)
        self._at = now

    def wait_time(self) -> float:
        """Seconds until one more request fits (0: now)."""
        self._drain(self._clock())
        return max(0.0, (self._level + 1 - self.burst) / self.rate)

    async def acquire(self) -> None:
        async with self._lock:
            wait = self.wait_time()
            if wait > 0:
                await self._sleep(wait)
                self._drain(self._clock())
            self._level += 1

    async def wait_for_room(self) -> bool:
        """Wait until a request would go out at once, without taking the slot. True if requests
        are scarce: it had to wait, or the bucket is still more than half full.

        Callers that batch use it to wait *before* deciding what to send, so that whatever
        piles up meanwhile goes out in the same request; when requests are scarce, they may
        wait longer still for a fuller batch.
        """
        waited = False
        while (wait := self.wait_time()) > 0:
            waited = True
            await self._sleep(wait)
        return waited or self._level > self.burst / 2

    def set_level(self, level: float) -> None:
        """The platform told us how full its bucket is (e.g. a response header): believe it."""
        self._drain(self._clock())
        self._level = max(0.0, min(float(self.burst), level))

    def fill(self) -> None:
        """The platform said the bucket is full (someone else uses it too): start from full."""
        self._drain(self._clock())
        self._level = float(self.burst)
