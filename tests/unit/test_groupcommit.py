import asyncio
from collections.abc import Sequence

import pytest

from bridge.groupcommit import GroupCommit


class Writer:
    """Records each group it is given; an item "bad" fails alone, an item "boom" fails all."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []

    async def write(self, items: list[str]) -> Sequence[str | BaseException]:
        self.groups.append(items)
        await asyncio.sleep(0.01)  # a commit takes a while; others arrive meanwhile
        if "boom" in items:
            raise OSError("disk full")
        return [ValueError(i) if i == "bad" else i.upper() for i in items]


async def test_a_lone_item_is_written_at_once() -> None:
    writer = Writer()
    assert await GroupCommit(writer.write).submit("a") == "A"
    assert writer.groups == [["a"]]


async def test_items_arriving_during_a_write_share_the_next_one() -> None:
    writer = Writer()
    group = GroupCommit(writer.write)

    first = asyncio.ensure_future(group.submit("0"))
    await asyncio.sleep(0)  # its write is under way
    results = await asyncio.gather(first, *(group.submit(str(i)) for i in range(1, 6)))

    assert results == ["0", "1", "2", "3", "4", "5"]
    assert writer.groups == [["0"], ["1", "2", "3", "4", "5"]]


async def test_an_item_that_fails_fails_alone() -> None:
    group = GroupCommit(Writer().write)

    results = await asyncio.gather(
        *(group.submit(i) for i in ("a", "b", "bad", "c")), return_exceptions=True
    )

    assert results[:2] == ["A", "B"] and results[3] == "C"
    assert isinstance(results[2], ValueError)


async def test_a_failed_write_fails_everyone_in_it_and_the_next_group_goes_on() -> None:
    writer = Writer()
    group = GroupCommit(writer.write)
    first = asyncio.ensure_future(group.submit("x"))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(group.submit(i)) for i in ("boom", "y")]
    await first
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert [type(r) for r in results] == [OSError, OSError]

    assert await group.submit("z") == "Z"  # not stuck after a failure
    assert writer.groups == [["x"], ["boom", "y"], ["z"]]


async def test_a_writer_that_miscounts_its_outcomes_fails_the_group() -> None:
    async def short(items: list[str]) -> list[str]:
        return items[:-1]

    group = GroupCommit(short)
    with pytest.raises(RuntimeError, match="0 outcomes for 1 items"):
        await group.submit("a")


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    writer = Writer()
    group = GroupCommit(writer.write)
    first = asyncio.ensure_future(group.submit("a"))
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(group.submit("b"))
    staying = asyncio.ensure_future(group.submit("c"))
    await asyncio.sleep(0)
    leaving.cancel()

    assert await first == "A"
    assert await staying == "C"
    assert leaving.cancelled()
    assert writer.groups == [["a"], ["b", "c"]]  # "b" was written all the same
