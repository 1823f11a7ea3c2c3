"""``bridge bitrix24-statuses``: the real command, in a subprocess, against a simulated portal.

The command only talks to Bitrix24, so the environment holds Bitrix24's settings and nothing
of Shoptet or MetaKocka, although the mapping file maps all three platforms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.config import Settings
from bridge.platforms.base import ClientContext, ReadFailed
from bridge.platforms.bitrix24 import TOKENS_VALUE, B24Error, Bitrix24Client
from bridge.sandbox.bitrix24 import (
    DEFAULT_DEAL_STAGES,
    DEFAULT_SALE_STATUSES,
    Bitrix24Simulator,
    DealStage,
    RecordedCall,
    SaleStatus,
)
from bridge.sandbox.server import ServerThread
from bridge.store.sqlite import SQLiteStore
from tests.integration.conftest import PROCESSING_STATUS
from tests.mappings import mapping_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
ALL_THREE = ("shoptet", "metakocka", "bitrix24")
# The example mapping's Bitrix24 order statuses and what they mean.
ORDER_STATUSES = {
    "N": "new",
    "P": "paid",
    "PR": "processing",
    "S": "shipped",
    "F": "completed",
    "D": "cancelled",
}
PIPELINE_0 = [
    "NEW",
    "PREPARATION",
    "PREPAYMENT_INVOICE",
    "EXECUTING",
    "FINAL_INVOICE",
    "WON",
    "LOSE",
]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout with whitespace (and so the console's line wrapping) collapsed."""
        return " ".join(self.out.split())

    @property
    def error(self) -> str:
        return " ".join(self.err.split())

    def json(self) -> Any:
        return json.loads(self.out)


class Portal:
    def __init__(self, sim: Bitrix24Simulator, url: str) -> None:
        self.sim = sim
        self.url = url

    @property
    def webhook_url(self) -> str:
        return self.url + self.sim.webhook_path

    def calls(self, method: str) -> list[RecordedCall]:
        return [c for c in self.sim.requests if c.method == method]

    def statuses(self) -> dict[str, dict[str, Any]]:
        """The portal's sale statuses as its API lists them."""
        answer = httpx.post(self.webhook_url + "sale.status.list", json={}).json()
        return {s["id"]: s for s in answer["result"]["statuses"]}


@contextlib.contextmanager
def serving(
    mode: str = "orders",
    sale_statuses: Iterable[SaleStatus] = (*DEFAULT_SALE_STATUSES, PROCESSING_STATUS),
    deal_stages: Iterable[DealStage] = DEFAULT_DEAL_STAGES,
) -> Iterator[Portal]:
    sim = Bitrix24Simulator(
        mode=mode,  # type: ignore[arg-type]
        sale_statuses=sale_statuses,
        deal_stages=deal_stages,
    )
    try:
        with ServerThread(sim.app) as server:
            yield Portal(sim, server.url)
    finally:
        sim.close()


