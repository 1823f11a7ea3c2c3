from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
import pytest

from bridge.config import Settings
from bridge.platforms.base import WebhookRejected
from bridge.platforms.shoptet import (
    ShoptetOptions,
    classify_write,
    order_path,
    parse_webhook,
    snapshot_from_order,
    status_path,
    status_request,
)
from bridge.signing import hmac_sha1_hex

KEY = "0123456789abcdef0123456789abcdef"
SETTINGS = Settings(_env_file=None, shoptet_webhook_key=KEY, shoptet_eshop_id=222651)  # type: ignore[call-arg]
NOW = 1_700_000_000.0


def signed(payload: dict[str, Any] | bytes, key: str = KEY) -> tuple[dict[str, str], bytes]:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return {"shoptet-webhook-signature": hmac_sha1_hex(key, body)}, body


def event(name: str = "order:update", instance: str = "2026000042", **extra: Any) -> dict[str, Any]:
    return {
        "eshopId": 222651,
        "event": name,
        "eventCreated": "2026-11-22T10:00:00+0100",
        "eventInstance": instance,
        **extra,
    }


@pytest.mark.parametrize(
    ("payload", "refs"),
    [
        (event(), ("2026000042",)),
        (event("order:create"), ("2026000042",)),
        (event("order:cancel"), ("2026000042",)),
        (event(instance="OBJ-2026-7"), ("OBJ-2026-7",)),  # codes may hold letters and dashes
        (
            event("order:massUpdate", '["2026000001","2026000002","2026000001"]'),
            ("2026000001", "2026000002"),
        ),
        (event("order:massUpdate", "[2026000001]"), ("2026000001",)),
        (event("product:update", "abc"), ()),  # acknowledged, ignored
        (event("order:delete"), ()),
        (event(payload={"extra": "ignored"}), ("2026000042",)),
    ],
)
def test_parse_accepts(payload: dict[str, Any], refs: tuple[str, ...]) -> None:
    headers, body = signed(payload)
    parsed = parse_webhook(SETTINGS, headers, body)
    assert parsed.refs == refs
    assert parsed.event == payload["event"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "reason"),
    [
        ({}, orjson.dumps(event()), 401, "missing Shoptet-Webhook-Signature"),
        (signed(event(), key="f" * 32)[0], orjson.dumps(event()), 401, "does not match"),
        ({"shoptet-webhook-signature": "zz"}, orjson.dumps(event()), 401, "does not match"),
        (*signed(b"{not json"), 400, "not valid JSON"),
        (*signed(b"[1,2]"), 400, "JSON object"),
        (*signed(event(eshopId="222651")), 400, "eshopId"),
        (*signed(event(eshopId=1)), 400, "this bridge serves 222651"),
        (*signed(event(event=5)), 400, "event must be"),
        (*signed({**event(), "eventCreated": None}), 400, "eventCreated"),
        (*signed(event(instance="")), 400, "eventInstance"),
        (*signed(event(instance="x" * 101)), 400, "not a valid order code"),
        (*signed(event(instance="a\nb")), 400, "not a valid order code"),
        (*signed(event("order:massUpdate", "2026000001")), 400, "list of order codes"),
        (*signed(event("order:massUpdate", "[not json")), 400, "JSON list"),
        (*signed(event("order:massUpdate", '{"a": 1}')), 400, "list of order codes"),
    ],
)
def test_parse_rejects(headers: dict[str, str], body: bytes, status: int, reason: str) -> None:
    with pytest.raises(WebhookRejected) as caught:
        parse_webhook(SETTINGS, headers, body)
    assert caught.value.status == status
    assert reason in caught.value.reason


def test_signature_is_checked_before_parsing() -> None:
    # A forged body must not reveal how it would have been parsed.
    with pytest.raises(WebhookRejected) as caught:
        parse_webhook(SETTINGS, {"shoptet-webhook-signature": "0" * 40}, b"{not json")
    assert caught.value.status == 401


