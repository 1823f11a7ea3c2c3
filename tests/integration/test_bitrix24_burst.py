"""500 changes at once through a Bitrix24 portal that allows 2 requests/s with a burst of 50.

The portal's bucket is already full when the burst starts (someone else on the portal just used
it), so the bridge's very first request is refused; from then on its own copy of the bucket
keeps it under the limit: not one more refusal, and every order converges.
"""

from __future__ import annotations

import time

import httpx
import pytest

from bridge.models import Observation, Snapshot
from bridge.sandbox.bitrix24 import DEFAULT_SALE_STATUSES, Bitrix24Simulator
from bridge.sandbox.server import ServerThread
from bridge.store.sqlite import SQLiteStore
from tests.integration.conftest import (
    BITRIX,
    MK,
    PROCESSING_STATUS,
    SHOPTET,
    World,
    eventually,
    running_bridge,
)

pytestmark = pytest.mark.integration

ORDERS = [f"2026500{i:03d}" for i in range(500)]


@pytest.mark.parametrize("mode", ["orders", "deals"])
async def test_a_burst_of_500_changes_keeps_to_the_portal_rate(sims: World, mode: str) -> None:
    world = sims
    bitrix = Bitrix24Simulator(
        mode=mode,  # type: ignore[arg-type]
        rate_per_second=2.0,
        burst=50,
        sale_statuses=(*DEFAULT_SALE_STATUSES, PROCESSING_STATUS),
    )
    world.bitrix_rate, world.bitrix_burst = 2.0, 50
    # Shoptet's own limits are not under test here.
    world.shoptet._capacity = 10**9
    with ServerThread(bitrix.app) as server:
        world.bitrix, world.bitrix_url = bitrix, server.url
        for code in ORDERS:
            world.add_order(code)
        await seed_links(world)
        # Someone else on the portal has just used up the bucket.
        async with httpx.AsyncClient(base_url=server.url + bitrix.webhook_path) as other:
            for _ in range(50):
                await other.post("sale.status.list", json={})
        assert bitrix.throttled_count == 0
        async with running_bridge(world, bitrix24_poll_interval_seconds=5.0):
            start = time.monotonic()
            for code in ORDERS:
                world.metakocka.set_status_as_person(world.mk_ids[code], MK["shipped"])
            want = BITRIX[mode]["shipped"]
            await eventually(
                lambda: all(world.bitrix_status(c) == want for c in ORDERS),
                within=120,
                what="every order to reach Bitrix24",
            )
            took = time.monotonic() - start
            await eventually(
                lambda: all(world.shoptet_status(c) == SHOPTET["shipped"] for c in ORDERS),
                within=60,
            )
            calls = len([r for r in bitrix.requests if r.auth == "webhook"]) - 50
        bitrix.close()
    # At most the one refusal the full bucket forced at the start.
    assert bitrix.throttled_count <= 1
    # 500 writes and their 500 echo reads went in batches of up to 50.
    assert calls <= 80, calls
    # 2 requests/s: the calls beyond the free burst took their time, and no more than that.
    assert took >= (calls - 50) / 2.0 - 1
    print(f"{mode}: {calls} Bitrix24 calls for 500 changes in {took:.1f} s")


async def seed_links(world: World) -> None:
    """The bridge has seen every order on all three platforms already (as after a first sync)."""
    assert world.bitrix is not None
    store = SQLiteStore(str(world.tmp / "bridge.sqlite3"))
    await store.open()
    try:
        for code in ORDERS:
            await store.commit_observation(
                Observation(
                    hints=(),
                    platform="shoptet",
                    ref=code,
                    observed_at=time.time(),
                    order_key=code,
                    native_status=str(SHOPTET["new"]),
                    new_canonical="new",
                    sightings=(
                        Snapshot("metakocka", world.mk_ids[code], code, MK["new"]),
                        Snapshot(
                            "bitrix24", str(world.bitrix_ids[code]), code, BITRIX[world.mode]["new"]
                        ),
                    ),
                )
            )
    finally:
        await store.close()
