"""Everything the bridge sends to Shoptet conforms to Shoptet's official OpenAPI spec.

Each test drives full scenarios against the Shoptet simulator (both directions, a mass update,
retries after every kind of failure), then checks every request the simulator received, all
of them the bridge's, and every answer it gave, with ``tests/contract/shoptet_openapi.py``.
A coverage check makes sure the scenarios really produced the exchanges they are about, so
the contract check cannot pass by having nothing to look at.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import parse_qs

import pytest

import bridge.delivery as delivery_module
import bridge.platforms.shoptet as shoptet_module
from bridge.mapping import StatusMapping
from bridge.models import Snapshot
from bridge.platforms.shoptet import ShoptetClient
from bridge.sandbox.server import serve_in_loop
from bridge.sandbox.shoptet import RecordedRequest
from bridge.service import Bridge
from tests.contract.shoptet_openapi import (
    ContractViolation,
    find_operation,
    request_problems,
    response_problems,
)
from tests.integration.conftest import (
    MAPPING,
    MK,
    SHOPTET,
    World,
    agreed_on,
    eventually,
    mapping_with,
    settle,
)

pytestmark = pytest.mark.integration


# --- the check ---------------------------------------------------------------------------------


def contract_problems(exchanges: Iterable[RecordedRequest]) -> list[str]:
    """Every way in which a request, or the answer to it, breaks Shoptet's spec."""
    found = []
    for r in exchanges:
        target = f"{r.method} {r.path}{'?' + r.query if r.query else ''} -> {r.status}"
        for problem in request_problems(r.method, r.path, r.query, r.headers, r.body):
            found.append(f"request {target}: {problem}")
        for problem in response_problems(
            r.method,
            r.path,
            r.query,
            r.headers,
            r.body,
            status=r.status,
            headers=r.response_headers,
            body=r.response_body,
        ):
            found.append(f"answer {target}: {problem}")
    return found


def assert_conforms(exchanges: list[RecordedRequest]) -> None:
    problems = contract_problems(exchanges)
    if problems:
        raise ContractViolation(
            f"{len(problems)} problem(s) in {len(exchanges)} exchanges:\n" + "\n".join(problems)
        )


def seen(world: World) -> Counter[tuple[str, str, int]]:
    """(method, spec path template, status) of every exchange so far."""
    counts: Counter[tuple[str, str, int]] = Counter()
    for r in world.shoptet.requests:
        op = find_operation(r.method, r.path)
        counts[(r.method, op[0] if op else r.path, r.status)] += 1
    return counts


# --- driving -----------------------------------------------------------------------------------

ORDER = "/api/orders/{code}"
STATUS = "/api/orders/{code}/status"
MK_OPIS = {**MK, "completed": "completed"}  # the example mapping's target for "completed"


@contextlib.asynccontextmanager
async def serve(
    world: World, mapping: StatusMapping = MAPPING, **overrides: Any
) -> AsyncIterator[Bridge]:
    settings = world.settings(metakocka_poll_interval_seconds=0.1, **overrides)
    bridge = Bridge(settings, mapping=mapping)
    async with serve_in_loop(bridge.app) as url:
        world.bridge, world.bridge_url = bridge, url
        world.shoptet.register_webhook("order:update", f"{url}/webhooks/shoptet")
        world.shoptet.register_webhook("order:massUpdate", f"{url}/webhooks/shoptet")
        yield bridge


async def agree(world: World, codes: list[str]) -> None:
    for code in codes:
        world.add_order(code)
    for code in codes:
        await eventually(lambda code=code: agreed_on(world, code, "new"))


async def mk_change(world: World, code: str, canonical: str) -> None:
    world.metakocka.set_status_as_person(world.mk_ids[code], MK_OPIS[canonical])
    await eventually(
        lambda: world.shoptet_status(code) == SHOPTET[canonical], within=6, what=canonical
    )
    # Let the echo (Shoptet's webhook for the write, and the bridge's read) pass, so that a
    # failure primed next meets the next write, not that read.
    await settle(world, 0)
    await eventually(lambda: _no_hints(world))


async def _no_hints(world: World) -> bool:
    assert world.bridge is not None
    return await world.bridge.store.pending_hints() == 0


