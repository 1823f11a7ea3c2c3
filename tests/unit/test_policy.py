import pytest

from bridge.models import DesiredWrite, OrderState, PlatformState
from bridge.platforms import PLATFORMS
from bridge.policy import decide, reconcile
from tests.mappings import mapping

MAPPING = mapping(("shoptet", "metakocka"))
S, M = "shoptet", "metakocka"


def order(canonical: str | None, **platforms: PlatformState) -> OrderState:
    return OrderState("2026000042", canonical, 3, dict(platforms))


# Shoptet ids of the example: new -1, paid 2, processing -2 (or 4), shipped 3, completed -3, cancelled -4.
CASES = [
    # (name, source, native, order, kind, agreed, writes, supersede)
    ("first sighting", S, "-1", None, "advance", "new", {M: "new_order"}, (S,)),
    ("first sighting from MK", M, "created", None, "advance", "new", {S: "-1"}, (M,)),
    (
        "first sighting: another platform is further along and wins",
        M,
        "new_order",
        order(None, shoptet=PlatformState(ref="2026000042", last_seen="2")),
        "advance",
        "paid",
        {M: "in_progress"},
        (S,),
    ),
    (
        "first sighting: both agree already, nothing to write",
        S,
        "2",
        order(None, metakocka=PlatformState(ref="1", last_seen="in_progress")),
        "advance",
        "paid",
        {},
        (M, S),
    ),
    (
        "a first sighting below the agreed status catches up, backward rule or not",
        S,
        "-1",
        order("cancelled"),
        "catch_up",
        "cancelled",
        {S: "-4"},
        (),
    ),
    ("forward move", S, "2", order("new"), "advance", "paid", {M: "in_progress"}, (S,)),
    ("skip a stage", M, "shipped", order("new"), "advance", "shipped", {S: "3"}, (M,)),
    ("repeat of the agreed status", S, "2", order("paid"), "same", "paid", {}, (S,)),
    ("an also-status means the same", M, "draft", order("new"), "same", "new", {}, (M,)),
    (
        "the bridge's own write comes back",
        S,
        "3",
        order("shipped", shoptet=PlatformState(ref="2026000042", last_written="3")),
        "echo",
        "shipped",
        {},
        (S,),
    ),
    (
        "a known platform moving back is a regress",
        S,
        "2",
        order("shipped", shoptet=PlatformState(ref="2026000042", last_seen="3")),
        "regress",
        "shipped",
        {},
        (),
    ),
    (
        "a platform never seen before that is behind catches up",
        S,
        "2",
        order("shipped"),
        "catch_up",
        "shipped",
        {S: "3"},
        (),
    ),
    (
        "backward rule allows reopening",
        S,
        "-1",
        order("cancelled", shoptet=PlatformState(ref="2026000042", last_seen="-4")),
        "advance",
        "new",
        {M: "new_order"},
        (S,),
    ),
    (
        "backward rule: returned parcel",
        M,
        "ready_to_ship",
        order("shipped", metakocka=PlatformState(ref="1", last_seen="shipped")),
        "advance",
        "processing",
        {S: "-2"},
        (M,),
    ),
    (
        "an also-status: ready for pickup",
        S,
        "4",
        order("paid"),
        "advance",
        "processing",
        {M: "ready_to_ship"},
        (S,),
    ),
    (
        "cancel from anywhere (highest rank)",
        S,
        "-4",
        order("shipped"),
        "advance",
        "cancelled",
        {M: "canceled"},
        (S,),
    ),
    ("unmapped native status", S, "77", order("new"), "unmapped", None, {}, ()),
    ("unmapped MK status", M, "paused", None, "unmapped", None, {}, ()),
    (
        "a target already showing the status gets no write",
        S,
        "2",
        order("new", metakocka=PlatformState(ref="400000000001", last_seen="in_progress")),
        "advance",
        "paid",
        {},
        (M, S),
    ),
    (
        "a target showing an older status gets the write",
        S,
        "2",
        order("new", metakocka=PlatformState(ref="400000000001", last_seen="new_order")),
        "advance",
        "paid",
        {M: "in_progress"},
        (S,),
    ),
]


