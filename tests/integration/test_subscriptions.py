"""Webhook subscriptions kept right, against the simulators over real HTTP.

Start-up checks (and registers) Shoptet's webhooks; `bridge shoptet-webhooks` does the same
on demand; `bridge shoptet-renew-key`, run in another process, renews the signature key while
a bridge keeps serving; with OAuth the bridge checks Bitrix24's event handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from bridge.service import Bridge
from bridge.subscriptions import SIGNATURE_KEY_VALUE
from tests.integration.conftest import MK, SHOPTET, World, agreed_on, eventually, running_bridge

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
FOREIGN = "https://erp.example.com/hooks/shoptet"


# -- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(world: World, **overrides: Any) -> AsyncIterator[Bridge]:
    """A bridge served on a port chosen before it starts, so BRIDGE_PUBLIC_URL can name it.

    (The harness's running_bridge learns its URL only once the bridge has started, too late
    for the start-up check.) No pollers: a change can only arrive by webhook.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = world.settings(**{"public_url": url, **overrides})
    bridge = Bridge(settings, mapping=world.mapping, run_pollers=False)
    config = uvicorn.Config(bridge.app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or task.done(), what="the bridge to start")
        if task.done():
            task.result()
        assert bridge.subscriptions_checked is not None
        await bridge.subscriptions_checked
        world.bridge, world.bridge_url = bridge, url  # the served address, whatever is public
        yield bridge
    finally:
        server.should_exit = True
        await task
        sock.close()


def webhooks(world: World) -> list[tuple[str, str]]:
    """(event, url) of every webhook Shoptet has, in id order."""
    answer = httpx.get(
        f"{world.shoptet_url}/api/webhooks",
        params={"itemsPerPage": "500"},
        headers={"Shoptet-Private-API-Token": world.shoptet.token},
    ).json()
    return [(w["event"], w["url"]) for w in answer["data"]["webhooks"]]


def webhook_calls(world: World) -> list[tuple[str, Any]]:
    """The bridge's calls to /api/webhooks that change something: (method, JSON body)."""
    return [
        (r.method, json.loads(r.body) if r.body else None)
        for r in world.shoptet.requests
        if r.path.startswith("/api/webhooks") and r.method != "GET"
    ]


def signed(key: str, code: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "eshopId": 222651,
            "event": "order:update",
            "eventCreated": "2026-11-22T10:00:00+0100",
            "eventInstance": code,
        }
    ).encode()
    signature = hmac.new(key.encode(), body, hashlib.sha1).hexdigest()
    return body, {"Content-Type": "application/json", "Shoptet-Webhook-Signature": signature}


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return " ".join(self.out.split())


def environment(world: World, **settings: str) -> dict[str, str]:
    """A bare environment: the same store and Shoptet as the world's bridge, nothing else."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(world.tmp),
        "PYTHONPATH": str(REPO),
        "BRIDGE_DATABASE_URL": f"sqlite:///{world.tmp / 'bridge.sqlite3'}",
        "BRIDGE_SHOPTET_BASE_URL": world.shoptet_url,
        "BRIDGE_SHOPTET_API_TOKEN": world.shoptet.token,
    }
    env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items()})
    return env


async def run(env: dict[str, str], *args: str) -> Run:
    """The real command in a subprocess; in a thread, so a bridge in this loop keeps serving."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bridge", *args],
        env=env,
        cwd=env["HOME"],  # no .env file there
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def count_key_reads(bridge: Bridge) -> list[int]:
    """Count the bridge's reads of the stored key from now on (in a one-item list)."""
    reads = [0]
    read = bridge.store.get_watermark

    async def counting(name: str) -> str | None:
        reads[0] += name == SIGNATURE_KEY_VALUE
        return await read(name)

    bridge.store.get_watermark = counting  # type: ignore[method-assign]
    return reads


# -- start-up -------------------------------------------------------------------------------


