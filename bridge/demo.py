"""``bridge demo``: the bridge at work against simulators, on loopback, in about ten seconds.

Everything is real but the platforms: the simulators are HTTP servers that follow the
platforms' documentation, the bridge is the same app ``bridge serve`` runs, and the store is an
SQLite file in a temporary folder.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from importlib.resources import as_file, files
from pathlib import Path

from pydantic import SecretStr
from rich.console import Console

from bridge.config import Settings
from bridge.models import AuditEntry
from bridge.sandbox.bitrix24 import DEFAULT_SALE_STATUSES, Bitrix24Simulator, SaleStatus
from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread
from bridge.sandbox.shoptet import ShoptetSimulator
from bridge.store.sqlite import SQLiteStore

ORDER = "2026000042"


def _wait(what: Callable[[], bool], timeout: float = 20.0) -> float:
    start = time.monotonic()
    while not what():
        if time.monotonic() - start > timeout:
            raise TimeoutError
        time.sleep(0.02)
    return time.monotonic() - start


def run_demo(*, keep_running: bool = False, console: Console | None = None) -> int:
    from bridge.service import Bridge

    out = console or Console()
    shoptet = ShoptetSimulator(webhook_retry_delay=2.0)
    metakocka = MetaKockaSimulator()
    # The example mapping's "processing" is a status of the shop's own on Bitrix24 (PR).
    bitrix = Bitrix24Simulator(
        sale_statuses=(*DEFAULT_SALE_STATUSES, SaleStatus("PR", "O", 25, "#FFF3B0"))
    )
    shoptet.add_order(ORDER, -1)
    mk_id = metakocka.add_order(ORDER, "new_order")
    b24_id = bitrix.add_order("N", xml_id=ORDER)

    def b24_status() -> str:
        return str(bitrix.order(b24_id)["statusId"])

    with (
        tempfile.TemporaryDirectory(prefix="bridge-demo-") as tmp,
        as_file(files("bridge").joinpath("mapping.example.toml")) as mapping,
        ServerThread(shoptet.app) as shoptet_srv,
        ServerThread(metakocka.app) as metakocka_srv,
        ServerThread(bitrix.app) as bitrix_srv,
    ):
        settings = Settings(
            _env_file=None,
            database_url=f"sqlite:///{Path(tmp) / 'bridge.sqlite3'}",
            mapping_file=mapping,
            shoptet_base_url=shoptet_srv.url,
            shoptet_api_token=SecretStr(shoptet.token),
            shoptet_webhook_key=SecretStr(shoptet.signature_key),
            shoptet_eshop_id=shoptet.eshop_id,
            metakocka_base_url=f"{metakocka_srv.url}/rest/eshop/v1",
            metakocka_company_id=metakocka.company_id,
            metakocka_secret_key=SecretStr(metakocka.secret_key),
            metakocka_poll_interval_seconds=1.0,
            metakocka_poll_overlap_seconds=5.0,
            bitrix24_webhook_url=SecretStr(bitrix_srv.url + bitrix.webhook_path),
            bitrix24_application_token=SecretStr(bitrix.application_token),
            bitrix24_poll_interval_seconds=2.0,
            bitrix24_poll_overlap_seconds=5.0,
            idle_check_seconds=0.2,
        )
        bridge = Bridge(settings)
        with ServerThread(bridge.app) as bridge_srv:
            shoptet.register_webhook("order:update", f"{bridge_srv.url}/webhooks/shoptet")
            bitrix.register_outgoing_webhook(
                f"{bridge_srv.url}/webhooks/bitrix24", ["ONSALEORDERSAVED"]
            )
            out.rule("[bold]bridge demo")
            out.print(f"Shoptet simulator    {shoptet_srv.url}  (e-shop {shoptet.eshop_id})")
            out.print(f"MetaKocka simulator  {metakocka_srv.url}/rest/eshop/v1")
            out.print(f"Bitrix24 simulator   {bitrix_srv.url}{bitrix.webhook_path}  (sale orders)")
            out.print(f"bridge               {bridge_srv.url}")
            out.print(f"store                {settings.database_url}")
            out.print(f"mapping              {mapping}")
            out.print(
                f"Order {ORDER}: Shoptet -1 (new), MetaKocka {mk_id} 'new_order', "
                f"Bitrix24 order {b24_id} 'N'.\n"
            )
            try:
                out.print(
                    "[bold]1.[/] A shop assistant marks the order paid in Shoptet (status 2)."
                )
                shoptet.set_status_as_person(ORDER, 2)
                out.print(
                    "   Shoptet sends a signed order:update webhook; the bridge reads the order,"
                )
                out.print(
                    "   maps 2 -> 'paid' and drives MetaKocka to 'in_progress', Bitrix24 to 'P'."
                )
                took = _wait(
                    lambda: (
                        metakocka.order(mk_id)["status_desc"] == "in_progress"
                        and b24_status() == "P"
                    )
                )
                out.print(f"   [green]both show it after {took * 1000:.0f} ms.[/]\n")

                time.sleep(1.0)
                out.print("[bold]2.[/] The warehouse marks the order shipped in MetaKocka.")
                metakocka.set_status_as_person(mk_id, "shipped")
                out.print("   MetaKocka sends no webhooks: the bridge's poller finds the change.")
                took = _wait(
                    lambda: shoptet.order(ORDER)["status"]["id"] == 3 and b24_status() == "S"
                )
                out.print(
                    f"   [green]Shoptet shows 3, Bitrix24 'S' after {took * 1000:.0f} ms.[/]\n"
                )

                time.sleep(1.0)  # people do not change one order twice within a second
                out.print("[bold]3.[/] A sales manager completes the order in Bitrix24 (status F).")
                bitrix.set_order_status_as_person(b24_id, "F")
                out.print(
                    "   Bitrix24 posts ONSALEORDERSAVED (form-encoded, with its application token)."
                )
                took = _wait(
                    lambda: (
                        shoptet.order(ORDER)["status"]["id"] == -3
                        and metakocka.order(mk_id)["status_desc"] == "completed"
                    )
                )
                out.print(
                    f"   [green]Shoptet shows -3, MetaKocka 'completed' after {took * 1000:.0f} ms."
                    "[/]\n"
                )

                out.print("[bold]4.[/] No echo, no loop: each platform reports the bridge's writes")
                out.print(
                    "   back (webhooks, polls, events); the bridge recognises them and writes"
                )
                out.print("   nothing more.")
                time.sleep(3.0)  # the echoes, two poll cycles of each polled platform
                writes = {
                    "Shoptet": len(
                        [r for r in shoptet.requests if r.method == "PATCH" and r.status == 200]
                    ),
                    "MetaKocka": metakocka.calls_by_method["change_document_status"],
                    "Bitrix24": len([c for c in bitrix.requests if c.method == "sale.order.update"])
                    + len([c for c in bitrix.subcalls if c.method == "sale.order.update"]),
                }
                out.print("   writes: " + ", ".join(f"{k} {v}" for k, v in writes.items()) + "\n")
                ok = writes == {"Shoptet": 2, "MetaKocka": 2, "Bitrix24": 2}
            except TimeoutError:
                out.print("[bold red]the change did not arrive in time; see the log above[/]")
                return 1
            out.print("[bold]Audit trail of the order[/] (from the bridge's store):")
            _print_audit(out, Path(tmp) / "bridge.sqlite3")
            if keep_running:
                out.print("\n[bold]Everything keeps running.[/] Try, in another terminal:")
                out.print(f"   curl {bridge_srv.url}/healthz")
                out.print(f"   curl {bridge_srv.url}/metrics")
                out.print(
                    f"   curl -H 'Shoptet-Private-API-Token: {shoptet.token}' "
                    f"{shoptet_srv.url}/api/orders/{ORDER}"
                )
                out.print("Press Ctrl+C to stop.")
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        shoptet.close()
        bitrix.close()
    out.rule("[green]done" if ok else "[red]unexpected write count")
    return 0 if ok else 1


def _print_audit(out: Console, path: Path) -> None:
    async def read() -> list[AuditEntry]:
        # A second connection beside the running bridge's: WAL lets readers in.
        store = SQLiteStore(str(path))
        await store.open()
        try:
            return await store.list_audit(ORDER, limit=50)
        finally:
            await store.close()

    entries = list(reversed(asyncio.run(read())))
    start = entries[0].at if entries else 0.0
    for e in entries:
        d = e.detail
        what = d.get("reason") or f"{d.get('native')} ({d.get('canonical')})"
        writes = d.get("writes") or {}
        if writes:
            what += "; to write: " + ", ".join(f"{p} {n}" for p, n in writes.items())
        out.print(
            f"   +{(e.at - start) * 1000:5.0f} ms  {e.platform or '':<10} {e.kind:<8} {what}",
            highlight=False,
        )
