"""A world of simulators and one bridge, all talking real HTTP on loopback.

The simulators run in their own threads (like remote services); the bridge runs in the test's
event loop, so tests can look into its store directly.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bridge.config import Settings
from bridge.mapping import StatusMapping, parse_mapping
from bridge.platforms import PLATFORMS
from bridge.sandbox.bitrix24 import DEFAULT_SALE_STATUSES, Bitrix24Simulator, SaleStatus
from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread, serve_in_loop
from bridge.sandbox.shoptet import ShoptetSimulator
from bridge.service import Bridge
from tests.mappings import mapping, mapping_file

MAPPING = mapping(("shoptet", "metakocka"))
# The two-platform example as a file, for tests that read or derive from it.
EXAMPLE_MAPPING = mapping_file(Path(tempfile.mkdtemp(prefix="bridge-test-mapping-")))

# Shoptet ids and MetaKocka Opis values of the example mapping.
SHOPTET = {"new": -1, "paid": 2, "processing": -2, "shipped": 3, "completed": -3, "cancelled": -4}
MK = {
    "new": "new_order",
    "paid": "in_progress",
    "processing": "ready_to_ship",
    "shipped": "shipped",
    "completed": "completed",
    "cancelled": "canceled",
}


BITRIX = {
    "orders": {
        "new": "N",
        "paid": "P",
        "processing": "PR",
        "shipped": "S",
        "completed": "F",
        "cancelled": "D",
    },
    "deals": {
        "new": "NEW",
        "paid": "PREPARATION",
        "processing": "EXECUTING",
        "shipped": "FINAL_INVOICE",
        "completed": "WON",
        "cancelled": "LOSE",
    },
}
BITRIX_EVENTS = {"orders": ["ONSALEORDERSAVED"], "deals": ["ONCRMDEALUPDATE", "ONCRMDEALADD"]}
# The example mapping's own Bitrix24 order status for "processing" (operators create it).
PROCESSING_STATUS = SaleStatus("PR", "O", 25, "#FFF3B0")


@dataclass
class World:
    shoptet: ShoptetSimulator
    shoptet_url: str
    metakocka: MetaKockaSimulator
    metakocka_url: str
    tmp: Path
    bridge: Bridge | None = None
    bridge_url: str = ""
    mk_ids: dict[str, str] = field(default_factory=dict)
    bitrix: Bitrix24Simulator | None = None
    bitrix_url: str = ""
    bitrix_ids: dict[str, int] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.bitrix.mode if self.bitrix else ""

    @property
    def mapping(self) -> StatusMapping:
        if self.bitrix is None:
            return MAPPING
        return mapping(("shoptet", "metakocka", "bitrix24"), self.bitrix.mode)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{self.tmp / 'bridge.sqlite3'}",
            "mapping_file": mapping_file(self.tmp),
            "shoptet_base_url": self.shoptet_url,
            "shoptet_api_token": SecretStr(self.shoptet.token),
            "shoptet_webhook_key": SecretStr(self.shoptet.signature_key),
            "shoptet_eshop_id": self.shoptet.eshop_id,
            "metakocka_base_url": f"{self.metakocka_url}/rest/eshop/v1",
            "metakocka_company_id": self.metakocka.company_id,
            "metakocka_secret_key": SecretStr(self.metakocka.secret_key),
            "metakocka_poll_interval_seconds": 0.3,
            "metakocka_poll_overlap_seconds": 2.0,
            "idle_check_seconds": 0.05,
            "read_retry_seconds": 0.1,
            "retry_base_seconds": 0.05,
            "retry_cap_seconds": 0.3,
        }
        if self.bitrix is not None:
            values.update(
                bitrix24_mode=self.bitrix.mode,
                bitrix24_webhook_url=SecretStr(self.bitrix_url + self.bitrix.webhook_path),
                bitrix24_application_token=SecretStr(self.bitrix.application_token),
                bitrix24_rate_per_second=self.bitrix_rate,
                bitrix24_burst=self.bitrix_burst,
                bitrix24_poll_interval_seconds=0.5,
                bitrix24_poll_overlap_seconds=2.0,
            )
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    bitrix_rate: float = 20.0
    bitrix_burst: int = 50

    def add_order(self, code: str, canonical: str = "new") -> str:
        self.shoptet.add_order(code, SHOPTET[canonical])
        mk_id = self.metakocka.add_order(code, MK[canonical])
        self.mk_ids[code] = mk_id
        if self.bitrix is not None:
            native = BITRIX[self.mode][canonical]
            if self.mode == "orders":
                self.bitrix_ids[code] = self.bitrix.add_order(native, xml_id=code)
            else:
                self.bitrix_ids[code] = self.bitrix.add_deal(native, ORIGIN_ID=code)
        return mk_id

    def bitrix_status(self, code: str) -> str:
        assert self.bitrix is not None
        if self.mode == "orders":
            return str(self.bitrix.order(self.bitrix_ids[code])["statusId"])
        return str(self.bitrix.deal(self.bitrix_ids[code])["STAGE_ID"])

    def set_bitrix_status(self, code: str, canonical: str) -> None:
        assert self.bitrix is not None
        native = BITRIX[self.mode][canonical]
        if self.mode == "orders":
            self.bitrix.set_order_status_as_person(self.bitrix_ids[code], native)
        else:
            self.bitrix.set_deal_stage_as_person(self.bitrix_ids[code], native)

    def bitrix_writes(self, code: str | None = None) -> list[Any]:
        """Status updates the bridge sent to Bitrix24 (batched ones included)."""
        assert self.bitrix is not None
        method = "sale.order.update" if self.mode == "orders" else "crm.deal.update"
        calls = [c for c in self.bitrix.requests if c.method == method]
        calls += [c for c in self.bitrix.subcalls if c.method == method]
        if code is None:
            return calls
        wanted = str(self.bitrix_ids[code])
        return [c for c in calls if str((c.params or {}).get("id")) == wanted]

    def agreed(self, code: str, canonical: str) -> bool:
        ok = (
            self.shoptet_status(code) == SHOPTET[canonical]
            and self.mk_status(code) == MK[canonical]
        )
        if self.bitrix is not None:
            ok = ok and self.bitrix_status(code) == BITRIX[self.mode][canonical]
        return ok

    def shoptet_status(self, code: str) -> int:
        return int(self.shoptet.order(code)["status"]["id"])

    def mk_status(self, code: str) -> str:
        return str(self.metakocka.order(self.mk_ids[code])["status_desc"])

    def shoptet_patches(self, code: str | None = None) -> list[Any]:
        return [
            r
            for r in self.shoptet.requests
            if r.method == "PATCH" and (code is None or r.path == f"/api/orders/{code}/status")
        ]

    def shoptet_writes(self, code: str | None = None) -> list[Any]:
        """Status PATCHes Shoptet accepted: a 423 on a quick repeat and its retry are one write."""
        return [r for r in self.shoptet_patches(code) if r.status == 200]

    def mk_changes(self, code: str | None = None, *, succeeded: bool = True) -> list[Any]:
        """change_document_status calls (the successful ones) touching order ``code``."""
        calls = []
        for call in self.metakocka.requests:
            if call.method != "change_document_status" or call.body is None:
                continue
            if succeeded and (call.answer is None or call.answer.get("opr_code") != "0"):
                continue
            ids = [call.body.get("mk_id")] + [str(i) for i in call.body.get("mk_id_list") or []]
            if code is None or self.mk_ids[code] in ids or call.body.get("buyer_order") == code:
                calls.append(call)
        return calls


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], within: float = 10.0, what: str = ""
) -> None:
    """Wait until ``check`` (plain or async) holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