async def test_start_registers_exactly_the_missing_ones_and_never_twice(sims: World) -> None:
    async with served(sims, register_webhooks=True) as bridge:
        url = f"{sims.bridge_url}/webhooks/shoptet"
        sims.shoptet.register_webhook("orderStatusesList:change", FOREIGN)  # not ours: untouched
        assert webhooks(sims) == [
            ("order:update", url),
            ("order:massUpdate", url),
            ("orderStatusesList:change", FOREIGN),
        ]
        assert webhook_calls(sims) == [
            (
                "POST",
                {
                    "data": [
                        {"event": "order:update", "url": url},
                        {"event": "order:massUpdate", "url": url},
                    ]
                },
            )
        ]
        # What was registered works: a change made in Shoptet reaches MetaKocka (no pollers).
        sims.add_order("S1")
        sims.shoptet.set_status_as_person("S1", SHOPTET["paid"])
        await eventually(lambda: sims.mk_status("S1") == MK["paid"], what="the change to arrive")
        assert await agreed_on(sims, "S1", "paid")
        calls = bridge.metrics.registry.get_sample_value(
            "bridge_api_calls_total", {"platform": "shoptet", "method": "POST /api/webhooks"}
        )
        assert calls == 1

    # Started again (same store, same Shoptet): everything is there, nothing is registered.
    sims.shoptet.requests.clear()
    async with served(sims, register_webhooks=True):
        pass
    assert webhook_calls(sims) == []
    assert [r.path for r in sims.shoptet.requests if r.path.startswith("/api/webhooks")] == [
        "/api/webhooks"
    ]


async def test_only_the_missing_one_is_registered(sims: World) -> None:
    # The check does not need the public address to reach this test's bridge.
    public = "https://bridge.example.com"
    url = f"{public}/webhooks/shoptet"
    sims.shoptet.register_webhook("order:massUpdate", url)
    async with served(sims, public_url=public, register_webhooks=True):
        pass
    assert webhook_calls(sims) == [("POST", {"data": [{"event": "order:update", "url": url}]})]
    assert webhooks(sims) == [("order:massUpdate", url), ("order:update", url)]


