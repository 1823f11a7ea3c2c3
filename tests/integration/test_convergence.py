"""Bridge <-> simulators over real HTTP: the scenarios the product promises."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from bridge.signing import hmac_sha1_hex
from tests.integration.conftest import (
    MK,
    SHOPTET,
    World,
    agreed_on,
    audit_has,
    eventually,
    running_bridge,
    settle,
)

pytestmark = pytest.mark.integration

CODE = "2026000042"


async def test_shoptet_change_reaches_metakocka_and_its_echo_costs_nothing(world: World) -> None:
    world.add_order(CODE)
    world.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
    await eventually(lambda: world.mk_status(CODE) == MK["paid"], what="MetaKocka to show paid")
    await settle(world)
    assert len(world.mk_changes(CODE)) == 1
    assert world.shoptet_writes() == []  # nothing written back to the source


async def test_metakocka_change_reaches_shoptet_through_the_poller(world: World) -> None:
    mk_id = world.add_order(CODE)
    world.metakocka.set_status_as_person(mk_id, MK["shipped"])
    await eventually(
        lambda: world.shoptet_status(CODE) == SHOPTET["shipped"], what="Shoptet shipped"
    )
    # Shoptet sends order:update for the bridge's own write; the read shows what the bridge
    # wrote, so nothing more happens, and MetaKocka (the source) is never written.
    await settle(world)
    assert len(world.shoptet_writes(CODE)) == 1
    assert world.mk_changes() == []
    assert world.bridge is not None
    audit = await world.bridge.store.list_audit(CODE)
    assert {"echo", "advance", "written"} <= {a.kind for a in audit}


async def test_both_directions_in_turn_without_loops(world: World) -> None:
    mk_id = world.add_order(CODE)
    world.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
    await eventually(lambda: world.mk_status(CODE) == MK["paid"])
    world.metakocka.set_status_as_person(mk_id, MK["processing"])
    await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["processing"])
    world.shoptet.set_status_as_person(CODE, SHOPTET["shipped"])
    await eventually(lambda: world.mk_status(CODE) == MK["shipped"])
    await settle(world)
    assert len(world.mk_changes(CODE)) == 2  # paid, shipped
    assert len(world.shoptet_writes(CODE)) == 1  # processing


async def test_the_same_webhook_five_times_causes_one_write(sims: World) -> None:
    sims.add_order(CODE)
    sims.shoptet.add_order("2026000043", SHOPTET["new"])
    async with running_bridge(sims, register_webhook=False):
        # The status changes in Shoptet; the webhook is delivered five times (retries,
        # duplicates), some of them at the same moment.
        sims.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
        body = orjson.dumps(
            {
                "eshopId": sims.shoptet.eshop_id,
                "event": "order:update",
                "eventCreated": "2026-11-22T10:00:00+0100",
                "eventInstance": CODE,
            }
        )
        headers = {
            "Shoptet-Webhook-Signature": hmac_sha1_hex(sims.shoptet.signature_key, body),
            "Content-Type": "application/json",
        }
        async with httpx.AsyncClient(base_url=sims.bridge_url) as client:
            answers = await asyncio.gather(
                *(client.post("/webhooks/shoptet", content=body, headers=headers) for _ in range(3))
            )
            await eventually(lambda: sims.mk_status(CODE) == MK["paid"])
            answers += [
                await client.post("/webhooks/shoptet", content=body, headers=headers)
                for _ in range(2)
            ]
        assert [a.status_code for a in answers] == [200] * 5
        await settle(sims)
    assert len(sims.mk_changes(CODE)) == 1


async def test_a_lower_ranked_status_arriving_late_does_not_move_the_order_back(
    world: World,
) -> None:
    mk_id = world.add_order(CODE)
    world.metakocka.set_status_as_person(mk_id, MK["shipped"])
    await eventually(lambda: world.shoptet_status(CODE) == SHOPTET["shipped"])
    # Someone sets "paid" in Shoptet afterwards (or a stale view comes back): paid ranks below
    # shipped and no backward rule allows it, so MetaKocka keeps "shipped".
    world.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
    assert world.bridge is not None
    await eventually(lambda: audit_has(world, "regress"))
    await settle(world)
    assert world.mk_status(CODE) == MK["shipped"]
    assert world.mk_changes(CODE) == []


async def test_metakocka_down_for_a_while_then_everything_converges(world: World) -> None:
    codes = [f"20260001{i:02d}" for i in range(10)]
    for code in codes:
        world.add_order(code)
    # The poller finds the new MetaKocka orders and the bridge links them to Shoptet's.
    for code in codes:
        await eventually(lambda code=code: agreed_on(world, code, "new"))
    world.metakocka.set_down(True)
    for i, code in enumerate(codes):
        world.shoptet.set_status_as_person(code, SHOPTET["paid" if i % 2 else "processing"])
    assert world.bridge is not None
    await eventually(
        lambda: (
            len([c for c in world.metakocka.requests if c.method == "change_document_status"]) >= 10
        )
    )
    assert await world.bridge.store.pending_deliveries("metakocka") == 10
    world.metakocka.set_down(False)
    for i, code in enumerate(codes):
        want = MK["paid" if i % 2 else "processing"]
        await eventually(lambda code=code, want=want: world.mk_status(code) == want)
    await settle(world)
    assert await world.bridge.store.pending_deliveries() == 0
    assert len(world.mk_changes()) <= 10  # batched by status once the mk_ids are known, never more


async def test_a_b_c_while_the_target_is_down_writes_c_once(world: World) -> None:
    world.add_order(CODE)
    await eventually(lambda: agreed_on(world, CODE, "new"))
    world.metakocka.set_down(True)
    assert world.bridge is not None
    for status in ("paid", "processing", "shipped"):
        world.shoptet.set_status_as_person(CODE, SHOPTET[status])
        await eventually(lambda status=status: audit_has(world, "advance", canonical=status))
    world.metakocka.set_down(False)
    await eventually(lambda: world.mk_status(CODE) == MK["shipped"])
    await settle(world)
    changes = world.mk_changes(CODE)
    assert len(changes) == 1
    assert changes[0].body["status_code"] == MK["shipped"]
