"""The Bitrix24 client against the simulator over real HTTP, in sale-orders and CRM-deals mode.

Each test builds the client itself (``Settings`` without an env file, a ``ClientContext`` with
a ``MemoryStore`` and the mapping's natives) and looks at what the simulator recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from bridge.config import ConfigError, Settings
from bridge.models import NewHint, Snapshot
from bridge.platforms.base import ClientContext, Outcome, ReadFailed, WriteRequest
from bridge.platforms.bitrix24 import TOKENS_VALUE, Bitrix24Client, Bitrix24Options
from bridge.sandbox.bitrix24 import (
    DEFAULT_SALE_STATUSES,
    Bitrix24Simulator,
    RecordedCall,
    _B24Error,
)
from bridge.sandbox.server import ServerThread
from bridge.service import client_context
from bridge.store.memory import MemoryStore
from tests.integration.conftest import BITRIX, PROCESSING_STATUS
from tests.mappings import mapping

pytestmark = pytest.mark.integration

MODES = ["orders", "deals"]
OPTIONS = Bitrix24Options()
MISSING = "999999"  # an id no order or deal has


class Clock:
    """The simulator's clock: real time, moved on by hand to date changes apart."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Portal:
    """One simulated portal on a loopback port, and what the tests need to know about it."""

    def __init__(self, sim: Bitrix24Simulator, url: str) -> None:
        self.sim = sim
        self.url = url

    @property
    def mode(self) -> str:
        return self.sim.mode

    @property
    def get_method(self) -> str:
        return "sale.order.get" if self.mode == "orders" else "crm.deal.get"

    @property
    def update_method(self) -> str:
        return "sale.order.update" if self.mode == "orders" else "crm.deal.update"

    @property
    def list_method(self) -> str:
        return "sale.order.list" if self.mode == "orders" else "crm.deal.list"

    @property
    def key_field(self) -> str:
        return "xmlId" if self.mode == "orders" else "ORIGIN_ID"

    @property
    def webhook_url(self) -> str:
        return self.url + self.sim.webhook_path

    def native(self, canonical: str) -> str:
        return BITRIX[self.mode][canonical]

    def add(self, key: str | None, canonical: str = "new") -> str:
        """An order (or deal) in the default pipeline; its id as the client's ref."""
        native = self.native(canonical)
        if self.mode == "orders":
            return str(self.sim.add_order(native, xml_id=key or ""))
        fields = {"ORIGIN_ID": key} if key else {}
        return str(self.sim.add_deal(native, **fields))

    def status(self, ref: str) -> str:
        if self.mode == "orders":
            return str(self.sim.order(int(ref))["statusId"])
        return str(self.sim.deal(int(ref))["STAGE_ID"])

    def set_status(self, ref: str, canonical: str) -> None:
        if self.mode == "orders":
            self.sim.set_order_status_as_person(int(ref), self.native(canonical))
        else:
            self.sim.set_deal_stage_as_person(int(ref), self.native(canonical))

    def calls(self, method: str) -> list[RecordedCall]:
        return [c for c in self.sim.requests if c.method == method]

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "bitrix24_mode": self.mode,
            "bitrix24_webhook_url": SecretStr(self.webhook_url),
            "bitrix24_application_token": SecretStr(self.sim.application_token),
            "bitrix24_rate_per_second": 50.0,
            "bitrix24_burst": 50,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    def oauth_settings(self, access: str | None, refresh: str, **overrides: Any) -> Settings:
        """A local application: the portal's REST root, the app's credentials, its tokens."""
        values: dict[str, Any] = {
            "bitrix24_webhook_url": None,
            "bitrix24_portal_url": self.url + "/rest",
            "bitrix24_client_id": self.sim.client_id,
            "bitrix24_client_secret": SecretStr(self.sim.client_secret),
            "bitrix24_refresh_token": SecretStr(refresh),
            "bitrix24_oauth_url": self.url + "/oauth/token/",
        }
        if access is not None:
            values["bitrix24_access_token"] = SecretStr(access)
        values.update(overrides)
        return self.settings(**values)


@contextlib.contextmanager
def serving(mode: str, app: Any = None, **sim_options: Any) -> Iterator[Portal]:
    """A simulator in its own server thread; ``app`` wraps its ASGI app if given."""
    sim_options.setdefault("sale_statuses", (*DEFAULT_SALE_STATUSES, PROCESSING_STATUS))
    sim_options.setdefault("rate_per_second", 50.0)
    sim_options.setdefault("burst", 50)
    sim = Bitrix24Simulator(mode=mode, **sim_options)
    try:
        with ServerThread(app(sim.app) if app else sim.app) as server:
            yield Portal(sim, server.url)
    finally:
        sim.close()


