"""Assembles the bridge: store, platform clients, inbox, worker, delivery, pollers, HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime

import orjson
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pydantic import SecretStr
from starlette.applications import Starlette

from bridge.app import create_app
from bridge.config import ConfigError, Settings
from bridge.delivery import Dispatcher
from bridge.inbox import Inbox
from bridge.mapping import StatusMapping, load_mapping
from bridge.metrics import Metrics
from bridge.platforms import PLATFORMS
from bridge.platforms.base import ClientContext, PlatformClient, PlatformSpec
from bridge.poller import Poller, iso
from bridge.reconcile import SweepReport, sweep
from bridge.retry import RetryPolicy
from bridge.store import Store, open_store
from bridge.subscriptions import SIGNATURE_KEY_VALUE, check_at_start
from bridge.worker import Worker

log = logging.getLogger("bridge")

SWEEP_VALUE = "sweep:last"  # when the last scheduled sweep ran (ISO time)
# How often the rate limits' levels are saved, for a restart to start from (see _keep_buckets).
BUCKET_SAVE_SECONDS = 1.0


def bucket_value(platform: str) -> str:
    return f"ratelimit:{platform}"


def client_context(
    mapping: StatusMapping,
    platform: str,
    store: Store | None,
    on_call: Callable[[str, str], None] | None = None,
) -> ClientContext:
    natives = frozenset().union(*(s.inbound[platform] for s in mapping.statuses.values()))
    if on_call is None:
        return ClientContext(store=store, natives=natives)
    return ClientContext(store=store, natives=natives, on_call=on_call)


class Bridge:
    """One running bridge. ``app`` is the ASGI app; its lifespan starts and stops the rest."""

    def __init__(
        self,
        settings: Settings,
        *,
        mapping: StatusMapping | None = None,
        store: Store | None = None,
        clients: Mapping[str, PlatformClient] | None = None,
        clock: Callable[[], float] = time.time,
        run_pollers: bool = True,
    ) -> None:
        self.settings = settings
        self.mapping = mapping or load_mapping(settings.mapping_file, PLATFORMS)
        self.platforms = sorted(self.mapping.platforms)
        self.specs: dict[str, PlatformSpec] = {p: PLATFORMS[p] for p in self.platforms}
        self.store = store or open_store(settings.database_url)
        self.metrics = Metrics()
        self.clients: dict[str, PlatformClient] = (
            dict(clients)
            if clients is not None
            else {
                p: s.make_client(
                    settings, client_context(self.mapping, p, self.store, self._count_call)
                )
                for p, s in self.specs.items()
            }
        )
        missing = set(self.platforms) - set(self.clients)
        if missing:
            raise ConfigError(f"no client for mapped platform(s): {', '.join(sorted(missing))}")
        self.clock = clock
        self.retry = RetryPolicy(
            base_seconds=settings.retry_base_seconds,
            cap_seconds=settings.retry_cap_seconds,
            horizon_seconds=settings.retry_horizon_seconds,
        )
        self.dispatcher = Dispatcher(
            self.store,
            self.clients,
            self.specs,
            self.mapping,
            self.metrics,
            retry=self.retry,
            lease_seconds=settings.delivery_lease_seconds,
            idle_seconds=settings.idle_check_seconds,
            on_hint=self._wake_worker,
            clock=clock,
        )
        self.worker = Worker(
            self.store,
            self.clients,
            self.mapping,
            self.metrics,
            concurrency=settings.worker_concurrency,
            lease_seconds=settings.hint_lease_seconds,
            read_retry_seconds=settings.read_retry_seconds,
            idle_seconds=settings.idle_check_seconds,
            on_desired=self.dispatcher.notify,
            clock=clock,
        )
        self.inbox = Inbox(self.store, on_stored=self._wake_worker)
        self.pollers = [
            Poller(
                self.store,
                self.inbox,
                self.clients[p],
                self.metrics,
                overlap_seconds=self._poll_setting(p, "overlap_seconds"),
                clock=clock,
            )
            for p, spec in self.specs.items()
            if spec.polled
        ]
        self._run_pollers = run_pollers
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: AsyncIOScheduler | None = None
        # `bridge shoptet-renew-key` may replace the Shoptet key from another process.
        self._key_lock = asyncio.Lock()
        self._key_read_at = -math.inf
        self.subscriptions_checked: asyncio.Task[None] | None = None
        self.app: Starlette = create_app(self, lifespan=self._lifespan)

    def _poll_setting(self, platform: str, name: str) -> float:
        value = getattr(self.settings, f"{platform}_poll_{name}")
        assert isinstance(value, float | int)
        return float(value)

    def _count_call(self, platform: str, method: str) -> None:
        self.metrics.api_calls.labels(platform, method).inc()

    def _wake_worker(self) -> None:
        self.worker.wake.set()

    async def _load_webhook_key(self) -> bool:
        """Use the Shoptet key `bridge shoptet-renew-key` stored (it replaced the one in
        BRIDGE_SHOPTET_WEBHOOK_KEY at Shoptet). True if the key in use changed."""
        stored = await self.store.get_watermark(SIGNATURE_KEY_VALUE)
        if not stored or stored == _webhook_key(self.settings):
            return False
        # A new Settings, not a change in place: a request verifying right now keeps its copy.
        self.settings = self.settings.model_copy(update={"shoptet_webhook_key": SecretStr(stored)})
        return True

    async def reload_webhook_key(self, platform: str, tried: Settings) -> bool:
        """A webhook failed to verify with ``tried``: is there another key to try now?

        Yes if the key in use is no longer the tried one (a concurrent request reloaded it),
        or if the stored key, re-read at most once per BRIDGE_SHOPTET_KEY_RELOAD_SECONDS,
        differs. That way a renewal by the command needs no restart, and forged requests
        cost a store read only now and then.
        """
        if platform != "shoptet":
            return False
        async with self._key_lock:
            if _webhook_key(self.settings) != _webhook_key(tried):
                return True
            now = time.monotonic()
            if now - self._key_read_at < self.settings.shoptet_key_reload_seconds:
                return False
            self._key_read_at = now
            try:
                changed = await self._load_webhook_key()
            except Exception as exc:  # the webhook is refused (401) and sent again later
                log.warning("could not re-read the Shoptet signature key: %r", exc)
                return False
        if changed:
            log.info("Shoptet signature key reloaded from the store (it was renewed)")
        return changed

    async def _restore_buckets(self) -> None:
        """Start each rate limit from the level the last process saved: after a restart, the
        platform's bucket may still be full of our own requests."""
        for platform, client in self.clients.items():
            bucket = client.bucket
            if bucket is None:
                continue
            try:
                saved = await self.store.get_watermark(bucket_value(platform))
                if not saved:
                    continue
                state = orjson.loads(saved)
                level, at = float(state["level"]), float(state["at"])
            except Exception:  # nothing saved, or unreadable: the probe finds out
                continue
            # What may have gone out after the last save: a save interval's worth, plus one.
            margin = bucket.rate * BUCKET_SAVE_SECONDS + 1
            bucket.restore(level + margin, time.time() - at)
            log.info(
                "%s: rate limit restored at %.0f of %d", platform, bucket.level(), bucket.burst
            )

    async def _save_buckets(self, last: dict[str, float]) -> None:
        for platform, client in self.clients.items():
            bucket = client.bucket
            if bucket is None:
                continue
            level = round(bucket.level(), 1)
            if last.get(platform) == level:
                continue
            value = orjson.dumps({"level": level, "at": time.time()}).decode()
            await self.store.set_watermark(bucket_value(platform), value)
            last[platform] = level

    async def _keep_buckets(self) -> None:
        last: dict[str, float] = {}
        try:
            while True:
                await asyncio.sleep(BUCKET_SAVE_SECONDS)
                try:
                    await self._save_buckets(last)
                except Exception as exc:  # the next save tries again
                    log.debug("saving the rate limits failed: %r", exc)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._save_buckets(last))

    async def start(self) -> None:
        await self.store.open()
        await self._restore_buckets()
        if "shoptet" in self.specs and await self._load_webhook_key():
            log.info(
                "Shoptet: verifying webhooks with the key stored by `bridge shoptet-renew-key` "
                "(it overrides BRIDGE_SHOPTET_WEBHOOK_KEY)"
            )
        if "shoptet" in self.specs and self.settings.shoptet_webhook_key is None:
            log.error(
                "Shoptet: no signature key (BRIDGE_SHOPTET_WEBHOOK_KEY, or one stored by "
                "`bridge shoptet-renew-key`): every Shoptet webhook is refused with 401 and "
                "only the poller sees changes"
            )
        # Not awaited: a platform that is slow or down must not hold up the start.
        self.subscriptions_checked = asyncio.create_task(
            check_at_start(self.settings, self.clients), name="subscriptions"
        )
        self._tasks.append(self.subscriptions_checked)
        self._tasks.append(asyncio.create_task(self.worker.run(), name="worker"))
        self._tasks.append(asyncio.create_task(self._keep_buckets(), name="rate-limits"))
        for platform in self.platforms:
            self._tasks.append(
                asyncio.create_task(self.dispatcher.run(platform), name=f"delivery:{platform}")
            )
        if self._run_pollers and self.pollers:
            scheduler = AsyncIOScheduler()
            for poller in self.pollers:
                scheduler.add_job(
                    poller.poll,
                    "interval",
                    seconds=self._poll_setting(poller.platform, "interval_seconds"),
                    id=f"poll:{poller.platform}",
                    max_instances=1,
                    coalesce=True,
                    next_run_time=datetime.now(UTC),
                    misfire_grace_time=None,
                )
            if self.settings.sweep_interval_seconds > 0:
                scheduler.add_job(
                    self.run_sweep,
                    "interval",
                    seconds=self.settings.sweep_interval_seconds,
                    id="sweep",
                    max_instances=1,
                    coalesce=True,
                    misfire_grace_time=None,
                    next_run_time=await self._next_sweep_at(),
                )
            scheduler.start()
            self._scheduler = scheduler
        log.info(
            "bridge started: platforms %s, store %s",
            ", ".join(self.platforms),
            self.settings.database_url,
        )

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for client in self.clients.values():
            await client.aclose()
        await self.store.close()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _next_sweep_at(self) -> datetime:
        """When the next sweep is due, counted from the last one (stored), not from this
        start: a bridge restarted more often than the interval must still sweep."""
        interval = self.settings.sweep_interval_seconds
        last = await self.store.get_watermark(SWEEP_VALUE)
        due = (datetime.fromisoformat(last).timestamp() if last else self.clock()) + interval
        # Not in the very first minute: the pollers' start-up cycles come first.
        return datetime.fromtimestamp(max(due, self.clock() + 60.0), UTC)

    async def run_sweep(self, *, dry_run: bool = False) -> SweepReport:
        """Read every recently active order everywhere; repair what drifted. Never raises."""
        since = self.clock() - self.settings.sweep_window_days * 86_400
        try:
            report = await sweep(
                self.store, self.clients, self.mapping, seen_since=since, dry_run=dry_run
            )
        except Exception:
            log.exception("the sweep failed; the next one tries again")
            return SweepReport(dry_run=dry_run)
        if not dry_run:
            await self.store.set_watermark(SWEEP_VALUE, iso(self.clock()))
        log.info(
            "sweep: %d orders checked, %d drifted, %d repaired",
            report.checked,
            len(report.drifted),
            report.repaired,
        )
        if report.repaired:
            self.dispatcher.notify()
        return report

    async def refresh_gauges(self) -> None:
        self.metrics.pending_hints.set(await self.store.pending_hints())
        for platform in self.platforms:
            self.metrics.pending_writes.labels(platform).set(
                await self.store.pending_deliveries(platform)
            )


def _webhook_key(settings: Settings) -> str | None:
    key = settings.shoptet_webhook_key
    return None if key is None else key.get_secret_value()
