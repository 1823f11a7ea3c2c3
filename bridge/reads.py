"""Read coalescing: concurrent reads of one platform go out together in one batch call.

The worker reads each order on its own; when many orders change at once (a mass update, the
echoes of a batch of the bridge's own writes, a busy poll page) their reads arrive within
milliseconds of each other. Gathering them for a moment and asking once turns fifty requests
into one, which is what a rate-limited platform (Bitrix24: 2 requests/s) needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bridge.models import Snapshot
from bridge.platforms.base import PlatformClient, ReadFailed


class CoalescingReader:
    def __init__(self, client: PlatformClient, window_seconds: float = 0.01) -> None:
        self._client = client
        self._window = window_seconds
        self._waiting: dict[str, list[asyncio.Future[Snapshot | None]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0

    async def read(self, ref: str) -> Snapshot | None:
        """The order's snapshot (None: not found); raises ReadFailed like the client does."""
        if self._client.reads_in_batches <= 0:
            return await self._client.read(ref)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Snapshot | None] = loop.create_future()
        self._waiting.setdefault(ref, []).append(future)
        if len(self._waiting) >= self._client.reads_in_batches:
            self._flush_now()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush_now)
        return await future

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, {}
        if waiting:
            asyncio.get_running_loop().create_task(self._read(waiting))

    async def _read(self, waiting: dict[str, list[asyncio.Future[Snapshot | None]]]) -> None:
        refs: Sequence[str] = list(waiting)
        try:
            results = await self._client.read_many(refs)
            self.batches += 1
        except Exception as exc:  # every waiter must hear about it
            failure = exc if isinstance(exc, ReadFailed) else ReadFailed(repr(exc))
            results = dict.fromkeys(refs, failure)
        for ref, futures in waiting.items():
            result = results.get(ref, ReadFailed(f"no answer for {ref}"))
            for future in futures:
                if future.done():
                    continue
                if isinstance(result, ReadFailed):
                    future.set_exception(result)
                else:
                    future.set_result(result)
