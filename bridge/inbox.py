"""Group commit of incoming hints: many webhooks, one transaction.

A webhook is answered 200 only after its hint is on disk. Committing each one alone would cap
ingest at the disk's fsync rate, so concurrent webhooks wait together: while one batch is
being written, new arrivals gather, and the next write takes them all. A lone webhook is written
at once (no timer, no added latency); under load the batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from bridge.models import NewHint
from bridge.store.base import Store, StoreUnavailable


class Inbox:
    def __init__(self, store: Store, on_stored: Callable[[], None] | None = None) -> None:
        self._store = store
        self._on_stored = on_stored
        self._pending: list[tuple[Sequence[NewHint], asyncio.Future[None]]] = []
        self._flushing = False
        self.batches = 0
        self.stored = 0

    async def add(self, hints: Sequence[NewHint]) -> None:
        """Return once ``hints`` are durably stored; raise StoreUnavailable if they are not."""
        if not hints:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((hints, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                hints = [h for group, _ in batch for h in group]
                try:
                    await self._store.add_hints(hints)
                except Exception as exc:  # every waiter must learn the outcome
                    error = (
                        exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
                    )
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.batches += 1
                self.stored += len(hints)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
                if self._on_stored is not None:
                    self._on_stored()
        finally:
            self._flushing = False
