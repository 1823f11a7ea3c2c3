"""The decision: given what a platform shows now, what should every platform show?

Pure: no I/O, no clock. The worker feeds it a fresh read and the order's stored state; the
store records whatever it returns, atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from bridge.mapping import StatusMapping
from bridge.models import DesiredWrite, OrderState

VerdictKind = Literal["advance", "same", "echo", "regress", "behind", "catch_up", "unmapped"]


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    canonical: str | None  # what the source's native status means (None if unmapped)
    agreed: str | None = None  # the agreed status after this verdict
    writes: tuple[DesiredWrite, ...] = ()
    # Platforms whose pending write is moot: they show the agreed status already.
    supersede: tuple[str, ...] = ()
    reason: str = ""

    @property
    def changes_agreement(self) -> bool:
        return self.kind == "advance"


def decide(
    mapping: StatusMapping,
    source: str,
    native: str,
    order: OrderState | None,
    unknown: frozenset[str] = frozenset(),
) -> Verdict:
    """Decide what a platform's current status means for the order.

    ``unknown``: platforms whose current status the bridge does not know yet (the order was
    never seen there and is being looked up). They get no write: never write blind. When their
    status is known, it is decided on like any other (a first sighting, see catch_up).

    * unmapped: the mapping has no canonical status for it; nothing moves, an operator is told;
    * echo: the source shows what the bridge itself wrote there — nothing to do;
    * same: the source agrees with the agreed status already (a repeat, or a person caught up);
    * advance: a new agreed status; every platform that does not show it yet gets a desired
      write. A sideways move (equal rank) is an advance too: the newest change wins. With no
      agreement yet (an order's first sighting), the most advanced status any platform shows
      wins — rank first, then the mapping's platform authority — so a first sighting never
      drags another platform backwards;
    * regress: the source moved below the agreed status, the mapping allows no such way back
      (a late webhook, a slow poll, a mistaken click): nothing is propagated;
    * behind: the source shows a lower status while a write to it is still pending: it simply
      has not received that write yet; nothing changes;
    * catch_up: the source shows a lower status but had never been seen with this order (an
      order just imported there, or just looked up): it is behind, not moving back, so it gets
      the agreed status, whatever backward rules say (a first sighting is not a move). An
      equally ranked first sighting catches up too, unless its platform has more authority
      than every platform that shows the agreed status.
    """
    canonical = mapping.canonical_for(source, native)
    if canonical is None:
        return Verdict("unmapped", None, reason=f"{source} status {native!r} is not in the mapping")

    known = _known_canonicals(mapping, order, source)
    agreed = order.canonical if order else None
    if agreed is None or agreed not in mapping.statuses:
        candidates = {**known, source: canonical}
        winner = max(
            candidates,
            key=lambda p: (mapping.rank(candidates[p]), -mapping.authority_index(p)),
        )
        agreed = candidates[winner]
        writes, already = _writes(
            mapping, agreed, {**known, source: canonical}, exclude=None, unknown=unknown
        )
        via = f" (shown by {winner})" if winner != source else ""
        return Verdict(
            "advance", canonical, agreed, writes, already, f"first agreement on {agreed!r}{via}"
        )

    if canonical == agreed:
        mine = order.platforms.get(source) if order else None
        if mine is not None and mine.last_written == native:
            return Verdict(
                "echo", canonical, agreed, supersede=(source,), reason="own write came back"
            )
        return Verdict(
            "same", canonical, agreed, supersede=(source,), reason=f"agreed on {agreed!r}"
        )

    pending = order.pending.get(source) if order else None
    if pending is not None and mapping.rank(canonical) < mapping.rank(agreed):
        # The bridge's write to this platform has not landed yet: what it shows is the past,
        # not a move backwards — not even one a backward rule would allow.
        return Verdict("behind", canonical, agreed, reason=f"{source} is still to get {pending!r}")

    mine = order.platforms.get(source) if order else None
    first_sighting = mine is None or mine.last_seen is None
    lower = mapping.rank(canonical) < mapping.rank(agreed)
    if first_sighting and (
        lower
        or (
            mapping.rank(canonical) == mapping.rank(agreed)
            and not _outranks(mapping, source, agreed, known)
        )
    ):
        target = mapping.target_for(source, agreed)
        return Verdict(
            "catch_up",
            canonical,
            agreed,
            (DesiredWrite(source, agreed, target.native),),
            reason=f"{source} first seen at {canonical!r}, behind the agreed {agreed!r}",
        )

    if lower and not mapping.allows_backward(agreed, canonical):
        return Verdict(
            "regress",
            canonical,
            agreed,
            reason=f"{canonical!r} ranks below the agreed {agreed!r}; no backward rule allows it",
        )

    writes, already = _writes(
        mapping, canonical, {**known, source: canonical}, exclude=source, unknown=unknown
    )
    return Verdict(
        "advance", canonical, canonical, writes, already, f"from {agreed!r} to {canonical!r}"
    )


def _known_canonicals(
    mapping: StatusMapping, order: OrderState | None, source: str
) -> dict[str, str]:
    """What each other platform was last seen showing, as canonical statuses (mapped only)."""
    known: dict[str, str] = {}
    for platform, state in (order.platforms if order else {}).items():
        if platform == source or state.last_seen is None:
            continue
        canonical = mapping.canonical_for(platform, state.last_seen)
        if canonical is not None:
            known[platform] = canonical
    return known


def _outranks(mapping: StatusMapping, source: str, agreed: str, known: Mapping[str, str]) -> bool:
    """Has ``source`` more authority than every platform known to show ``agreed``?"""
    showing = [p for p, canonical in known.items() if canonical == agreed]
    mine = mapping.authority_index(source)
    return all(mine < mapping.authority_index(p) for p in showing)


def _writes(
    mapping: StatusMapping,
    agreed: str,
    showing: dict[str, str],
    exclude: str | None,
    unknown: frozenset[str] = frozenset(),
) -> tuple[tuple[DesiredWrite, ...], tuple[str, ...]]:
    """Writes for every platform not showing ``agreed`` (and not ``unknown``: its status is not
    known, so it is not written blind); and the platforms that already show it."""
    writes, already = [], []
    for platform in sorted(mapping.platforms):
        if platform in unknown:
            continue
        if platform == exclude or showing.get(platform) == agreed:
            already.append(platform)  # a write would only repeat its side effects
            continue
        writes.append(DesiredWrite(platform, agreed, mapping.target_for(platform, agreed).native))
    return tuple(writes), tuple(already)


def reconcile(mapping: StatusMapping, order: OrderState, shown: Mapping[str, str]) -> Verdict:
    """A sweep's verdict: what the platforms show now (``shown``: platform -> native) against
    the agreed status.

    The most advanced status wins — one any platform shows, or the agreed one (rank, then
    authority; the agreed status wins a tie, as the bridge cannot tell which is newer). A
    platform showing more than the agreed status had a change the bridge missed (a lost
    webhook): that becomes the agreement. A platform showing less lags behind (a lost write,
    a change made while the bridge was down): it gets the agreed status. Unmapped statuses are
    left alone. ``kind`` is "same" when nothing needs doing.
    """
    mapped = {p: c for p, n in shown.items() if (c := mapping.canonical_for(p, n)) is not None}
    agreed = order.canonical if order.canonical in mapping.statuses else None
    candidates: list[tuple[int, int, str]] = [
        (mapping.rank(c), -mapping.authority_index(p), c) for p, c in mapped.items()
    ]
    if agreed is not None:
        candidates.append((mapping.rank(agreed), 1, agreed))  # wins ties
    if not candidates:
        return Verdict("unmapped", None, agreed, reason="no platform shows a mapped status")
    winner = max(candidates)[2]
    writes, already = _writes(mapping, winner, mapped, exclude=None)
    writes = tuple(w for w in writes if w.platform in mapped)  # only where the order exists
    if winner == agreed and not writes:
        return Verdict("same", winner, winner, supersede=already, reason="all agree")
    kind: VerdictKind = "advance" if winner != agreed else "catch_up"
    drift = ", ".join(f"{p} shows {c!r}" for p, c in sorted(mapped.items()) if c != winner)
    return Verdict(kind, winner, winner, writes, already, f"agreed {agreed!r}; {drift}")
