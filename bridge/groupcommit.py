"""Group commit: callers that arrive while a write is in flight share the next write.

Each durable commit costs an fsync. Committing every caller alone would cap the rate at the
disk's fsync rate and queue callers behind each other; instead, while one write is in flight,
new arrivals gather, and the next write takes them all. A lone caller is written at once (no
timer, no added latency); under load the groups grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Writes one group; returns one outcome per item, in order: a result, or the exception that
# item's caller should get (one item failing need not fail the others).
WriteGroup = Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]]


class GroupCommit(Generic[Item, Result]):
    def __init__(self, write: WriteGroup[Item, Result]) -> None:
        self._write = write
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._writing = False

    async def submit(self, item: Item) -> Result:
        """Return ``item``'s outcome once the group holding it is written."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    outcomes = await self._write([item for item, _ in group])
                    if len(outcomes) != len(group):
                        raise RuntimeError(f"{len(outcomes)} outcomes for {len(group)} items")
                except Exception as exc:  # every waiter must learn the outcome
                    outcomes = [exc] * len(group)
                for (_, future), outcome in zip(group, outcomes, strict=True):
                    if future.done():  # its caller was cancelled; the write stands
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._writing = False
