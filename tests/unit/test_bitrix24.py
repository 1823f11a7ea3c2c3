from urllib.parse import parse_qs, urlencode

import pytest

from bridge.config import Settings
from bridge.models import Snapshot
from bridge.platforms.base import WebhookRejected
from bridge.platforms.bitrix24 import (
    B24Error,
    classify_error,
    command,
    error_of,
    first_by_key,
    parse_event,
    stage_category,
    update_params,
)

TOKEN = "jvh9c0ffee"
ORDERS = Settings(_env_file=None, bitrix24_application_token=TOKEN)  # type: ignore[call-arg]
DEALS = Settings(_env_file=None, bitrix24_application_token=TOKEN, bitrix24_mode="deals")  # type: ignore[call-arg]
FORM = {"content-type": "application/x-www-form-urlencoded"}


def event(
    name: str = "ONSALEORDERSAVED", order_id: str = "300", token: str | None = TOKEN, **extra: str
) -> bytes:
    fields = {
        "event": name,
        "event_handler_id": "975",
        "data[FIELDS][ID]": order_id,
        "data[FIELDS][XML_ID]": "",
        "data[FIELDS][ACTION]": "save",
        "ts": "1714649632",
        "auth[domain]": "some-domain.bitrix24.com",
        "auth[member_id]": "d897",
        **extra,
    }
    if token is not None:
        fields["auth[application_token]"] = token
    return urlencode(fields).encode()


@pytest.mark.parametrize(
    ("settings", "body", "refs"),
    [
        (ORDERS, event(), ("300",)),
        (ORDERS, event("OnSaleOrderSaved"), ("300",)),  # event names are case-insensitive
        (ORDERS, event("ONORDERENTITYSAVED"), ("300",)),
        (ORDERS, event("ONCRMDEALUPDATE"), ()),  # another mode's event: acknowledged, ignored
        (ORDERS, event("ONUSERADD"), ()),
        (DEALS, event("ONCRMDEALUPDATE", "17"), ("17",)),
        (DEALS, event("ONCRMDEALADD", "18"), ("18",)),
        (DEALS, event(), ()),
    ],
)
def test_parse_accepts(settings: Settings, body: bytes, refs: tuple[str, ...]) -> None:
    assert parse_event(settings, FORM, body).refs == refs


@pytest.mark.parametrize(
    ("headers", "body", "status", "reason"),
    [
        (FORM, event(token=None), 401, "missing auth[application_token]"),
        (FORM, event(token="guess"), 401, "does not match"),
        (FORM, event(token=""), 401, "missing"),
        (
            {"content-type": "application/json"},
            b'{"event": "ONSALEORDERSAVED"}',
            400,
            "x-www-form-urlencoded",
        ),
        ({}, event(), 400, "x-www-form-urlencoded"),
        (FORM, b"\xff\xfe", 400, "not a valid form"),
        (FORM, event(name=""), 400, "event is missing"),
        (FORM, event(order_id="abc"), 400, "numeric id"),
        (FORM, event(order_id=""), 400, "numeric id"),
        (FORM, event() + b"&data%5BFIELDS%5D%5BID%5D=301", 400, "one numeric id"),
    ],
)
def test_parse_rejects(headers: dict[str, str], body: bytes, status: int, reason: str) -> None:
    with pytest.raises(WebhookRejected) as caught:
        parse_event(ORDERS, headers, body)
    assert caught.value.status == status
    assert reason in caught.value.reason


def test_no_token_configured_rejects_everything() -> None:
    with pytest.raises(WebhookRejected) as caught:
        parse_event(Settings(_env_file=None), FORM, event())  # type: ignore[call-arg]
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}, "retry"),
        (429, {"error": "OPERATION_TIME_LIMIT", "error_description": "Method is blocked"}, "retry"),
        (400, {"error": 201240400001, "error_description": "order does not exist"}, "not_found"),
        (400, {"error": 200540400001, "error_description": "order does not exist"}, "not_found"),
        (400, {"error": "NOT_FOUND", "error_description": "Not found"}, "not_found"),
        (400, {"error": 0, "error_description": "Required fields: type"}, "permanent"),
        (400, {"error": 100, "error_description": "id or fields missing"}, "permanent"),
        (401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}, "retry"),
        (403, {"error": "insufficient_scope", "error_description": ""}, "retry"),
        (500, {"error": "INTERNAL_SERVER_ERROR", "error_description": ""}, "retry"),
        (502, None, "retry"),
    ],
)
def test_classify_error(status: int, body: object, kind: str) -> None:
    error = error_of(status, body)
    assert error is not None
    assert classify_error(error, 0.0).kind == kind


def test_success_is_no_error() -> None:
    assert error_of(200, {"result": {"order": {}}, "time": {}}) is None


def test_time_limit_waits_as_long_as_known() -> None:
    outcome = classify_error(B24Error("OPERATION_TIME_LIMIT", "", 429, 42.0), 0.0)
    assert outcome.retry_after == 42.0


def test_batch_commands_use_bracketed_query_keys() -> None:
    cmd = command("crm.deal.update", update_params("deals", "17", "C1:WON"))
    method, query = cmd.split("?", 1)
    assert method == "crm.deal.update"
    assert parse_qs(query) == {"id": ["17"], "fields[STAGE_ID]": ["C1:WON"]}
    order = command("sale.order.update", update_params("orders", "300", "P"))
    assert parse_qs(order.split("?", 1)[1]) == {"id": ["300"], "fields[statusId]": ["P"]}
    listing = command(
        "sale.order.list",
        {"select": ["id", "statusId"], "filter": {">=dateUpdate": "2026-01-01T00:00:00+00:00"}},
    )
    assert parse_qs(listing.split("?", 1)[1]) == {
        "select[]": ["id", "statusId"],
        "filter[>=dateUpdate]": ["2026-01-01T00:00:00+00:00"],
    }


def test_each_key_gets_the_first_order_with_exactly_that_key() -> None:
    def snap(ref: str, key: str | None) -> Snapshot:
        return Snapshot("bitrix24", ref, key, "N")

    found = [snap("300", "k1"), snap("301", "K1"), snap("302", None), snap("303", "K1")]
    # "k1" came back for K1 too (a collation that ignores case): only K1 itself counts.
    assert first_by_key(["K1", "K2", "k1"], found) == {
        "K1": snap("301", "K1"),
        "K2": None,
        "k1": snap("300", "k1"),
    }


@pytest.mark.parametrize(
    ("stage", "category"), [("WON", 0), ("C1:WON", 1), ("C12:NEW", 12), ("CX:NEW", 0)]
)
def test_stage_category(stage: str, category: int) -> None:
    assert stage_category(stage) == category