async def agreed_on(world: World, code: str, canonical: str) -> bool:
    """The bridge knows the order on every platform and has agreed on ``canonical``."""
    assert world.bridge is not None
    order = await world.bridge.store.load_order(code)
    return (
        order is not None
        and order.canonical == canonical
        and len(order.platforms) == len(world.mapping.platforms)
    )


async def audit_has(world: World, kind: str, **detail: Any) -> bool:
    assert world.bridge is not None
    for entry in await world.bridge.store.list_audit(limit=1000):
        if entry.kind == kind and all(entry.detail.get(k) == v for k, v in detail.items()):
            return True
    return False


async def settle(world: World, seconds: float = 1.0) -> None:
    """Let echoes come back and pollers run (for asserting that nothing *more* happens)."""

    def idle() -> None:
        world.shoptet.wait_webhooks_idle()
        if world.bitrix is not None:
            world.bitrix.wait_events_idle()

    # In a thread: the bridge answering those webhooks runs in this event loop.
    await asyncio.to_thread(idle)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(idle)


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[World]:
    shoptet = ShoptetSimulator(webhook_retry_delay=0.2, lock_seconds=0.05)
    metakocka = MetaKockaSimulator()
    with ServerThread(shoptet.app) as s, ServerThread(metakocka.app) as m:
        yield World(shoptet, s.url, metakocka, m.url, tmp_path)
    shoptet.close()


