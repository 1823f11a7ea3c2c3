"""What every platform module provides.

A platform module has two halves:

* a pure half: webhook verification and parsing, request building and response
  classification — no I/O, so it is unit-tested with plain bytes and dicts;
* a client (:class:`PlatformClient`) that does the HTTP with httpx and uses the pure half.

Adding a platform means one module that fills in :class:`PlatformSpec`, and one line in
:mod:`bridge.platforms` (the registry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from bridge.models import NewHint, Snapshot
from bridge.ratelimit import LeakyBucket

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.store.base import Store


@dataclass(frozen=True, slots=True)
class ClientContext:
    """What a client may need besides settings: the store (e.g. for OAuth tokens) and the
    native statuses the mapping uses on its platform (e.g. to check a deal pipeline)."""

    store: Store | None = None
    natives: frozenset[str] = frozenset()
    # Told of every request sent: (platform, method). Counts the API economy.
    on_call: Callable[[str, str], None] = lambda platform, method: None

    def count(self, platform: str, method: str) -> None:
        self.on_call(platform, method)


class TargetOptions(BaseModel):
    """Side-effect flags that a mapping may set per canonical status and platform."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WebhookRejected(Exception):
    """A webhook that must not be stored: ``status`` is the HTTP answer, ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ReadFailed(Exception):
    """A read that did not answer (network, throttling, outage): try again later."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ParsedWebhook:
    """The order references a verified webhook points at (empty: acknowledged and ignored)."""

    event: str
    refs: tuple[str, ...]


OutcomeKind = Literal["done", "retry", "not_found", "permanent", "conflict"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one write, classified by the platform module.

    * done: the platform shows the status now (``warning`` if it said something alongside);
    * retry: try again later (``retry_after`` seconds if the platform said when);
    * not_found: the order is not (yet) on the platform; recorded and retried later;
    * conflict: the order changed under the write; re-read and decide again;
    * permanent: will never succeed as it stands; dead-lettered with ``reason``.
    """

    kind: OutcomeKind
    reason: str = ""
    retry_after: float | None = None
    warning: str | None = None
    learned_ref: str | None = None  # the platform's own reference, if the answer revealed it


@dataclass(frozen=True, slots=True)
class WriteRequest:
    order_key: str
    native: str
    ref: str | None  # the learned platform reference, cheaper than the order key where known
    options: TargetOptions


class PlatformClient(ABC):
    """Reads and writes one platform's order statuses over HTTP."""

    name: ClassVar[str]
    # The client's copy of the platform's rate limit, if it has one; the bridge saves its
    # level now and then, so a restarted bridge knows how full the platform's bucket may be.
    bucket: LeakyBucket | None = None

    @abstractmethod
    async def read(self, ref: str) -> Snapshot | None:
        """The order's current status by the platform's own reference; None if not found."""

    @abstractmethod
    async def read_by_key(self, order_key: str) -> Snapshot | None:
        """The order's current status by the cross-platform order key; None if not found."""

    async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
        """Several reads at once; platforms with a batch call override this (and
        ``reads_in_batches``). Each ref gets its snapshot, None, or its own failure."""
        results: dict[str, Snapshot | ReadFailed | None] = {}
        for ref in refs:
            try:
                results[ref] = await self.read(ref)
            except ReadFailed as exc:
                results[ref] = exc
        return results

    reads_in_batches: ClassVar[int] = 0  # >0: read_many takes up to this many refs in one call

    async def read_many_by_key(
        self, keys: Sequence[str]
    ) -> dict[str, Snapshot | ReadFailed | None]:
        """Several reads by order key at once; platforms that can look up many keys in one call
        override this (and ``keys_in_batches``). Each key gets its snapshot, None, or its own
        failure."""
        results: dict[str, Snapshot | ReadFailed | None] = {}
        for key in keys:
            try:
                results[key] = await self.read_by_key(key)
            except ReadFailed as exc:
                results[key] = exc
        return results

    keys_in_batches: ClassVar[int] = 0  # >0: read_many_by_key takes up to this many keys a call

    async def wait_ready(self) -> bool:
        """Return when a request would not have to wait for the platform's rate limit; True if
        requests are scarce (it had to wait, or the platform's budget is mostly used up).

        Batching callers wait here before choosing what goes into the next call, so a backlog
        that builds up while the platform is busy leaves in full batches.
        """
        return False  # no client-side rate limit by default

    @abstractmethod
    async def write(self, request: WriteRequest) -> Outcome:
        """Drive one order to a native status. Never raises for HTTP or network trouble."""

    async def write_many(self, requests: Sequence[WriteRequest]) -> list[Outcome]:
        """Several writes; platforms with a batch call override this. Same order as given."""
        return [await self.write(r) for r in requests]

    def changes_since(self, since: str | None, until: str) -> AsyncIterator[list[NewHint]]:
        """Pages of hints for orders changed in ``[since, until]`` (ISO times); for pollers."""
        raise NotImplementedError(f"{self.name} cannot be polled")

    @abstractmethod
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class PlatformSpec:
    """A platform as the rest of the bridge sees it (one registry entry)."""

    name: str
    native_type: type[int] | type[str]  # how the mapping file writes native statuses
    options: type[TargetOptions]
    make_client: Callable[[Settings, ClientContext], PlatformClient]
    # Pure: verify and parse a webhook. None: the platform sends no order webhooks.
    parse_webhook: Callable[[Settings, Mapping[str, str], bytes], ParsedWebhook] | None = None
    # Does this platform need polling to see changes made in it?
    polled: bool = False
    # Max concurrent writes (the platform's own per-token limit).
    write_concurrency: int = 1
    # Max writes to claim at once (batching platforms take more).
    write_batch: int = 1
    extra: Mapping[str, Any] | None = None
