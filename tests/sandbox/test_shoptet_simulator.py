"""The Shoptet simulator, exercised over real HTTP and checked against Shoptet's OpenAPI file.

Every request a test sends and every answer the simulator gives goes through
``tests/contract/shoptet_openapi.py``; requests that are deliberately wrong must be *rejected*
by that validator, which also proves it is not vacuous.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.sandbox.server import ServerThread
from bridge.sandbox.shoptet import ShoptetSimulator, ShoptetStatus
from tests.contract.shoptet_openapi import (
    ContractViolation,
    find_operation,
    validate_error_envelope,
    validate_exchange,
    validate_httpx,
    validate_request,
    validate_response,
    validate_webhook_body,
)

pytestmark = pytest.mark.integration

TOKEN = "test-private-token-0123456789"
EPOCH = 1_700_000_000.0  # 2023-11-14T23:13:20+0100 in Prague
DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+\d{4}$")


# --- infrastructure ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = EPOCH) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class _SwitchApp:
    """One server for the whole module; each test plugs its own simulator in."""

    def __init__(self) -> None:
        self.target: Any = None
        self._idle = Starlette()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self._idle if scope["type"] == "lifespan" or self.target is None else self.target
        await app(scope, receive, send)


class Receiver:
    """A webhook endpoint that records what arrives and answers scripted statuses."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.delay = 0.0
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.received.append(({k.lower(): v for k, v in request.headers.items()}, body))
            status = self.statuses.pop(0) if self.statuses else 200
            delay = self.delay
        if delay:
            await asyncio.sleep(delay)
        return Response(status_code=status)

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.statuses.clear()
            self.delay = 0.0

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.received]