def environment(tmp_path: Path, mode: str = "orders", **settings: str) -> dict[str, str]:
    """A bare environment (no colours, no terminal width, no settings of the caller's)."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'bridge.sqlite3'}",
        "BRIDGE_MAPPING_FILE": str(mapping_file(tmp_path, ALL_THREE, mode)),
        "BRIDGE_BITRIX24_MODE": mode,
        "BRIDGE_BITRIX24_APPLICATION_TOKEN": "sim-app-token",
    }
    env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items()})
    return env


def webhook_env(tmp_path: Path, portal: Portal, mode: str = "orders") -> dict[str, str]:
    return environment(tmp_path, mode, bitrix24_webhook_url=portal.webhook_url)


def run(env: dict[str, str], *args: str) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "bitrix24-statuses", *args],
        env=env,
        cwd=env["HOME"],  # no .env file there
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- orders mode ----------------------------------------------------------------------------


def test_every_status_present_lists_them_and_exits_0(tmp_path: Path) -> None:
    with serving() as portal:
        result = run(webhook_env(tmp_path, portal))
        assert portal.calls("sale.status.update") == []
    assert result.code == 0, result.err
    assert result.err == ""
    assert "Bitrix24 (orders mode) defines: N, P, PR, S, D, F" in result.text
    assert "every mapped status exists on the portal" in result.text
    assert "missing" not in result.text
    assert (
        "xmlId is not the canonical key on: D, F, N, P, PR, S (run with --stamp to write it)"
        in result.text
    )


def test_json_output_parses(tmp_path: Path) -> None:
    with serving() as portal:
        result = run(webhook_env(tmp_path, portal), "--json")
    assert result.code == 0, result.err
    assert result.json() == {
        "mode": "orders",
        "defined": ["N", "P", "PR", "S", "D", "F"],
        "missing": {},
        "unstamped": ["D", "F", "N", "P", "PR", "S"],
        "stamped": [],
    }


def test_stamp_writes_each_canonical_key_into_its_status_xml_id(tmp_path: Path) -> None:
    with serving() as portal:
        env = webhook_env(tmp_path, portal)
        result = run(env, "--stamp")
        assert result.code == 0, result.err
        updates = portal.calls("sale.status.update")
        # type is required by sale.status.update, even when it does not change.
        assert {c.params["id"]: c.params["fields"] for c in updates} == {
            native: {"type": "O", "xmlId": canonical}
            for native, canonical in ORDER_STATUSES.items()
        }
        assert {c.http_status for c in updates} == {200}
        statuses = portal.statuses()
        assert {n: statuses[n]["xmlId"] for n in ORDER_STATUSES} == ORDER_STATUSES
        # Statuses the mapping does not use (the delivery ones) are left alone.
        assert {statuses[n]["xmlId"] for n in ("DN", "DD", "DF")} == {None}

        again = run(env, "--stamp", "--json")
        assert len(portal.calls("sale.status.update")) == len(updates)  # nothing left to do
    assert "stamped xmlId on: D, F, N, P, PR, S" in result.text
    assert "every mapped status exists on the portal" in result.text
    assert again.code == 0, again.err
    assert again.json()["unstamped"] == []
    assert again.json()["stamped"] == []


def test_a_missing_status_is_named_with_its_canonical_status_and_exits_1(tmp_path: Path) -> None:
    with serving(sale_statuses=DEFAULT_SALE_STATUSES) as portal:  # no "PR"
        env = webhook_env(tmp_path, portal)
        result = run(env)
        stamped = run(env, "--stamp")
        as_json = run(env, "--json")
        # Nothing is stamped while a status is missing.
        assert portal.calls("sale.status.update") == []
    assert result.code == 1, result.err
    assert "missing: PR (mapped as 'processing') is not on the portal" in result.text
    assert "every mapped status exists" not in result.text
    assert stamped.code == 1
    assert "PR (mapped as 'processing')" in stamped.text
    assert as_json.code == 1
    assert as_json.json()["missing"] == {"PR": "processing"}
    assert as_json.json()["defined"] == ["N", "P", "S", "D", "F"]


# -- deals mode -----------------------------------------------------------------------------


def test_deals_mode_lists_the_pipeline_stages(tmp_path: Path) -> None:
    with serving("deals") as portal:
        env = webhook_env(tmp_path, portal, "deals")
        result = run(env)
        as_json = run(env, "--json")
        stamped = run(env, "--stamp")
        assert portal.calls("sale.status.update") == []  # deal stages have no xmlId
        listed = portal.calls("crm.status.list")
        assert {c.params["filter"]["ENTITY_ID"] for c in listed} == {"DEAL_STAGE"}
    assert result.code == 0, result.err
    assert f"Bitrix24 (deals mode) defines: {', '.join(PIPELINE_0)}" in result.text
    assert "C1:" not in result.out
    assert "every mapped status exists on the portal" in result.text
    assert as_json.code == 0
    assert as_json.json()["defined"] == PIPELINE_0
    assert as_json.json()["missing"] == {}
    assert stamped.code == 0
    assert "stamped" not in stamped.text


def test_deals_mode_names_a_missing_stage(tmp_path: Path) -> None:
    stages = [s for s in DEFAULT_DEAL_STAGES if s.status_id != "EXECUTING"]
    with serving("deals", deal_stages=stages) as portal:
        result = run(webhook_env(tmp_path, portal, "deals"))
    assert result.code == 1
    assert "missing: EXECUTING (mapped as 'processing') is not on the portal" in result.text


def test_deals_mode_with_the_stages_in_another_pipeline_is_a_config_error(
    tmp_path: Path,
) -> None:
    with serving("deals") as portal:
        env = webhook_env(tmp_path, portal, "deals")
        env["BRIDGE_BITRIX24_DEAL_CATEGORY"] = "1"
        result = run(env)
        assert portal.sim.requests == []
    assert result.code == 2
    assert "Traceback" not in result.err
    assert "deal stages EXECUTING, FINAL_INVOICE, LOSE, NEW, PREPARATION, WON" in result.error
    assert "not in pipeline 1" in result.error


# -- failures -------------------------------------------------------------------------------


def test_an_unreachable_portal_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/rest/1/code/"
    result = run(environment(tmp_path, bitrix24_webhook_url=url))
    assert result.code == 2
    assert result.out == ""
    assert "Traceback" not in result.err
    assert result.error.startswith("error: Bitrix24: sale.status.list: ConnectError")


def test_an_unreachable_portal_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/rest/1/code/"
    result = run(environment(tmp_path, bitrix24_webhook_url=url))
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_a_portal_that_is_down_or_refuses_the_webhook_is_an_error(tmp_path: Path) -> None:
    with serving() as portal:
        portal.sim.set_down(True)
        down = run(webhook_env(tmp_path, portal))
        portal.sim.set_down(False)
        wrong = f"{portal.url}/rest/{portal.sim.user_id}/not0the0code/"
        refused = run(environment(tmp_path, bitrix24_webhook_url=wrong))
    assert down.code == 2
    assert "Traceback" not in down.err
    assert "error: Bitrix24: HTTP_503" in down.error
    assert refused.code == 2
    assert "Traceback" not in refused.err
    assert "INVALID_CREDENTIALS" in refused.error


@pytest.mark.parametrize("url", ["http://[::1/rest/1/code/", "http://127.0.0.1:99999/rest/1/code/"])
def test_a_malformed_webhook_url_is_an_error_not_a_traceback(tmp_path: Path, url: str) -> None:
    result = run(environment(tmp_path, bitrix24_webhook_url=url))
    assert "Traceback" not in result.err
    assert result.code == 2


def test_settings_and_mapping_problems_are_errors(tmp_path: Path) -> None:
    no_portal = run(environment(tmp_path))
    assert no_portal.code == 2
    assert "Bitrix24 needs BRIDGE_BITRIX24_WEBHOOK_URL" in no_portal.error

    env = environment(tmp_path, bitrix24_webhook_url="http://127.0.0.1:9/rest/1/code/")
    env["BRIDGE_MAPPING_FILE"] = str(mapping_file(tmp_path, ("shoptet", "metakocka")))
    unmapped = run(env)
    assert unmapped.code == 2
    assert "no status is mapped to bitrix24" in unmapped.error
    assert "Traceback" not in no_portal.err + unmapped.err


# -- OAuth ----------------------------------------------------------------------------------


def oauth_env(tmp_path: Path, portal: Portal, access: str, refresh: str) -> dict[str, str]:
    return environment(
        tmp_path,
        bitrix24_portal_url=portal.url + "/rest",
        bitrix24_client_id=portal.sim.client_id,
        bitrix24_client_secret=portal.sim.client_secret,
        bitrix24_access_token=access,
        bitrix24_refresh_token=refresh,
        bitrix24_oauth_url=portal.url + "/oauth/token/",
    )


def service_settings(env: dict[str, str]) -> Settings:
    """The settings the service would read from the same environment."""
    values = {k.removeprefix("BRIDGE_").lower(): v for k, v in env.items() if k[:7] == "BRIDGE_"}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def service_reads_statuses(env: dict[str, str]) -> list[str]:
    """What the running service would do: a client on the database's stored tokens."""
    store = SQLiteStore(env["BRIDGE_DATABASE_URL"].removeprefix("sqlite:///"))
    await store.open()
    client = Bitrix24Client(service_settings(env), ClientContext(store=store))
    try:
        return [d.id for d in await client.status_definitions()]
    except (B24Error, ReadFailed) as exc:
        # Not raised as it is: a B24Error cannot pass through a `with` block (see the
        # unit samples test), and the point here is that the service is locked out.
        raise AssertionError(f"the service cannot reach Bitrix24: {exc}") from None
    finally:
        await client.aclose()
        await store.close()


