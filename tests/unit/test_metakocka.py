from typing import Any

import pytest

from bridge.platforms.metakocka import (
    MetaKockaOptions,
    change_status_body,
    classify_answer,
    search_body,
    snapshot_from_document,
)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ({"opr_code": "0", "opr_time_ms": "38"}, "done"),
        ({"opr_code": 0}, "done"),
        (
            {
                "opr_code": "1",
                "opr_desc": "Dinamični šifrant z vrednostjo ''Izgubljen'' tipa ''Prodajna naročila - status'' mora biti nastavljen",
            },
            "permanent",
        ),
        ({"opr_code": "2", "opr_desc": "Paramether 'status_code' is required"}, "permanent"),
        (
            {"opr_code": "6", "opr_desc": "Cannot find sales order with buyer order '5662'"},
            "not_found",
        ),
        ({"opr_code": "5", "opr_desc": "Quote exceeds"}, "retry"),
        ({"opr_code": "3", "opr_desc": "Wrong secret key or company id"}, "retry"),
        ({"opr_code": "4", "opr_desc": "IP not allowed"}, "retry"),
        ({"opr_code": "1", "opr_desc": "Unknown error"}, "retry"),
        ({"opr_code": "6", "opr_desc": "Some application error"}, "permanent"),
        (
            {"opr_code": "6", "opr_desc_app": "Documents with some buyer order already exist"},
            "permanent",
        ),
        ("<html>maintenance</html>", "retry"),
        ([], "retry"),
    ],
)
def test_classify_answer(answer: Any, kind: str) -> None:
    outcome = classify_answer(answer)
    assert outcome.kind == kind
    if kind != "done":
        assert outcome.reason


def test_change_status_bodies() -> None:
    options = MetaKockaOptions()
    assert change_status_body("shipped", options, mk_ids=["400000000001"]) == {
        "doc_type": "sales_order",
        "status_code": "shipped",
        "mk_id": "400000000001",
    }
    assert change_status_body("shipped", options, mk_ids=["1", "2"])["mk_id_list"] == ["1", "2"]
    assert (
        change_status_body("shipped", options, buyer_order="2026000042")["buyer_order"]
        == "2026000042"
    )
    receiving = MetaKockaOptions(doc_type="warehouse_receiving_note")
    assert (
        change_status_body("x", receiving, mk_ids=["1"])["doc_type"] == "warehouse_receiving_note"
    )


def test_search_body_pages_and_window() -> None:
    body = search_body("2026-11-22T09:00:00+00:00", "2026-11-22T10:00:00+00:00", 200)
    assert body["doc_type"] == "sales_order"
    assert body["result_type"] == "doc"
    assert (body["limit"], body["offset"]) == ("100", "200")
    assert body["query_advance"] == [
        {"type": "last_change_from", "value": "2026-11-22T09:00:00+00:00"},
        {"type": "last_change_to", "value": "2026-11-22T10:00:00+00:00"},
    ]


def test_snapshot_from_document() -> None:
    snap = snapshot_from_document(
        {
            "mk_id": "400000000001",
            "buyer_order": "2026000042",
            "status_code": "Odpremljen",
            "status_desc": "shipped",
        }
    )
    assert (snap.ref, snap.order_key, snap.native_status) == (
        "400000000001",
        "2026000042",
        "shipped",
    )
    assert snapshot_from_document({"mk_id": "1", "buyer_order": ""}).order_key is None
