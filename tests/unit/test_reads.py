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


class SaturatedClient(BatchingClient):
    """Its rate limit is what paces every call: wait_ready always had to wait."""

    async def wait_ready(self) -> bool:
        await asyncio.sleep(0)
        return True


async def test_a_saturated_platform_s_reads_wait_to_fill_a_batch() -> None:
    client = SaturatedClient()
    reader = CoalescingReader(client, linger_seconds=0.5)
    first = [asyncio.ensure_future(reader.read(str(i))) for i in range(2)]
    await asyncio.sleep(0.05)  # past the gathering window: a free platform would have read them
    assert client.calls == []
    later = [asyncio.ensure_future(reader.read(str(i))) for i in range(2, 7)]

    # A full batch leaves at once; the two left over wait out the linger for company.
    await asyncio.wait_for(asyncio.gather(*first, *later[:3]), 0.3)
    assert client.calls == [["0", "1", "2", "3", "4"]]
    await asyncio.wait_for(asyncio.gather(*later[3:]), 1.0)
    assert client.calls[1:] == [["5", "6"]]


async def test_a_saturated_platform_s_lone_read_waits_no_longer_than_the_linger() -> None:
    client = SaturatedClient()
    reader = CoalescingReader(client, linger_seconds=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    snap = await reader.read("1")

    assert snap is not None
    assert 0.2 <= loop.time() - started < 1.0
    assert client.calls == [["1"]]