async def test_tokens_the_command_refreshes_are_kept_for_the_service(tmp_path: Path) -> None:
    with serving() as portal:
        access, refresh = portal.sim.issue_oauth_tokens()
        portal.sim.expire_access_tokens()
        env = oauth_env(tmp_path, portal, access, refresh)
        result = await asyncio.to_thread(run, env)
        assert result.code == 0, result.err
        assert [c.http_status for c in portal.sim.oauth_requests] == [200]
        # The refresh token in the settings is used up now: the service, started later with
        # the same settings and database, gets in with the tokens the command stored.
        assert "PR" in await service_reads_statuses(env)
        store = SQLiteStore(env["BRIDGE_DATABASE_URL"].removeprefix("sqlite:///"))
        await store.open()
        try:
            assert await store.get_watermark(TOKENS_VALUE) is not None
        finally:
            await store.close()


async def test_the_command_uses_the_tokens_the_service_stored(tmp_path: Path) -> None:
    with serving() as portal:
        access, refresh = portal.sim.issue_oauth_tokens()
        portal.sim.expire_access_tokens()
        env = oauth_env(tmp_path, portal, access, refresh)
        assert "PR" in await service_reads_statuses(env)  # the service refreshed and stored
        assert [c.http_status for c in portal.sim.oauth_requests] == [200]
        # The settings' tokens are stale now; the command takes the stored ones.
        result = await asyncio.to_thread(run, env)
        assert result.code == 0, result.err
        assert "every mapped status exists on the portal" in result.text
        assert [c.http_status for c in portal.sim.oauth_requests] == [200]
