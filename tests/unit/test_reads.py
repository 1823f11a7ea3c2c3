import asyncio
from collections.abc import Sequence

import pytest

from bridge.models import Snapshot
from bridge.platforms.base import Outcome, PlatformClient, ReadFailed, WriteRequest
from bridge.reads import CoalescingReader


class BatchingClient(PlatformClient):
    name = "batching"
    reads_in_batches = 5

    def __init__(self, missing: set[str] = frozenset(), failing: set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.missing, self.failing = missing, failing

    async def read(self, ref: str) -> Snapshot | None:
        raise AssertionError("reads go through read_many")

    async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
        self.calls.append(list(refs))
        await asyncio.sleep(0)
        out: dict[str, Snapshot | ReadFailed | None] = {}
        for ref in refs:
            if ref in self.missing:
                out[ref] = None
            elif ref in self.failing:
                out[ref] = ReadFailed(f"{ref} failed")
            else:
                out[ref] = Snapshot(self.name, ref, f"key-{ref}", "S")
        return out

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        return None

    async def write(self, request: WriteRequest) -> Outcome:
        return Outcome("done")

    async def aclose(self) -> None:
        pass


async def test_concurrent_reads_share_calls_up_to_the_batch_size() -> None:
    client = BatchingClient()
    reader = CoalescingReader(client)
    snaps = await asyncio.gather(*(reader.read(str(i)) for i in range(12)))
    assert [s.ref for s in snaps if s] == [str(i) for i in range(12)]
    assert [len(c) for c in client.calls] == [5, 5, 2]


async def test_the_same_order_read_twice_at_once_is_asked_once() -> None:
    client = BatchingClient()
    reader = CoalescingReader(client)
    a, b = await asyncio.gather(reader.read("7"), reader.read("7"))
    assert a == b
    assert client.calls == [["7"]]


async def test_missing_and_failing_orders_stay_separate() -> None:
    client = BatchingClient(missing={"2"}, failing={"3"})
    reader = CoalescingReader(client)
    results = await asyncio.gather(
        reader.read("1"), reader.read("2"), reader.read("3"), return_exceptions=True
    )
    assert isinstance(results[0], Snapshot)
    assert results[1] is None
    assert isinstance(results[2], ReadFailed)


async def test_a_client_without_batches_reads_directly() -> None:
    class Plain(BatchingClient):
        reads_in_batches = 0

        async def read(self, ref: str) -> Snapshot | None:
            return Snapshot("plain", ref, None, "x")

    reader = CoalescingReader(Plain())
    snap = await reader.read("1")
    assert snap is not None and snap.platform == "plain"


async def test_an_exploding_client_fails_every_waiter() -> None:
    class Exploding(BatchingClient):
        async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
            raise RuntimeError("boom")

    reader = CoalescingReader(Exploding())
    with pytest.raises(ReadFailed, match="boom"):
        await reader.read("1")
