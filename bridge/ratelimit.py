"""A client-side leaky bucket, mirroring the one a platform enforces.

Bitrix24 counts every request into a bucket that drains at a fixed rate and refuses requests
when it overflows. Keeping our own copy of that bucket, shared by everything that talks to the
portal, means the bridge waits *before* sending instead of collecting refusals.

When requests are scarce, not every request is worth the same. A write moves an order to where
it belongs, and a look-up is what a write waits for; reading back the echo of a write the bridge
made can wait a few seconds, and gathers more echoes while it waits. So requests carry a
priority (:data:`HIGH` by default, :data:`LOW` inside ``with priority(LOW)``): when the bucket
has no room, the next free slot goes to the highest priority, first come first served within
it. A low-priority request that has waited ``defer_seconds`` counts as high, so nothing waits
for ever behind a long backlog of writes.

Two more things keep a (re)started bridge from collecting refusals: a bucket can be restored
from the level a previous process saved (:meth:`LeakyBucket.restore`), and until the platform
has answered once, only one request is out at a time: if the platform's bucket turns out to be
full, one request is refused, not every request that was sent at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

HIGH = 0
LOW = 1

_priority: ContextVar[int] = ContextVar("bridge_request_priority", default=HIGH)


@contextlib.contextmanager
def priority(level: int) -> Iterator[None]:
    """Requests sent inside this block (in this task) wait for a slot at ``level``."""
    token = _priority.set(level)
    try:
        yield
    finally:
        _priority.reset(token)


def current_priority() -> int:
    return _priority.get()


@dataclass(eq=False)
class _Waiter:
    priority: int
    seq: int
    since: float
    future: asyncio.Future[None] = field(repr=False)


class LeakyBucket:
    """``burst`` requests at once, then ``rate`` per second.

    ``acquire`` takes a slot and returns when it is safe to send. Slots are handed out by one
    task in order of priority, then arrival, so concurrent callers queue fairly instead of all
    waking at once.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        defer_seconds: float = 10.0,
        probe: bool = False,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._defer = defer_seconds
        self._level = 0.0  # requests counted in the bucket as of self._at
        self._at = clock()
        self._waiters: list[_Waiter] = []
        self._order = itertools.count()
        self._pump: asyncio.Task[None] | None = None
        # Until the platform has answered once, one request at a time (see the module doc).
        self._probing = probe
        self._probe_out = False
        self._probe_back = asyncio.Event()

    # -- the level -------------------------------------------------------------------------
    def _drain(self, now: float) -> None:
        self._level = max(0.0, self._level - (now - self._at) * self.rate)
        self._at = now

    def level(self) -> float:
        """Requests counted in the bucket right now."""
        self._drain(self._clock())
        return self._level

    def wait_time(self) -> float:
        """Seconds until one more request fits (0: now)."""
        self._drain(self._clock())
        wait = (self._level + 1 - self.burst) / self.rate
        # Below a nanosecond is rounding, not waiting (a sleep that short may not move a clock).
        return wait if wait > 1e-9 else 0.0

    def set_level(self, level: float) -> None:
        """The platform told us how full its bucket is (e.g. a response header): believe it."""
        self._drain(self._clock())
        self._level = max(0.0, min(float(self.burst), level))
        self._end_probe()

    def fill(self) -> None:
        """The platform said the bucket is full (someone else uses it too): start from full."""
        self._drain(self._clock())
        self._level = float(self.burst)
        self._end_probe()

    def restore(self, level: float, age_seconds: float) -> None:
        """Start from a level a previous process saved ``age_seconds`` ago (a restart): what
        the platform's bucket may still hold of it, drained since then."""
        self._drain(self._clock())
        left = level - max(0.0, age_seconds) * self.rate
        self._level = max(self._level, min(float(self.burst), left))

    # -- answers ---------------------------------------------------------------------------
    def answered(self, heard: bool = True) -> None:
        """A request got an answer (``heard``), or failed without one. Until one is heard,
        requests go out one at a time; after that, the bucket alone decides."""
        if heard:
            self._end_probe()
        elif self._probe_out:
            self._probe_out = False
            self._probe_back.set()

    def _end_probe(self) -> None:
        self._probing = False
        self._probe_out = False
        self._probe_back.set()

    # -- waiting ---------------------------------------------------------------------------
    def _rank(self, waiter: _Waiter, now: float) -> tuple[int, int]:
        promoted = waiter.priority <= HIGH or now - waiter.since >= self._defer
        return (HIGH if promoted else waiter.priority, waiter.seq)

    async def acquire(self, priority: int | None = None) -> None:
        """Wait for a slot at ``priority`` (default: the current :func:`priority` block)."""
        level = current_priority() if priority is None else priority
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(level, next(self._order), self._clock(), future)
        self._waiters.append(waiter)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._hand_out())
        try:
            await future
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if future.done() and not future.cancelled():
                self.answered(heard=False)  # the slot was ours: never sent, never answered
            raise

    @contextlib.asynccontextmanager
    async def slot(self, priority: int | None = None) -> AsyncIterator[None]:
        """``acquire``, then send inside the block: leaving it normally means the platform
        answered, leaving it with an exception that it did not (see :meth:`answered`)."""
        await self.acquire(priority)
        try:
            yield
        except BaseException:
            self.answered(heard=False)
            raise
        self.answered(heard=True)

    async def _hand_out(self) -> None:
        """Give out slots one by one, each to the best-ranked waiter, when there is room."""
        while True:
            self._waiters = [w for w in self._waiters if not w.future.done()]
            if not self._waiters:
                return
            if self._probing and self._probe_out:
                self._probe_back.clear()
                await self._probe_back.wait()
                continue
            wait = self.wait_time()
            if wait > 0:
                # Sleep, then choose: a better-ranked waiter may arrive meanwhile.
                await self._sleep(wait)
                continue
            now = self._clock()
            waiter = min(self._waiters, key=lambda w: self._rank(w, now))
            self._waiters.remove(waiter)
            self._level += 1
            if self._probing:
                self._probe_out = True
            waiter.future.set_result(None)

    async def wait_for_room(self, priority: int | None = None) -> bool:
        """Wait until a request at ``priority`` would get a slot at once, without taking it.
        True if requests are scarce: it had to wait, or the bucket is still more than half
        full.

        Callers that batch use it to wait *before* deciding what to send, so that whatever
        piles up meanwhile goes out in the same request; when requests are scarce, they may
        wait longer still for a fuller batch.
        """
        level = current_priority() if priority is None else priority
        since = self._clock()
        waited = False
        while True:
            now = self._clock()
            mine = HIGH if level <= HIGH or now - since >= self._defer else level
            ahead = any(self._rank(w, now)[0] <= mine for w in self._waiters)
            wait = self.wait_time()
            if wait <= 0 and not ahead and not (self._probing and self._probe_out):
                break
            waited = True
            if wait > 0:
                await self._sleep(wait)
            else:
                # Room, but someone is ahead: let the hand-out serve them first.
                await asyncio.sleep(min(0.05, 1 / self.rate))
        return waited or self._level > self.burst / 2