async def test_a_foreign_url_is_reported_not_deleted(
    sims: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.subscriptions")
    sims.shoptet.register_webhook("order:update", FOREIGN)
    async with served(sims, register_webhooks=True):
        url = f"{sims.bridge_url}/webhooks/shoptet"
    # Only order:massUpdate was registered; the foreign order:update is exactly as it was.
    assert webhooks(sims) == [("order:update", FOREIGN), ("order:massUpdate", url)]
    assert [method for method, _ in webhook_calls(sims)] == ["POST"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"Shoptet: webhook 1 sends order:update to {FOREIGN}, not to this bridge; left as it "
        "is: repoint or delete it in Shoptet if this bridge should get the event"
    ]


async def test_missing_ones_are_only_logged_without_registration(
    sims: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.subscriptions")
    async with served(sims):
        url = f"{sims.bridge_url}/webhooks/shoptet"
    assert webhooks(sims) == []
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"Shoptet: missing: order:update, order:massUpdate -> {url} (")


async def test_a_platform_down_does_not_stop_the_start(
    sims: World, caplog: pytest.LogCaptureFixture
) -> None:
    sims.shoptet.set_down(True)
    async with served(sims, register_webhooks=True):
        async with httpx.AsyncClient() as http:  # the bridge serves from this very loop
            health = await http.get(f"{sims.bridge_url}/healthz")
        assert health.status_code == 200
    sims.shoptet.set_down(False)
    assert webhooks(sims) == []
    assert [r.getMessage() for r in caplog.records if r.name == "bridge.subscriptions"] == [
        "could not check Shoptet's webhooks: GET /api/webhooks: system-maintenance: "
        "System maintenance. Please try later."
    ]


# -- the shoptet-webhooks command -----------------------------------------------------------


async def test_webhooks_command_reports_registers_and_exits_accordingly(sims: World) -> None:
    public = "http://bridge.example.com:8080"
    url = f"{public}/webhooks/shoptet"
    env = environment(sims, public_url=public)

    result = await run(env, "shoptet-webhooks")
    assert result.code == 1, result.err
    assert result.text.startswith(
        f"Shoptet webhooks for {url} warning: missing: order:update, order:massUpdate -> {url}"
    )
    assert webhooks(sims) == []

    result = await run(env, "shoptet-webhooks", "--register", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [(w["event"], w["url"]) for w in report["registered"]] == [
        ("order:update", url),
        ("order:massUpdate", url),
    ]
    assert report["uncovered"] == []
    assert webhooks(sims) == [("order:update", url), ("order:massUpdate", url)]

    result = await run(env, "shoptet-webhooks", "--register")
    assert result.code == 0, result.err
    assert result.text == (
        f"Shoptet webhooks for {url} ok: order:update (webhook 1) ok: order:massUpdate "
        f"(webhook 2) order:update, order:massUpdate -> {url}: all registered"
    )
    assert [m for m, _ in webhook_calls(sims)] == ["POST"]  # the second run registered nothing


async def test_webhooks_command_with_a_foreign_url_exits_1(sims: World) -> None:
    sims.shoptet.register_webhook("order:update", FOREIGN)
    env = environment(sims, public_url="https://bridge.example.com")
    result = await run(env, "shoptet-webhooks", "--register", "--json")
    assert result.code == 1, result.err
    report = json.loads(result.out)
    assert report["elsewhere"] == [{"id": 1, "event": "order:update", "url": FOREIGN}]
    assert report["uncovered"] == ["order:update"]
    assert webhooks(sims)[0] == ("order:update", FOREIGN)


async def test_webhooks_command_needs_the_public_url(sims: World) -> None:
    result = await run(environment(sims), "shoptet-webhooks")
    assert result.code == 2
    assert "BRIDGE_PUBLIC_URL is not set" in result.err
    assert sims.shoptet.requests == []


# -- renewing the signature key -------------------------------------------------------------


async def test_renewal_by_the_command_keeps_a_running_bridge_verifying(sims: World) -> None:
    old_key = sims.shoptet.signature_key
    async with running_bridge(sims) as bridge:
        sims.add_order("K1")
        result = await run(environment(sims), "shoptet-renew-key")
        new_key = sims.shoptet.signature_key
        assert result.code == 0, result.err
        assert new_key != old_key
        assert new_key not in result.out + result.err
        assert f"bridge.sqlite3, named value '{SIGNATURE_KEY_VALUE}'" in result.text
        assert await bridge.store.get_watermark(SIGNATURE_KEY_VALUE) == new_key

        # Shoptet now signs with the new key; the bridge takes it from the store and accepts.
        sims.shoptet.set_status_as_person("K1", SHOPTET["paid"])
        await eventually(lambda: sims.mk_status("K1") == MK["paid"], what="the change to arrive")
        first = next(d for d in sims.shoptet.webhook_deliveries if d.instance == "K1")
        assert (first.status, first.attempt) == (200, 1)
        assert bridge.settings.shoptet_webhook_key == SecretStr(new_key)

        # The old key is dead here too.
        async with httpx.AsyncClient(base_url=sims.bridge_url) as http:
            body, headers = signed(old_key, "K1")
            refused = await http.post("/webhooks/shoptet", content=body, headers=headers)
            body, headers = signed(new_key, "K1")
            accepted = await http.post("/webhooks/shoptet", content=body, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["detail"] == "Shoptet-Webhook-Signature does not match the body"
        assert accepted.status_code == 200


async def test_forged_webhooks_do_not_hammer_the_store(sims: World) -> None:
    async with running_bridge(sims, register_webhook=False) as bridge:
        reads = count_key_reads(bridge)
        async with httpx.AsyncClient(base_url=sims.bridge_url) as http:
            for i in range(20):
                body, headers = signed("forged", f"F{i}")
                answer = await http.post("/webhooks/shoptet", content=body, headers=headers)
                assert answer.status_code == 401
        assert reads == [1]  # once, then not again within BRIDGE_SHOPTET_KEY_RELOAD_SECONDS


async def test_webhooks_arriving_together_after_a_renewal_share_one_reload(sims: World) -> None:
    async with running_bridge(sims, register_webhook=False) as bridge:
        sims.add_order("K3")
        await bridge.store.set_watermark(SIGNATURE_KEY_VALUE, "renewed-elsewhere")
        reads = count_key_reads(bridge)
        async with httpx.AsyncClient(base_url=sims.bridge_url) as http:
            answers = await asyncio.gather(
                *(
                    http.post("/webhooks/shoptet", content=body, headers=headers)
                    for body, headers in [signed("renewed-elsewhere", "K3")] * 10
                )
            )
        # The first to fail re-reads the key; one failing alongside it (within the reload
        # interval) finds the key in use is no longer the one it tried, and tries again.
        assert [a.status_code for a in answers] == [200] * 10
        assert reads == [1]


async def test_show_prints_the_key_and_a_bridge_started_later_uses_it(sims: World) -> None:
    old_key = sims.shoptet.signature_key
    result = await run(environment(sims), "shoptet-renew-key", "--show")
    assert result.code == 0, result.err
    new_key = sims.shoptet.signature_key
    assert new_key != old_key
    assert result.out.splitlines()[-1] == new_key
    # Its settings still say the old key; the stored one wins.
    async with running_bridge(sims) as bridge:
        assert bridge.settings.shoptet_webhook_key == SecretStr(new_key)
        sims.add_order("K2")
        sims.shoptet.set_status_as_person("K2", SHOPTET["paid"])
        await eventually(lambda: sims.mk_status("K2") == MK["paid"], what="the change to arrive")


async def test_renewal_refused_by_shoptet_stores_nothing(sims: World) -> None:
    old_key = sims.shoptet.signature_key
    sims.shoptet.fail_next(1, 503)
    result = await run(environment(sims), "shoptet-renew-key")
    assert result.code == 2
    assert "Shoptet: POST /api/webhooks/renew-signature-key: system-maintenance" in " ".join(
        result.err.split()
    )
    assert sims.shoptet.signature_key == old_key
    async with running_bridge(sims, register_webhook=False) as bridge:
        assert await bridge.store.get_watermark(SIGNATURE_KEY_VALUE) is None


# -- Bitrix24 -------------------------------------------------------------------------------


def bind(world: World, access: str, event: str, handler: str) -> None:
    """Bind a handler as the application would (event.bind with its access token)."""
    answer = httpx.post(
        f"{world.bitrix_url}/rest/event.bind",
        json={"auth": access, "event": event, "handler": handler},
    )
    assert answer.json()["result"] is True


def oauth(world: World, access: str, refresh: str) -> dict[str, Any]:
    """Settings of a local application instead of the inbound webhook."""
    assert world.bitrix is not None
    return {
        "bitrix24_access_token": SecretStr(access),
        "bitrix24_webhook_url": None,
        "bitrix24_portal_url": world.bitrix_url + "/rest",
        "bitrix24_client_id": world.bitrix.client_id,
        "bitrix24_client_secret": SecretStr(world.bitrix.client_secret),
        "bitrix24_refresh_token": SecretStr(refresh),
        "bitrix24_oauth_url": world.bitrix_url + "/oauth/token/",
    }


async def test_bitrix24_oauth_logs_a_missing_handler(
    sims3: World, caplog: pytest.LogCaptureFixture
) -> None:
    assert sims3.bitrix is not None
    caplog.set_level(logging.INFO, logger="bridge.subscriptions")
    public = "https://bridge.example.com"
    handler = f"{public}/webhooks/bitrix24"
    access, refresh = sims3.bitrix.issue_oauth_tokens()
    if sims3.mode == "deals":  # one of the two bound: the other is reported
        bind(sims3, access, "OnCrmDealAdd", handler)
    bind(sims3, access, "OnSaleOrderSaved", "https://elsewhere.example.com/b24")  # not ours
    sims3.bitrix.requests.clear()
    async with served(sims3, **oauth(sims3, access, refresh), public_url=public):
        pass
    assert [c.method for c in sims3.bitrix.requests if c.method.startswith("event.")] == [
        "event.get"
    ]
    missing = "ONSALEORDERSAVED" if sims3.mode == "orders" else "ONCRMDEALUPDATE"
    assert [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.subscriptions" and "Bitrix24" in r.getMessage()
    ] == [
        f"Bitrix24: no handler for {missing} at {handler}; bind it (event.bind) or the bridge "
        "only sees these changes when it polls"
    ]


async def test_bitrix24_inbound_webhook_skips_the_check(
    sims3: World, caplog: pytest.LogCaptureFixture
) -> None:
    assert sims3.bitrix is not None
    caplog.set_level(logging.DEBUG, logger="bridge.subscriptions")
    async with served(sims3, public_url="https://bridge.example.com"):
        pass
    assert [c for c in sims3.bitrix.requests if c.method.startswith("event.")] == []
    [note] = [r for r in caplog.records if "Bitrix24" in r.getMessage()]
    assert note.levelno == logging.DEBUG
    assert "event.get needs OAuth" in note.getMessage()