@pytest.fixture(params=["orders", "deals"])
def sims3(request: pytest.FixtureRequest, sims: World) -> Iterator[World]:
    """The two simulators plus Bitrix24, in sale-orders mode and in CRM-deals mode."""
    bitrix = Bitrix24Simulator(
        mode=request.param,
        rate_per_second=sims.bitrix_rate,
        burst=sims.bitrix_burst,
        sale_statuses=(*DEFAULT_SALE_STATUSES, PROCESSING_STATUS),
    )
    with ServerThread(bitrix.app) as b:
        sims.bitrix, sims.bitrix_url = bitrix, b.url
        yield sims
    bitrix.close()


@pytest.fixture
async def world3(sims3: World) -> AsyncIterator[World]:
    """Three platforms and a running bridge, all event webhooks pointed at it."""
    async with running_bridge(sims3):
        yield sims3


@pytest.fixture
async def world(sims: World) -> AsyncIterator[World]:
    """The simulators plus a running bridge, with Shoptet's order:update webhook pointed at it."""
    async with running_bridge(sims):
        yield sims


class running_bridge:
    def __init__(self, world: World, register_webhook: bool = True, **overrides: Any) -> None:
        self.world = world
        self.register = register_webhook
        self.overrides = overrides
        self._cm: Any = None

    async def __aenter__(self) -> Bridge:
        bridge = Bridge(self.world.settings(**self.overrides), mapping=self.world.mapping)
        self._cm = serve_in_loop(bridge.app)
        url = await self._cm.__aenter__()
        self.world.bridge, self.world.bridge_url = bridge, url
        if self.register:
            self.world.shoptet.register_webhook("order:update", f"{url}/webhooks/shoptet")
            if self.world.bitrix is not None:
                self.world.bitrix.register_outgoing_webhook(
                    f"{url}/webhooks/bitrix24", BITRIX_EVENTS[self.world.mode]
                )
        return bridge

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)


def mapping_with(platform: str, canonical: str, target: int | str) -> StatusMapping:
    """The harness's mapping with one target replaced, rebuilt through parse_mapping (so it is
    checked like a mapping file would be)."""
    statuses: dict[str, Any] = {}
    for name, status in MAPPING.statuses.items():
        entry: dict[str, Any] = {"rank": status.rank}
        for p, t in status.targets.items():
            native = PLATFORMS[p].native_type
            also = sorted(status.inbound[p] - {t.native})
            entry[p] = {
                "target": native(t.native),
                "also": [native(n) for n in also],
                **t.options.model_dump(exclude_defaults=True),
            }
        statuses[name] = entry
    statuses[canonical][platform] = {"target": target}
    backward = [{"from": a, "to": b} for a, b in sorted(MAPPING.backward)]
    return parse_mapping({"statuses": statuses, "backward": backward}, PLATFORMS, "test")
