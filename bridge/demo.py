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
from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread
from bridge.sandbox.shoptet import ShoptetSimulator
from bridge.store.sqlite import SQLiteStore

ORDER = "2026000042"
SHOPTET_NEW, SHOPTET_PAID, SHOPTET_SHIPPED = -1, 2, 3


def _wait(what: Callable[[], bool], timeout: float = 20.0) -> float:
    start = time.monotonic()
    while not what():
        if time.monotonic() - start > timeout:
            raise TimeoutError
        time.sleep(0.02)
    return time.monotonic() - start


def demo_settings(
    folder: Path,
    mapping: Path,
    shoptet: ShoptetSimulator,
    shoptet_url: str,
    metakocka: MetaKockaSimulator,
    metakocka_url: str,
) -> Settings:
    return Settings(
        database_url=f"sqlite:///{folder / 'bridge.sqlite3'}",
        mapping_file=mapping,
        shoptet_base_url=shoptet_url,
        shoptet_api_token=SecretStr(shoptet.token),
        shoptet_webhook_key=SecretStr(shoptet.signature_key),
        shoptet_eshop_id=shoptet.eshop_id,
        metakocka_base_url=f"{metakocka_url}/rest/eshop/v1",
        metakocka_company_id=metakocka.company_id,
        metakocka_secret_key=SecretStr(metakocka.secret_key),
        metakocka_poll_interval_seconds=1.0,
        metakocka_poll_overlap_seconds=5.0,
        idle_check_seconds=0.2,
    )


def run_demo(*, keep_running: bool = False, console: Console | None = None) -> int:
    from bridge.service import Bridge

    out = console or Console()
    shoptet = ShoptetSimulator(webhook_retry_delay=2.0)
    metakocka = MetaKockaSimulator()
    shoptet.add_order(ORDER, SHOPTET_NEW)
    mk_id = metakocka.add_order(ORDER, "new_order")
    with (
        tempfile.TemporaryDirectory(prefix="bridge-demo-") as tmp,
        as_file(files("bridge").joinpath("mapping.example.toml")) as mapping,
        ServerThread(shoptet.app) as shoptet_srv,
        ServerThread(metakocka.app) as metakocka_srv,
    ):
        settings = demo_settings(
            Path(tmp), mapping, shoptet, shoptet_srv.url, metakocka, metakocka_srv.url
        )
        bridge = Bridge(settings)
        with ServerThread(bridge.app) as bridge_srv:
            shoptet.register_webhook("order:update", f"{bridge_srv.url}/webhooks/shoptet")
            out.rule("[bold]bridge demo")
            out.print(f"Shoptet simulator    {shoptet_srv.url}  (e-shop {shoptet.eshop_id})")
            out.print(
                f"MetaKocka simulator  {metakocka_srv.url}/rest/eshop/v1"
                f"  (company {metakocka.company_id})"
            )
            out.print(f"bridge               {bridge_srv.url}  (store {settings.database_url})")
            out.print(f"mapping              {mapping}")
            out.print(f"Order {ORDER}: Shoptet status -1 (new), MetaKocka {mk_id} 'new_order'.\n")
            try:
                out.print(
                    "[bold]1.[/] A shop assistant marks the order paid in Shoptet (status 2)."
                )
                shoptet.set_status_as_person(ORDER, SHOPTET_PAID)
                out.print("   Shoptet sends a signed order:update webhook to the bridge;")
                out.print(
                    "   the bridge reads the order, maps 2 -> 'paid' -> MetaKocka 'in_progress'."
                )
                took = _wait(lambda: metakocka.order(mk_id)["status_desc"] == "in_progress")
                out.print(
                    f"   [green]MetaKocka shows 'in_progress' after {took * 1000:.0f} ms.[/]\n"
                )

                out.print("[bold]2.[/] The warehouse marks the order shipped in MetaKocka.")
                metakocka.set_status_as_person(mk_id, "shipped")
                out.print("   MetaKocka sends no webhooks: the bridge's poller finds the change.")
                took = _wait(lambda: shoptet.order(ORDER)["status"]["id"] == SHOPTET_SHIPPED)
                out.print(
                    f"   [green]Shoptet shows status 3 (shipped) after {took * 1000:.0f} ms.[/]\n"
                )

                out.print(
                    "[bold]3.[/] No echo, no loop: each platform's own change comes back to the"
                )
                out.print(
                    "   bridge (a webhook, a poll), is recognised, and costs no further write."
                )
                time.sleep(2.5)  # two poll cycles and the webhook of the bridge's own write
                patches = [r for r in shoptet.requests if r.method == "PATCH"]
                changes = metakocka.calls_by_method["change_document_status"]
                out.print(f"   writes to Shoptet: {len(patches)}, writes to MetaKocka: {changes}\n")
                ok = len(patches) == 1 and changes == 1
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
