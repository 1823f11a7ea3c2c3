"""The defaults every platform client inherits from PlatformClient (no I/O)."""

from bridge.models import Snapshot
from bridge.platforms.base import Outcome, PlatformClient, ReadFailed, WriteRequest


class KeyedClient(PlatformClient):
    """Finds orders by key one at a time, as a platform without a batch call does."""

    name = "keyed"

    def __init__(self, orders: dict[str, str], failing: set[str]) -> None:
        self.orders, self.failing = orders, failing
        self.asked: list[str] = []

    async def read(self, ref: str) -> Snapshot | None:
        raise AssertionError("only reads by key here")

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        self.asked.append(order_key)
        if order_key in self.failing:
            raise ReadFailed(f"{order_key} timed out", retry_after=3.0)
        ref = self.orders.get(order_key)
        return None if ref is None else Snapshot(self.name, ref, order_key, "S")

    async def write(self, request: WriteRequest) -> Outcome:
        return Outcome("done")

    async def aclose(self) -> None:
        pass


async def test_read_many_by_key_reads_each_key_and_keeps_each_ones_failure() -> None:
    client = KeyedClient({"K1": "1", "K3": "3"}, failing={"K2"})
    assert client.keys_in_batches == 0
    results = await client.read_many_by_key(["K1", "K2", "K3", "K4"])
    assert client.asked == ["K1", "K2", "K3", "K4"]
    assert results["K1"] == Snapshot("keyed", "1", "K1", "S")
    assert results["K3"] == Snapshot("keyed", "3", "K3", "S")
    assert results["K4"] is None
    failed = results["K2"]
    assert isinstance(failed, ReadFailed)
    assert (failed.reason, failed.retry_after) == ("K2 timed out", 3.0)
    assert list(results) == ["K1", "K2", "K3", "K4"]


async def test_read_many_by_key_of_no_keys_reads_nothing() -> None:
    client = KeyedClient({}, failing=set())
    assert await client.read_many_by_key([]) == {}
    assert client.asked == []
