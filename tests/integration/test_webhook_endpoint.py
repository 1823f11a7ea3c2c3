"""The bridge's HTTP face under bad, hostile and unexpected input.

Every endpoint has a defined answer: a 4xx with a JSON body ``{"error": ..., "detail": ...}``
naming the problem, never a 5xx or a stack trace, and a refused request stores nothing (no
hint, no audit line, no problem, no call to any platform). Everything goes over real HTTP to a
real bridge, except the fuzz test and the few checks of headers that a real HTTP server
refuses before the app sees them; those run the same app in-process (``httpx.ASGITransport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from starlette.applications import Starlette

from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread, serve_in_loop
from bridge.sandbox.shoptet import ShoptetSimulator
from bridge.service import Bridge
from bridge.signing import hmac_sha1_hex
from bridge.store.sqlite import SQLiteStore
from tests.integration.conftest import MAPPING, MK, SHOPTET, World, eventually

pytestmark = pytest.mark.integration

CODE = "2026000042"
LIMIT = 64 * 1024  # Settings.max_webhook_bytes default
PATH = "/webhooks/shoptet"


# --- worlds ------------------------------------------------------------------------------------


class _Switch:
    """A long-lived server whose app each test plugs in (a server costs ~0.2 s to stop)."""

    def __init__(self) -> None:
        self.target: Any = None
        self._idle = Starlette()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self._idle if scope["type"] == "lifespan" or self.target is None else self.target
        await app(scope, receive, send)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[_Switch, str, _Switch, str]]:
    shoptet, metakocka = _Switch(), _Switch()
    with ServerThread(shoptet) as s, ServerThread(metakocka) as m:
        yield shoptet, s.url, metakocka, m.url


@pytest.fixture
def sims(servers: tuple[_Switch, str, _Switch, str], tmp_path: Path) -> Iterator[World]:
    """The harness's World (fresh simulators per test), on this module's long-lived servers."""
    shoptet_switch, shoptet_url, mk_switch, mk_url = servers
    shoptet = ShoptetSimulator(webhook_retry_delay=0.2, lock_seconds=0.05)
    metakocka = MetaKockaSimulator()
    shoptet_switch.target, mk_switch.target = shoptet.app, metakocka.app
    try:
        yield World(shoptet, shoptet_url, metakocka, mk_url, tmp_path)
    finally:
        shoptet_switch.target = mk_switch.target = None
        shoptet.close()


@contextlib.asynccontextmanager
async def serve(
    world: World, *, store: Any = None, register_webhook: bool = False
) -> AsyncIterator[Bridge]:
    """A real bridge over real HTTP, without pollers (so the store sees only what we send)."""
    bridge = Bridge(world.settings(), mapping=MAPPING, store=store, run_pollers=False)
    async with serve_in_loop(bridge.app) as url:
        world.bridge, world.bridge_url = bridge, url
        if register_webhook:
            world.shoptet.register_webhook("order:update", f"{url}{PATH}")
        yield bridge


@pytest.fixture
async def bridge(sims: World) -> AsyncIterator[Bridge]:
    async with serve(sims) as b:
        yield b


@pytest.fixture
async def client(sims: World, bridge: Bridge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sims.bridge_url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One bridge (in its own server thread) for all the tests that expect a refusal.

    Sharing it is safe because a refusal stores nothing: every such test checks that the store
    and both simulators are still untouched, so a leak from any of them fails the next one too.
    """
    shoptet = ShoptetSimulator()
    metakocka = MetaKockaSimulator()
    with ServerThread(shoptet.app) as s, ServerThread(metakocka.app) as m:
        world = World(shoptet, s.url, metakocka, m.url, tmp_path_factory.mktemp("refusing"))
        bridge = Bridge(world.settings(), mapping=MAPPING, run_pollers=False)
        with ServerThread(bridge.app) as b:
            world.bridge, world.bridge_url = bridge, b.url
            yield world
    shoptet.close()


