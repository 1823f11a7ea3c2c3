"""The Bitrix24 simulator, exercised over real HTTP the way the bridge calls a portal."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.sandbox.bitrix24 import Bitrix24Simulator, parse_php_pairs
from bridge.sandbox.server import ServerThread

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC).timestamp()
PORTAL_TZ = timezone(timedelta(hours=2))
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+02:00$")
CLIENT = {"client_id": "local.sim", "client_secret": "sim-client-secret"}


def iso(epoch: float, tz: timezone = PORTAL_TZ) -> str:
    return datetime.fromtimestamp(epoch, tz).isoformat(timespec="seconds")


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class SwappableApp:
    """One server for the whole module, serving whichever app the current test plugged in.

    A uvicorn shutdown costs about 0.2 s, which per test would dominate this file's run time.
    """

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:  # the apps need no start-up, but uvicorn expects the handshake
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


class Receiver:
    """An event handler that records what arrives and answers scripted statuses."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, dict[str, str]]] = []
        self.statuses: list[int] = []
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        # Starlette's request.form() needs python-multipart, which the project does not
        # install; for a urlencoded body it amounts to exactly this parse.
        content_type = request.headers.get("content-type", "")
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        with self.lock:
            self.received.append((content_type, form))
            status = self.statuses.pop(0) if self.statuses else 200
        return Response(status_code=status)

    def forms(self) -> list[dict[str, str]]:
        with self.lock:
            return [form for _, form in self.received]

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.statuses.clear()


@dataclass
class Portal:
    sim: Bitrix24Simulator
    url: str
    clock: FakeClock
    client: httpx.Client

    def post(self, method: str, params: Any = None, **kw: Any) -> httpx.Response:
        """A webhook call with a JSON body, as the docs show it."""
        return self.client.post(self.sim.webhook_path + method, json=params or {}, **kw)

    def ok(self, method: str, params: Any = None) -> dict[str, Any]:
        response = self.post(method, params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        answer: dict[str, Any] = response.json()
        assert "error" not in answer
        return answer

    def error(self, method: str, params: Any, status: int) -> dict[str, Any]:
        response = self.post(method, params)
        assert response.status_code == status, response.text
        answer: dict[str, Any] = response.json()
        assert set(answer) == {"error", "error_description"}
        return answer


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[SwappableApp, str]]:
    app = SwappableApp()
    with ServerThread(app) as srv:
        yield app, srv.url


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    with ServerThread(receiver.app) as srv:
        yield receiver, f"{srv.url}/hook"


@pytest.fixture
def receiver(receiver_server: tuple[Receiver, str]) -> Iterator[Receiver]:
    receiver_server[0].reset()
    yield receiver_server[0]
    receiver_server[0].reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def portal(server: tuple[SwappableApp, str], clock: FakeClock) -> Iterator[Portal]:
    # A generous bucket so that only the bucket's own test meets it.
    sim = Bitrix24Simulator(clock=clock, burst=10_000, event_timeout=2.0)
    server[0].app = sim.app
    with httpx.Client(base_url=server[1], timeout=10) as client:
        yield Portal(sim, server[1], clock, client)
    sim.close()


# --- transport and authentication ------------------------------------------------------------


def test_php_bracket_parameters_are_read_like_php() -> None:
    pairs = [
        ("filter[>=dateUpdate]", "2026-03-10T12:00:00+00:00"),
        ("filter[@id][]", "1"),
        ("filter[@id][]", "2"),
        ("select[]", "id"),
        ("fields[statusId]", "P"),
        ("id", "300"),
    ]
    assert parse_php_pairs(pairs) == {
        "filter": {">=dateUpdate": "2026-03-10T12:00:00+00:00", "@id": ["1", "2"]},
        "select": ["id"],
        "fields": {"statusId": "P"},
        "id": "300",
    }