class Api:
    """An httpx client for the simulator that checks each exchange against the spec."""

    def __init__(self, base_url: str, token: str = TOKEN) -> None:
        self.client = httpx.Client(
            base_url=base_url,
            headers={"Shoptet-Private-API-Token": token, "Content-Type": "application/json"},
            timeout=10,
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        spec_valid_request: bool = True,
    ) -> httpx.Response:
        if json_body is not None:
            content = json.dumps(json_body).encode()
        response = self.client.request(
            method, path, params=params, content=content, headers=headers
        )
        check_exchange(response, spec_valid_request=spec_valid_request)
        return response

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.call("GET", path, **kw)

    def patch_status(
        self, code: str, body: dict[str, Any], *, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        return self.call("PATCH", f"/api/orders/{code}/status", params=params, json_body=body)


def check_exchange(response: httpx.Response, *, spec_valid_request: bool = True) -> None:
    """Validate the answer; validate the request, or insist the validator rejects it."""
    if spec_valid_request:
        validate_httpx(response)
        return
    request = response.request
    query = request.url.query.decode()
    with pytest.raises(ContractViolation):
        validate_request(
            request.method, request.url.path, query, request.headers.multi_items(), request.content
        )
    if find_operation(request.method, request.url.path) is None:
        validate_error_envelope(response.status_code, response.headers, response.content)
    else:
        validate_httpx(response, check_request=False)


def envelope(response: httpx.Response) -> dict[str, Any]:
    doc: dict[str, Any] = response.json()
    assert response.headers["x-request-id"] == doc["metadata"]["requestId"]
    assert re.fullmatch(r"\d+/\d+", response.headers["x-ratelimit-bucket-filling"])
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    return doc


def only_error(response: httpx.Response) -> dict[str, str]:
    doc = envelope(response)
    assert doc["data"] is None
    assert len(doc["errors"]) == 1
    error: dict[str, str] = doc["errors"][0]
    return error


@pytest.fixture(scope="module")
def switch() -> Iterator[tuple[_SwitchApp, str]]:
    app = _SwitchApp()
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
def hook_url(receiver_server: tuple[Receiver, str]) -> str:
    return receiver_server[1]


MakeSim = Callable[..., tuple[ShoptetSimulator, Api]]


@pytest.fixture
def make_sim(switch: tuple[_SwitchApp, str]) -> Iterator[MakeSim]:
    app, url = switch
    made: list[tuple[ShoptetSimulator, Api]] = []

    def make(**kwargs: Any) -> tuple[ShoptetSimulator, Api]:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("lock_seconds", 0.0)
        kwargs.setdefault("webhook_retry_delay", 0.05)
        sim = ShoptetSimulator(**kwargs)
        app.target = sim.app
        api = Api(url)
        made.append((sim, api))
        return sim, api

    yield make
    app.target = None
    for sim, api in made:
        api.client.close()
        sim.close()


@pytest.fixture
def sim_api(make_sim: MakeSim) -> tuple[ShoptetSimulator, Api]:
    return make_sim()


def signature_ok(key: str, body: bytes, signature: str) -> bool:
    expected = hmac.new(key.encode(), body, hashlib.sha1).hexdigest()
    return hmac.compare_digest(expected, signature)


# --- the validator itself ----------------------------------------------------------------------


def test_validator_rejects_a_broken_order_and_a_bad_request() -> None:
    headers = {"Shoptet-Private-API-Token": "x", "Content-Type": "application/json"}
    broken = b'{"data": {"order": {"code": "1"}}, "errors": null, "metadata": {"requestId": "r"}}'
    with pytest.raises(ContractViolation, match=r"'guid' is a required property"):
        validate_response(
            "GET",
            "/api/orders/1",
            "",
            headers,
            status=200,
            headers={"content-type": "application/json"},
            body=broken,
        )
    with pytest.raises(ContractViolation, match="Content-Type"):
        validate_request("GET", "/api/orders", "", {"Shoptet-Private-API-Token": "x"})
    with pytest.raises(ContractViolation, match="%2B"):
        validate_request("GET", "/api/orders", "changeTimeFrom=2024-01-01T00:00:00+0100", headers)
    with pytest.raises(ContractViolation, match=r"[Aa]dditional"):
        validate_request("PATCH", "/api/orders/1/status", "", headers, b'{"data": {"x": 1}}')
    with pytest.raises(ContractViolation, match="errors"):
        validate_response(
            "GET",
            "/api/orders/1",
            "",
            headers,
            status=404,
            headers={"content-type": "application/json"},
            body=b'{"data": null, "errors": null, "metadata": {"requestId": "r"}}',
        )


# --- e-shop info and statuses ------------------------------------------------------------------


def test_eshop_info_includes_order_statuses_on_request(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    _, api = sim_api
    plain = envelope(api.get("/api/eshop"))
    assert plain["errors"] is None
    assert plain["data"]["contactInformation"]["eshopId"] == 222651
    assert "orderStatuses" not in plain["data"]

    doc = envelope(api.get("/api/eshop", params={"include": "orderStatuses"}))
    statuses = doc["data"]["orderStatuses"]
    assert statuses["defaultStatus"] == -1
    by_id = {s["id"]: s for s in statuses["statuses"]}
    assert set(by_id) == {-1, -2, -3, -4, 2, 3, 4}
    assert by_id[2]["markAsPaid"] is True
    assert by_id[-4]["name"] == "Stornována"


def test_order_statuses_list_has_system_flags_and_documents(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    _, api = sim_api
    doc = envelope(api.get("/api/orders/statuses"))
    by_id = {s["id"]: s for s in doc["data"]["statuses"]}
    assert doc["data"]["defaultStatus"] == -1
    assert all(s["system"] == (s["id"] < 0) for s in by_id.values())
    assert by_id[3]["documents"]["generateDeliveryNote"] is True


# --- authentication and routing ----------------------------------------------------------------


def test_missing_token_is_401_missing_access_token(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    _, api = sim_api
    with httpx.Client(base_url=str(api.client.base_url)) as bare:
        response = bare.get("/api/eshop", headers={"Content-Type": "application/json"})
    check_exchange(response, spec_valid_request=False)
    assert response.status_code == 401
    assert only_error(response)["errorCode"] == "missing-access-token"


def test_wrong_token_is_401_and_header_name_is_case_insensitive(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    _, api = sim_api
    wrong = api.get("/api/eshop", headers={"Shoptet-Private-API-Token": "nope-nope-nope"})
    assert wrong.status_code == 401
    assert only_error(wrong)["errorCode"] == "invalid-token"
    lower = api.get("/api/eshop", headers={"shoptet-private-api-token": TOKEN})
    assert lower.status_code == 200
    # The private token is not an add-on access token.
    with httpx.Client(base_url=str(api.client.base_url)) as bare:
        oauth = bare.get(
            "/api/eshop",
            headers={"Shoptet-Access-Token": TOKEN, "Content-Type": "application/json"},
        )
    check_exchange(oauth)
    assert oauth.status_code == 401
    assert only_error(oauth)["errorCode"] == "invalid-token"


def test_unknown_endpoint_is_404_envelope(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    _, api = sim_api
    response = api.get("/api/no-such-thing", spec_valid_request=False)
    assert response.status_code == 404
    assert only_error(response)["errorCode"] == "endpoint-not-found"


# --- order detail and status PATCH -------------------------------------------------------------


def test_order_detail_matches_control_copy(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    doc = envelope(api.get("/api/orders/2024000001"))
    order = doc["data"]["order"]
    assert order["code"] == "2024000001"
    assert order["status"] == {"id": -1, "name": "Nevyřízená"}
    assert order["paid"] is False
    assert DATETIME_RE.match(order["changeTime"])
    assert order == sim.order("2024000001")


def test_codes_with_letters_and_dashes_work(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    sim, api = sim_api
    sim.add_order("OBJ-2024-7", -1)
    assert envelope(api.get("/api/orders/OBJ-2024-7"))["data"]["order"]["code"] == "OBJ-2024-7"


def test_unknown_order_is_404_order_not_found(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    _, api = sim_api
    for response in (
        api.get("/api/orders/2099000001"),
        api.patch_status("2099000001", {"data": {"statusId": 2}}),
    ):
        assert response.status_code == 404
        assert only_error(response) == {
            "errorCode": "order-not-found",
            "message": 'Order "2099000001" not found.',
            "instance": "2099000001",
        }


def test_status_change_sends_email_sms_documents_and_updates_change_time(
    make_sim: MakeSim,
) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock)
    sim.add_order("2024000001", -1)
    before = sim.order("2024000001")["changeTime"]
    clock.advance(61)
    response = api.patch_status("2024000001", {"data": {"statusId": 3}})
    assert response.status_code == 200
    doc = envelope(response)
    assert doc["errors"] is None
    order = doc["data"]["order"]
    assert order["status"] == {"id": 3, "name": "Expedována"}
    assert before == "2023-11-14T23:13:20+0100"
    assert order["changeTime"] == "2023-11-14T23:14:21+0100"
    assert order["creationTime"] == before
    effects = sim.order_side_effects("2024000001")
    assert effects.emails == [3]
    assert effects.sms == [3]
    assert effects.documents == ["deliveryNote"]
    assert effects.suppressed == []


def test_suppress_flags_prevent_side_effects(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    flags = {
        "suppressDocumentGeneration": True,
        "suppressEmailSending": True,
        "suppressSmsSending": True,
    }
    response = api.patch_status("2024000001", {"data": {"statusId": 3}}, params=flags)
    assert response.status_code == 200
    assert "suppressEmailSending=true" in response.request.url.query.decode()
    effects = sim.order_side_effects("2024000001")
    assert (effects.emails, effects.sms, effects.documents) == ([], [], [])
    assert effects.suppressed == [(3, "email"), (3, "sms"), (3, "document:deliveryNote")]
    assert sim.order("2024000001")["status"]["id"] == 3


def test_same_status_is_a_no_op_without_webhook(
    make_sim: MakeSim, receiver: Receiver, hook_url: str
) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock)
    sim.add_order("2024000001", 3)
    sim.register_webhook("order:update", hook_url)
    before = sim.order("2024000001")
    clock.advance(10)
    response = api.patch_status("2024000001", {"data": {"statusId": 3}})
    assert response.status_code == 200
    assert envelope(response)["data"]["order"] == before
    sim.wait_webhooks_idle()
    assert receiver.received == []
    assert sim.order_side_effects("2024000001").emails == []


def test_mark_as_paid_status_sets_paid_unless_paid_false_is_sent(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    sim.add_order("2024000002", -1)
    first = api.patch_status("2024000001", {"data": {"statusId": 2}})
    assert envelope(first)["data"]["order"]["paid"] is True
    second = api.patch_status("2024000002", {"data": {"statusId": 2, "paid": False}})
    order = envelope(second)["data"]["order"]
    assert (order["status"]["id"], order["paid"]) == (2, False)
    assert sim.order_side_effects("2024000001").documents == ["invoice", "proofPayment"]


def test_paid_and_billing_method_can_change_without_status(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -2, paid=None)
    response = api.patch_status("2024000001", {"data": {"paid": True, "billingMethodId": 4}})
    order = envelope(response)["data"]["order"]
    assert order["paid"] is True
    assert order["billingMethod"] == {"id": 4, "name": "Kartou"}
    assert order["status"]["id"] == -2
    assert sim.order_side_effects("2024000001").emails == []


def test_unknown_status_id_is_422_and_changes_nothing(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    response = api.patch_status("2024000001", {"data": {"statusId": 99}})
    assert response.status_code == 422
    assert only_error(response) == {
        "errorCode": "invalid-request-data",
        "message": 'Invalid statusId "99".',
        "instance": "data.statusId",
    }
    bad_billing = api.patch_status("2024000001", {"data": {"billingMethodId": 9}})
    assert bad_billing.status_code == 422
    assert only_error(bad_billing)["instance"] == "data.billingMethodId"
    assert sim.order("2024000001")["status"]["id"] == -1


@pytest.mark.parametrize(
    ("body", "instance"),
    [
        (b'{"data": {}}', "data"),
        (b'{"data": {"statusId": 2, "note": "x"}}', "data.note"),
        (b'{"data": {"statusId": "2"}}', "data.statusId"),
        (b'{"statusId": 2}', "payload"),
        (b"{not json", "payload"),
    ],
)
def test_schema_invalid_status_body_is_422(
    sim_api: tuple[ShoptetSimulator, Api], body: bytes, instance: str
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    response = api.call(
        "PATCH", "/api/orders/2024000001/status", content=body, spec_valid_request=False
    )
    assert response.status_code == 422
    error = only_error(response)
    assert (error["errorCode"], error["instance"]) == ("invalid-request-data", instance)
    assert sim.order("2024000001")["status"]["id"] == -1


def test_failed_document_is_200_with_errors_and_status_applied(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    sim.document_error_statuses.add(3)
    response = api.patch_status("2024000001", {"data": {"statusId": 3}})
    assert response.status_code == 200
    doc = envelope(response)
    assert doc["data"]["order"]["status"]["id"] == 3
    assert doc["errors"] == [
        {
            "errorCode": "document-not-generated",
            "message": 'Delivery note belonging to order "2024000001" was not created. '
            "Generating document code failed.",
            "instance": "2024000001",
        }
    ]
    assert sim.order_side_effects("2024000001").documents == []


def test_conflict_next_gives_409_record_already_changed(
    sim_api: tuple[ShoptetSimulator, Api],
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    sim.conflict_next(1)
    response = api.patch_status("2024000001", {"data": {"statusId": 2}})
    assert response.status_code == 409
    assert only_error(response) == {
        "errorCode": "record-already-changed",
        "message": "Order has been changed before update.",
        "instance": "payload",
    }
    assert sim.order("2024000001")["status"]["id"] == -1
    assert api.patch_status("2024000001", {"data": {"statusId": 2}}).status_code == 200


def test_quick_repeat_of_a_write_is_423_locked(make_sim: MakeSim) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock, lock_seconds=0.3)
    sim.add_order("2024000001", -1)
    sim.add_order("2024000002", -1)
    assert api.patch_status("2024000001", {"data": {"statusId": 2}}).status_code == 200
    clock.advance(0.25)
    locked = api.patch_status("2024000001", {"data": {"statusId": 3}})
    assert locked.status_code == 423
    assert only_error(locked)["errorCode"] == "locked"
    # Another URL is not locked, and reads are never locked.
    assert api.patch_status("2024000002", {"data": {"statusId": 2}}).status_code == 200
    assert api.get("/api/orders/2024000001").status_code == 200
    clock.advance(0.1)
    assert api.patch_status("2024000001", {"data": {"statusId": 3}}).status_code == 200
    assert sim.order("2024000001")["status"]["id"] == 3


# --- rate limits and failures ------------------------------------------------------------------


def test_full_bucket_is_429_with_http_date_retry_after(make_sim: MakeSim) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock, bucket_capacity=5, drain_per_second=1.0)
    fillings = [
        api.get("/api/orders/statuses").headers["x-ratelimit-bucket-filling"] for _ in "12345"
    ]
    assert fillings == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    throttled = api.get("/api/orders/statuses")
    assert throttled.status_code == 429
    assert only_error(throttled)["errorCode"] == "too-many-requests"
    retry_at = email.utils.parsedate_to_datetime(throttled.headers["retry-after"])
    assert throttled.headers["retry-after"].endswith(" GMT")
    assert retry_at == datetime.fromtimestamp(EPOCH + 1, UTC)
    assert sim.throttled_count == 1
    clock.advance(1)
    assert api.get("/api/orders/statuses").status_code == 200


def test_more_connections_than_allowed_per_token_is_429(make_sim: MakeSim) -> None:
    sim, api = make_sim(max_connections_per_token=3)
    sim.set_latency(0.4)
    base_url = str(api.client.base_url)

    def one(_: int) -> httpx.Response:
        with httpx.Client(
            base_url=base_url,
            headers={"Shoptet-Private-API-Token": TOKEN, "Content-Type": "application/json"},
        ) as client:
            return client.get("/api/orders/statuses")

    with ThreadPoolExecutor(max_workers=5) as pool:
        responses = list(pool.map(one, range(5)))
    codes = sorted(r.status_code for r in responses)
    # Normally exactly two are refused; a thread starting 0.4 s late on a loaded machine may
    # slip in after the first three finished, so only demand what overlap guarantees.
    assert set(codes) == {200, 429}
    assert codes.count(200) >= 3
    for response in responses:
        check_exchange(response)
        if response.status_code == 429:
            assert email.utils.parsedate_to_datetime(response.headers["retry-after"])
            assert "429 Too Many Requests" in response.text  # nginx's own page, not JSON
    assert sim.throttled_count == codes.count(429)


def test_fail_next_and_maintenance(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    sim, api = sim_api
    sim.fail_next(2, status=500)
    assert [api.get("/api/eshop").status_code for _ in range(3)] == [500, 500, 200]
    sim.set_down(True)
    down = api.get("/api/eshop")
    assert down.status_code == 503
    assert only_error(down)["errorCode"] == "system-maintenance"
    sim.set_down(False)
    assert api.get("/api/eshop").status_code == 200


# --- listing orders and changes ----------------------------------------------------------------


def test_order_list_pages_newest_first_and_caps_items_per_page(make_sim: MakeSim) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock)
    for i in range(1, 121):
        sim.add_order(f"2024{i:06d}", -1)
        clock.advance(1)
    first = envelope(api.get("/api/orders"))["data"]
    assert first["paginator"] == {
        "totalCount": 120,
        "page": 1,
        "pageCount": 3,
        "itemsOnPage": 50,
        "itemsPerPage": 50,
    }
    assert first["orders"][0]["code"] == "2024000120"
    seen = [o["code"] for o in first["orders"]]
    for page in (2, 3):
        data = envelope(api.get("/api/orders", params={"page": page, "itemsPerPage": 100}))["data"]
        assert data["paginator"]["itemsPerPage"] == 50
        seen += [o["code"] for o in data["orders"]]
    assert sorted(seen) == [f"2024{i:06d}" for i in range(1, 121)]
    assert len(set(seen)) == 120


def test_order_list_filters(make_sim: MakeSim) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock)
    sim.add_order("2024000001", -1)
    sim.add_order("2024000002", -1)
    sim.add_order("2024000003", 2, paid=True)
    clock.advance(3600)
    sim.set_status_as_person("2024000002", 3)

    by_status = envelope(api.get("/api/orders", params={"statusId": 2}))["data"]["orders"]
    assert [o["code"] for o in by_status] == ["2024000003"]
    assert by_status[0]["status"] == {"id": 2, "name": "Zaplaceno"}

    changed = api.get("/api/orders", params={"changeTimeFrom": "2023-11-14T23:43:20+0100"})
    assert "%2B0100" in changed.request.url.query.decode()
    assert [o["code"] for o in envelope(changed)["data"]["orders"]] == ["2024000002"]

    codes = envelope(
        api.get("/api/orders", params={"orderCodes": "2024000003,2024000001,nope", "statusId": 3})
    )["data"]["orders"]
    assert sorted(o["code"] for o in codes) == ["2024000001", "2024000003"]

    too_many = api.get("/api/orders", params={"orderCodes": ",".join(str(i) for i in range(51))})
    assert too_many.status_code == 400
    assert only_error(too_many) == {
        "errorCode": "invalid-parameter",
        "message": 'Invalid "orderCodes" parameter. Expected max. 50 elements, but 51 given.',
        "instance": "orderCodes",
    }


def test_unencoded_plus_in_datetime_is_rejected(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    _, api = sim_api
    response = api.call(
        "GET",
        "/api/orders?changeTimeFrom=2024-01-01T00:00:00+0100",
        spec_valid_request=False,
    )
    assert response.status_code == 400
    assert only_error(response)["instance"] == "changeTimeFrom"


def test_order_changes_log_pages_and_types(make_sim: MakeSim) -> None:
    clock = FakeClock()
    sim, api = make_sim(clock=clock)
    for i in range(1, 26):
        sim.add_order(f"2024{i:06d}", -1)
        clock.advance(1)
    sim.set_status_as_person("2024000001", 2)  # logged once, with its last change
    sim.delete_order("2024000002")
    since = "2023-11-14T23:13:20+0100"  # EPOCH in Prague

    first = envelope(api.get("/api/orders/changes", params={"from": since}))["data"]
    assert first["paginator"]["itemsPerPage"] == 20
    assert first["paginator"]["totalCount"] == 25
    assert first["changes"][0] == {
        "code": "2024000003",
        "changeTime": "2023-11-14T23:13:22+0100",
        "changeType": "edit",
    }
    everything = envelope(
        api.get("/api/orders/changes", params={"from": since, "itemsPerPage": 5000})
    )["data"]
    assert everything["paginator"]["itemsPerPage"] == 1000
    tail = {c["code"]: c["changeType"] for c in everything["changes"][-2:]}
    assert tail == {"2024000001": "edit", "2024000002": "delete"}
    deletes = envelope(
        api.get("/api/orders/changes", params={"from": since, "changeType": "delete"})
    )["data"]["changes"]
    assert [c["code"] for c in deletes] == ["2024000002"]
    later = envelope(api.get("/api/orders/changes", params={"from": "2023-11-14T23:13:40+01:00"}))[
        "data"
    ]["changes"]
    assert [c["code"] for c in later] == [f"2024{i:06d}" for i in range(21, 26)] + [
        "2024000001",
        "2024000002",
    ]

    missing = api.get("/api/orders/changes", spec_valid_request=False)
    assert missing.status_code == 400
    assert only_error(missing)["errorCode"] == "missing-parameter"


# --- webhooks: registration --------------------------------------------------------------------


def test_webhook_registration_lifecycle(
    sim_api: tuple[ShoptetSimulator, Api], hook_url: str
) -> None:
    _, api = sim_api
    created = api.call(
        "POST",
        "/api/webhooks",
        json_body={
            "data": [
                {"event": "order:update", "url": hook_url},
                {"event": "order:massUpdate", "url": hook_url},
            ]
        },
    )
    assert created.status_code == 201
    hooks = envelope(created)["data"]["webhooks"]
    assert [h["event"] for h in hooks] == ["order:update", "order:massUpdate"]
    first_id = hooks[0]["id"]

    listed = envelope(api.get("/api/webhooks"))["data"]
    assert listed["paginator"]["totalCount"] == 2
    second_page = envelope(api.get("/api/webhooks", params={"page": 2, "itemsPerPage": 1}))
    assert [h["event"] for h in second_page["data"]["webhooks"]] == ["order:massUpdate"]
    assert second_page["data"]["paginator"]["pageCount"] == 2
    assert envelope(api.get(f"/api/webhooks/{first_id}"))["data"]["webhook"]["url"] == hook_url

    patched = api.call(
        "PATCH", f"/api/webhooks/{first_id}", json_body={"data": {"url": hook_url + "?v=2"}}
    )
    assert envelope(patched)["data"]["webhook"]["updated"] is not None

    assert api.call("DELETE", f"/api/webhooks/{first_id}").status_code == 200
    gone = api.get(f"/api/webhooks/{first_id}")
    assert gone.status_code == 404
    assert only_error(gone) == {
        "errorCode": "webhook-not-found",
        "message": f'Webhook with id "{first_id}" not found.',
        "instance": str(first_id),
    }
    assert api.call("DELETE", f"/api/webhooks/{first_id}").status_code == 404


def test_duplicate_event_is_422_and_update_with_cancel_is_409(
    sim_api: tuple[ShoptetSimulator, Api], hook_url: str
) -> None:
    sim, api = sim_api
    sim.register_webhook("order:update", hook_url)
    duplicate = api.call(
        "POST", "/api/webhooks", json_body={"data": [{"event": "order:update", "url": hook_url}]}
    )
    assert duplicate.status_code == 422
    assert only_error(duplicate)["message"] == "Webhook already exists for this event"

    conflict = api.call(
        "POST", "/api/webhooks", json_body={"data": [{"event": "order:cancel", "url": hook_url}]}
    )
    assert conflict.status_code == 409

    hooks = envelope(api.get("/api/webhooks"))["data"]["webhooks"]
    assert [h["event"] for h in hooks] == ["order:update"]
    with pytest.raises(ValueError, match="already exists"):
        sim.register_webhook("order:update", hook_url)


def test_update_and_cancel_in_one_request_is_409_and_registers_nothing(
    sim_api: tuple[ShoptetSimulator, Api], hook_url: str
) -> None:
    _, api = sim_api
    both = api.call(
        "POST",
        "/api/webhooks",
        json_body={
            "data": [
                {"event": "order:create", "url": hook_url},
                {"event": "order:update", "url": hook_url},
                {"event": "order:cancel", "url": hook_url},
            ]
        },
    )
    assert both.status_code == 409
    assert envelope(api.get("/api/webhooks"))["data"]["webhooks"] == []


# --- webhooks: delivery ------------------------------------------------------------------------


def test_webhook_from_admin_change_is_signed_hmac_sha1(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, _ = sim_api
    sim.add_order("2024000001", -1)
    sim.register_webhook("order:update", hook_url)
    sim.set_status_as_person("2024000001", 3)
    sim.wait_webhooks_idle()
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert headers["content-type"] == "application/json"
    assert signature_ok(sim.signature_key, body, headers["shoptet-webhook-signature"])
    assert re.fullmatch(r"[0-9a-f]{40}", headers["shoptet-webhook-signature"])
    doc = validate_webhook_body(body)
    assert doc["eshopId"] == 222651
    assert doc["event"] == "order:update"
    assert doc["eventInstance"] == "2024000001"
    assert DATETIME_RE.match(doc["eventCreated"])
    assert [(d.event, d.attempt, d.status) for d in sim.webhook_deliveries] == [
        ("order:update", 1, 200)
    ]


def test_api_patch_also_sends_order_update_and_paid_and_cancel_events(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    sim.add_order("2024000002", -1)
    sim.register_webhook("order:update", hook_url)
    sim.register_webhook("order:paid", hook_url)
    api.patch_status("2024000001", {"data": {"statusId": 2}})
    sim.wait_webhooks_idle()
    events = sorted((b["event"], b["eventInstance"]) for b in receiver.bodies())
    assert events == [("order:paid", "2024000001"), ("order:update", "2024000001")]

    # order:cancel cannot live next to order:update, so check it on its own.
    receiver.reset()
    for hook in envelope(api.get("/api/webhooks"))["data"]["webhooks"]:
        api.call("DELETE", f"/api/webhooks/{hook['id']}")
    sim.register_webhook("order:cancel", hook_url)
    api.patch_status("2024000002", {"data": {"statusId": -4}})
    sim.wait_webhooks_idle()
    assert [(b["event"], b["eventInstance"]) for b in receiver.bodies()] == [
        ("order:cancel", "2024000002")
    ]


def test_order_create_only_when_notified(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, _ = sim_api
    sim.register_webhook("order:create", hook_url)
    sim.add_order("2024000001", -1)
    sim.add_order("2024000002", -1, notify=True)
    sim.wait_webhooks_idle()
    assert [b["eventInstance"] for b in receiver.bodies()] == ["2024000002"]


def test_mass_update_sends_mass_event_and_single_events(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, _ = sim_api
    for code in ("2024000001", "2024000002", "2024000003"):
        sim.add_order(code, -1)
    sim.set_status_as_person("2024000003", 3)
    sim.register_webhook("order:update", hook_url)
    sim.register_webhook("order:massUpdate", hook_url)
    sim.mass_update(["2024000001", "2024000002", "2024000003"], 3)
    sim.wait_webhooks_idle()
    bodies = receiver.bodies()
    for _, raw in receiver.received:
        validate_webhook_body(raw)
    singles = sorted(b["eventInstance"] for b in bodies if b["event"] == "order:update")
    assert singles == ["2024000001", "2024000002"]
    mass = [b for b in bodies if b["event"] == "order:massUpdate"]
    assert len(mass) == 1
    assert isinstance(mass[0]["eventInstance"], str)
    assert json.loads(mass[0]["eventInstance"]) == ["2024000001", "2024000002"]


def test_renew_signature_key_replaces_the_old_key_at_once(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, api = sim_api
    old_key = sim.signature_key
    first = envelope(api.call("POST", "/api/webhooks/renew-signature-key"))["data"]["signatureKey"]
    second = envelope(api.call("POST", "/api/webhooks/renew-signature-key"))["data"]["signatureKey"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert len({old_key, first, second}) == 3
    assert sim.signature_key == second

    sim.add_order("2024000001", -1)
    sim.register_webhook("order:update", hook_url)
    sim.set_status_as_person("2024000001", 2)
    sim.wait_webhooks_idle()
    headers, body = receiver.received[0]
    assert signature_ok(second, body, headers["shoptet-webhook-signature"])
    assert not signature_ok(first, body, headers["shoptet-webhook-signature"])
    assert not signature_ok(old_key, body, headers["shoptet-webhook-signature"])


def test_failed_webhook_is_retried_then_dropped(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    sim.add_order("2024000002", -1)
    sim.register_webhook("order:update", hook_url)
    receiver.statuses[:] = [500, 503, 500]
    sim.set_status_as_person("2024000001", 2)
    sim.wait_webhooks_idle()
    assert [(d.attempt, d.status, d.dropped) for d in sim.webhook_deliveries] == [
        (1, 500, False),
        (2, 503, False),
        (3, 500, True),
    ]
    assert len({body for _, body in receiver.received}) == 1  # the same notification each time

    receiver.statuses[:] = [500]
    sim.set_status_as_person("2024000002", 2)
    sim.wait_webhooks_idle()
    assert [(d.attempt, d.status) for d in sim.webhook_deliveries[3:]] == [(1, 500), (2, 200)]

    failed = envelope(api.get("/api/webhooks/notifications", params={"status": "failed"}))["data"][
        "notifications"
    ]
    assert [(n["data"]["eventInstance"], n["attempts"], n["active"]) for n in failed] == [
        ("2024000001", 3, False)
    ]


def test_slow_webhook_receiver_times_out(
    make_sim: MakeSim, receiver: Receiver, hook_url: str
) -> None:
    sim, _ = make_sim(webhook_timeout=0.2, webhook_attempts=1)
    receiver.delay = 0.5
    sim.add_order("2024000001", -1)
    sim.register_webhook("order:update", hook_url)
    sim.set_status_as_person("2024000001", 2)
    sim.wait_webhooks_idle()
    (delivery,) = sim.webhook_deliveries
    assert delivery.status is None
    assert delivery.error is not None and "Timeout" in delivery.error
    assert delivery.dropped


def test_status_list_change_event(
    sim_api: tuple[ShoptetSimulator, Api], receiver: Receiver, hook_url: str
) -> None:
    sim, api = sim_api
    sim.register_webhook("orderStatusesList:change", hook_url)
    sim.upsert_status(ShoptetStatus(5, "Čeká na platbu", 8, send_email=True))
    sim.wait_webhooks_idle()
    assert [b["eventInstance"] for b in receiver.bodies()] == ["5"]
    statuses = envelope(api.get("/api/orders/statuses"))["data"]["statuses"]
    assert any(s["id"] == 5 and s["name"] == "Čeká na platbu" for s in statuses)


# --- recording ---------------------------------------------------------------------------------


def test_every_recorded_exchange_conforms(sim_api: tuple[ShoptetSimulator, Api]) -> None:
    sim, api = sim_api
    sim.add_order("2024000001", -1)
    api.get("/api/orders/2024000001")
    api.patch_status("2024000001", {"data": {"statusId": 2}}, params={"suppressEmailSending": True})
    api.get("/api/orders", params={"statusId": 2})
    assert [(r.method, r.path, r.status) for r in sim.requests] == [
        ("GET", "/api/orders/2024000001", 200),
        ("PATCH", "/api/orders/2024000001/status", 200),
        ("GET", "/api/orders", 200),
    ]
    patch = sim.requests[1]
    assert patch.query == "suppressEmailSending=true"
    assert patch.headers["shoptet-private-api-token"] == TOKEN
    assert json.loads(patch.body) == {"data": {"statusId": 2}}
    assert patch.response_headers["x-request-id"] == patch.response_json()["metadata"]["requestId"]
    for recorded in sim.requests:
        validate_exchange(recorded)
