"""Read coalescing: concurrent reads of one platform go out together in one batch call.

The worker reads each order on its own; when many orders change at once (a mass update, the
echoes of a batch of the bridge's own writes, a busy poll page) their reads arrive within
milliseconds of each other. Gathering them for a moment, and for as long as the platform's
rate limit makes us wait anyway, turns fifty requests into one: what a rate-limited platform
(Bitrix24: 2 requests/s) needs.
"""

from __future__ import annotations

import asyncio

from bridge.models import Snapshot
from bridge.platforms.base import PlatformClient, ReadFailed


class CoalescingReader:
    def __init__(self, client: PlatformClient, window_seconds: float = 0.01) -> None:
        self._client = client
        self._window = window_seconds
        self._waiting: dict[str, list[asyncio.Future[Snapshot | None]]] = {}
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0

    async def read(self, ref: str) -> Snapshot | None:
        """The order's snapshot (None: not found); raises ReadFailed like the client does."""
        if self._client.reads_in_batches <= 0:
            return await self._client.read(ref)
        future: asyncio.Future[Snapshot | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(ref, []).append(future)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        size = self._client.reads_in_batches
        while self._waiting:
            await asyncio.sleep(self._window)
            await self._client.wait_ready()
            refs = list(self._waiting)[:size]
            batch = {ref: self._waiting.pop(ref) for ref in refs}
            try:
                results = await self._client.read_many(refs)
                self.batches += 1
            except Exception as exc:  # every waiter must hear about it
                failure = exc if isinstance(exc, ReadFailed) else ReadFailed(repr(exc))
                results = dict.fromkeys(refs, failure)
            for ref, futures in batch.items():
                result = results.get(ref, ReadFailed(f"no answer for {ref}"))
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(result, ReadFailed):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
