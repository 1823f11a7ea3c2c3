"""Read coalescing: concurrent reads of one platform go out together in one batch call.

The worker reads each order on its own; when many orders change at once (a mass update, the
echoes of a batch of the bridge's own writes, a busy poll page) their reads arrive within
milliseconds of each other. Gathering them for a moment, and for as long as the platform's
rate limit makes us wait anyway, turns fifty requests into one: what a rate-limited platform
(Bitrix24: 2 requests/s) needs. Look-ups by order key (an order's first sighting on a
platform) are gathered the same way, in their own calls: Bitrix24 finds up to 2,500 orders by
key in one request.

When requests are scarce (the bucket had no room, or is more than half full), every request
is a slot taken from something else, typically a backlog of writes. So a scarce platform's
reads linger, up to ``linger_seconds``, while more keep joining: they leave when the batch is
full, or when nothing joined for ``quiet_seconds``. While draining 5,000 writes into Shoptet
that is one read per fifty writes instead of one per three.

Reads by reference are mostly echoes of the bridge's own writes: they are sent at low
priority (:mod:`bridge.ratelimit`), after the writes and look-ups that wait for the same
slots. Look-ups are what a write waits for, so they go at high priority.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from bridge.models import Snapshot
from bridge.platforms.base import PlatformClient, ReadFailed
from bridge.ratelimit import HIGH, LOW, priority

Results = dict[str, Snapshot | ReadFailed | None]


class _Gatherer:
    """One kind of read (by reference, or by order key) of one platform, gathered."""

    def __init__(
        self,
        client: PlatformClient,
        size: int,
        fetch_many: Callable[[Sequence[str]], Awaitable[Results]],
        fetch_one: Callable[[str], Awaitable[Snapshot | None]],
        level: int,
        window: float,
        linger: float,
        quiet: float,
    ) -> None:
        self._client = client
        self._size = size
        self._fetch_many = fetch_many
        self._fetch_one = fetch_one
        self._level = level
        self._window = window
        self._linger = linger
        self._quiet = quiet
        self._waiting: dict[str, list[asyncio.Future[Snapshot | None]]] = {}
        self._joined = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0

    async def read(self, name: str) -> Snapshot | None:
        if self._size <= 0:
            with priority(self._level):
                return await self._fetch_one(name)
        future: asyncio.Future[Snapshot | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(name, []).append(future)
        self._joined.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _gather_more(self) -> None:
        """Scarce: make this request count (see the module's docstring)."""
        deadline = time.monotonic() + self._linger
        while len(self._waiting) < self._size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._joined.clear()
            try:
                await asyncio.wait_for(self._joined.wait(), min(self._quiet, left))
            except TimeoutError:
                return  # nothing joined for a while: send what there is

    async def _send(self) -> None:
        with priority(self._level):
            while self._waiting:
                await asyncio.sleep(self._window)
                if await self._client.wait_ready() and len(self._waiting) < self._size:
                    await self._gather_more()
                    await self._client.wait_ready()
                names = list(self._waiting)[: self._size]
                batch = {name: self._waiting.pop(name) for name in names}
                try:
                    results = await self._fetch_many(names)
                    self.batches += 1
                except Exception as exc:  # every waiter must hear about it
                    failure = exc if isinstance(exc, ReadFailed) else ReadFailed(repr(exc))
                    results = dict.fromkeys(names, failure)
                for name, futures in batch.items():
                    result = results.get(name, ReadFailed(f"no answer for {name}"))
                    for future in futures:
                        if future.done():
                            continue
                        if isinstance(result, ReadFailed):
                            future.set_exception(result)
                        else:
                            future.set_result(result)


class CoalescingReader:
    def __init__(
        self,
        client: PlatformClient,
        window_seconds: float = 0.01,
        linger_seconds: float = 5.0,
        quiet_seconds: float = 0.25,
    ) -> None:
        self._refs = _Gatherer(
            client,
            client.reads_in_batches,
            client.read_many,
            client.read,
            LOW,
            window_seconds,
            linger_seconds,
            quiet_seconds,
        )
        self._keys = _Gatherer(
            client,
            client.keys_in_batches,
            client.read_many_by_key,
            client.read_by_key,
            HIGH,
            window_seconds,
            linger_seconds,
            quiet_seconds,
        )

    @property
    def batches(self) -> int:
        """Batch calls sent so far (reads and look-ups)."""
        return self._refs.batches + self._keys.batches

    async def read(self, ref: str) -> Snapshot | None:
        """The order's snapshot by the platform's reference (None: not found); raises
        ReadFailed like the client does."""
        return await self._refs.read(ref)

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        """The order's snapshot found by its order key (None: not on this platform)."""
        return await self._keys.read(order_key)