@pytest.fixture(params=MODES)
def portal(request: pytest.FixtureRequest) -> Iterator[Portal]:
    with serving(request.param) as portal:
        yield portal


@contextlib.asynccontextmanager
async def connected(
    settings: Settings,
    store: MemoryStore | None = None,
    natives: frozenset[str] | None = None,
) -> AsyncIterator[Bitrix24Client]:
    if natives is None:
        natives = frozenset(BITRIX[settings.bitrix24_mode].values())
    store = store if store is not None else MemoryStore()
    client = Bitrix24Client(settings, ClientContext(store=store, natives=natives))
    try:
        yield client
    finally:
        await client.aclose()


def request(portal: Portal, key: str, canonical: str, ref: str | None = None) -> WriteRequest:
    return WriteRequest(key, portal.native(canonical), ref, OPTIONS)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def fail_reads_of(portal: Portal, refs: set[str]) -> None:
    """Reads of these ids fail on the portal (each on its own, also inside a batch)."""
    method = portal.get_method
    original = portal.sim._methods[method]

    def failing(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if str(params.get("id")) in refs:
            raise _B24Error(500, "INTERNAL_SERVER_ERROR", "Internal server error")
        return original(params, ctx)

    portal.sim._methods[method] = failing


def fail_lists_of(portal: Portal, keys: set[str]) -> None:
    """Lists whose key filter names one of these keys fail on the portal (also in a batch)."""
    method = portal.list_method
    original = portal.sim._methods[method]

    def failing(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if keys & set((params.get("filter") or {}).get(f"@{portal.key_field}") or []):
            raise _B24Error(500, "INTERNAL_SERVER_ERROR", "Internal server error")
        return original(params, ctx)

    portal.sim._methods[method] = failing


# -- reads ----------------------------------------------------------------------------------


async def test_read_by_ref_and_by_key(portal: Portal) -> None:
    ref = portal.add("2026000001", "paid")
    portal.add("2026000002")
    expected = Snapshot("bitrix24", ref, "2026000001", portal.native("paid"))
    async with connected(portal.settings()) as client:
        assert await client.read(ref) == expected
        assert await client.read(MISSING) is None
        assert await client.read_by_key("2026000001") == expected
        assert await client.read_by_key("2026999999") is None
    # By key: one list call filtered on the key field (IN, with the one key).
    lists = portal.calls(portal.list_method)
    assert len(lists) == 2
    key_field = "xmlId" if portal.mode == "orders" else "ORIGIN_ID"
    assert lists[0].params["filter"][f"@{key_field}"] == ["2026000001"]


async def test_read_many_is_one_batch_with_found_missing_and_failing_ids(portal: Portal) -> None:
    found = [portal.add(f"K{i}", "shipped") for i in range(3)]
    failing = portal.add("K-failing")
    fail_reads_of(portal, {failing})
    refs = [found[0], MISSING, found[1], failing, "888888", found[2]]
    async with connected(portal.settings()) as client:
        result = await client.read_many(refs)
    assert set(result) == set(refs)
    for i, ref in enumerate(found):
        assert result[ref] == Snapshot("bitrix24", ref, f"K{i}", portal.native("shipped"))
    assert result[MISSING] is None
    assert result["888888"] is None
    failed = result[failing]
    assert isinstance(failed, ReadFailed)
    assert "INTERNAL_SERVER_ERROR" in failed.reason
    assert portal.sim.calls_by_method == {"batch": 1}
    assert portal.sim.subcalls_by_method[portal.get_method] == len(refs)


async def test_read_many_of_an_invalid_deal_id_fails_only_that_one() -> None:
    # A deals portal refuses id 0 itself ("ID is not defined or invalid."): not "not found".
    with serving("deals") as portal:
        ref = portal.add("K1")
        async with connected(portal.settings()) as client:
            result = await client.read_many([ref, "0"])
        assert result[ref] == Snapshot("bitrix24", ref, "K1", "NEW")
        assert isinstance(result["0"], ReadFailed)
        assert "ID is not defined or invalid" in result["0"].reason


async def test_read_many_over_50_ids_splits_and_a_failed_batch_fails_only_its_part(
    portal: Portal,
) -> None:
    refs = [portal.add(f"K{i:03}") for i in range(60)]
    portal.sim.fail_next(1, 500)  # the first batch call: the first 50 reads
    async with connected(portal.settings()) as client:
        result = await client.read_many(refs)
        assert all(isinstance(result[r], ReadFailed) for r in refs[:50])
        assert all(isinstance(result[r], Snapshot) for r in refs[50:])
        again = await client.read_many(refs)
    assert [again[r] for r in refs] == [
        Snapshot("bitrix24", r, f"K{i:03}", portal.native("new")) for i, r in enumerate(refs)
    ]
    batches = portal.calls("batch")
    assert [len(c.params["cmd"]) for c in batches] == [50, 10, 50, 10]
    assert portal.sim.throttled_count == 0


async def test_read_many_by_key_is_one_batch_of_lists_of_50_keys(portal: Portal) -> None:
    wanted = [f"K{i:03}" for i in range(120)]
    missing = set(wanted[::7])
    if portal.mode == "deals":  # deals of another pipeline with our keys, and older: not ours
        portal.sim.add_deal("C1:NEW", category_id=1, ORIGIN_ID=wanted[1])
        portal.sim.add_deal("C1:NEW", category_id=1, ORIGIN_ID=wanted[0])  # a missing key
    refs = {key: portal.add(key, "paid") for key in wanted if key not in missing}
    async with connected(portal.settings()) as client:
        result = await client.read_many_by_key(wanted)
    assert result == {
        key: Snapshot("bitrix24", refs[key], key, portal.native("paid")) if key in refs else None
        for key in wanted
    }
    assert portal.sim.calls_by_method == {"batch": 1}
    assert portal.sim.subcalls_by_method == {portal.list_method: 3}
    filters = [c.params["filter"] for c in portal.sim.subcalls]
    assert [f[f"@{portal.key_field}"] for f in filters] == [
        wanted[:50],
        wanted[50:100],
        wanted[100:],
    ]
    if portal.mode == "deals":
        assert [f["CATEGORY_ID"] for f in filters] == ["0"] * 3


async def test_read_many_by_key_of_50_keys_or_fewer_is_one_plain_list_call(
    portal: Portal,
) -> None:
    wanted = [f"K{i:02}" for i in range(30)]
    refs = {key: portal.add(key) for key in wanted[:20]}
    async with connected(portal.settings()) as client:
        result = await client.read_many_by_key(wanted)
    assert result == {
        key: Snapshot("bitrix24", refs[key], key, portal.native("new")) if key in refs else None
        for key in wanted
    }
    assert portal.sim.calls_by_method == {portal.list_method: 1}
    [listed] = portal.calls(portal.list_method)
    assert listed.params["filter"][f"@{portal.key_field}"] == wanted


async def test_a_failed_list_command_fails_only_its_own_keys(portal: Portal) -> None:
    wanted = [f"K{i:03}" for i in range(120)]
    refs = {key: portal.add(key) for key in wanted}
    fail_lists_of(portal, {"K077"})  # in the second of the three lists
    async with connected(portal.settings()) as client:
        result = await client.read_many_by_key(wanted)
    failed = [key for key in wanted if isinstance(result[key], ReadFailed)]
    assert failed == wanted[50:100]
    assert "INTERNAL_SERVER_ERROR" in str(result["K050"])
    assert [result[key] for key in wanted[:50] + wanted[100:]] == [
        Snapshot("bitrix24", refs[key], key, portal.native("new"))
        for key in wanted[:50] + wanted[100:]
    ]
    assert portal.sim.calls_by_method == {"batch": 1}


async def test_a_failed_call_fails_every_key_of_that_call_and_no_other(portal: Portal) -> None:
    wanted = [f"M{i:04}" for i in range(2_490)] + [f"K{i:02}" for i in range(30)]
    refs = {key: portal.add(key) for key in wanted[-30:]}
    portal.sim.fail_next(1, 500)  # the first call: the first 2,500 keys
    async with connected(portal.settings()) as client:
        result = await client.read_many_by_key(wanted)
    assert all(isinstance(result[key], ReadFailed) for key in wanted[:2_500])
    assert [result[key] for key in wanted[2_500:]] == [
        Snapshot("bitrix24", refs[key], key, portal.native("new")) for key in wanted[2_500:]
    ]
    # A batch (refused) and then a plain list of the 20 keys left.
    assert [(c.method, c.http_status) for c in portal.sim.requests] == [
        ("batch", 500),
        (portal.list_method, 200),
    ]


async def test_a_key_on_more_orders_than_a_page_holds_is_followed_to_the_last_page(
    portal: Portal,
) -> None:
    shared = [portal.add("K00") for _ in range(60)]
    refs = {key: portal.add(key) for key in (f"K{i:02}" for i in range(1, 60))}
    refs["K00"] = shared[0]  # the oldest order with the key
    wanted = [f"K{i:02}" for i in range(60)]
    async with connected(portal.settings()) as client:
        result = await client.read_many_by_key(wanted)
    assert result == {
        key: Snapshot("bitrix24", refs[key], key, portal.native("new")) for key in wanted
    }
    # The first list (K00..K49) matches 109 orders: its next pages come as plain list calls.
    assert portal.sim.calls_by_method == {"batch": 1, portal.list_method: 2}
    assert [c.params["start"] for c in portal.calls(portal.list_method)] == [50, 100]


# -- writes ---------------------------------------------------------------------------------


async def test_write_by_ref_by_key_and_the_failures(portal: Portal) -> None:
    ref1, ref2 = portal.add("K1"), portal.add("K2")
    async with connected(portal.settings()) as client:
        by_ref = await client.write(request(portal, "K1", "paid", ref1))
        assert by_ref == Outcome("done")
        assert portal.status(ref1) == portal.native("paid")

        by_key = await client.write(request(portal, "K2", "shipped"))
        assert by_key.kind == "done"
        assert by_key.learned_ref == ref2
        assert portal.status(ref2) == portal.native("shipped")

        unknown_key = await client.write(request(portal, "K-nobody", "paid"))
        assert unknown_key.kind == "not_found"
        assert "K-nobody" in unknown_key.reason

        unknown_ref = await client.write(request(portal, "K9", "paid", MISSING))
        assert unknown_ref.kind == "not_found"

        unknown_status = await client.write(WriteRequest("K1", "ZZ", ref1, OPTIONS))
        assert unknown_status.kind == "permanent"
    assert portal.status(ref1) == portal.native("paid")
    # K-nobody was only looked up: four updates were sent (paid, shipped, MISSING, ZZ).
    assert len(portal.calls(portal.update_method)) == 4


async def test_write_many_is_one_batch_and_each_command_has_its_own_outcome(
    portal: Portal,
) -> None:
    refs = [portal.add(f"K{i}") for i in range(4)]
    requests = [
        request(portal, "K0", "paid", refs[0]),
        WriteRequest("K1", "ZZ", refs[1], OPTIONS),  # a status the portal does not have
        request(portal, "K2", "shipped"),  # by key: its id is learned
        request(portal, "K3", "completed", refs[3]),
        request(portal, "K-nobody", "paid"),  # by key, and no such order
    ]
    async with connected(portal.settings()) as client:
        outcomes = await client.write_many(requests)
    assert [o.kind for o in outcomes] == ["done", "permanent", "done", "done", "not_found"]
    assert outcomes[0].learned_ref is None
    assert outcomes[2].learned_ref == refs[2]
    assert outcomes[3].learned_ref is None
    assert [portal.status(r) for r in refs] == [
        portal.native("paid"),
        portal.native("new"),
        portal.native("shipped"),
        portal.native("completed"),
    ]
    # One lookup for both keys, then the four updates in one batch call.
    assert portal.sim.calls_by_method == {portal.list_method: 1, "batch": 1}
    assert portal.sim.subcalls_by_method == {portal.update_method: 4}


async def test_write_many_of_one_sends_it_plainly(portal: Portal) -> None:
    ref = portal.add("K1")
    async with connected(portal.settings()) as client:
        outcomes = await client.write_many([request(portal, "K1", "paid")])
    assert outcomes == [Outcome("done", learned_ref=ref)]
    assert portal.sim.calls_by_method == {portal.list_method: 1, portal.update_method: 1}


async def test_write_many_finds_every_id_it_lacks_in_one_look_up(portal: Portal) -> None:
    refs = [portal.add(f"K{i}") for i in range(5)]
    requests = [request(portal, f"K{i}", "paid") for i in range(5)]
    requests.append(request(portal, "K-nobody", "paid"))
    async with connected(portal.settings()) as client:
        outcomes = await client.write_many(requests)
    assert outcomes[:5] == [Outcome("done", learned_ref=ref) for ref in refs]
    assert outcomes[5].kind == "not_found"
    assert "K-nobody" in outcomes[5].reason
    assert [portal.status(r) for r in refs] == [portal.native("paid")] * 5
    assert portal.sim.calls_by_method == {portal.list_method: 1, "batch": 1}
    assert portal.sim.subcalls_by_method == {portal.update_method: 5}


async def test_a_failed_look_up_leaves_its_writes_to_retry(portal: Portal) -> None:
    ref1, ref2 = portal.add("K1"), portal.add("K2")
    fail_lists_of(portal, {"K2"})
    async with connected(portal.settings()) as client:
        outcomes = await client.write_many(
            [request(portal, "K1", "paid", ref1), request(portal, "K2", "paid")]
        )
        alone = await client.write(request(portal, "K2", "paid"))
    assert outcomes[0] == Outcome("done")
    for outcome in (outcomes[1], alone):
        assert outcome.kind == "retry"
        assert "INTERNAL_SERVER_ERROR" in outcome.reason
    assert portal.status(ref1) == portal.native("paid")
    assert portal.status(ref2) == portal.native("new")
    assert len(portal.calls(portal.update_method)) == 1


async def test_write_many_over_50_is_split_into_batches_of_50(portal: Portal) -> None:
    refs = [portal.add(f"K{i:03}") for i in range(120)]
    requests = [request(portal, f"K{i:03}", "paid", r) for i, r in enumerate(refs)]
    async with connected(portal.settings()) as client:
        outcomes = await client.write_many(requests)
    assert all(o.kind == "done" for o in outcomes), {o.reason for o in outcomes}
    assert all(portal.status(r) == portal.native("paid") for r in refs)
    assert [len(c.params["cmd"]) for c in portal.calls("batch")] == [50, 50, 20]
    # No command went over a batch's limit.
    assert all(c.http_status == 200 for c in portal.sim.subcalls)
    assert len(portal.sim.subcalls) == 120


async def test_a_deal_pipeline_other_than_the_default_one() -> None:
    with serving("deals") as portal:
        in_default = portal.add("K1")
        in_one = str(portal.sim.add_deal("C1:NEW", category_id=1, ORIGIN_ID="K1"))
        settings = portal.settings(bitrix24_deal_category=1)
        natives = frozenset({"C1:NEW", "C1:WON"})
        async with connected(settings, natives=natives) as client:
            # The key lookup stays inside the configured pipeline.
            assert await client.read_by_key("K1") == Snapshot("bitrix24", in_one, "K1", "C1:NEW")
            outcome = await client.write(WriteRequest("K1", "C1:WON", None, OPTIONS))
        assert outcome == Outcome("done", learned_ref=in_one)
        assert portal.status(in_one) == "C1:WON"
        assert portal.status(in_default) == "NEW"


# -- polling --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_changes_since_pages_through_more_than_50_changes(mode: str) -> None:
    clock = Clock()
    with serving(mode, clock=clock) as portal:
        t0 = clock()
        refs = [portal.add(f"K{i:03}") for i in range(130)]
        clock.offset = 1000.0
        for ref in refs[:60]:
            portal.set_status(ref, "paid")
        if mode == "deals":  # deals of another pipeline changed at the same time: not ours
            for _ in range(3):
                portal.sim.add_deal("C1:NEW", category_id=1)
        clock.offset = 2000.0
        for ref in refs[60:65]:
            portal.set_status(ref, "shipped")

        async with connected(portal.settings()) as client:

            async def pages(since: float | None, until: float) -> list[list[NewHint]]:
                found = []
                async for page in client.changes_since(
                    iso(since) if since is not None else None, iso(until)
                ):
                    found.append(page)
                return found

            paid = await pages(t0 + 500, t0 + 1500)
            everything_before = await pages(None, t0 + 1500)
            since_then = await pages(t0 + 500, t0 + 2500)

    assert [len(p) for p in paid] == [50, 10]
    hints = [h for p in paid for h in p]
    assert [h.ref for h in hints] == refs[:60]
    assert {(h.platform, h.event, h.observed) for h in hints} == {
        ("bitrix24", "poll", portal.native("paid"))
    }
    # Without a start: everything changed until then. The first page says how many follow;
    # the rest come up to 50 pages a request (a batch of list commands).
    assert [len(p) for p in everything_before] == [50, 75]
    assert [h.ref for p in everything_before for h in p] == refs[:60] + refs[65:]
    assert [h.ref for p in since_then for h in p] == refs[:65]
    starts = [c.params.get("start") for c in portal.calls(portal.list_method)]
    assert starts == [0, 0, 0]
    batched = [
        [int(cmd.split("start=")[1]) for cmd in c.params["cmd"].values()]
        for c in portal.calls("batch")
    ]
    assert batched == [[50], [50, 100], [50]]


# -- OAuth ----------------------------------------------------------------------------------


async def test_an_expired_access_token_is_refreshed_once_and_the_tokens_stored(
    portal: Portal,
) -> None:
    ref = portal.add("K1", "paid")
    access, refresh = portal.sim.issue_oauth_tokens()
    portal.sim.expire_access_tokens()
    store = MemoryStore()
    async with connected(portal.oauth_settings(access, refresh), store=store) as client:
        assert await client.read(ref) == Snapshot("bitrix24", ref, "K1", portal.native("paid"))
        assert await client.read(ref) is not None  # the new token goes on working
    [exchange] = portal.sim.oauth_requests
    assert exchange.http_status == 200
    assert exchange.params["refresh_token"] == refresh
    assert exchange.answer is not None
    new_tokens = {k: exchange.answer[k] for k in ("access_token", "refresh_token")}
    assert new_tokens["refresh_token"] != refresh
    stored = await store.get_watermark(TOKENS_VALUE)
    assert stored is not None
    assert json.loads(stored) == new_tokens
    # The call was refused once for the expired token and sent again with the new one.
    gets = portal.calls(portal.get_method)
    assert [c.http_status for c in gets] == [401, 200, 200]
    assert gets[0].answer == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }
    assert {c.auth for c in gets} == {"oauth"}


async def test_a_second_client_on_the_same_store_uses_the_stored_tokens(portal: Portal) -> None:
    ref = portal.add("K1")
    access, refresh = portal.sim.issue_oauth_tokens()
    portal.sim.expire_access_tokens()
    store = MemoryStore()
    settings = portal.oauth_settings(access, refresh)
    async with connected(settings, store=store) as first:
        await first.read(ref)
    assert len(portal.sim.oauth_requests) == 1
    first_tokens = json.loads(await store.get_watermark(TOKENS_VALUE) or "{}")

    # The settings still name the first tokens; the refresh token there is used up.
    async with connected(settings, store=store) as second:
        assert await second.read(ref) is not None
        assert len(portal.sim.oauth_requests) == 1  # the stored access token works as it is
        portal.sim.expire_access_tokens()
        assert (await second.write(request(portal, "K1", "paid", ref))).kind == "done"
    assert portal.status(ref) == portal.native("paid")
    exchange = portal.sim.oauth_requests[1]
    assert exchange.http_status == 200
    assert exchange.params["refresh_token"] == first_tokens["refresh_token"]
    assert exchange.answer is not None
    assert json.loads(await store.get_watermark(TOKENS_VALUE) or "{}") == {
        k: exchange.answer[k] for k in ("access_token", "refresh_token")
    }

    # Without the store, a client has only the settings' refresh token, which is dead.
    async with connected(settings, store=MemoryStore()) as stale:
        with pytest.raises(ReadFailed, match="invalid_grant"):
            await stale.read(ref)
    assert portal.sim.oauth_requests[2].http_status == 400


async def test_a_refused_refresh_is_a_clear_error_not_a_crash(portal: Portal) -> None:
    ref = portal.add("K1")
    access, _ = portal.sim.issue_oauth_tokens()
    portal.sim.expire_access_tokens()
    store = MemoryStore()
    settings = portal.oauth_settings(access, "a-refresh-token-nobody-issued")
    async with connected(settings, store=store) as client:
        with pytest.raises(ReadFailed) as caught:
            await client.read(ref)
        assert "invalid_grant" in caught.value.reason
        with pytest.raises(ReadFailed, match="invalid_grant"):
            await client.read_by_key("K1")
        many = await client.read_many([ref])
        assert isinstance(many[ref], ReadFailed)

        outcome = await client.write(request(portal, "K1", "paid", ref))
        assert outcome.kind == "retry"
        assert outcome.reason.startswith("access refused")
        assert "invalid_grant" in outcome.reason
        outcomes = await client.write_many(
            [request(portal, "K1", "paid", ref), request(portal, "K1", "shipped", ref)]
        )
        assert [o.kind for o in outcomes] == ["retry", "retry"]
    assert {c.http_status for c in portal.sim.oauth_requests} == {400}
    assert await store.get_watermark(TOKENS_VALUE) is None
    assert portal.status(ref) == portal.native("new")


async def test_oauth_with_only_a_refresh_token_gets_an_access_token_first(
    portal: Portal,
) -> None:
    ref = portal.add("K1")
    _, refresh = portal.sim.issue_oauth_tokens()
    store = MemoryStore()
    async with connected(portal.oauth_settings(None, refresh), store=store) as client:
        assert await client.read(ref) is not None
    # Refused once for want of a token (NO_AUTH_FOUND), then sent with a fresh one.
    assert [c.http_status for c in portal.calls(portal.get_method)] == [401, 200]
    [exchange] = portal.sim.oauth_requests
    assert exchange.http_status == 200
    assert exchange.answer is not None
    assert json.loads(await store.get_watermark(TOKENS_VALUE) or "{}") == {
        k: exchange.answer[k] for k in ("access_token", "refresh_token")
    }


def delaying(method: str, seconds: float) -> Any:
    """Wrap a portal's ASGI app so that calls of ``method`` are answered ``seconds`` late."""

    def wrap(app: Any) -> Any:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/" + method):
                await asyncio.sleep(seconds)
            await app(scope, receive, send)

        return wrapped

    return wrap


@pytest.mark.parametrize("mode", MODES)
async def test_calls_that_all_found_the_token_expired_refresh_it_once(mode: str) -> None:
    get = "sale.order.get" if mode == "orders" else "crm.deal.get"
    with serving(mode, app=delaying(get, 0.5)) as portal:
        ref = portal.add("K1")
        access, refresh = portal.sim.issue_oauth_tokens()
        portal.sim.expire_access_tokens()
        async with connected(portal.oauth_settings(access, refresh)) as client:
            # Both go out with the expired token; the list's refusal comes back first.
            found, by_key = await asyncio.gather(client.read(ref), client.read_by_key("K1"))
        assert found == by_key
        assert len(portal.sim.oauth_requests) == 1


# -- limits and outages ---------------------------------------------------------------------


async def test_an_exhausted_method_time_budget_makes_writes_wait_and_leaves_reads_alone(
    portal: Portal,
) -> None:
    ref1, ref2 = portal.add("K1"), portal.add("K2")
    async with connected(portal.settings()) as client:
        # A successful answer tells when the method's time budget resets.
        assert (await client.write(request(portal, "K1", "paid", ref1))).kind == "done"
        portal.sim.exhaust_operating_time(portal.update_method, 30)

        refused = await client.write(request(portal, "K1", "shipped", ref1))
        assert refused.kind == "retry"
        assert "OPERATION_TIME_LIMIT" in refused.reason
        assert refused.retry_after is not None
        assert 0 < refused.retry_after <= 601
        sent = len(portal.calls(portal.update_method))
        # The method stays blocked on the client's side: the next write is not even sent.
        again = await client.write(request(portal, "K2", "paid", ref2))
        assert again.kind == "retry"
        assert again.retry_after is not None
        assert again.retry_after > 0
        assert len(portal.calls(portal.update_method)) == sent

        # Other methods still work.
        assert await client.read(ref1) == Snapshot("bitrix24", ref1, "K1", portal.native("paid"))
        assert await client.read_by_key("K2") == Snapshot(
            "bitrix24", ref2, "K2", portal.native("new")
        )
        many = await client.read_many([ref1, ref2])
        assert all(isinstance(s, Snapshot) for s in many.values())

        # Inside a batch, each update is refused for the budget too: retry, with a wait.
        batched = await client.write_many(
            [request(portal, "K1", "shipped", ref1), request(portal, "K2", "shipped", ref2)]
        )
        assert [o.kind for o in batched] == ["retry", "retry"]
        assert all(o.retry_after for o in batched)
    assert portal.status(ref1) == portal.native("paid")
    assert portal.status(ref2) == portal.native("new")


@pytest.mark.parametrize("mode", MODES)
async def test_a_full_portal_bucket_costs_at_most_one_refusal(mode: str) -> None:
    with serving(mode, rate_per_second=4.0, burst=10) as portal:
        ref = portal.add("K1")
        # Someone else on the portal has just used up the bucket.
        async with httpx.AsyncClient(base_url=portal.webhook_url) as other:
            for _ in range(10):
                assert (await other.post("sale.status.list", json={})).status_code == 200
        assert portal.sim.throttled_count == 0
        settings = portal.settings(bitrix24_rate_per_second=4.0, bitrix24_burst=10)
        async with connected(settings) as client:
            found = [await client.read(ref) for _ in range(4)]
        assert found == [Snapshot("bitrix24", ref, "K1", portal.native("new"))] * 4
        assert portal.sim.throttled_count <= 1
        gets = portal.calls(portal.get_method)
        assert len(gets) == 4 + portal.sim.throttled_count


async def test_a_portal_that_is_down_fails_reads_and_leaves_writes_to_retry(
    portal: Portal,
) -> None:
    ref1, ref2 = portal.add("K1"), portal.add("K2")
    async with connected(portal.settings()) as client:
        portal.sim.set_down(True)
        with pytest.raises(ReadFailed, match="HTTP_503"):
            await client.read(ref1)
        with pytest.raises(ReadFailed):
            await client.read_by_key("K1")
        many = await client.read_many([ref1, ref2])
        assert all(isinstance(r, ReadFailed) for r in many.values())
        with pytest.raises(ReadFailed):
            async for _ in client.changes_since(None, iso(time.time())):
                pass

        assert (await client.write(request(portal, "K1", "paid", ref1))).kind == "retry"
        assert (await client.write(request(portal, "K1", "paid"))).kind == "retry"
        outcomes = await client.write_many(
            [request(portal, "K1", "paid", ref1), request(portal, "K2", "paid", ref2)]
        )
        assert [o.kind for o in outcomes] == ["retry", "retry"]
        assert portal.status(ref1) == portal.native("new")

        portal.sim.set_down(False)
        assert await client.read(ref1) == Snapshot("bitrix24", ref1, "K1", portal.native("new"))
        assert (await client.write(request(portal, "K1", "paid", ref1))).kind == "done"
    assert portal.status(ref1) == portal.native("paid")


async def test_a_wrong_webhook_code_leaves_writes_waiting_as_access_refused(
    portal: Portal,
) -> None:
    ref = portal.add("K1")
    wrong = f"{portal.url}/rest/{portal.sim.user_id}/not0the0code/"
    async with connected(portal.settings(bitrix24_webhook_url=SecretStr(wrong))) as client:
        outcome = await client.write(request(portal, "K1", "paid", ref))
        assert outcome.kind == "retry"
        assert outcome.reason.startswith("access refused")
        assert "INVALID_CREDENTIALS" in outcome.reason
        with pytest.raises(ReadFailed, match="INVALID_CREDENTIALS"):
            await client.read(ref)
        outcomes = await client.write_many(
            [request(portal, "K1", "paid", ref), request(portal, "K1", "shipped", ref)]
        )
        assert [o.kind for o in outcomes] == ["retry", "retry"]
        assert all(o.reason.startswith("access refused") for o in outcomes)
    assert {c.http_status for c in portal.sim.requests} == {401}
    assert portal.status(ref) == portal.native("new")


def missing_scope(mode: str) -> tuple[str, ...]:
    """The portal's scopes without the one the mode's methods need."""
    return ("crm",) if mode == "orders" else ("sale",)


@pytest.mark.parametrize("mode", MODES)
async def test_a_missing_scope_leaves_a_write_waiting(mode: str) -> None:
    with serving(mode, scopes=missing_scope(mode)) as portal:
        ref = portal.add("K1")
        async with connected(portal.settings()) as client:
            outcome = await client.write(request(portal, "K1", "paid", ref))
    assert outcome.kind == "retry"
    assert outcome.reason.startswith("access refused: insufficient_scope")


@pytest.mark.parametrize("mode", MODES)
async def test_a_missing_scope_leaves_batched_writes_waiting_too(mode: str) -> None:
    with serving(mode, scopes=missing_scope(mode)) as portal:
        refs = [portal.add("K1"), portal.add("K2")]
        async with connected(portal.settings()) as client:
            outcomes = await client.write_many(
                [request(portal, f"K{i + 1}", "paid", r) for i, r in enumerate(refs)]
            )
    # Inside a batch the command's error has no HTTP status of its own: its code says it.
    assert portal.sim.subcalls[0].http_status == 401
    assert [o.kind for o in outcomes] == ["retry", "retry"]
    assert all(o.reason.startswith("access refused: insufficient_scope") for o in outcomes)


# -- configuration --------------------------------------------------------------------------


async def test_deals_mode_refuses_stages_of_another_pipeline() -> None:
    deals = mapping(("shoptet", "metakocka", "bitrix24"), "deals")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        bitrix24_mode="deals",
        bitrix24_webhook_url=SecretStr("http://127.0.0.1:9/rest/1/code/"),
        bitrix24_application_token=SecretStr("token"),
        bitrix24_deal_category=1,
    )
    # The example's deal stages are those of the default pipeline 0.
    with pytest.raises(ConfigError) as caught:
        Bitrix24Client(settings, client_context(deals, "bitrix24", None))
    message = str(caught.value)
    assert "EXECUTING, FINAL_INVOICE, LOSE, NEW, PREPARATION, WON" in message
    assert "pipeline 1" in message
    assert "BRIDGE_BITRIX24_DEAL_CATEGORY" in message

    # Pipeline 0 configured, a mapping with stages of pipeline 1 among them: only those named.
    mixed = ClientContext(natives=frozenset({"NEW", "C1:WON", "C1:LOSE"}))
    with pytest.raises(ConfigError) as caught:
        Bitrix24Client(settings.model_copy(update={"bitrix24_deal_category": 0}), mixed)
    assert "deal stages C1:LOSE, C1:WON are not in pipeline 0" in str(caught.value)

    # Orders mode does not care about deal pipelines.
    orders = settings.model_copy(update={"bitrix24_mode": "orders"})
    client = Bitrix24Client(orders, mixed)
    assert client.mode == "orders"
    await client.aclose()
