"""Drift repair: a lost webhook is caught by the poller, lagging platforms by the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import MK, SHOPTET, World, audit_has, eventually, running_bridge

pytestmark = pytest.mark.integration

CODE = "2026000900"


async def test_a_lost_shoptet_webhook_is_repaired_by_the_poller(sims: World) -> None:
    # No webhook registered: Shoptet's notification is lost (it gave up after 3 tries).
    async with running_bridge(sims, register_webhook=False, shoptet_poll_interval_seconds=0.5):
        sims.add_order(CODE)
        await eventually(lambda: sims.agreed(CODE, "new"))
        sims.shoptet.set_status_as_person(CODE, SHOPTET["shipped"])
        # Within two poll intervals (plus the write).
        await eventually(lambda: sims.mk_status(CODE) == MK["shipped"], within=2 * 0.5 + 2)


def run_reconcile(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    settings = world.settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        secret = getattr(value, "get_secret_value", None)
        env[f"BRIDGE_{name.upper()}"] = str(secret() if secret else value)
    return subprocess.run(
        [sys.executable, "-m", "bridge", "reconcile", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_reconcile_reports_drift_then_repairs_it(sims: World) -> None:
    async with running_bridge(sims) as bridge:
        sims.add_order(CODE)
        sims.add_order("2026000901")
        await eventually(lambda: sims.agreed(CODE, "new") and sims.agreed("2026000901", "new"))
        sims.shoptet.set_status_as_person(CODE, SHOPTET["shipped"])
        await eventually(lambda: sims.mk_status(CODE) == MK["shipped"])
        # Someone moves MetaKocka back: a known platform moving back is not propagated...
        sims.metakocka.set_status_as_person(sims.mk_ids[CODE], MK["paid"])
        await eventually(lambda: audit_has(sims, "regress"))
        assert sims.mk_status(CODE) == MK["paid"]
    # ...so the platforms disagree until a sweep repairs it.
    dry = run_reconcile(sims, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["checked"] == 2
    [drift] = report["drifted"]
    assert drift["order_key"] == CODE
    assert drift["writes"] == {"metakocka": MK["shipped"]}
    assert sims.mk_status(CODE) == MK["paid"]  # dry run: nothing written

    human = run_reconcile(sims, "--dry-run", "--platform", "metakocka")
    assert human.returncode == 0, human.stderr
    assert CODE in human.stdout and "1 drifted" in human.stdout

    repair = run_reconcile(sims)
    assert repair.returncode == 0, repair.stderr
    assert "1 repairs recorded" in repair.stdout
    async with running_bridge(sims, register_webhook=False):
        await eventually(lambda: sims.mk_status(CODE) == MK["shipped"], what="the repair delivered")
    assert bridge is not None


def test_reconcile_refuses_bad_options(sims: World) -> None:
    bad = run_reconcile(sims, "--since", "last tuesday")
    assert bad.returncode == 2
    assert "--since" in bad.stderr and "Traceback" not in bad.stderr
    unknown = run_reconcile(sims, "--platform", "ebay")
    assert unknown.returncode == 2
    assert "ebay" in unknown.stderr
