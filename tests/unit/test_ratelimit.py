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


# -- priorities, restarts, probing --------------------------------------------------------------


async def test_when_scarce_the_next_slot_goes_to_the_higher_priority() -> None:
    from bridge.ratelimit import HIGH, LOW

    t = FakeTime()
    bucket = LeakyBucket(2.0, 1, clock=t.clock, sleep=t.sleep)
    await bucket.acquire()  # the bucket is full now
    served: list[str] = []

    async def take(name: str, level: int) -> None:
        await bucket.acquire(level)
        served.append(name)

    # Arrival order: two reads, then two writes; the writes go first.
    await asyncio.gather(
        take("read1", LOW), take("read2", LOW), take("write1", HIGH), take("write2", HIGH)
    )
    assert served == ["write1", "write2", "read1", "read2"]


async def test_a_low_priority_request_waits_at_most_defer_seconds() -> None:
    from bridge.ratelimit import HIGH, LOW

    t = FakeTime()
    bucket = LeakyBucket(1.0, 1, clock=t.clock, sleep=t.sleep, defer_seconds=3.0)
    await bucket.acquire()
    served: list[tuple[str, float]] = []

    async def take(name: str, level: int) -> None:
        await bucket.acquire(level)
        served.append((name, t.now))

    await asyncio.gather(take("read", LOW), *(take(f"w{i}", HIGH) for i in range(10)))
    # Slots come at 1, 2, 3 s: at 3 s the read has waited its 3 s and counts as high.
    names = [name for name, _ in served]
    assert names.index("read") == 2, names


async def test_the_priority_block_sets_the_default() -> None:
    from bridge.ratelimit import LOW, current_priority, priority

    assert current_priority() == 0
    with priority(LOW):
        assert current_priority() == LOW
    assert current_priority() == 0


async def test_a_restored_level_is_drained_by_its_age() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    bucket.restore(50.0, age_seconds=2.0)  # saved full two seconds ago: 46 left
    assert bucket.level() == pytest.approx(46.0)
    for _ in range(4):
        await bucket.acquire()
    assert t.slept == []
    await bucket.acquire()
    assert t.slept == [pytest.approx(0.5)]


async def test_an_old_saved_level_changes_nothing() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    bucket.restore(50.0, age_seconds=600.0)
    assert bucket.level() == 0.0


async def test_a_probing_bucket_sends_one_request_until_the_platform_answered() -> None:
    bucket = LeakyBucket(2.0, 50, probe=True)
    sent: list[int] = []

    async def request(i: int) -> None:
        async with bucket.slot():
            sent.append(i)
            await asyncio.sleep(0.05)

    first = asyncio.create_task(request(0))
    await asyncio.sleep(0.01)
    others = [asyncio.create_task(request(i)) for i in range(1, 5)]
    await asyncio.sleep(0.02)
    assert sent == [0]  # the rest wait for the first answer
    await asyncio.gather(first, *others)
    assert sorted(sent) == [0, 1, 2, 3, 4]


async def test_a_probe_that_got_no_answer_lets_the_next_one_probe() -> None:
    bucket = LeakyBucket(2.0, 50, probe=True)
    with pytest.raises(OSError):
        async with bucket.slot():
            raise OSError("connection refused")
    in_flight = 0
    most = 0

    async def request() -> None:
        nonlocal in_flight, most
        async with bucket.slot():
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

    await asyncio.gather(*(request() for _ in range(3)))
    assert most >= 1  # it went on; the first heard answer ended the probing


async def test_a_refusal_while_probing_fills_the_bucket_and_ends_the_probe() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep, probe=True)
    async with bucket.slot():
        bucket.fill()  # the platform said: full
    await bucket.acquire()
    assert t.slept == [pytest.approx(0.5)]