def test_no_key_configured_rejects_everything() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    headers, body = signed(event())
    with pytest.raises(WebhookRejected) as caught:
        parse_webhook(settings, headers, body)
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("options", "params", "data"),
    [
        (ShoptetOptions(), {}, {"statusId": 2}),
        (ShoptetOptions(paid=True), {}, {"statusId": 2, "paid": True}),
        (
            ShoptetOptions(paid=False, billing_method_id=2),
            {},
            {"statusId": 2, "paid": False, "billingMethodId": 2},
        ),
        (
            ShoptetOptions(suppress_email=True, suppress_sms=True, suppress_documents=True),
            {
                "suppressDocumentGeneration": "true",
                "suppressEmailSending": "true",
                "suppressSmsSending": "true",
            },
            {"statusId": 2},
        ),
    ],
)
def test_status_request(
    options: ShoptetOptions, params: dict[str, str], data: dict[str, Any]
) -> None:
    assert status_request("2", options) == (params, {"data": data})


def test_paths_quote_the_code() -> None:
    assert status_path("2026/7 x") == "/api/orders/2026%2F7%20x/status"
    assert order_path("OBJ-1") == "/api/orders/OBJ-1"


def envelope(errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"data": None, "errors": errors, "metadata": {"requestId": "r"}}


def err(code: str, message: str = "m") -> dict[str, str]:
    return {"errorCode": code, "message": message, "instance": "x"}


IN_30S = format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind", "retry_after"),
    [
        (200, {}, envelope(), "done", None),
        (200, {}, envelope([err("document-not-generated")]), "done", None),
        (200, {}, envelope([err("something-else")]), "permanent", None),
        (404, {}, envelope([err("order-not-found")]), "not_found", None),
        (409, {}, envelope([err("record-already-changed")]), "conflict", None),
        (
            422,
            {},
            envelope([err("invalid-request-data", 'Invalid statusId "99".')]),
            "permanent",
            None,
        ),
        (400, {}, envelope([err("invalid-parameter")]), "permanent", None),
        (403, {}, envelope([err("invalid-token-no-rights")]), "permanent", None),
        (401, {}, envelope([err("invalid-token")]), "retry", None),
        (423, {}, envelope([err("locked")]), "retry", 5.0),
        (429, {"retry-after": IN_30S}, envelope([err("too-many-requests")]), "retry", 30.0),
        (429, {}, None, "retry", None),
        (500, {}, None, "retry", None),
        (503, {"retry-after": "120"}, None, "retry", 120.0),
    ],
)
def test_classify_write(
    status: int, headers: dict[str, str], body: Any, kind: str, retry_after: float | None
) -> None:
    outcome = classify_write(status, headers, body, NOW)
    assert outcome.kind == kind
    assert outcome.retry_after == retry_after
    if kind == "done" and body and body["errors"]:
        assert outcome.warning and "document-not-generated" in outcome.warning
    if kind != "done":
        assert outcome.reason


def test_snapshot_from_order() -> None:
    body = {"data": {"order": {"code": "2026000042", "status": {"id": -1, "name": "Nová"}}}}
    snap = snapshot_from_order(body, "2026000042")
    assert (snap.ref, snap.order_key, snap.native_status) == ("2026000042", "2026000042", "-1")
    assert (
        snapshot_from_order({"data": {"order": {"code": "1", "status": None}}}, "1").native_status
        == ""
    )


@pytest.mark.parametrize(
    ("header", "level"),
    [
        ("12/200", 0.06),
        (" 200/200 ", 1.0),
        ("0/200", 0.0),
        ("5/1000", 0.005),  # a bucket of another size reads right
        ("", None),
        (None, None),
        ("full", None),
        ("x/200", None),
        ("1/0", None),
    ],
)
def test_bucket_filling_header(header: str | None, level: float | None) -> None:
    from bridge.platforms.shoptet import bucket_filling

    assert bucket_filling(header) == level
