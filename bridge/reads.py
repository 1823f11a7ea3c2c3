"""Read coalescing: concurrent reads of one platform go out together in one batch call.

The worker reads each order on its own; when many orders change at once (a mass update, the
echoes of a batch of the bridge's own writes, a busy poll page) their reads arrive within
milliseconds of each other. Gathering them for a moment, and for as long as the platform's
rate limit makes us wait anyway, turns fifty requests into one: what a rate-limited platform
(Bitrix24: 2 requests/s) needs.

When requests are scarce (the bucket had no room, or is more than half full), every request
is a slot taken from something else, typically a backlog of writes. Each write comes back as an
echo to read, and a read sent as soon as there is room would carry only the one or two echoes
that came in meanwhile. So a scarce platform's reads linger, up to ``linger_seconds``, until
they fill a batch: while draining 5,000 writes into Shoptet, one read per fifty writes instead
of one per three.
"""

from __future__ import annotations

import asyncio
import contextlib

from bridge.models import Snapshot
from bridge.platforms.base import PlatformClient, ReadFailed


class CoalescingReader:
    def __init__(
        self, client: PlatformClient, window_seconds: float = 0.01, linger_seconds: float = 5.0
    ) -> None:
        self._client = client
        self._window = window_seconds
        self._linger = linger_seconds
        self._waiting: dict[str, list[asyncio.Future[Snapshot | None]]] = {}
        self._full = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0

    async def read(self, ref: str) -> Snapshot | None:
        """The order's snapshot (None: not found); raises ReadFailed like the client does."""
        if self._client.reads_in_batches <= 0:
            return await self._client.read(ref)
        future: asyncio.Future[Snapshot | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(ref, []).append(future)
        if len(self._waiting) >= self._client.reads_in_batches:
            self._full.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        size = self._client.reads_in_batches
        while self._waiting:
            await asyncio.sleep(self._window)
            if await self._client.wait_ready() and len(self._waiting) < size:
                # Scarce: make this request count (see the module's docstring).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._linger)
                await self._client.wait_ready()
            refs = list(self._waiting)[:size]
            batch = {ref: self._waiting.pop(ref) for ref in refs}
            if len(self._waiting) < size:
                self._full.clear()
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
