"""Webhook subscriptions kept right: the platforms must send their events to this bridge.

Shoptet: the bridge needs ``order:update`` (any order change, status changes included) and
``order:massUpdate`` (an admin's mass status change; Shoptet still sends the per-order events
too, but says that will change) delivered to ``{BRIDGE_PUBLIC_URL}/webhooks/shoptet``. Never
``order:cancel``: Shoptet refuses it together with ``order:update`` (409), and ``order:update``
covers cancellations anyway. Shoptet keeps one URL per event, so a webhook for one of our
events that points elsewhere is somebody's decision: it is reported, never deleted or
repointed (another system may live on it).

Bitrix24: an application (OAuth) can list its handlers with ``event.get``; handlers missing
for the mode's events are reported. An inbound webhook may not call ``event.get`` (the portal
answers ``WRONG_AUTH_TYPE``) and outgoing webhooks are set up in the portal's UI, so then there
is nothing to check.

The planning (:func:`plan_webhooks`) is pure. :func:`check_at_start` never raises: a platform
that is down must not keep the bridge from starting, and the pollers cover what webhooks miss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from bridge.config import Settings
from bridge.platforms.base import PlatformClient, ReadFailed
from bridge.platforms.bitrix24 import B24Error, Bitrix24Client
from bridge.platforms.shoptet import ShoptetClient

log = logging.getLogger("bridge.subscriptions")

# Where `bridge shoptet-renew-key` keeps the renewed key (a named value of the store); the
# running bridge reads it from there, so a renewal needs no restart.
SIGNATURE_KEY_VALUE = "shoptet:signature_key"

SHOPTET_EVENTS = ("order:update", "order:massUpdate")
# Shoptet answers 409 to registering an event while its counterpart exists.
SHOPTET_EXCLUSIVE: Mapping[str, tuple[str, ...]] = {"order:update": ("order:cancel",)}
BITRIX24_EVENTS: Mapping[str, tuple[str, ...]] = {
    "orders": ("ONSALEORDERSAVED",),
    "deals": ("ONCRMDEALUPDATE", "ONCRMDEALADD"),
}


def webhook_url(public_url: str, platform: str) -> str:
    """Where ``platform`` must send its events: the bridge's webhook route."""
    return f"{public_url.rstrip('/')}/webhooks/{platform}"


def same_url(a: str, b: str) -> bool:
    """Equal as far as delivery goes: scheme and host in any case, a trailing slash or not."""
    x, y = urlsplit(a.strip()), urlsplit(b.strip())
    return (
        x.scheme.lower() == y.scheme.lower()
        and x.netloc.lower() == y.netloc.lower()
        and x.path.rstrip("/") == y.path.rstrip("/")
        and x.query == y.query
    )


# -- pure: planning -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    event: str
    url: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class Blocked:
    """A missing event the platform would refuse to register while ``by`` exists."""

    event: str
    by: Webhook


@dataclass(frozen=True, slots=True)
class Plan:
    url: str
    needed: tuple[str, ...]
    ok: tuple[Webhook, ...]  # a needed event delivered to ``url`` (the first such webhook)
    missing: tuple[str, ...]  # needed events with no webhook at all
    elsewhere: tuple[Webhook, ...]  # a needed event delivered to another URL: report only
    duplicated: tuple[Webhook, ...]  # another webhook for an event already delivered to ``url``
    blocked: tuple[Blocked, ...]  # missing events an exclusive one stands in the way of

    @property
    def to_register(self) -> tuple[str, ...]:
        """Missing and registrable (a blocked one would only earn a refusal)."""
        stuck = {b.event for b in self.blocked}
        return tuple(e for e in self.missing if e not in stuck)

    @property
    def uncovered(self) -> tuple[str, ...]:
        """Needed events the bridge does not receive."""
        delivered = {w.event for w in self.ok}
        return tuple(e for e in self.needed if e not in delivered)


