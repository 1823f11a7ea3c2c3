"""The ``bridge`` command: serve, demo, check, example-mapping."""

from __future__ import annotations

import gc
import logging
import sys
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from bridge.config import ConfigError, Settings
from bridge.mapping import MappingError, StatusMapping, load_mapping
from bridge.platforms import PLATFORMS
from bridge.platforms.shoptet import ShoptetClient
from bridge.service import client_context
from bridge.store import open_store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Keeps an order's status in agreement across Shoptet, MetaKocka and Bitrix24.",
)
# soft_wrap: an error stays on one line even when stderr is a file or a pipe.
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _settings(mapping: Path | None) -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "BRIDGE_" + "_".join(str(p) for p in first["loc"]).upper()
        raise _fail(f"{name}: {first['msg']}") from None
    if mapping is not None:
        settings = settings.model_copy(update={"mapping_file": mapping})
    return settings


def _mapping(settings: Settings) -> StatusMapping:
    try:
        return load_mapping(settings.mapping_file, PLATFORMS)
    except MappingError as exc:
        raise _fail(str(exc)) from None


MappingOption = Annotated[
    Path | None, typer.Option("--mapping", help="Mapping file (default: BRIDGE_MAPPING_FILE).")
]


@app.command()
def serve(
    mapping: MappingOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address (BRIDGE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (BRIDGE_PORT).")] = None,
) -> None:
    """Run the bridge: webhook intake, worker, delivery and pollers."""
    import uvicorn

    from bridge.service import Bridge

    settings = _settings(mapping)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request's full URL at INFO; a Bitrix24 webhook URL carries its secret.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    status_mapping = _mapping(settings)
    try:
        bridge = Bridge(settings, mapping=status_mapping)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    # What is loaded by now (modules, settings, the mapping, the app) lives as long as the
    # process. Frozen, it is left out of the cyclic collector's full passes, which otherwise
    # walk all of it about once a second under load: a 30-40 ms pause every time, the tail of
    # the webhook acknowledgement latency (docs/benchmarks.md, P2).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        bridge.app,
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@app.command()
def check(mapping: MappingOption = None) -> None:
    """Validate the settings and the mapping file, and show the mapping."""
    settings = _settings(mapping)
    status_mapping = _mapping(settings)
    try:
        open_store(settings.database_url)
    except ValueError as exc:
        raise _fail(f"BRIDGE_DATABASE_URL: {exc}") from None
    for platform in sorted(status_mapping.platforms):
        try:
            client = PLATFORMS[platform].make_client(
                settings, client_context(status_mapping, platform, None)
            )
        except ConfigError as exc:
            raise _fail(str(exc)) from None
        # Clients own an HTTP connection pool; nothing was sent, so just drop it.
        del client
    table = Table(title=f"{settings.mapping_file}")
    table.add_column("status")
    table.add_column("rank", justify="right")
    platforms = sorted(status_mapping.platforms)
    for platform in platforms:
        table.add_column(platform)
    for status in sorted(status_mapping.statuses.values(), key=lambda s: s.rank):
        cells = []
        for platform in platforms:
            target = status.targets[platform].native
            others = sorted(status.inbound[platform] - {target})
            cells.append(target + (f" (also {', '.join(others)})" if others else ""))
        table.add_row(status.key, str(status.rank), *cells)
    Console().print(table)
    Console().print("[green]settings and mapping are valid[/]")


def parse_since(value: str, now: float) -> float:
    """``7d``, ``24h``, ``90m`` ago, or an ISO 8601 date or date-time (UTC if no offset)."""
    import re
    from datetime import UTC, datetime

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dhm])", value.strip())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return now - amount * {"d": 86_400, "h": 3_600, "m": 60}[unit]
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _fail(f"--since {value!r}: use 7d, 24h, 90m or an ISO date like 2026-11-01") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@app.command()
def reconcile(
    mapping: MappingOption = None,
    platform: Annotated[
        list[str] | None,
        typer.Option("--platform", help="Only read this platform (repeatable; default: all)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only orders seen since: 7d, 24h, 90m or an ISO date (default: all)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report the drift and what would be written.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare every platform's status of the known orders with the agreed one; repair drift.

    Repairs are recorded like any other decision: the running bridge (or the next `serve`)
    delivers them. With --dry-run nothing is written anywhere.
    """
    import asyncio
    import dataclasses
    import json
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bridge.reconcile import SweepReport, sweep
    from bridge.service import Bridge

    settings = _settings(mapping)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    status_mapping = _mapping(settings)
    unknown = sorted(set(platform or []) - status_mapping.platforms)
    if unknown:
        raise _fail(f"--platform {unknown[0]!r} is not in the mapping")
    seen_since = parse_since(since, time.time()) if since else None
    try:
        bridge = Bridge(settings, mapping=status_mapping)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None

    async def run() -> SweepReport:
        await bridge.store.open()
        try:
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=err,
                disable=as_json or not err.is_terminal,
            ) as progress:
                task = progress.add_task("checking orders: 0", total=None)
                return await sweep(
                    bridge.store,
                    bridge.clients,
                    status_mapping,
                    platforms=platform,
                    seen_since=seen_since,
                    dry_run=dry_run,
                    on_progress=lambda n: progress.update(
                        task, description=f"checking orders: {n}"
                    ),
                )
        finally:
            for client in bridge.clients.values():
                await client.aclose()
            await bridge.store.close()

    report = asyncio.run(run())
    if as_json:
        sys.stdout.write(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        return
    out = Console()
    if report.drifted:
        table = Table(title="orders whose platforms disagree")
        table.add_column("order")
        table.add_column("agreed")
        table.add_column("shown")
        table.add_column("to write" if dry_run else "written next")
        for d in report.drifted:
            table.add_row(
                d.order_key,
                f"{d.agreed} -> {d.new_agreed}" if d.new_agreed != d.agreed else str(d.agreed),
                ", ".join(f"{p} {n}" for p, n in sorted(d.shown.items())),
                ", ".join(f"{p} {n}" for p, n in sorted(d.writes.items())) or "-",
            )
        out.print(table)
    unread = ", ".join(f"{p}: {n}" for p, n in sorted(report.unreadable.items()))
    verb = "would be repaired" if dry_run else "repairs recorded"
    out.print(
        f"{report.checked} orders checked, {len(report.drifted)} drifted, "
        f"{len(report.drifted) if dry_run else report.repaired} {verb}"
        + (f"; not readable: {unread}" if unread else "")
    )


@app.command("bitrix24-statuses")
def bitrix24_statuses(
    mapping: MappingOption = None,
    stamp: Annotated[
        bool,
        typer.Option("--stamp", help="Write each mapped status's canonical key into its xmlId."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the mapping against the portal's statuses (or deal stages); optionally stamp them."""
    import asyncio
    import dataclasses
    import json

    from bridge.platforms.base import ReadFailed
    from bridge.platforms.bitrix24 import B24Error, Bitrix24Client, StatusReport, check_statuses

    settings = _settings(mapping)
    status_mapping = _mapping(settings)
    if "bitrix24" not in status_mapping.platforms:
        raise _fail(f"{settings.mapping_file}: no status is mapped to bitrix24")
    wanted = {
        native: status.key
        for status in status_mapping.statuses.values()
        for native in status.inbound["bitrix24"]
    }

    async def run() -> StatusReport:
        # With OAuth, the store holds the tokens `serve` keeps refreshed: use (and update)
        # the same ones. An inbound webhook URL needs no store at all.
        store = None
        if settings.bitrix24_webhook_url is None:
            try:
                store = open_store(settings.database_url)
            except ValueError as exc:
                raise _fail(f"BRIDGE_DATABASE_URL: {exc}") from None
            await store.open()
        try:
            client = Bitrix24Client(settings, client_context(status_mapping, "bitrix24", store))
        except ConfigError as exc:
            if store is not None:
                await store.close()
            raise _fail(str(exc)) from None
        try:
            return await check_statuses(client, wanted, stamp=stamp)
        except (B24Error, ReadFailed) as exc:  # a clear message, not a traceback
            raise _fail(f"Bitrix24: {exc}") from None
        finally:
            await client.aclose()
            if store is not None:
                await store.close()

    report = asyncio.run(run())
    if as_json:
        sys.stdout.write(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    else:
        out = Console()
        out.print(f"Bitrix24 ({report.mode} mode) defines: {', '.join(report.defined)}")
        for native, canonical in report.missing.items():
            out.print(f"[red]missing:[/] {native} (mapped as {canonical!r}) is not on the portal")
        if stamp and report.mode == "deals":
            out.print("--stamp applies to order statuses (orders mode); deal stages have no xmlId")
        if report.stamped:
            out.print(f"[green]stamped xmlId on:[/] {', '.join(report.stamped)}")
        elif report.unstamped and report.mode == "orders":
            out.print(
                f"xmlId is not the canonical key on: {', '.join(report.unstamped)}"
                " (run with --stamp to write it)"
            )
        if not report.missing:
            out.print("[green]every mapped status exists on the portal[/]")
    if report.missing:
        raise typer.Exit(1)


def _shoptet_client(settings: Settings) -> ShoptetClient:
    from pydantic import SecretStr

    from bridge.platforms.base import ClientContext

    if settings.shoptet_webhook_key is None:
        # The client insists on the key because `serve` verifies webhooks with it; these
        # commands verify none, and renewing is how one gets a key in the first place.
        settings = settings.model_copy(update={"shoptet_webhook_key": SecretStr("unused")})
    try:
        return ShoptetClient(settings, ClientContext())
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _redacted(url: str) -> str:
    """A database URL fit to print: no password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@app.command("shoptet-webhooks")
def shoptet_webhooks(
    register: Annotated[
        bool,
        typer.Option("--register", help="Register the missing ones (never deletes or repoints)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check that Shoptet sends order:update and order:massUpdate to BRIDGE_PUBLIC_URL.

    The same check `serve` makes at start. Exits 1 when an event is still not delivered to
    the bridge (missing and not registered, or registered to another URL).
    """
    import asyncio
    import json

    from rich.markup import escape

    from bridge.platforms.base import ReadFailed
    from bridge.subscriptions import ShoptetReport, check_shoptet, describe_shoptet

    settings = _settings(None)
    public_url = settings.public_url
    if public_url is None:
        raise _fail("BRIDGE_PUBLIC_URL is not set (the bridge's address as Shoptet sees it)")
    client = _shoptet_client(settings)

    async def run() -> ShoptetReport:
        try:
            return await check_shoptet(client, public_url, register=register)
        except ReadFailed as exc:
            raise _fail(f"Shoptet: {exc.reason}") from None
        finally:
            await client.aclose()

    report = asyncio.run(run())
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        out = Console(highlight=False)
        out.print(f"Shoptet webhooks for {escape(report.plan.url)}", soft_wrap=True)
        for hook in report.plan.ok:
            out.print(f"[green]ok:[/] {hook.event} (webhook {hook.id})", soft_wrap=True)
        for level, line in describe_shoptet(report, registering=register):
            prefix = "[yellow]warning:[/] " if level == "warning" else ""
            out.print(prefix + escape(line), soft_wrap=True)
    if report.uncovered:
        raise typer.Exit(1)


@app.command("shoptet-renew-key")
def shoptet_renew_key(
    show: Annotated[
        bool, typer.Option("--show", help="Also print the new key (it is a secret).")
    ] = False,
) -> None:
    """Renew Shoptet's webhook signature key; store it where the bridge reads it.

    The old key stops working at once. A running bridge on the same store (BRIDGE_DATABASE_URL)
    takes the new key with the next webhook it cannot verify: no restart. The stored key
    overrides BRIDGE_SHOPTET_WEBHOOK_KEY from then on.
    """
    import asyncio

    from rich.markup import escape

    from bridge.platforms.base import ReadFailed
    from bridge.subscriptions import SIGNATURE_KEY_VALUE

    settings = _settings(None)
    try:
        store = open_store(settings.database_url)
    except ValueError as exc:
        raise _fail(f"BRIDGE_DATABASE_URL: {exc}") from None
    client = _shoptet_client(settings)
    where = f"{_redacted(settings.database_url)}, named value {SIGNATURE_KEY_VALUE!r}"

    async def run() -> str:
        try:
            # The store opens first, so once Shoptet has made the key (and dropped the old one)
            # storing it is the very next step and nothing else can fail in between.
            await store.open()
            try:
                key = await client.renew_signature_key()
            except ReadFailed as exc:
                raise _fail(
                    f"Shoptet: {exc.reason}. If Shoptet renewed the key anyway, webhooks are "
                    "refused until this command succeeds: run it again."
                ) from None
            try:
                await store.set_watermark(SIGNATURE_KEY_VALUE, key)
            except Exception as exc:
                if show:
                    sys.stdout.write(f"{key}\n")
                raise _fail(
                    f"Shoptet renewed the key, but storing it in {where} failed: {exc!r}. "
                    "Webhooks are refused until the bridge has the key: run this again"
                    + (" or set BRIDGE_SHOPTET_WEBHOOK_KEY to the key above." if show else ".")
                ) from None
            return key
        finally:
            await client.aclose()
            await store.close()

    key = asyncio.run(run())
    out = Console(highlight=False)
    out.print(
        f"Shoptet webhook signature key renewed and stored in {escape(where)}.", soft_wrap=True
    )
    out.print(
        "A running bridge on this store switches to it with the next webhook; it overrides "
        "BRIDGE_SHOPTET_WEBHOOK_KEY, which is now out of date.",
        soft_wrap=True,
    )
    if show:
        sys.stdout.write(f"{key}\n")


@app.command("example-mapping")
def example_mapping() -> None:
    """Print the annotated example mapping file (redirect it to bridge.toml)."""
    sys.stdout.write(files("bridge").joinpath("mapping.example.toml").read_text("utf-8"))


@app.command()
def demo(
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Leave everything running for poking around.")
    ] = False,
) -> None:
    """Show the bridge at work against simulators of the platforms (no credentials needed)."""
    from bridge.demo import run_demo

    raise typer.Exit(run_demo(keep_running=keep_running))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