@pytest.fixture
async def refuse(refusing: World) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the shared refusing bridge."""
    async with httpx.AsyncClient(base_url=refusing.bridge_url, timeout=10) as c:
        yield c


@pytest.fixture
async def local(refusing: World, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (ASGITransport), for headers a real HTTP server never passes on."""
    settings = refusing.settings(database_url=f"sqlite:///{tmp_path / 'local.sqlite3'}")
    bridge = Bridge(settings, mapping=MAPPING, run_pollers=False)
    await bridge.start()
    transport = httpx.ASGITransport(app=bridge.app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as c:
            yield c
        assert bridge.inbox.stored == 0
    finally:
        await bridge.stop()


# --- helpers -----------------------------------------------------------------------------------


def payload(event: str = "order:update", instance: str = CODE, **fields: Any) -> dict[str, Any]:
    return {
        "eshopId": 222651,  # ShoptetSimulator's default e-shop id, which the harness configures
        "event": event,
        "eventCreated": "2026-11-22T10:00:00+0100",
        "eventInstance": instance,
        **fields,
    }


def signed(world: World, body: bytes | dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return raw, {
        "Content-Type": "application/json",
        "Shoptet-Webhook-Signature": hmac_sha1_hex(world.shoptet.signature_key, raw),
    }


def assert_error(response: httpx.Response, status: int, error: str, *words: str) -> None:
    """A JSON error answer with the given status, naming the problem (no stack trace)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    for word in words:
        assert word.lower() in body["detail"].lower(), body


async def assert_nothing_stored(world: World, bridge: Bridge | None = None) -> None:
    """Nothing reached the store, and nothing was asked of either platform."""
    bridge = bridge or world.bridge
    assert bridge is not None
    assert bridge.inbox.stored == 0
    assert await bridge.store.pending_hints() == 0
    assert await bridge.store.list_audit(limit=10) == []
    assert await bridge.store.list_problems() == []
    assert await bridge.store.pending_deliveries() == 0
    assert world.shoptet.requests == []
    assert world.metakocka.requests == []


async def raw_http(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (headers an HTTP client would refuse to send); (status, body)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus text output (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(f"{name}{{"):
            continue
        inside, value = line[len(name) + 1 :].rsplit("} ", 1)
        found = dict(pair.split("=", 1) for pair in inside.split(","))
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return 0.0


# --- accepted ----------------------------------------------------------------------------------


async def test_a_signed_order_update_is_stored_as_one_hint(
    sims: World, bridge: Bridge, client: httpx.AsyncClient
) -> None:
    sims.add_order(CODE)
    body, headers = signed(sims, payload())
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "accepted", "hints": 1}
    assert bridge.inbox.stored == 1
    # The worker takes it from there: reads the order in Shoptet, decides, consumes the hint.
    await eventually(lambda: any(r.path == f"/api/orders/{CODE}" for r in sims.shoptet.requests))
    await eventually(lambda: bridge.store.list_audit(CODE), what="a decision on the order")
    await eventually(lambda: _pending_is(bridge, 0))


async def _pending_is(bridge: Bridge, n: int) -> bool:
    return await bridge.store.pending_hints() == n


async def test_signature_hex_case_does_not_matter(
    sims: World, bridge: Bridge, client: httpx.AsyncClient
) -> None:
    body, headers = signed(sims, payload())
    headers["Shoptet-Webhook-Signature"] = headers["Shoptet-Webhook-Signature"].upper()
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert bridge.inbox.stored == 1


async def test_mass_update_stores_one_hint_per_order(
    sims: World, bridge: Bridge, client: httpx.AsyncClient
) -> None:
    codes = ["2026000101", "2026000102", "OBJ-2026-7"]
    body, headers = signed(sims, payload("order:massUpdate", orjson.dumps(codes).decode()))
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "accepted", "hints": 3}
    assert bridge.inbox.stored == 3
    for code in codes:  # each one is read in Shoptet by the worker (together: orderCodes)
        await eventually(
            lambda code=code: any(
                r.path == f"/api/orders/{code}"
                or (r.path == "/api/orders" and code in unquote(r.query))
                for r in sims.shoptet.requests
            )
        )


@pytest.mark.parametrize("event", ["product:update", "order:delete", "eshop:mandatoryFields"])
async def test_other_events_are_acknowledged_and_ignored(
    refusing: World, refuse: httpx.AsyncClient, event: str
) -> None:
    body, headers = signed(refusing, payload(event, "abc"))
    response = await refuse.post(PATH, content=body, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "event": event}
    await assert_nothing_stored(refusing)


async def test_a_body_of_exactly_the_limit_is_accepted(
    sims: World, bridge: Bridge, client: httpx.AsyncClient
) -> None:
    base = orjson.dumps(payload(pad=""))
    body, headers = signed(sims, payload(pad="x" * (LIMIT - len(base))))
    assert len(body) == LIMIT
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 200, response.text

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = await client.post(PATH, content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.status_code == 200, response.text
    assert bridge.inbox.stored == 2


# --- refused: signature ------------------------------------------------------------------------


async def test_missing_signature_is_401(refusing: World, refuse: httpx.AsyncClient) -> None:
    body, headers = signed(refusing, payload())
    del headers["Shoptet-Webhook-Signature"]
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 401, "unauthorized", "missing", "signature")
    empty = await refuse.post(PATH, content=body, headers={"Shoptet-Webhook-Signature": ""})
    assert_error(empty, 401, "unauthorized", "missing")
    await assert_nothing_stored(refusing)


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda key, body: "0" * 40, id="wrong-signature"),
        pytest.param(lambda key, body: "not hex at all", id="garbage"),
        pytest.param(lambda key, body: hmac_sha1_hex(key, body + b" "), id="other-body"),
        pytest.param(lambda key, body: hmac_sha1_hex("another-key", body), id="other-key"),
        pytest.param(lambda key, body: hmac_sha1_hex(key, body)[:-1], id="truncated"),
        pytest.param(lambda key, body: hmac_sha1_hex(key, body) * 2, id="doubled"),
    ],
)
async def test_forged_signature_is_401(
    refusing: World, refuse: httpx.AsyncClient, forge: Any
) -> None:
    body = orjson.dumps(payload())
    headers = {"Shoptet-Webhook-Signature": forge(refusing.shoptet.signature_key, body)}
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 401, "unauthorized", "does not match")
    await assert_nothing_stored(refusing)


async def test_signature_of_a_different_body_is_401(
    refusing: World, refuse: httpx.AsyncClient
) -> None:
    # A genuine signature, replayed on a body that points at another order.
    _, headers = signed(refusing, payload(instance="2026000001"))
    forged = orjson.dumps(payload(instance="2026000666"))
    response = await refuse.post(PATH, content=forged, headers=headers)
    assert_error(response, 401, "unauthorized", "does not match")
    # The same JSON re-serialised (other key order, spaces) is another body, too.
    _, headers = signed(refusing, payload())
    reordered = orjson.dumps(dict(reversed(list(payload().items()))))
    response = await refuse.post(PATH, content=reordered, headers=headers)
    assert_error(response, 401, "unauthorized")
    await assert_nothing_stored(refusing)


async def test_a_non_ascii_signature_header_is_401_not_500(
    refusing: World, refuse: httpx.AsyncClient
) -> None:
    body = orjson.dumps(payload())
    response = await refuse.post(
        PATH, content=body, headers={"Shoptet-Webhook-Signature": "é".encode("latin-1")}
    )
    assert_error(response, 401, "unauthorized")
    await assert_nothing_stored(refusing)


# --- refused: body -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"{'eshopId': 1}", id="single-quotes"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"[" * 2000 + b"]" * 2000, id="too-deep"),
        pytest.param(b'{"eshopId": NaN}', id="nan"),
    ],
)
async def test_signed_malformed_json_is_400(
    refusing: World, refuse: httpx.AsyncClient, body: bytes
) -> None:
    body, headers = signed(refusing, body)
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 400, "bad_request", "json")
    await assert_nothing_stored(refusing)


_MISSING = object()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("eshopId", _MISSING, "eshopId"),
        ("eshopId", "222651", "eshopId"),
        ("eshopId", 222651.0, "eshopId"),
        ("eshopId", True, "eshopId"),
        ("eshopId", None, "eshopId"),
        ("event", _MISSING, "event"),
        ("event", "", "event"),
        ("event", 5, "event"),
        ("event", ["order:update"], "event"),
        ("eventCreated", _MISSING, "eventCreated"),
        ("eventCreated", 1700000000, "eventCreated"),
        ("eventInstance", _MISSING, "eventInstance"),
        ("eventInstance", "", "eventInstance"),
        ("eventInstance", 2026000042, "eventInstance"),
        ("eventInstance", None, "eventInstance"),
        ("eventInstance", "   ", "order code"),
        ("eventInstance", "20260\n00042", "order code"),
        ("eventInstance", "x" * 101, "order code"),
    ],
)
async def test_missing_or_wrong_typed_fields_are_400(
    refusing: World, refuse: httpx.AsyncClient, field: str, value: Any, words: str
) -> None:
    doc = payload()
    if value is _MISSING:
        del doc[field]
    else:
        doc[field] = value
    body, headers = signed(refusing, doc)
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 400, "bad_request", words)
    await assert_nothing_stored(refusing)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[]", id="list"),
        pytest.param(b'"order:update"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"42", id="number"),
    ],
)
async def test_a_body_that_is_not_an_object_is_400(
    refusing: World, refuse: httpx.AsyncClient, body: bytes
) -> None:
    body, headers = signed(refusing, body)
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 400, "bad_request", "object")
    await assert_nothing_stored(refusing)


@pytest.mark.parametrize(
    "instance",
    [
        pytest.param("2026000001", id="not-a-list"),
        pytest.param("[", id="broken-json"),
        pytest.param('{"a": 1}', id="object"),
        pytest.param("[1.5]", id="float"),
        pytest.param('[null, "2026000001"]', id="null"),
        pytest.param('[["2026000001"]]', id="nested"),
        pytest.param('["ok", ""]', id="empty-code"),
        pytest.param(orjson.dumps(["x" * 101]).decode(), id="code-too-long"),
    ],
)
async def test_a_bad_mass_update_list_is_400_and_stores_none_of_it(
    refusing: World, refuse: httpx.AsyncClient, instance: str
) -> None:
    body, headers = signed(refusing, payload("order:massUpdate", instance))
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 400, "bad_request")
    await assert_nothing_stored(refusing)


async def test_a_mass_update_list_of_booleans_is_400(
    sims: World, bridge: Bridge, client: httpx.AsyncClient
) -> None:
    body, headers = signed(sims, payload("order:massUpdate", "[true, false]"))
    response = await client.post(PATH, content=body, headers=headers)
    assert_error(response, 400, "bad_request")
    await assert_nothing_stored(sims, bridge)


async def test_a_webhook_for_another_eshop_is_400(
    refusing: World, refuse: httpx.AsyncClient
) -> None:
    body, headers = signed(refusing, payload(eshopId=1))
    response = await refuse.post(PATH, content=body, headers=headers)
    assert_error(response, 400, "bad_request", "e-shop 1", "222651")
    await assert_nothing_stored(refusing)


# --- refused: size and framing -----------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_with_content_length(
    refusing: World, refuse: httpx.AsyncClient
) -> None:
    body, headers = signed(refusing, payload(pad="x" * LIMIT))
    response = await refuse.post(PATH, content=body, headers=headers)
    assert response.request.headers["content-length"] == str(len(body))
    assert_error(response, 413, "too_large", str(LIMIT))
    await assert_nothing_stored(refusing)
    assert (await refuse.get("/healthz")).status_code == 200  # still serving


async def test_a_body_over_the_limit_is_413_when_chunked(
    refusing: World, refuse: httpx.AsyncClient
) -> None:
    body, headers = signed(refusing, payload(pad="x" * LIMIT))
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for start in range(0, len(body), 8192):
            sent += 1
            yield body[start : start + 8192]

    response = await refuse.post(PATH, content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "too_large")
    await assert_nothing_stored(refusing)
    assert (await refuse.get("/healthz")).status_code == 200


async def test_a_huge_declared_length_is_refused_without_reading_the_body(refusing: World) -> None:
    # Declares a gigabyte, sends 2 bytes: the answer must come from the header alone.
    request = (
        b"POST /webhooks/shoptet HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{}"
    )
    status, body = await raw_http(refusing.bridge_url, request)
    assert status == 413
    assert orjson.loads(body)["error"] == "too_large"
    await assert_nothing_stored(refusing)


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b"0x10", b"12 34"])
async def test_a_non_numeric_content_length_is_400(
    refusing: World, local: httpx.AsyncClient, value: bytes
) -> None:
    # Over real HTTP, uvicorn (h11) refuses the framing itself before the app runs: a plain
    # 400 from the server, never a 5xx.
    request = (
        b"POST /webhooks/shoptet HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n"
        b"Content-Length: " + value + b"\r\n\r\n{}"
    )
    status, _ = await raw_http(refusing.bridge_url, request)
    assert status == 400
    # The app's own answer (what a server that passes the header on gets): a JSON 400.
    response = await local.post(PATH, content=b"{}", headers={"Content-Length": value})
    assert_error(response, 400, "bad_request", "Content-Length")
    await assert_nothing_stored(refusing)


async def test_a_content_length_of_unicode_digits_is_400(local: httpx.AsyncClient) -> None:
    response = await local.post(PATH, content=b"{}", headers={"Content-Length": b"\xb2"})
    assert_error(response, 400, "bad_request", "Content-Length")


# --- routing -----------------------------------------------------------------------------------


async def test_an_unknown_platform_is_404(refusing: World, refuse: httpx.AsyncClient) -> None:
    body, headers = signed(refusing, payload())
    response = await refuse.post("/webhooks/nope", content=body, headers=headers)
    assert_error(response, 404, "not_found", "nope")
    await assert_nothing_stored(refusing)


async def test_metakocka_has_no_webhook_it_is_polled(
    refusing: World, refuse: httpx.AsyncClient
) -> None:
    response = await refuse.post("/webhooks/metakocka", json={"mk_id": "1"})
    assert_error(response, 404, "not_found", "metakocka", "polled")
    await assert_nothing_stored(refusing)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_webhook_path_are_405(
    refusing: World, refuse: httpx.AsyncClient, method: str
) -> None:
    body, headers = signed(refusing, payload())
    response = await refuse.request(method, PATH, content=body, headers=headers)
    assert_error(response, 405, "method_not_allowed")
    await assert_nothing_stored(refusing)


async def test_a_405_says_which_methods_are_allowed(refuse: httpx.AsyncClient) -> None:
    response = await refuse.get(PATH)
    assert response.status_code == 405
    assert response.headers.get("allow") == "POST"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/webhooks"),
        ("POST", "/webhooks/"),
        ("POST", "/webhooks/shoptet/extra"),
        ("GET", "/healthz/../../etc/passwd"),
        ("POST", "/webhooks/%00"),
        ("POST", "/webhooks/..%2Fhealthz"),
        ("POST", "/api/orders/2026000042/status"),
    ],
)
async def test_an_unknown_path_is_404_json(
    refusing: World, refuse: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await refuse.request(method, path, content=b"{}")
    assert_error(response, 404, "not_found")
    await assert_nothing_stored(refusing)


# --- health and metrics ------------------------------------------------------------------------


async def test_healthz_answers_json(refusing: World, refuse: httpx.AsyncClient) -> None:
    response = await refuse.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "ok", "pending_hints": 0}
    assert_error(await refuse.post("/healthz"), 405, "method_not_allowed")
    await assert_nothing_stored(refusing)


async def test_metrics_count_webhooks_by_outcome(
    sims: World, bridge: Bridge, client: httpx.AsyncClient
) -> None:
    body, headers = signed(sims, payload())
    assert (await client.post(PATH, content=body, headers=headers)).status_code == 200
    assert (await client.post(PATH, content=body)).status_code == 401
    assert (await client.post(PATH, content=b"x" * (LIMIT + 1))).status_code == 413
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "bridge_webhooks_total" in text
    assert metric(text, "bridge_webhooks_total", platform="shoptet", outcome="accepted") == 1
    assert metric(text, "bridge_webhooks_total", platform="shoptet", outcome="rejected_401") == 1
    assert metric(text, "bridge_webhooks_total", platform="shoptet", outcome="too_large") == 1


# --- the store fails ---------------------------------------------------------------------------


async def test_store_locked_webhooks_get_503_and_nothing_is_lost(sims: World) -> None:
    """The database is locked by another writer (a backup, an operator's sqlite3 shell)."""
    sims.add_order(CODE)
    path = str(sims.tmp / "bridge.sqlite3")
    store = SQLiteStore(path, busy_timeout=0.1)  # the real store, impatient for a fast test
    async with (
        serve(sims, store=store, register_webhook=True) as bridge,
        httpx.AsyncClient(base_url=sims.bridge_url, timeout=10) as client,
    ):
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            body, headers = signed(sims, payload())
            response = await client.post(PATH, content=body, headers=headers)
            assert_error(response, 503, "unavailable", "retry")
            assert await bridge.store.pending_hints() == 0
            assert bridge.inbox.stored == 0

            # A real change in Shoptet: its webhook is refused too, and Shoptet will retry it.
            sims.shoptet.set_status_as_person(CODE, SHOPTET["paid"])
            await eventually(
                lambda: any(d.status == 503 for d in sims.shoptet.webhook_deliveries),
                what="Shoptet's first delivery to be refused",
            )
        finally:
            # At once: Shoptet tries three times, 0.2 s apart here, then gives up.
            lock.rollback()
            lock.close()
        metrics = (await client.get("/metrics")).text
        assert (
            metric(
                metrics, "bridge_webhooks_total", platform="shoptet", outcome="store_unavailable"
            )
            >= 2
        )
        # The store is back: Shoptet's retry gets through and the change reaches MetaKocka.
        await eventually(lambda: sims.mk_status(CODE) == MK["paid"], what="MetaKocka paid")
        assert [d.status for d in sims.shoptet.webhook_deliveries][-1] == 200
        # Whoever got the 503 sends again; now it is taken.
        response = await client.post(PATH, content=body, headers=headers)
        assert response.status_code == 200


async def test_store_closed_webhook_and_healthz_answer_503_json(sims: World) -> None:
    async with (
        serve(sims) as bridge,
        httpx.AsyncClient(base_url=sims.bridge_url, timeout=10) as client,
    ):
        await bridge.store.close()
        try:
            body, headers = signed(sims, payload())
            response = await client.post(PATH, content=body, headers=headers)
            assert_error(response, 503, "unavailable")
            health = await client.get("/healthz")
            assert_error(health, 503, "unavailable", "store")
        finally:
            await bridge.store.open()
        response = await client.post(PATH, content=body, headers=headers)
        assert response.status_code == 200
        assert bridge.inbox.stored == 1


async def test_metrics_still_answer_while_the_store_is_closed(sims: World) -> None:
    async with (
        serve(sims) as bridge,
        httpx.AsyncClient(base_url=sims.bridge_url, timeout=10) as client,
    ):
        await bridge.store.close()
        try:
            response = await client.get("/metrics")
        finally:
            await bridge.store.open()
        assert response.status_code in (200, 503), response.text


# --- fuzz --------------------------------------------------------------------------------------

_int64 = st.integers(-(2**63), 2**63 - 1)  # orjson's range
_json_scalars = st.none() | st.booleans() | _int64 | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
_codes = st.lists(st.text(max_size=12) | _int64 | st.booleans() | st.none(), max_size=4)


def _mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> Any:
    """``valid`` three times in four, else ``junk`` (a plain ``|`` would weigh every branch of
    a nested one_of the same)."""
    return st.integers(0, 3).flatmap(lambda i: junk if i == 0 else valid)


# Each field mostly right, sometimes anything: deep enough to get past every check in turn.
_fields = {
    "eshopId": _mostly(st.just(222651), _json_scalars),
    "event": _mostly(
        st.sampled_from(["order:update", "order:massUpdate", "order:create", "x:y"]),
        st.text(max_size=20) | _json_scalars,
    ),
    "eventCreated": _mostly(st.just("2026-11-22T10:00:00+0100"), _json_scalars),
    "eventInstance": _mostly(
        st.text(max_size=30) | _codes.map(lambda v: orjson.dumps(v).decode()), _json_scalars
    ),
}
_near_valid = _mostly(
    st.fixed_dictionaries(_fields), st.fixed_dictionaries({}, optional=_fields)
).map(orjson.dumps)
_bodies = st.one_of(
    _near_valid, _near_valid, _near_valid, st.binary(max_size=300), _json.map(orjson.dumps)
)
# Header values a real HTTP server passes on: visible ASCII and spaces (non-ASCII ones are
# covered by the tests above).
_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_headers = st.dictionaries(
    st.sampled_from(["content-type", "content-encoding", "x-forwarded-for", "transfer-encoding"]),
    _header_text,
    max_size=2,
)
_content_length = st.one_of(
    st.none(), st.none(), st.none(), st.integers(0, 2 * LIMIT).map(str), _header_text
)


@contextlib.contextmanager
def _loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_fuzz_random_bodies_and_headers_never_give_a_5xx(sims: World) -> None:
    bridge = Bridge(sims.settings(), mapping=MAPPING, run_pollers=False)
    key = sims.shoptet.signature_key
    accepted = 0
    seen: set[int] = set()
    with _loop() as loop:
        loop.run_until_complete(bridge.start())
        transport = httpx.ASGITransport(app=bridge.app, raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://bridge")
        try:

            @hsettings(
                max_examples=50,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(
                body=_bodies,
                signature=st.sampled_from(["valid"] * 4 + ["missing", "random", "upper"]),
                random_signature=_header_text,
                headers=_headers,
                content_length=_content_length,
                path=st.sampled_from([PATH] * 6 + ["/webhooks/metakocka", "/webhooks/x", "/"]),
            )
            def check(
                body: bytes,
                signature: str,
                random_signature: str,
                headers: dict[str, str],
                content_length: str | None,
                path: str,
            ) -> None:
                nonlocal accepted
                headers = dict(headers)
                if content_length is not None:
                    headers["content-length"] = content_length
                if signature == "valid":
                    headers["shoptet-webhook-signature"] = hmac_sha1_hex(key, body)
                elif signature == "upper":
                    headers["shoptet-webhook-signature"] = hmac_sha1_hex(key, body).upper()
                elif signature == "random":
                    headers["shoptet-webhook-signature"] = random_signature
                before = bridge.inbox.stored
                response = loop.run_until_complete(client.post(path, content=body, headers=headers))
                assert response.status_code < 500, (response.status_code, response.text)
                assert response.headers["content-type"].startswith("application/json")
                answer = response.json()
                seen.add(response.status_code)
                if response.status_code == 200:
                    assert answer["status"] in ("accepted", "ignored")
                    stored = answer.get("hints", 0)
                    assert bridge.inbox.stored == before + stored
                    accepted += stored
                else:
                    assert 400 <= response.status_code < 500
                    assert set(answer) == {"error", "detail"}
                    assert bridge.inbox.stored == before  # a refusal stores nothing

            check()
            assert loop.run_until_complete(bridge.store.pending_hints()) <= accepted
            assert 200 in seen and len(seen) >= 3, seen  # the fuzz got past the checks, too
        finally:
            loop.run_until_complete(client.aclose())
            loop.run_until_complete(bridge.stop())
