"""SIGKILL at any moment loses no accepted hint and leaves no write half-recorded.

The bridge runs as a real subprocess (``python -m bridge serve``) on a real SQLite file. The
test sends signed Shoptet webhooks itself, so it knows exactly which ones the bridge accepted
(answered 200), kills the bridge with SIGKILL at random moments while webhooks, reads and
writes are in flight, restarts it, and finally checks that every accepted change reached
MetaKocka and that the store agrees with what the platforms show.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread
from bridge.sandbox.shoptet import ShoptetSimulator
from bridge.signing import hmac_sha1_hex
from bridge.store.sqlite import SQLiteStore
from tests.integration.conftest import MK, SHOPTET, eventually
from tests.mappings import mapping_file

pytestmark = pytest.mark.integration

STEPS = ["paid", "processing", "shipped", "completed", "cancelled"]
MK_STEPS = {**MK, "completed": "completed", "cancelled": "canceled"}
ORDERS = [f"2026100{i:03d}" for i in range(60)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BridgeProcess:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("bridge did not become healthy:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def sims() -> Iterator[tuple[ShoptetSimulator, str, MetaKockaSimulator, str]]:
    # A slow MetaKocka keeps writes in flight long enough for kills to land on them.
    shoptet = ShoptetSimulator(lock_seconds=0.0)
    metakocka = MetaKockaSimulator(call_latency=0.05)
    with ServerThread(shoptet.app) as s, ServerThread(metakocka.app) as m:
        yield shoptet, s.url, metakocka, m.url
    shoptet.close()


async def test_sigkill_at_any_moment_loses_nothing_accepted(
    sims: tuple[ShoptetSimulator, str, MetaKockaSimulator, str], tmp_path: Path
) -> None:
    shoptet, shoptet_url, metakocka, metakocka_url = sims
    mk_ids = {}
    for code in ORDERS:
        shoptet.add_order(code, SHOPTET["new"])
        mk_ids[code] = metakocka.add_order(code, MK["new"])
    database = tmp_path / "bridge.sqlite3"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "BRIDGE_DATABASE_URL": f"sqlite:///{database}",
        "BRIDGE_MAPPING_FILE": str(mapping_file(tmp_path)),
        "BRIDGE_SHOPTET_BASE_URL": shoptet_url,
        "BRIDGE_SHOPTET_API_TOKEN": shoptet.token,
        "BRIDGE_SHOPTET_WEBHOOK_KEY": shoptet.signature_key,
        "BRIDGE_METAKOCKA_BASE_URL": f"{metakocka_url}/rest/eshop/v1",
        "BRIDGE_METAKOCKA_COMPANY_ID": metakocka.company_id,
        "BRIDGE_METAKOCKA_SECRET_KEY": metakocka.secret_key,
        "BRIDGE_METAKOCKA_POLL_INTERVAL_SECONDS": "0.5",
        "BRIDGE_HINT_LEASE_SECONDS": "1",
        "BRIDGE_DELIVERY_LEASE_SECONDS": "1",
        "BRIDGE_RETRY_BASE_SECONDS": "0.05",
        "BRIDGE_RETRY_CAP_SECONDS": "0.5",
        "BRIDGE_IDLE_CHECK_SECONDS": "0.05",
        "BRIDGE_LOG_LEVEL": "warning",
    }
    bridge = BridgeProcess(env, free_port(), tmp_path / "bridge.log")
    rng = random.Random(20261122)
    accepted: dict[str, str] = {}  # order -> the last step whose webhook got a 200
    refused = 0
    kills_with_work_pending = 0

    async def send(client: httpx.AsyncClient, code: str, step: str) -> None:
        nonlocal refused
        body = orjson.dumps(
            {
                "eshopId": shoptet.eshop_id,
                "event": "order:update",
                "eventCreated": "2026-11-22T10:00:00+0100",
                "eventInstance": code,
            }
        )
        headers = {
            "Shoptet-Webhook-Signature": hmac_sha1_hex(shoptet.signature_key, body),
            "Content-Type": "application/json",
        }
        try:
            answer = await client.post(
                f"{bridge.url}/webhooks/shoptet", content=body, headers=headers
            )
        except httpx.HTTPError:
            refused += 1
            return
        if answer.status_code == 200:
            accepted[code] = step
        else:
            refused += 1

    try:
        for round_no, step in enumerate(STEPS):
            bridge.start()
            for code in ORDERS:
                shoptet.set_status_as_person(code, SHOPTET[step])  # no webhook registered
            async with httpx.AsyncClient(
                timeout=5, limits=httpx.Limits(max_connections=20)
            ) as client:
                sending = asyncio.gather(*(send(client, code, step) for code in ORDERS))
                # Kill somewhere between mid-ingest and mid-delivery.
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                pending = await _pending_work(database)
                kills_with_work_pending += pending > 0
                bridge.kill()
                await sending
            if round_no == 1:
                # One restart that lives long enough to finish what was accepted so far.
                bridge.start()
                await asyncio.sleep(1.5)
                bridge.kill()

        bridge.start()
        # A hint makes the bridge read the order's *current* status, so an accepted webhook
        # guarantees at least its own step (later steps may have been read already).
        step_of = {MK_STEPS[step]: i for i, step in enumerate(STEPS)}

        def behind() -> dict[str, tuple[str, str]]:
            late = {}
            for code, step in accepted.items():
                actual = metakocka.order(mk_ids[code])["status_desc"]
                if step_of.get(actual, -1) < STEPS.index(step):
                    late[code] = (actual, MK_STEPS[step])
            return late

        with contextlib.suppress(AssertionError):
            await eventually(lambda: not behind(), within=30)
        assert not behind(), f"accepted changes that never arrived (actual, expected): {behind()}"

        # Writes whose record a kill prevented are redone once their lease runs out.
        async def settled() -> bool:
            return await _pending_work(database) == 0

        await eventually(settled, within=30, what="the store to have no work left")
    finally:
        bridge.stop()

    # The kills really landed in the middle of work, and some webhooks really were refused.
    assert kills_with_work_pending >= 2
    assert len(accepted) >= len(ORDERS) // 2
    # Nothing half-recorded: the store's view matches what MetaKocka shows, nothing is left over.
    store = SQLiteStore(str(database))
    await store.open()
    try:
        assert await store.pending_hints() == 0
        assert await store.pending_deliveries() == 0
        assert await store.list_problems() == []
        for code in accepted:
            order = await store.load_order(code)
            assert order is not None
            mk_state = order.platforms["metakocka"]
            actual = metakocka.order(mk_ids[code])["status_desc"]
            # A write whose record a kill prevented is either redone and recorded, or seen
            # by the poller and its pending row superseded: either way the store knows it.
            assert mk_state.last_seen == actual
    finally:
        await store.close()
    # Each accepted step is written at most once per order, except where a kill fell between
    # a write and its record (then the same status is written again, which is harmless).
    changes = [c for c in metakocka.requests if c.method == "change_document_status" and c.answer]
    assert len(changes) <= len(ORDERS) * len(STEPS) * 2
    # Shoptet is where every change started: the bridge never had a reason to write there.
    assert [r for r in shoptet.requests if r.method == "PATCH"] == []


async def _pending_work(database: Path) -> int:
    """Hints plus pending writes in the bridge's store, read beside the running bridge."""
    if not await asyncio.to_thread(database.exists):
        return 0
    store = SQLiteStore(str(database))
    await store.open()
    try:
        return await store.pending_hints() + await store.pending_deliveries()
    finally:
        await store.close()
