from pathlib import Path

import pytest

from bridge.mapping import MappingError, load_mapping, parse_mapping
from bridge.platforms import PLATFORMS
from bridge.platforms.metakocka import MetaKockaOptions
from bridge.platforms.shoptet import ShoptetOptions

EXAMPLE = Path(__file__).parents[2] / "bridge" / "mapping.example.toml"


def test_the_shipped_example_is_valid() -> None:
    mapping = load_mapping(EXAMPLE, PLATFORMS)
    assert mapping.platforms == {"shoptet", "metakocka", "bitrix24"}
    assert mapping.target_for("bitrix24", "paid").native == "P"
    assert mapping.canonical_for("shoptet", "2") == "paid"
    assert mapping.canonical_for("metakocka", "created") == "new"  # an "also" status
    assert mapping.target_for("metakocka", "new").native == "new_order"
    assert mapping.target_for("shoptet", "paid").options == ShoptetOptions(paid=True)
    assert mapping.target_for("metakocka", "paid").options == MetaKockaOptions()
    assert mapping.allows_backward("cancelled", "new")
    assert not mapping.allows_backward("shipped", "new")


def base() -> dict:
    return {
        "statuses": {
            "new": {"rank": 1, "shoptet": {"target": -1}, "metakocka": {"target": "new_order"}},
            "paid": {"rank": 2, "shoptet": {"target": 2}, "metakocka": {"target": "in_progress"}},
        }
    }


def with_(path: str, value: object) -> dict:
    data = base()
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({}, "statuses", "at least one"),
        ({"statuses": {}, "extra": 1}, "extra", "unknown key"),
        (with_("statuses.new.rank", DELETE), "statuses.new.rank", "required"),
        (with_("statuses.new.rank", "high"), "statuses.new.rank", "integer"),
        (with_("statuses.new.rank", True), "statuses.new.rank", "integer"),
        (with_("statuses.new.bitrix", {"target": "N"}), "statuses.new.bitrix", "unknown platform"),
        (with_("statuses.paid.metakocka", DELETE), "statuses.paid.metakocka", "missing"),
        (with_("statuses.paid.shoptet", {"also": [3]}), "statuses.paid.shoptet.target", "required"),
        (
            with_("statuses.paid.shoptet", {"target": "2"}),
            "statuses.paid.shoptet.target",
            "integer",
        ),
        (
            with_("statuses.paid.metakocka", {"target": 5}),
            "statuses.paid.metakocka.target",
            "strings",
        ),
        (
            with_("statuses.paid.metakocka", {"target": " "}),
            "statuses.paid.metakocka.target",
            "strings",
        ),
        (
            with_("statuses.paid.shoptet", {"target": 2, "also": [-1]}),
            "statuses.paid.shoptet",
            "already mapped to 'new'",
        ),
        (
            with_("statuses.paid.shoptet", {"target": 2, "paid": "yes"}),
            "statuses.paid.shoptet.paid",
            "boolean",
        ),
        (
            with_("statuses.paid.shoptet", {"target": 2, "send_email": True}),
            "statuses.paid.shoptet.send_email",
            "Extra inputs",
        ),
        (
            with_("statuses.paid.metakocka", {"target": "x", "doc_type": "invoice"}),
            "statuses.paid.metakocka.doc_type",
            "sales_order",
        ),
        (with_("statuses.paid.colour", "red"), "statuses.paid.colour", "unknown platform"),
        (with_("backward", [{"from": "paid"}]), "backward[0]", "exactly `from` and `to`"),
        (with_("backward", [{"from": "paid", "to": "lost"}]), "backward[0].to", "unknown status"),
        (with_("backward", {"from": "paid", "to": "new"}), "backward", "array of tables"),
    ],
)
def test_invalid_mappings_name_key_and_reason(data: dict, key: str, reason: str) -> None:
    with pytest.raises(MappingError) as caught:
        parse_mapping(data, PLATFORMS, "bridge.toml")
    assert caught.value.file == "bridge.toml"
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"bridge.toml: {key}: ")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="cannot read the file"):
        load_mapping(tmp_path / "missing.toml", PLATFORMS)
    bad = tmp_path / "bad.toml"
    bad.write_text("[statuses.new\nrank = 1\n")
    with pytest.raises(MappingError, match=r"bad.toml: not valid TOML: .*line 1"):
        load_mapping(bad, PLATFORMS)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(MappingError, match="not UTF-8"):
        load_mapping(binary, PLATFORMS)


def test_wildcard_backward_rules() -> None:
    data = base()
    data["backward"] = [{"from": "*", "to": "new"}]
    mapping = parse_mapping(data, PLATFORMS)
    assert mapping.allows_backward("paid", "new")
    assert not mapping.allows_backward("new", "paid")


def test_unknown_native_status_is_unmapped() -> None:
    mapping = parse_mapping(base(), PLATFORMS)
    assert mapping.canonical_for("shoptet", "99") is None
    assert mapping.canonical_for("bitrix", "N") is None


def test_the_test_mappings_follow_the_example() -> None:
    from tests.mappings import mapping

    two = mapping(("shoptet", "metakocka"))
    assert two.platforms == {"shoptet", "metakocka"}
    deals = mapping(("shoptet", "metakocka", "bitrix24"), bitrix_mode="deals")
    assert deals.target_for("bitrix24", "completed").native == "WON"
    assert deals.canonical_for("bitrix24", "LOSE") == "cancelled"
