"""The decision: given what a platform shows now, what should every platform show?

Pure: no I/O, no clock. The worker feeds it a fresh read and the order's stored state; the
store records whatever it returns, atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bridge.mapping import StatusMapping
from bridge.models import DesiredWrite, OrderState

VerdictKind = Literal["advance", "same", "echo", "regress", "unmapped"]


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    canonical: str | None  # what the source's native status means (None if unmapped)
    writes: tuple[DesiredWrite, ...] = ()
    # Platforms whose pending write is moot: they show the status already (the source included).
    supersede: tuple[str, ...] = ()
    reason: str = ""

    @property
    def changes_agreement(self) -> bool:
        return self.kind == "advance"


def decide(mapping: StatusMapping, source: str, native: str, order: OrderState | None) -> Verdict:
    """Decide what a platform's current status means for the order.

    * unmapped: the mapping has no canonical status for it; nothing moves, an operator is told;
    * echo: the source shows what the bridge itself wrote there — nothing to do;
    * same: the source agrees with the agreed status already (a repeat, or a person caught up);
    * regress: the status ranks below the agreed one and the mapping allows no such way back
      (a late webhook, a slow poll): nothing is propagated;
    * advance: a new agreed status; every other platform that does not already show it gets a
      desired write. A sideways move (equal rank) is an advance too: the newest change wins.
    """
    canonical = mapping.canonical_for(source, native)
    if canonical is None:
        return Verdict("unmapped", None, reason=f"{source} status {native!r} is not in the mapping")

    agreed = order.canonical if order else None
    if canonical == agreed:
        assert order is not None
        mine = order.platforms.get(source)
        if mine is not None and mine.last_written == native:
            return Verdict(
                "echo", canonical, supersede=(source,), reason="the bridge's own write came back"
            )
        return Verdict(
            "same", canonical, supersede=(source,), reason=f"already agreed on {canonical!r}"
        )

    if (
        agreed is not None
        and agreed in mapping.statuses
        and mapping.rank(canonical) < mapping.rank(agreed)
        and not mapping.allows_backward(agreed, canonical)
    ):
        return Verdict(
            "regress",
            canonical,
            reason=f"{canonical!r} ranks below the agreed {agreed!r}; no backward rule allows it",
        )

    writes = []
    already = [source]
    for platform in sorted(mapping.platforms - {source}):
        target = mapping.target_for(platform, canonical)
        known = order.platforms.get(platform) if order else None
        if (
            known is not None
            and known.last_seen is not None
            and mapping.canonical_for(platform, known.last_seen) == canonical
        ):
            already.append(platform)  # a write would only repeat its side effects
            continue
        writes.append(DesiredWrite(platform, canonical, target.native))
    was = f"from {agreed!r}" if agreed else "first sighting"
    return Verdict(
        "advance", canonical, tuple(writes), tuple(already), reason=f"{was} to {canonical!r}"
    )