def test_webhook_calls_with_json_form_query_and_the_json_suffix(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    assert portal.ok("sale.order.get", {"id": order_id})["result"]["order"]["id"] == order_id
    suffixed = portal.post("sale.order.get.json", {"id": order_id})
    assert suffixed.status_code == 200

    listed = portal.client.get(
        portal.sim.webhook_path + "sale.order.list",
        params=[("select[]", "id"), ("select[]", "statusId"), ("filter[statusId]", "N")],
    )
    assert listed.json()["result"]["orders"] == [{"id": order_id, "statusId": "N"}]

    form = portal.client.post(
        portal.sim.webhook_path + "sale.order.update",
        data={"id": str(order_id), "fields[statusId]": "P"},
    )
    assert form.status_code == 200
    assert form.json()["result"]["order"]["statusId"] == "P"
    assert [r.auth for r in portal.sim.requests] == ["webhook"] * 4
    assert portal.sim.requests[-1].params == {"id": str(order_id), "fields": {"statusId": "P"}}


def test_a_json_body_without_its_content_type_is_read_as_a_form(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    body = b'{"id":%d,"fields":{"statusId":"P"}}' % order_id
    response = portal.client.post(portal.sim.webhook_path + "sale.order.update", content=body)
    assert response.status_code == 400
    assert response.json() == {
        "error": 100,
        "error_description": "Could not find value for parameter {id}",
    }
    seen = portal.sim.requests[-1]
    assert seen.content_type == "" and seen.params == {body.decode(): ""}
    assert portal.sim.order(order_id)["statusId"] == "N"

    # a body that is not JSON after all gives no parameters, not an error of its own
    broken = portal.client.post(
        portal.sim.webhook_path + "sale.order.get",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert broken.json()["error"] == 100


def test_wrong_webhook_credentials_and_unknown_methods(portal: Portal) -> None:
    for path in ("/rest/1/wrong-code/sale.order.list", "/rest/2/sim0webhook0code/sale.order.list"):
        response = portal.client.post(path, json={})
        assert response.status_code == 401
        assert response.json()["error"] == "INVALID_CREDENTIALS"
    unknown = portal.error("sale.order.frobnicate", {}, 404)
    assert unknown == {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
    assert portal.client.get("/elsewhere").status_code == 404


def test_scopes_the_webhook_lacks_are_refused(server: tuple[SwappableApp, str]) -> None:
    sim = Bitrix24Simulator(scopes=["crm"])
    server[0].app = sim.app
    with httpx.Client(base_url=server[1]) as client:
        refused = client.post(sim.webhook_path + "sale.order.list", json={})
        allowed = client.post(sim.webhook_path + "crm.deal.list", json={})
    sim.close()
    assert refused.status_code == 401
    assert refused.json()["error"] == "insufficient_scope"
    assert allowed.status_code == 200


def test_oauth_tokens_expire_refresh_and_rotate(portal: Portal) -> None:
    sim, client = portal.sim, portal.client
    access, refresh = sim.issue_oauth_tokens()

    assert client.post("/rest/crm.deal.list", json={"auth": access}).status_code == 200
    in_query = client.get("/rest/crm.deal.list.json", params={"auth": access})
    assert in_query.status_code == 200
    assert sim.requests[-1].auth == "oauth" and "auth" not in sim.requests[-1].params

    missing = client.post("/rest/crm.deal.list", json={})
    assert (missing.status_code, missing.json()["error"]) == (401, "NO_AUTH_FOUND")
    unknown = client.post("/rest/crm.deal.list", json={"auth": "nope"})
    assert (unknown.status_code, unknown.json()["error"]) == (401, "invalid_token")

    sim.expire_access_tokens()
    expired = client.post("/rest/crm.deal.list", json={"auth": access})
    assert expired.status_code == 401
    assert expired.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }

    renewed = client.get(
        "/oauth/token/", params={"grant_type": "refresh_token", **CLIENT, "refresh_token": refresh}
    )
    assert renewed.status_code == 200
    tokens = renewed.json()
    assert tokens["access_token"] != access and tokens["refresh_token"] != refresh
    assert tokens["client_endpoint"] == f"{portal.url}/rest/"
    assert tokens["expires_in"] == 3600 and tokens["expires"] == int(T0) + 3600
    assert tokens["member_id"] == sim.member_id and tokens["user_id"] == 1
    assert tokens["server_endpoint"] == "https://oauth.bitrix.info/rest/"
    new_access = tokens["access_token"]
    assert client.post("/rest/crm.deal.list", json={"auth": new_access}).status_code == 200

    # the old refresh token died with its use; a wrong client is told so
    reused = client.get(
        "/oauth/token/", params={"grant_type": "refresh_token", **CLIENT, "refresh_token": refresh}
    )
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    wrong_client = client.get(
        "/oauth/token/",
        params={
            "grant_type": "refresh_token",
            "client_id": "local.sim",
            "client_secret": "guess",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert (wrong_client.status_code, wrong_client.json()["error"]) == (401, "invalid_client")
    assert "client_secret" not in sim.oauth_requests[-1].params

    # tokens also run out by themselves, on the simulator's clock
    portal.clock.advance(3600)
    timed_out = client.post("/rest/crm.deal.list", json={"auth": new_access})
    assert timed_out.json()["error"] == "expired_token"


def test_event_methods_need_an_application(portal: Portal, receiver_server: Any) -> None:
    refused = portal.error("event.bind", {"event": "ONCRMDEALUPDATE", "handler": "x"}, 403)
    assert refused["error"] == "WRONG_AUTH_TYPE"
    access, _ = portal.sim.issue_oauth_tokens()
    url = receiver_server[1]
    bound = portal.client.post(
        "/rest/event.bind", json={"auth": access, "event": "OnCrmDealUpdate", "handler": url}
    )
    assert bound.json()["result"] is True
    listed = portal.client.post("/rest/event.get", json={"auth": access}).json()["result"]
    assert listed == [{"event": "ONCRMDEALUPDATE", "handler": url, "auth_type": "0", "offline": 0}]
    unknown = portal.client.post(
        "/rest/event.bind", json={"auth": access, "event": "ONNOTHING", "handler": url}
    )
    assert (unknown.status_code, unknown.json()["error"]) == (400, "ERROR_EVENT_NOT_FOUND")


# --- sale: orders and statuses ---------------------------------------------------------------


def test_order_get_shows_the_order_with_its_status_xml_id(portal: Portal) -> None:
    order_id = portal.sim.add_order("N", xml_id="shop-1001", account_number="1001", price=250.5)
    portal.ok("sale.status.update", {"id": "N", "fields": {"type": "O", "xmlId": "new"}})
    answer = portal.ok("sale.order.get", {"id": order_id})
    order = answer["result"]["order"]
    assert order["id"] == order_id and order["accountNumber"] == "1001"
    assert order["xmlId"] == "shop-1001" and order["price"] == 250.5
    assert (order["statusId"], order["statusXmlId"]) == ("N", "new")
    assert order["dateUpdate"] == order["dateStatus"] == iso(T0)
    assert ISO_RE.match(order["dateInsert"])
    assert order["shipments"][0]["statusId"] == "DN"
    assert {"basketItems", "payments", "propertyValues", "clients", "tradeBindings"} <= set(order)
    timing = answer["time"]
    assert timing["start"] == T0 and timing["date_start"] == iso(T0)
    assert timing["operating_reset_at"] == int(T0) + 600 and timing["operating"] >= 0

    missing = portal.error("sale.order.get", {"id": 999}, 400)
    assert missing == {"error": 201240400001, "error_description": "order does not exist"}
    assert portal.error("sale.order.get", {}, 400)["error"] == 100


def test_order_update_changes_status_dates_and_version(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    portal.clock.advance(90)
    order = portal.ok("sale.order.update", {"id": order_id, "fields": {"statusId": "P"}})
    order = order["result"]["order"]
    assert order["statusId"] == "P" and order["version"] == 2
    assert order["dateStatus"] == order["dateUpdate"] == iso(T0 + 90)
    assert order["empStatusId"] == 1
    assert "clients" in order and "requisiteLink" in order

    # read-only fields are ignored; the same status again changes nothing
    portal.clock.advance(30)
    again = portal.ok(
        "sale.order.update", {"id": order_id, "fields": {"statusId": "P", "version": 99}}
    )["result"]["order"]
    assert again["version"] == 2 and again["dateUpdate"] == iso(T0 + 90)

    # a person's change is stamped with that person
    portal.clock.advance(30)
    portal.sim.set_order_status_as_person(order_id, "S")
    seen = portal.sim.order(order_id)
    assert (seen["statusId"], seen["empStatusId"], seen["version"]) == ("S", 7, 3)
    assert seen["dateStatus"] == iso(T0 + 150)

    unknown_order = portal.error("sale.order.update", {"id": 5, "fields": {"statusId": "P"}}, 400)
    assert unknown_order["error"] == 200540400001
    for bad in ("XX", "DN"):
        refused = portal.error(
            "sale.order.update", {"id": order_id, "fields": {"statusId": bad}}, 400
        )
        assert refused["error"] == 0 and bad in refused["error_description"]
    assert portal.error("sale.order.update", {"id": order_id, "fields": {}}, 400)["error"] == 100
    assert portal.sim.order(order_id)["statusId"] == "S"


def test_order_list_filters_orders_and_pages(portal: Portal) -> None:
    ids = []
    for i in range(120):
        ids.append(portal.sim.add_order("P" if i % 3 == 0 else "N", xml_id=f"x{i}"))
        portal.clock.advance(10)
    select = ["id", "statusId", "dateUpdate", "xmlId"]

    first = portal.ok("sale.order.list", {"select": select, "order": {"id": "asc"}})
    assert first["total"] == 120 and first["next"] == 50
    assert [o["id"] for o in first["result"]["orders"]] == ids[:50]
    assert set(first["result"]["orders"][0]) == set(select)
    last = portal.ok("sale.order.list", {"select": ["id"], "start": 100})
    assert len(last["result"]["orders"]) == 20 and "next" not in last
    huge = portal.ok("sale.order.list", {"select": ["id"], "start": -1})
    assert len(huge["result"]["orders"]) == 50 and "total" not in huge and "next" not in huge

    # the same instant in another zone, and the boundary included
    since = iso(T0 + 1000, UTC)
    changed = portal.ok(
        "sale.order.list",
        {"select": ["id"], "filter": {">=dateUpdate": since, "<dateUpdate": iso(T0 + 1100)}},
    )
    assert [o["id"] for o in changed["result"]["orders"]] == ids[100:110]
    assert changed["total"] == 10 and "next" not in changed

    some = portal.ok(
        "sale.order.list",
        {"select": ["id"], "filter": {"@id": ids[:6], "!statusId": "P"}, "order": {"id": "desc"}},
    )
    assert [o["id"] for o in some["result"]["orders"]] == [ids[5], ids[4], ids[2], ids[1]]
    by_key = portal.ok(
        "sale.order.list", {"filter": {"=xmlId": "x7", "accountNumber": str(ids[7])}}
    )
    assert [o["id"] for o in by_key["result"]["orders"]] == [ids[7]]
    newest = portal.ok(
        "sale.order.list",
        {
            "select": ["id"],
            "filter": {">dateStatus": iso(T0 + 1185)},
            "order": {"dateStatus": "desc"},
        },
    )
    assert [o["id"] for o in newest["result"]["orders"]] == [ids[119]]

    assert portal.error("sale.order.list", {"filter": {"statusID": "N"}}, 400)["error"] == 0
    bad_date = portal.error("sale.order.list", {"filter": {">=dateUpdate": "yesterday"}}, 400)
    assert bad_date["error"] == 0


def test_status_list_get_update_and_add(portal: Portal) -> None:
    everything = portal.ok("sale.status.list")
    assert everything["total"] == 8
    assert {s["id"] for s in everything["result"]["statuses"]} == {
        "N",
        "P",
        "S",
        "D",
        "F",
        "DN",
        "DD",
        "DF",
    }
    orders_only = portal.ok(
        "sale.status.list",
        {"select": ["id", "xmlId"], "filter": {"type": "O"}, "order": {"sort": "asc"}},
    )
    assert orders_only["result"]["statuses"] == [
        {"id": s, "xmlId": None} for s in ("N", "P", "S", "D", "F")
    ]
    status = portal.ok("sale.status.get", {"id": "N"})["result"]["status"]
    assert status == {
        "color": "#BEEDF1",
        "id": "N",
        "notify": "Y",
        "sort": 10,
        "type": "O",
        "xmlId": None,
    }

    no_type = portal.error("sale.status.update", {"id": "P", "fields": {"xmlId": "paid"}}, 400)
    assert no_type == {"error": 0, "error_description": "Required fields: type"}
    updated = portal.ok("sale.status.update", {"id": "P", "fields": {"type": "O", "xmlId": "paid"}})
    assert updated["result"]["status"]["xmlId"] == "paid"
    order_id = portal.sim.add_order("P")
    assert portal.sim.order(order_id)["statusXmlId"] == "paid"

    system = portal.error("sale.status.update", {"id": "F", "fields": {"type": "D"}}, 400)
    assert system["error"] == 201350000006
    in_use = portal.error("sale.status.update", {"id": "P", "fields": {"type": "D"}}, 400)
    assert in_use["error"] == 201350000007
    assert (
        portal.error("sale.status.update", {"id": "ZZ", "fields": {"type": "O"}}, 400)["error"]
        == 201340400001
    )
    assert portal.error("sale.status.get", {"id": "ZZ"}, 400)["error"] == 201340400001

    added = portal.ok("sale.status.add", {"fields": {"id": "PX", "type": "O", "xmlId": "packing"}})
    assert added["result"]["status"]["id"] == "PX"
    assert (
        portal.error("sale.status.add", {"fields": {"id": "PX", "type": "O"}}, 400)["error"]
        == 201350000001
    )
    assert (
        portal.error("sale.status.add", {"fields": {"id": "PXX", "type": "O"}}, 400)["error"]
        == 201350000005
    )
    moved = portal.ok("sale.order.update", {"id": order_id, "fields": {"statusId": "PX"}})
    assert moved["result"]["order"]["statusXmlId"] == "packing"


# --- crm: deals and stages ---------------------------------------------------------------------


def test_deal_get_and_update(portal: Portal) -> None:
    deal_id = portal.sim.add_deal("NEW", UF_CRM_ORDER_CODE="SHOP-1", ORIGIN_ID="1001")
    deal = portal.ok("crm.deal.get", {"id": deal_id})["result"]
    assert deal["ID"] == str(deal_id) and deal["CATEGORY_ID"] == "0"
    assert (deal["STAGE_ID"], deal["STAGE_SEMANTIC_ID"], deal["CLOSED"]) == ("NEW", "P", "N")
    assert deal["UF_CRM_ORDER_CODE"] == "SHOP-1" and deal["ORIGIN_ID"] == "1001"
    assert deal["OPPORTUNITY"] == "100.00" and deal["DATE_MODIFY"] == iso(T0)

    portal.clock.advance(60)
    answer = portal.ok("crm.deal.update", {"id": deal_id, "fields": {"STAGE_ID": "WON"}})
    assert answer["result"] is True
    deal = portal.sim.deal(deal_id)
    assert (deal["STAGE_ID"], deal["STAGE_SEMANTIC_ID"], deal["CLOSED"]) == ("WON", "S", "Y")
    assert deal["DATE_MODIFY"] == deal["MOVED_TIME"] == iso(T0 + 60)

    other_pipeline = portal.error(
        "crm.deal.update", {"id": deal_id, "fields": {"STAGE_ID": "C1:WON"}}, 400
    )
    assert other_pipeline == {
        "error": "",
        "error_description": 'Invalid value for the "Stage" field',
    }
    missing = portal.error("crm.deal.update", {"id": 5, "fields": {"STAGE_ID": "WON"}}, 400)
    assert missing == {"error": "", "error_description": "Not found"}
    assert (
        portal.error("crm.deal.get", {"id": "x"}, 400)["error_description"]
        == "ID is not defined or invalid."
    )

    # CATEGORY_ID and unknown fields are ignored
    portal.ok("crm.deal.update", {"id": deal_id, "fields": {"CATEGORY_ID": 1, "NOPE": 1}})
    assert portal.sim.deal(deal_id)["CATEGORY_ID"] == "0"


def test_deal_list_filters_and_pages(portal: Portal) -> None:
    ids = []
    for i in range(60):
        category = i % 2
        stage = "C1:NEW" if category else "NEW"
        ids.append(portal.sim.add_deal(stage, category_id=category, UF_CRM_ORDER_CODE=f"S-{i}"))
        portal.clock.advance(1)

    first = portal.ok("crm.deal.list", {"select": ["ID", "STAGE_ID"], "filter": {"CATEGORY_ID": 0}})
    assert first["total"] == 30 and "next" not in first
    assert first["result"][0] == {"ID": str(ids[0]), "STAGE_ID": "NEW"}
    everything = portal.ok("crm.deal.list", {"order": {"ID": "DESC"}})
    assert everything["total"] == 60 and everything["next"] == 50
    assert (
        everything["result"][0]["ID"] == str(ids[-1])
        and "UF_CRM_ORDER_CODE" in everything["result"][0]
    )
    rest = portal.ok("crm.deal.list", {"order": {"ID": "DESC"}, "start": 50})
    assert [d["ID"] for d in rest["result"]] == [str(i) for i in reversed(ids[:10])]

    by_code = portal.ok(
        "crm.deal.list", {"SELECT": ["ID"], "FILTER": {"=UF_CRM_ORDER_CODE": "S-7"}}
    )
    assert by_code["result"] == [{"ID": str(ids[7])}]
    recent = portal.ok(
        "crm.deal.list",
        {"select": ["ID"], "filter": {">=DATE_MODIFY": iso(T0 + 55, UTC), "CATEGORY_ID": 1}},
    )
    assert [d["ID"] for d in recent["result"]] == [str(ids[55]), str(ids[57]), str(ids[59])]
    assert portal.error("crm.deal.list", {"filter": "CATEGORY_ID"}, 400)["error"] == ""


def test_crm_status_list_gives_the_stages_of_a_pipeline(portal: Portal) -> None:
    default = portal.ok("crm.status.list", {"filter": {"ENTITY_ID": "DEAL_STAGE"}})["result"]
    assert [s["STATUS_ID"] for s in default] == [
        "NEW",
        "PREPARATION",
        "PREPAYMENT_INVOICE",
        "EXECUTING",
        "FINAL_INVOICE",
        "WON",
        "LOSE",
    ]
    second = portal.ok("crm.status.list", {"filter": {"ENTITY_ID": "DEAL_STAGE_1"}})["result"]
    assert [s["STATUS_ID"] for s in second] == [
        "C1:NEW",
        "C1:PREPARATION",
        "C1:EXECUTING",
        "C1:WON",
        "C1:LOSE",
    ]
    won = second[3]
    assert (won["ENTITY_ID"], won["CATEGORY_ID"], won["SORT"], won["SEMANTICS"]) == (
        "DEAL_STAGE_1",
        "1",
        "40",
        "S",
    )
    assert {"NAME", "COLOR", "EXTRA"} <= set(won)


# --- batch --------------------------------------------------------------------------------------


def test_batch_runs_commands_in_order_with_their_own_errors(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    deal_id = portal.sim.add_deal("NEW")
    cmd = {
        "set": f"sale.order.update?id={order_id}&fields[statusId]=P",
        "get": f"sale.order.get?id={order_id}",
        "missing": "sale.order.get?id=1",
        "stage": f"crm.deal.update?id={deal_id}&fields%5BSTAGE_ID%5D=WON",
        "list": "sale.order.list?select[]=id&filter[statusId]=P",
        "ref": "crm.deal.get?id=$result[list][orders][0][id]",
        "nested": "batch?cmd[x]=sale.order.get%3Fid%3D1",
    }
    answer = portal.ok("batch", {"halt": 0, "cmd": cmd})
    result = answer["result"]
    assert result["result"]["get"]["order"]["statusId"] == "P"
    assert result["result"]["stage"] is True
    assert result["result"]["list"] == {"orders": [{"id": order_id}]}
    assert result["result_total"] == {"list": 1}
    assert result["result_next"] == []  # PHP's empty array
    assert set(result["result_time"]) == set(result["result"])
    assert result["result_error"]["missing"]["error"] == 201240400001
    assert result["result_error"]["ref"] == {"error": "", "error_description": "Not found"}
    assert result["result_error"]["nested"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert portal.sim.deal(deal_id)["STAGE_ID"] == "WON"
    assert "operating" not in answer["time"]

    assert portal.sim.calls_by_method["batch"] == 1
    assert portal.sim.calls_by_method["sale.order.get"] == 0
    assert portal.sim.subcalls_by_method["sale.order.get"] == 2
    assert [c.method for c in portal.sim.subcalls][:2] == ["sale.order.update", "sale.order.get"]


def test_batch_halt_list_commands_and_the_length_limit(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    halted = portal.ok(
        "batch",
        {
            "halt": 1,
            "cmd": ["sale.order.get?id=1", f"sale.order.update?id={order_id}&fields[statusId]=P"],
        },
    )["result"]
    # keys 0..n-1 make a PHP list, so the one error of command 0 comes back as a JSON list
    assert halted["result"] == []
    assert [e["error"] for e in halted["result_error"]] == [201240400001]
    assert portal.sim.order(order_id)["statusId"] == "N"

    clean = portal.ok("batch", {"cmd": [f"sale.order.get?id={order_id}"] * 2})["result"]
    assert isinstance(clean["result"], list) and len(clean["result"]) == 2
    assert clean["result_error"] == []

    # past 50, each command fails on its own and the first 50 still run
    too_long = {f"c{i}": f"sale.order.get?id={order_id}" for i in range(52)}
    overflow = portal.ok("batch", {"cmd": too_long})["result"]
    assert len(overflow["result"]) == 50 and "c49" in overflow["result"]
    exceeded = {
        "error": "ERROR_BATCH_LENGTH_EXCEEDED",
        "error_description": "Max batch length exceeded",
    }
    assert overflow["result_error"] == {"c50": exceeded, "c51": exceeded}

    # halt is cast like PHP's (bool): the string "false" halts
    stopped = portal.ok(
        "batch", {"halt": "false", "cmd": ["sale.order.get?id=1", "sale.order.list"]}
    )
    assert stopped["result"]["result"] == []


# --- limits ------------------------------------------------------------------------------------


def test_leaky_bucket_refuses_the_51st_quick_call(server: tuple[SwappableApp, str]) -> None:
    clock = FakeClock()
    sim = Bitrix24Simulator(clock=clock)  # 2 per second, burst 50
    server[0].app = sim.app
    with httpx.Client(base_url=server[1] + sim.webhook_path) as client:
        assert all(client.post("crm.deal.list", json={}).status_code == 200 for _ in range(49))
        batch = client.post("batch", json={"cmd": {f"c{i}": "crm.deal.list" for i in range(50)}})
        assert batch.status_code == 200  # a whole batch is one drop: 50 so far
        refused = client.post("crm.deal.list", json={})
        assert refused.status_code == 503
        assert refused.json() == {
            "error": "QUERY_LIMIT_EXCEEDED",
            "error_description": "Too many requests",
        }
        assert sim.throttled_count == 1
        clock.advance(0.5)  # one drop drained
        assert client.post("crm.deal.list", json={}).status_code == 200
        assert client.post("crm.deal.list", json={}).status_code == 503
    assert sim.throttled_count == 2
    assert sim.calls_by_method == {"crm.deal.list": 52, "batch": 1}
    sim.close()


def test_operation_time_limit_blocks_one_method_until_reset(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    portal.sim.exhaust_operating_time("sale.order.get", 60)
    blocked = portal.error("sale.order.get", {"id": order_id}, 429)
    assert blocked["error"] == "OPERATION_TIME_LIMIT"
    assert portal.post("sale.order.list", {}).status_code == 200
    in_batch = portal.ok("batch", {"cmd": {"g": f"sale.order.get?id={order_id}"}})["result"]
    assert in_batch["result_error"]["g"]["error"] == "OPERATION_TIME_LIMIT"
    portal.clock.advance(60)
    assert portal.post("sale.order.get", {"id": order_id}).status_code == 200


# --- outages and injected failures ------------------------------------------------------------


def test_set_down_answers_503_html_but_the_oauth_server_stays_up(portal: Portal) -> None:
    _, refresh = portal.sim.issue_oauth_tokens()
    portal.sim.set_down(True)
    down = portal.post("sale.order.list", {})
    assert down.status_code == 503 and down.headers["content-type"].startswith("text/html")
    assert portal.sim.requests[-1].answer is None
    renewed = portal.client.get(
        "/oauth/token/", params={"grant_type": "refresh_token", **CLIENT, "refresh_token": refresh}
    )
    assert renewed.status_code == 200
    portal.sim.set_down(False)
    assert portal.post("sale.order.list", {}).status_code == 200


def test_fail_next_fails_calls_without_effect(portal: Portal) -> None:
    order_id = portal.sim.add_order("N")
    portal.sim.fail_next(2, 503, "OVERLOAD_LIMIT", "REST API is blocked due to overload")
    for _ in range(2):
        failed = portal.error(
            "sale.order.update", {"id": order_id, "fields": {"statusId": "P"}}, 503
        )
        assert failed["error"] == "OVERLOAD_LIMIT"
    assert portal.sim.order(order_id)["statusId"] == "N"
    assert (
        portal.post("sale.order.update", {"id": order_id, "fields": {"statusId": "P"}}).status_code
        == 200
    )
    portal.sim.fail_next(1)
    assert portal.error("sale.order.list", {}, 500)["error"] == "INTERNAL_SERVER_ERROR"


# --- events -------------------------------------------------------------------------------------


def test_events_arrive_form_encoded_for_every_save(
    portal: Portal, receiver: Receiver, receiver_server: Any
) -> None:
    url = receiver_server[1]
    portal.sim.register_outgoing_webhook(
        url, ["ONSALEORDERSAVED", "OnCrmDealUpdate", "ONCRMDEALADD"]
    )
    order_id = portal.sim.add_order("N", xml_id="shop-7")
    portal.ok("sale.order.update", {"id": order_id, "fields": {"statusId": "P"}})
    portal.ok("sale.order.update", {"id": order_id, "fields": {"statusId": "P"}})  # no change
    portal.sim.set_order_status_as_person(order_id, "S")
    deal_id = portal.sim.add_deal("NEW")
    portal.sim.set_deal_stage_as_person(deal_id, "WON")
    portal.sim.wait_events_idle()

    with receiver.lock:
        content_types = {ct for ct, _ in receiver.received}
    assert content_types == {"application/x-www-form-urlencoded"}
    forms = receiver.forms()
    assert [f["event"] for f in forms] == ["ONSALEORDERSAVED"] * 4 + [
        "ONCRMDEALADD",
        "ONCRMDEALUPDATE",
    ]
    order_event = forms[1]
    assert order_event == {
        "event": "ONSALEORDERSAVED",
        "event_handler_id": "1",
        "data[FIELDS][ID]": str(order_id),
        "data[FIELDS][XML_ID]": "shop-7",
        "data[FIELDS][ACTION]": "save",
        "ts": str(int(T0)),
        "auth[domain]": "sim.bitrix24.test",
        "auth[client_endpoint]": f"{portal.url}/rest/",
        "auth[server_endpoint]": "https://oauth.bitrix.info/rest/",
        "auth[member_id]": portal.sim.member_id,
        "auth[application_token]": "sim-app-token",
    }
    assert forms[-1]["data[FIELDS][ID]"] == str(deal_id)
    assert {f["event_handler_id"] for f in forms[4:]} == {"2", "3"}
    assert [e.ok for e in portal.sim.events_sent] == [True] * 6
    # the no-change write still saved (event above) but left the order as it was
    assert portal.sim.order(order_id)["version"] == 3


def test_failed_events_are_never_retried(
    portal: Portal, receiver: Receiver, receiver_server: Any
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    portal.sim.register_outgoing_webhook(receiver_server[1], ["ONCRMDEALADD", "ONCRMDEALUPDATE"])
    portal.sim.register_outgoing_webhook(dead_url, ["ONCRMDEALADD"])
    receiver.statuses = [500]
    deal_id = portal.sim.add_deal("NEW")
    portal.sim.wait_events_idle()
    portal.sim.set_deal_stage_as_person(deal_id, "PREPARATION")
    portal.sim.wait_events_idle()

    sent = portal.sim.events_sent
    assert [(e.event, e.url, e.http_status) for e in sent] == [
        ("ONCRMDEALADD", receiver_server[1], 500),
        ("ONCRMDEALADD", dead_url, None),
        ("ONCRMDEALUPDATE", receiver_server[1], 200),
    ]
    assert sent[1].error is not None and "Connect" in sent[1].error
    assert [f["event"] for f in receiver.forms()] == ["ONCRMDEALADD", "ONCRMDEALUPDATE"]


def test_application_handlers_get_tokens_in_auth(
    portal: Portal, receiver: Receiver, receiver_server: Any
) -> None:
    access, _ = portal.sim.issue_oauth_tokens()
    bound = portal.client.post(
        "/rest/event.bind",
        json={"auth": access, "event": "ONSALEORDERSAVED", "handler": receiver_server[1]},
    )
    assert bound.status_code == 200
    portal.sim.add_order("N")
    portal.sim.wait_events_idle()
    (form,) = receiver.forms()
    assert form["auth[application_token]"] == "sim-app-token"
    assert form["auth[status]"] == "L" and form["auth[expires_in]"] == "3600"
    usable = portal.client.post("/rest/sale.order.list", json={"auth": form["auth[access_token]"]})
    assert usable.status_code == 200
