import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from bridge.retry import RetryPolicy, parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        (format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
        (format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True), 0.0),
        ("Mon, 01 Jul 2024 12:01:11", None),  # no zone: unreadable, not guessed
        ("soon", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize("attempts", [1, 2, 3, 5, 8, 20])
def test_delay_stays_within_the_exponential_step(attempts: int) -> None:
    policy = RetryPolicy(base_seconds=2, factor=2, cap_seconds=900)
    step = min(900, 2 * 2 ** (attempts - 1))
    rng = random.Random(attempts)
    for _ in range(200):
        assert step / 2 <= policy.delay(attempts, rng) <= step


def test_delays_grow_and_are_jittered() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    first = [policy.delay(1, rng) for _ in range(50)]
    fifth = [policy.delay(5, rng) for _ in range(50)]
    assert max(first) < min(fifth)
    assert len(set(first)) > 1


@pytest.mark.parametrize(
    ("elapsed", "gives_up"), [(0, False), (86_399, False), (86_400, True), (100_000, True)]
)
def test_horizon(elapsed: float, gives_up: bool) -> None:
    assert RetryPolicy(horizon_seconds=86_400).gives_up(NOW, NOW + elapsed) is gives_up