def plan_webhooks(
    existing: Iterable[Webhook],
    needed: Sequence[str],
    url: str,
    exclusive: Mapping[str, Sequence[str]] | None = None,
) -> Plan:
    """Compare what is registered with what the bridge needs at ``url``.

    An event that only points elsewhere is not "missing": on Shoptet registering it again
    would be refused (one URL per event), and taking it over is not ours to decide.
    """
    hooks = list(existing)
    ok: list[Webhook] = []
    elsewhere: list[Webhook] = []
    duplicated: list[Webhook] = []
    for hook in hooks:
        if hook.event not in needed:
            continue
        if not same_url(hook.url, url):
            elsewhere.append(hook)
        elif any(o.event == hook.event for o in ok):
            duplicated.append(hook)
        else:
            ok.append(hook)
    present = {h.event for h in hooks}
    missing = tuple(e for e in dict.fromkeys(needed) if e not in present)
    blocked = tuple(
        Blocked(event, hook)
        for event in missing
        for hook in hooks
        if hook.event in (exclusive or {}).get(event, ())
    )
    needed_once = tuple(dict.fromkeys(needed))
    return Plan(url, needed_once, tuple(ok), missing, tuple(elsewhere), tuple(duplicated), blocked)


def webhook_of(item: Mapping[str, Any]) -> Webhook | None:
    """A Shoptet webhook as ``GET|POST /api/webhooks`` lists it; None if it is not one."""
    event, url, hook_id = item.get("event"), item.get("url"), item.get("id")
    if not isinstance(event, str) or not isinstance(url, str):
        return None
    return Webhook(event, url, hook_id if isinstance(hook_id, int) else None)


Level = Literal["info", "warning"]


@dataclass(frozen=True, slots=True)
class ShoptetReport:
    plan: Plan
    registered: tuple[Webhook, ...] = ()
    register_error: str | None = None

    @property
    def uncovered(self) -> tuple[str, ...]:
        """Needed events still not delivered to the bridge after this run."""
        done = {w.event for w in self.registered}
        return tuple(e for e in self.plan.uncovered if e not in done)

    def as_dict(self) -> dict[str, Any]:
        p = self.plan
        hook = _hook_dict
        return {
            "url": p.url,
            "ok": [hook(w) for w in p.ok],
            "missing": list(p.missing),
            "registered": [hook(w) for w in self.registered],
            "register_error": self.register_error,
            "elsewhere": [hook(w) for w in p.elsewhere],
            "duplicated": [hook(w) for w in p.duplicated],
            "blocked": [{"event": b.event, "by": hook(b.by)} for b in p.blocked],
            "uncovered": list(self.uncovered),
        }


def _hook_dict(hook: Webhook) -> dict[str, Any]:
    return {"id": hook.id, "event": hook.event, "url": hook.url}


def _id(hook: Webhook) -> str:
    return f"webhook {hook.id}" if hook.id is not None else "a webhook"


def describe_shoptet(report: ShoptetReport, *, registering: bool) -> list[tuple[Level, str]]:
    """What to tell the operator, one line each (the log at start-up, the command's report)."""
    p = report.plan
    lines: list[tuple[Level, str]] = []
    for hook in report.registered:
        lines.append(("info", f"registered {hook.event} -> {hook.url} ({_id(hook)})"))
    if report.register_error:
        lines.append(
            ("warning", f"registering {', '.join(p.to_register)} failed: {report.register_error}")
        )
    elif p.to_register and not registering:
        lines.append(
            (
                "warning",
                f"missing: {', '.join(p.to_register)} -> {p.url} (register with "
                "`bridge shoptet-webhooks --register` or BRIDGE_REGISTER_WEBHOOKS=true; "
                "until then only the poller sees these changes)",
            )
        )
    for b in p.blocked:
        lines.append(
            (
                "warning",
                f"cannot register {b.event}: {_id(b.by)} for {b.by.event} ({b.by.url}) exists "
                f"and Shoptet refuses the two together; delete it ({b.event} covers it)",
            )
        )
    for hook in p.elsewhere:
        lines.append(
            (
                "warning",
                f"{_id(hook)} sends {hook.event} to {hook.url}, not to this bridge; left as "
                "it is: repoint or delete it in Shoptet if this bridge should get the event",
            )
        )
    for hook in p.duplicated:
        lines.append(
            ("warning", f"{hook.event} is delivered twice: {_id(hook)} duplicates another")
        )
    if not lines:
        lines.append(("info", f"{', '.join(p.needed)} -> {p.url}: all registered"))
    return lines


