"""The inbox: a webhook's hints, durably stored before it is answered 200.

Concurrent webhooks share one transaction (see ``bridge.groupcommit``): ingest is not capped
at the disk's fsync rate, and a lone webhook is written at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bridge.groupcommit import GroupCommit
from bridge.models import NewHint
from bridge.store.base import Store, StoreUnavailable


class Inbox:
    def __init__(self, store: Store, on_stored: Callable[[], None] | None = None) -> None:
        self._store = store
        self._on_stored = on_stored
        self._group: GroupCommit[Sequence[NewHint], None] = GroupCommit(self._write)
        self.batches = 0
        self.stored = 0

    async def add(self, hints: Sequence[NewHint]) -> None:
        """Return once ``hints`` are durably stored; raise StoreUnavailable if they are not."""
        if hints:
            await self._group.submit(hints)

    async def _write(self, groups: list[Sequence[NewHint]]) -> list[BaseException | None]:
        hints = [hint for group in groups for hint in group]
        try:
            await self._store.add_hints(hints)
        except Exception as exc:
            error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
            return [error] * len(groups)
        self.batches += 1
        self.stored += len(hints)
        if self._on_stored is not None:
            self._on_stored()
        return [None] * len(groups)
