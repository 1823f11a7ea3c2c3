"""When to try a failed write again: pure decisions, no I/O, no clock of their own."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, up to a horizon after which a write is dead-lettered.

    Platforms come back from maintenance after minutes or hours, so the default horizon is a
    day: a write is only given up when a person would have to look at it anyway.
    """

    base_seconds: float = 2.0
    factor: float = 2.0
    cap_seconds: float = 900.0
    horizon_seconds: float = 86_400.0

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failure (1 = the first one).

        "Equal jitter": half the exponential step is fixed, half random, so retries from many
        orders spread out but each order's waits still grow.
        """
        step = min(self.cap_seconds, self.base_seconds * self.factor ** max(0, attempts - 1))
        r = (rng or random).random()
        return step / 2 + r * step / 2

    def gives_up(self, first_try_at: float, now: float) -> bool:
        return now - first_try_at >= self.horizon_seconds


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: an HTTP date (Shoptet) or seconds.

    Returns None when absent or unreadable; never negative.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when: datetime = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