@dataclass(frozen=True, slots=True)
class Bitrix24Report:
    url: str
    events: tuple[str, ...]
    missing: tuple[str, ...]  # events with no handler at ``url``


# -- talking to the platforms ---------------------------------------------------------------


async def check_shoptet(client: ShoptetClient, public_url: str, *, register: bool) -> ShoptetReport:
    """List Shoptet's webhooks and plan; register the missing ones if asked.

    Raises ReadFailed when the list cannot be had; a refused registration is in the report.
    """
    url = webhook_url(public_url, "shoptet")
    existing = [w for w in map(webhook_of, await client.list_webhooks()) if w is not None]
    plan = plan_webhooks(existing, SHOPTET_EVENTS, url, SHOPTET_EXCLUSIVE)
    if not register or not plan.to_register:
        return ShoptetReport(plan)
    try:
        created = await client.register_webhooks(
            [{"event": event, "url": url} for event in plan.to_register]
        )
    except ReadFailed as exc:
        return ShoptetReport(plan, register_error=exc.reason)
    return ShoptetReport(plan, tuple(w for w in map(webhook_of, created) if w is not None))


async def check_bitrix24(client: Bitrix24Client, public_url: str) -> Bitrix24Report | None:
    """Which of the mode's events have no handler at the bridge; None if it cannot be known
    (an inbound webhook may not call ``event.get``). Raises B24Error or ReadFailed."""
    url = webhook_url(public_url, "bitrix24")
    needed = BITRIX24_EVENTS[client.mode]
    try:
        handlers = await client.event_handlers()
    except B24Error as exc:
        if exc.code == "WRONG_AUTH_TYPE":
            return None
        raise
    # Bitrix24 upper-cases event names in its answers, but accepts any case when binding.
    existing = [
        Webhook(str(h.get("event") or "").upper(), str(h.get("handler") or "")) for h in handlers
    ]
    plan = plan_webhooks(existing, needed, url)
    return Bitrix24Report(url, needed, plan.uncovered)


async def check_at_start(settings: Settings, clients: Mapping[str, PlatformClient]) -> None:
    """The start-up check: log what is missing or wrong, register if allowed. Never raises."""
    public_url = settings.public_url
    if public_url is None:
        if settings.register_webhooks:
            log.warning(
                "BRIDGE_REGISTER_WEBHOOKS is on but BRIDGE_PUBLIC_URL is not set: "
                "webhooks are neither checked nor registered"
            )
        return
    shoptet = clients.get("shoptet")
    if isinstance(shoptet, ShoptetClient):
        try:
            report = await check_shoptet(shoptet, public_url, register=settings.register_webhooks)
        except ReadFailed as exc:
            log.warning("could not check Shoptet's webhooks: %s", exc.reason)
        except Exception:
            log.exception("could not check Shoptet's webhooks")
        else:
            for level, line in describe_shoptet(report, registering=settings.register_webhooks):
                log.log(logging.INFO if level == "info" else logging.WARNING, "Shoptet: %s", line)
    bitrix = clients.get("bitrix24")
    if isinstance(bitrix, Bitrix24Client):
        try:
            b24 = await check_bitrix24(bitrix, public_url)
        except (B24Error, ReadFailed) as exc:
            log.warning("could not check Bitrix24's event handlers: %s", exc)
        except Exception:
            log.exception("could not check Bitrix24's event handlers")
        else:
            if b24 is None:
                log.debug(
                    "Bitrix24: an inbound webhook cannot list event handlers (event.get needs "
                    "OAuth); outgoing webhooks are checked in the portal's UI"
                )
            elif b24.missing:
                log.warning(
                    "Bitrix24: no handler for %s at %s; bind it (event.bind) or the bridge "
                    "only sees these changes when it polls",
                    ", ".join(b24.missing),
                    b24.url,
                )
            else:
                log.info("Bitrix24: handlers for %s -> %s", ", ".join(b24.events), b24.url)
