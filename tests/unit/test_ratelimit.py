import asyncio

import pytest

from bridge.ratelimit import LeakyBucket


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_a_burst_goes_at_once_then_the_rate_holds() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    for _ in range(50):
        await bucket.acquire()
    assert t.slept == []
    for _ in range(10):
        await bucket.acquire()
    assert t.now == pytest.approx(5.0)  # ten more at 2 per second


async def test_the_portal_never_sees_more_than_it_allows() -> None:
    # Replays the portal's own bucket on the times the client sends: it must never overflow.
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    level, last = 0.0, 0.0
    for i in range(500):
        if i % 37 == 0:
            t.now += 3.3  # idle gaps drain the bucket
        await bucket.acquire()
        level = max(0.0, level - (t.now - last) * 2.0) + 1
        last = t.now
        assert level <= 50 + 1e-9
    # and it is not much slower than allowed: 500 requests, 50 at once, then 2 per second
    assert t.now <= (500 - 50) / 2.0 + 3.3 * 14 + 1


async def test_fill_makes_the_next_request_wait() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    bucket.fill()
    await bucket.acquire()
    assert t.slept == [pytest.approx(0.5)]


async def test_concurrent_callers_are_spaced_out() -> None:
    t = FakeTime()
    bucket = LeakyBucket(5.0, 1, clock=t.clock, sleep=t.sleep)
    await asyncio.gather(*(bucket.acquire() for _ in range(6)))
    assert t.now == pytest.approx(1.0)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rate"):
        LeakyBucket(0, 1)
    with pytest.raises(ValueError, match="burst"):
        LeakyBucket(1, 0)


async def test_the_platform_can_correct_our_level() -> None:
    t = FakeTime()
    bucket = LeakyBucket(10.0, 200, clock=t.clock, sleep=t.sleep)
    bucket.set_level(200)  # the header said the bucket is full
    await bucket.acquire()
    assert t.slept == [pytest.approx(0.1)]
    bucket.set_level(-5)  # nonsense is clamped
    assert bucket.wait_time() == 0


async def test_wait_for_room_says_whether_requests_are_scarce() -> None:
    t = FakeTime()
    bucket = LeakyBucket(10.0, 200, clock=t.clock, sleep=t.sleep)
    assert await bucket.wait_for_room() is False  # empty: plenty of room
    for _ in range(100):
        await bucket.acquire()
    assert await bucket.wait_for_room() is False  # half full: not yet scarce
    await bucket.acquire()
    assert await bucket.wait_for_room() is True  # more than half full
    assert t.slept == []
    bucket.fill()
    assert await bucket.wait_for_room() is True  # had to wait for room
    assert t.slept == [pytest.approx(0.1)]
    t.now += 60.0
    assert await bucket.wait_for_room() is False  # drained meanwhile
