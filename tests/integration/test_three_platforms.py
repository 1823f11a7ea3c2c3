"""Shoptet, MetaKocka and Bitrix24 (sale orders and CRM deals) converge, over real HTTP."""

from __future__ import annotations

import pytest

from tests.integration.conftest import (
    BITRIX,
    MK,
    SHOPTET,
    World,
    agreed_on,
    eventually,
    running_bridge,
    settle,
)

pytestmark = pytest.mark.integration

CODE = "2026000777"


async def linked(world: World, code: str = CODE) -> None:
    """Add an order everywhere and wait until the bridge has linked all three."""
    world.add_order(code)
    await eventually(lambda: agreed_on(world, code, "new"), what="the order linked on all three")


async def test_a_shoptet_change_reaches_metakocka_and_bitrix24(world3: World) -> None:
    await linked(world3)
    world3.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
    await eventually(lambda: world3.agreed(CODE, "paid"), what="all three to show paid")
    await settle(world3)
    assert len(world3.bitrix_writes(CODE)) == 1
    assert len(world3.mk_changes(CODE)) == 1
    assert world3.shoptet_writes(CODE) == []


async def test_a_metakocka_change_reaches_shoptet_and_bitrix24(world3: World) -> None:
    await linked(world3)
    world3.metakocka.set_status_as_person(world3.mk_ids[CODE], MK["shipped"])
    await eventually(lambda: world3.agreed(CODE, "shipped"), what="all three to show shipped")
    await settle(world3)
    assert len(world3.bitrix_writes(CODE)) == 1
    assert len(world3.shoptet_writes(CODE)) == 1
    assert world3.mk_changes(CODE) == []


async def test_a_bitrix24_change_reaches_shoptet_and_metakocka(world3: World) -> None:
    await linked(world3)
    world3.set_bitrix_status(CODE, "processing")
    await eventually(lambda: world3.agreed(CODE, "processing"), what="all three to show processing")
    await settle(world3)
    # The three echoes (a Shoptet webhook, a MetaKocka poll, a Bitrix24 event) cost nothing.
    assert len(world3.shoptet_writes(CODE)) == 1
    assert len(world3.mk_changes(CODE)) == 1
    assert world3.bitrix_writes(CODE) == []


async def test_changes_in_turn_on_every_platform_without_loops(world3: World) -> None:
    await linked(world3)
    world3.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
    await eventually(lambda: world3.agreed(CODE, "paid"))
    world3.set_bitrix_status(CODE, "processing")
    await eventually(lambda: world3.agreed(CODE, "processing"))
    world3.metakocka.set_status_as_person(world3.mk_ids[CODE], MK["shipped"])
    await eventually(lambda: world3.agreed(CODE, "shipped"))
    await settle(world3, 1.5)
    assert len(world3.shoptet_writes(CODE)) == 2  # processing, shipped
    assert len(world3.mk_changes(CODE)) == 2  # paid, processing
    assert len(world3.bitrix_writes(CODE)) == 2  # paid, shipped


async def test_a_lost_bitrix24_event_is_caught_by_the_poller(sims3: World) -> None:
    async with running_bridge(sims3, register_webhook=False):
        await linked(sims3)
        # No outgoing webhook is registered: Bitrix24 tells nobody (as when an event is lost).
        sims3.set_bitrix_status(CODE, "completed")
        await eventually(lambda: sims3.agreed(CODE, "completed"), what="the poller to find it")


async def test_a_bitrix24_order_found_by_its_key_gets_its_id_learned(world3: World) -> None:
    # The order reaches Bitrix24 after the bridge first saw it: the write looks it up by the
    # key field (xmlId / ORIGIN_ID) once, and later writes use the learned id.
    world3.shoptet.add_order(CODE, SHOPTET["new"])
    world3.mk_ids[CODE] = world3.metakocka.add_order(CODE, MK["new"])
    await eventually(lambda: agreed_on_two(world3))
    assert world3.bitrix is not None
    native = BITRIX[world3.mode]["new"]
    if world3.mode == "orders":
        world3.bitrix_ids[CODE] = world3.bitrix.add_order(native, xml_id=CODE)
    else:
        world3.bitrix_ids[CODE] = world3.bitrix.add_deal(native, ORIGIN_ID=CODE)
    world3.shoptet.set_status_as_person(CODE, SHOPTET["shipped"])
    await eventually(lambda: world3.agreed(CODE, "shipped"))
    assert world3.bridge is not None
    order = await world3.bridge.store.load_order(CODE)
    assert order is not None
    assert order.platforms["bitrix24"].ref == str(world3.bitrix_ids[CODE])


async def agreed_on_two(world: World) -> bool:
    assert world.bridge is not None
    order = await world.bridge.store.load_order(CODE)
    return order is not None and {"shoptet", "metakocka"} <= set(order.platforms)


async def test_events_with_a_wrong_token_are_refused(world3: World) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=world3.bridge_url) as client:
        answer = await client.post(
            "/webhooks/bitrix24",
            content=b"event=ONSALEORDERSAVED&data%5BFIELDS%5D%5BID%5D=1&auth%5Bapplication_token%5D=nope",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert world3.bridge is not None
    assert await world3.bridge.store.pending_hints() == 0