@pytest.fixture
def quick_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge's fixed waits after a 423 (5 s) and a 409 (2 s), shortened."""
    monkeypatch.setattr(shoptet_module, "LOCKED_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(delivery_module, "CONFLICT_RETRY_SECONDS", 0.2)


# --- scenarios ---------------------------------------------------------------------------------


async def test_both_directions_and_every_retry_conform(sims: World, quick_waits: None) -> None:
    a, b = "2026000301", "2026000302"
    async with serve(sims):
        await agree(sims, [a, b])
        # Shoptet -> MetaKocka: a webhook, then the bridge reads the order.
        sims.shoptet.set_status_as_person(a, SHOPTET["paid"])
        await eventually(lambda: sims.mk_status(a) == MK["paid"])
        # MetaKocka -> Shoptet, through each failure Shoptet may answer first.
        sims.shoptet.fail_next(1, 503)
        await mk_change(sims, b, "paid")  # with paid=true
        sims.shoptet.fail_next(1, 500)
        await mk_change(sims, a, "processing")
        sims.shoptet.fail_next(1, 423)
        await mk_change(sims, b, "processing")
        sims.shoptet.fail_next(1, 429)  # with Retry-After
        await mk_change(sims, a, "completed")  # with suppressDocumentGeneration=true
        sims.shoptet.conflict_next(1)  # 409, a re-read, then 200 with document errors
        sims.shoptet.document_error_statuses = {SHOPTET["shipped"]}
        await mk_change(sims, b, "shipped")
        await settle(sims, 0.2)

    got = seen(sims)
    for status in (200, 409, 423, 429, 500, 503):
        assert got[("PATCH", STATUS, status)] >= 1, (status, got)
    assert got[("GET", ORDER, 200)] >= 4, got
    assert any("suppressDocumentGeneration=true" in r.query for r in sims.shoptet.requests)
    assert any(b'"paid":true' in r.body for r in sims.shoptet.requests)
    assert any(b"document-not-generated" in r.response_body for r in sims.shoptet.requests)
    assert_conforms(sims.shoptet.requests)


async def test_mass_update_conforms(sims: World) -> None:
    codes = [f"20260004{i:02d}" for i in range(4)]
    async with serve(sims):
        await agree(sims, codes)
        sims.shoptet.mass_update(codes, SHOPTET["shipped"])
        for code in codes:
            await eventually(lambda code=code: sims.mk_status(code) == MK["shipped"])
        await mk_change(sims, codes[0], "completed")
        await settle(sims, 0.2)
    assert any(d.event == "order:massUpdate" and d.ok for d in sims.shoptet.webhook_deliveries)
    got = seen(sims)
    # The mass update's orders are read together (orderCodes), not one detail call each.
    assert got[("GET", "/api/orders", 200)] >= 1, got
    assert got[("GET", ORDER, 200)] < 2 * len(codes), got
    assert got[("PATCH", STATUS, 200)] == 1, got
    assert_conforms(sims.shoptet.requests)


async def test_missing_orders_refused_writes_and_outages_conform(
    sims: World, quick_waits: None
) -> None:
    mapping = mapping_with("shoptet", "shipped", 99)  # unknown to the e-shop: 422
    known, missing = "2026000501", "2026000502"
    async with serve(sims, mapping=mapping) as bridge:
        await agree(sims, [known])
        # Only in MetaKocka: Shoptet answers 404 to the read and to every write.
        sims.mk_ids[missing] = sims.metakocka.add_order(missing, MK["paid"])
        await eventually(lambda: len(sims.shoptet_patches(missing)) >= 2)
        sims.metakocka.set_status_as_person(sims.mk_ids[known], MK["shipped"])
        await eventually(lambda: _dead_letters(bridge))
        sims.shoptet.set_down(True)  # maintenance: 503 with the envelope, for reads too
        sims.shoptet.set_status_as_person(known, SHOPTET["paid"])
        await eventually(
            lambda: any(r.method == "GET" and r.status == 503 for r in sims.shoptet.requests)
        )
        sims.shoptet.set_down(False)
        await settle(sims, 0.2)
    got = seen(sims)
    assert got[("GET", ORDER, 404)] >= 1, got
    assert got[("PATCH", STATUS, 404)] >= 2, got
    assert got[("PATCH", STATUS, 422)] == 1, got
    assert got[("GET", ORDER, 503)] >= 1, got
    assert_conforms(sims.shoptet.requests)


async def _dead_letters(bridge: Bridge) -> bool:
    return any(p.kind == "delivery_failed" for p in await bridge.store.list_problems())


async def test_reads_by_key_go_50_codes_a_call_and_conform(sims: World) -> None:
    codes = [f"2026000{i:03d}" for i in range(600, 660)]
    missing = set(codes[::12])  # five codes no order has
    for code in codes:
        if code not in missing:
            sims.shoptet.add_order(code, SHOPTET["paid"])
    client = ShoptetClient(sims.settings())
    try:
        results = await client.read_many_by_key(codes)
    finally:
        await client.aclose()
    assert results == {
        code: None if code in missing else Snapshot("shoptet", code, code, str(SHOPTET["paid"]))
        for code in codes
    }
    # Two list calls, 50 codes and then 10; no detail call for any order.
    assert [parse_qs(r.query)["orderCodes"][0].split(",") for r in sims.shoptet.requests] == [
        codes[:50],
        codes[50:],
    ]
    assert {(r.method, r.path, r.status) for r in sims.shoptet.requests} == {
        ("GET", "/api/orders", 200)
    }
    assert_conforms(sims.shoptet.requests)


# --- the check is not vacuous ------------------------------------------------------------------


def _exchange(**changes: Any) -> RecordedRequest:
    good: dict[str, Any] = {
        "method": "PATCH",
        "path": "/api/orders/2026000042/status",
        "query": "",
        "headers": {
            "shoptet-private-api-token": "sim-token",
            "content-type": "application/json",
        },
        "body": b'{"data":{"statusId":2}}',
        "status": 404,
        "response_headers": {"content-type": "application/json; charset=utf-8"},
        "response_body": b'{"data":null,"errors":[{"errorCode":"order-not-found",'
        b'"message":"Order not found.","instance":"2026000042"}],"metadata":{"requestId":"x"}}',
    }
    return RecordedRequest(**{**good, **changes})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"body": b'{"data":{"statusId":"2"}}'}, "statusId"),
        ({"body": b'{"statusId":2}'}, "data"),
        ({"headers": {"shoptet-private-api-token": "sim-token"}}, "Content-Type"),
        ({"query": "suppressEmailSending=maybe"}, "suppressEmailSending"),
        ({"method": "POST"}, "no operation"),
        ({"status": 500, "response_body": b"<html>oops</html>"}, "500"),
    ],
)
def test_the_check_rejects_what_does_not_conform(change: dict[str, Any], words: str) -> None:
    assert contract_problems([_exchange()]) == []
    with pytest.raises(ContractViolation, match=words):
        assert_conforms([_exchange(), _exchange(**change)])
