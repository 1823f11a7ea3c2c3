"""Planning webhook subscriptions: what is missing, pointed elsewhere, duplicated, blocked."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from bridge.config import Settings
from bridge.subscriptions import (
    SHOPTET_EVENTS,
    SHOPTET_EXCLUSIVE,
    Blocked,
    Plan,
    ShoptetReport,
    Webhook,
    describe_shoptet,
    plan_webhooks,
    same_url,
    webhook_of,
    webhook_url,
)

URL = "https://bridge.example.com/webhooks/shoptet"
OTHER = "https://erp.example.com/shoptet"
UPDATE, MASS = "order:update", "order:massUpdate"


def plan(*existing: Webhook) -> Plan:
    return plan_webhooks(existing, SHOPTET_EVENTS, URL, SHOPTET_EXCLUSIVE)


def hook(event: str, url: str = URL, id: int | None = None) -> Webhook:
    return Webhook(event, url, id)


# (existing webhooks, expected ok, missing, elsewhere, duplicated, blocked, to_register, uncovered)
CASES: dict[str, tuple[Any, ...]] = {
    "nothing registered": (
        [], [], [UPDATE, MASS], [], [], [], [UPDATE, MASS], [UPDATE, MASS],
    ),
    "all there": (
        [hook(UPDATE, id=1), hook(MASS, id=2)],
        [hook(UPDATE, id=1), hook(MASS, id=2)], [], [], [], [], [], [],
    ),
    "one missing": (
        [hook(MASS, id=2)], [hook(MASS, id=2)], [UPDATE], [], [], [], [UPDATE], [UPDATE],
    ),
    "ours points elsewhere: reported, not re-registered": (
        [hook(UPDATE, OTHER, 1)],
        [], [MASS], [hook(UPDATE, OTHER, 1)], [], [], [MASS], [UPDATE, MASS],
    ),
    "ours and a foreign one for the same event": (
        [hook(UPDATE, OTHER, 1), hook(UPDATE, id=2), hook(MASS, id=3)],
        [hook(UPDATE, id=2), hook(MASS, id=3)], [], [hook(UPDATE, OTHER, 1)], [], [], [], [],
    ),
    "duplicated at our URL": (
        [hook(UPDATE, id=1), hook(UPDATE, URL + "/", 4), hook(MASS, id=2)],
        [hook(UPDATE, id=1), hook(MASS, id=2)], [], [], [hook(UPDATE, URL + "/", 4)], [], [], [],
    ),
    "order:cancel blocks order:update": (
        [hook("order:cancel", id=7)],
        [], [UPDATE, MASS], [], [], [Blocked(UPDATE, hook("order:cancel", id=7))], [MASS],
        [UPDATE, MASS],
    ),
    "order:cancel elsewhere blocks it too": (
        [hook("order:cancel", OTHER, 7), hook(MASS, id=2)],
        [hook(MASS, id=2)], [UPDATE], [], [], [Blocked(UPDATE, hook("order:cancel", OTHER, 7))],
        [], [UPDATE],
    ),
    "other events are none of our business": (
        [hook("order:create", id=1), hook("orderStatusesList:change", OTHER, 2)],
        [], [UPDATE, MASS], [], [], [], [UPDATE, MASS], [UPDATE, MASS],
    ),
    "same URL up to case and a trailing slash": (
        [hook(UPDATE, "HTTPS://Bridge.Example.com/webhooks/shoptet/", 1), hook(MASS, id=2)],
        [hook(UPDATE, "HTTPS://Bridge.Example.com/webhooks/shoptet/", 1), hook(MASS, id=2)],
        [], [], [], [], [], [],
    ),
    "another path on our host is elsewhere": (
        [hook(UPDATE, "https://bridge.example.com/old/shoptet", 1)],
        [], [MASS], [hook(UPDATE, "https://bridge.example.com/old/shoptet", 1)], [], [], [MASS],
        [UPDATE, MASS],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan(case: tuple[Any, ...]) -> None:
    existing, ok, missing, elsewhere, duplicated, blocked, to_register, uncovered = case
    got = plan(*existing)
    assert list(got.ok) == ok
    assert list(got.missing) == missing
    assert list(got.elsewhere) == elsewhere
    assert list(got.duplicated) == duplicated
    assert list(got.blocked) == blocked
    assert list(got.to_register) == to_register
    assert list(got.uncovered) == uncovered


def test_order_cancel_is_never_planned() -> None:
    assert "order:cancel" not in plan().to_register
    assert "order:cancel" not in SHOPTET_EVENTS


@pytest.mark.parametrize(
    ("public_url", "expected"),
    [
        ("https://bridge.example.com", URL),
        ("https://bridge.example.com/", URL),
        ("https://example.com/bridge/", "https://example.com/bridge/webhooks/shoptet"),
    ],
)
def test_webhook_url(public_url: str, expected: str) -> None:
    assert webhook_url(public_url, "shoptet") == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (URL, URL, True),
        (URL, URL + "/", True),
        (URL, URL.upper().replace("/WEBHOOKS/SHOPTET", "/webhooks/shoptet"), True),
        (URL, URL.replace("https:", "http:"), False),
        (URL, URL.replace("shoptet", "Shoptet"), False),  # paths are case-sensitive
        (URL, URL + "?x=1", False),
        (URL, "https://bridge.example.com:8443/webhooks/shoptet", False),
    ],
)
def test_same_url(a: str, b: str, same: bool) -> None:
    assert same_url(a, b) is same


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"id": 3, "event": UPDATE, "url": URL, "created": "x"}, hook(UPDATE, id=3)),
        ({"event": UPDATE, "url": URL}, hook(UPDATE)),
        ({"id": "3", "event": UPDATE, "url": URL}, hook(UPDATE)),
        ({"id": 3, "url": URL}, None),
        ({"id": 3, "event": UPDATE, "url": None}, None),
    ],
)
def test_webhook_of(item: dict[str, Any], expected: Webhook | None) -> None:
    assert webhook_of(item) == expected


def test_describe_all_registered() -> None:
    lines = describe_shoptet(
        ShoptetReport(plan(hook(UPDATE, id=1), hook(MASS, id=2))), registering=False
    )
    assert lines == [("info", f"order:update, order:massUpdate -> {URL}: all registered")]


def test_describe_missing_says_how_to_register() -> None:
    [(level, line)] = describe_shoptet(ShoptetReport(plan(hook(UPDATE, id=1))), registering=False)
    assert level == "warning"
    assert line.startswith(f"missing: order:massUpdate -> {URL} (register with")


def test_describe_registered_and_foreign() -> None:
    report = ShoptetReport(plan(hook(UPDATE, OTHER, 1)), registered=(hook(MASS, id=5),))
    lines = describe_shoptet(report, registering=True)
    assert lines[0] == ("info", f"registered order:massUpdate -> {URL} (webhook 5)")
    assert lines[1][0] == "warning"
    assert lines[1][1].startswith(f"webhook 1 sends order:update to {OTHER}, not to this bridge")
    assert report.uncovered == (UPDATE,)


def test_describe_a_refused_registration() -> None:
    report = ShoptetReport(plan(), register_error="POST /api/webhooks: HTTP 503")
    [(level, line)] = describe_shoptet(report, registering=True)
    assert (level, line) == (
        "warning",
        "registering order:update, order:massUpdate failed: POST /api/webhooks: HTTP 503",
    )
    assert report.uncovered == (UPDATE, MASS)


def test_describe_blocked_and_duplicated() -> None:
    report = ShoptetReport(plan(hook("order:cancel", id=7), hook(MASS, id=2), hook(MASS, id=3)))
    lines = [line for _, line in describe_shoptet(report, registering=True)]
    assert lines == [
        f"cannot register order:update: webhook 7 for order:cancel ({URL}) exists and Shoptet "
        "refuses the two together; delete it (order:update covers it)",
        "order:massUpdate is delivered twice: webhook 3 duplicates another",
    ]


def test_as_dict_is_plain_data() -> None:
    report = ShoptetReport(plan(hook(UPDATE, OTHER, 1)), registered=(hook(MASS, id=5),))
    assert report.as_dict() == {
        "url": URL,
        "ok": [],
        "missing": [MASS],
        "registered": [{"id": 5, "event": MASS, "url": URL}],
        "register_error": None,
        "elsewhere": [{"id": 1, "event": UPDATE, "url": OTHER}],
        "duplicated": [],
        "blocked": [],
        "uncovered": [UPDATE],
    }


@pytest.mark.parametrize(
    "value",
    ["bridge.example.com", "ftp://bridge.example.com", "https://x.example/?a=1", "https://"],
)
def test_public_url_must_be_a_plain_http_url(value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, public_url=value)  # type: ignore[call-arg]


def test_public_url_and_registration_default_off() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.public_url is None
    assert settings.register_webhooks is False