@pytest.mark.parametrize(
    ("source", "native", "state", "kind", "agreed", "writes", "supersede"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide(
    source: str,
    native: str,
    state: OrderState | None,
    kind: str,
    agreed: str | None,
    writes: dict[str, str],
    supersede: tuple[str, ...],
) -> None:
    verdict = decide(MAPPING, source, native, state)
    assert verdict.kind == kind, verdict.reason
    assert verdict.agreed == agreed
    assert verdict.canonical == MAPPING.canonical_for(source, native)
    assert verdict.writes == tuple(
        DesiredWrite(p, agreed or "", n) for p, n in sorted(writes.items())
    )
    assert verdict.supersede == supersede
    assert verdict.reason
    assert verdict.changes_agreement is (kind == "advance")


def test_a_first_sighting_never_writes_back_to_the_source_alone() -> None:
    for status in MAPPING.statuses.values():
        for platform in MAPPING.platforms:
            for native in status.inbound[platform]:
                verdict = decide(MAPPING, platform, native, None)
                assert platform not in {w.platform for w in verdict.writes}


def test_equal_rank_ties_are_broken_by_authority() -> None:
    from bridge.mapping import parse_mapping

    data = {
        "authority": ["metakocka", "shoptet"],
        "statuses": {
            "a": {"rank": 1, "shoptet": {"target": 1}, "metakocka": {"target": "a"}},
            "b": {"rank": 1, "shoptet": {"target": 2}, "metakocka": {"target": "b"}},
        },
    }
    mapping = parse_mapping(data, PLATFORMS)
    state = order(None, metakocka=PlatformState(ref="1", last_seen="b"))
    verdict = decide(mapping, S, "1", state)
    assert verdict.agreed == "b"  # MetaKocka is trusted more
    assert verdict.writes == (DesiredWrite(S, "b", "2"),)


# -- the sweep's verdict ---------------------------------------------------------------------

RECONCILE_CASES = [
    # (name, agreed, shown, kind, new agreed, writes)
    ("all agree", "paid", {S: "2", M: "in_progress"}, "same", "paid", {}),
    (
        "a lost write: MK lags",
        "shipped",
        {S: "3", M: "in_progress"},
        "catch_up",
        "shipped",
        {M: "shipped"},
    ),
    ("a lost webhook: MK is ahead", "paid", {S: "2", M: "shipped"}, "advance", "shipped", {S: "3"}),
    ("the agreed status wins a tie", "paid", {S: "2", M: "in_progress"}, "same", "paid", {}),
    ("unmapped statuses are left alone", "paid", {S: "2", M: "paused"}, "same", "paid", {}),
    (
        "only platforms where the order exists get writes",
        "shipped",
        {S: "2"},
        "catch_up",
        "shipped",
        {S: "3"},
    ),
    ("nothing mapped at all", "paid", {M: "paused"}, "same", "paid", {}),
    (
        "no agreement yet: the most advanced wins",
        None,
        {S: "-1", M: "shipped"},
        "advance",
        "shipped",
        {S: "3"},
    ),
]


@pytest.mark.parametrize(
    ("agreed", "shown", "kind", "new_agreed", "writes"),
    [c[1:] for c in RECONCILE_CASES],
    ids=[c[0] for c in RECONCILE_CASES],
)
def test_reconcile(
    agreed: str | None, shown: dict[str, str], kind: str, new_agreed: str, writes: dict[str, str]
) -> None:
    verdict = reconcile(MAPPING, order(agreed), shown)
    assert verdict.kind == kind, verdict.reason
    assert verdict.agreed == new_agreed
    assert {w.platform: w.native for w in verdict.writes} == writes
