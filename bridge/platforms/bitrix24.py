"""Bitrix24: sale orders or CRM deals; form-encoded events in, REST calls out.

Facts relied on (docs/platforms.md has the sources):

* events carry only the id (``data[FIELDS][ID]``) and a shared secret,
  ``auth[application_token]``; they are never re-sent, so a poller covers what is lost;
* portals in the older "deals + orders" mode keep ``sale`` orders (``statusId``); new portals
  only have CRM deals, whose stage (``STAGE_ID``, per pipeline) is what people change;
* a leaky bucket per portal: 2 requests/s with a burst of 50 (Enterprise: 5 and 250); overflow
  is ``503 QUERY_LIMIT_EXCEEDED``; a per-method time budget gives ``429 OPERATION_TIME_LIMIT``;
* ``batch`` runs up to 50 commands for the price of one request, each with its own error;
* list filters take ``@<field>`` (IN) with a list of values, and pages hold 50 items: a
  ``batch`` of 50 lists finds up to 2,500 orders by key in one request;
* errors are ``{error, error_description}``; sale codes are numbers, system codes strings.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, quote

import httpx
import orjson

from bridge.config import ConfigError, Settings
from bridge.models import NewHint, Snapshot
from bridge.platforms.base import (
    ClientContext,
    Outcome,
    ParsedWebhook,
    PlatformClient,
    PlatformSpec,
    ReadFailed,
    TargetOptions,
    WebhookRejected,
    WriteRequest,
)
from bridge.ratelimit import LeakyBucket
from bridge.signing import constant_time_equals

NAME = "bitrix24"
BATCH_LIMIT = 50
PAGE_SIZE = 50
# Keys in one list's IN filter: a page holds all their orders while each key is on one order.
KEYS_PER_LIST = PAGE_SIZE
KEYS_PER_CALL = BATCH_LIMIT * KEYS_PER_LIST  # 2,500: a batch of 50 such lists
TOKENS_VALUE = "bitrix24:oauth"  # where OAuth tokens are kept in the store

ORDER_EVENTS = frozenset({"ONSALEORDERSAVED", "ONORDERENTITYSAVED"})
DEAL_EVENTS = frozenset({"ONCRMDEALUPDATE", "ONCRMDEALADD"})
_ID = re.compile(r"^[0-9]{1,18}$")
# Sale codes follow 2xxx4040xxxx for "not found" (e.g. 201240400001, 200540400001).
_NOT_FOUND_CODE = re.compile(r"^2\d{3}4040\d{4}$")
_NOT_FOUND_TEXT = re.compile(r"not found|does not exist|is not found", re.I)

log = logging.getLogger("bridge.bitrix24")

Mode = Literal["orders", "deals"]


class Bitrix24Options(TargetOptions):
    """No side-effect flags yet: a status (or stage) is all the bridge writes."""


# -- pure: the two modes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entity:
    """How one mode names things."""

    get: str
    update: str
    list: str
    result_key: str | None  # sale wraps get/update in result.order; crm does not
    list_key: str | None  # sale.order.list -> result.orders; crm.deal.list -> result
    id_field: str
    status_field: str
    modified_field: str
    default_key_field: str
    events: frozenset[str]


ORDERS = Entity(
    "sale.order.get", "sale.order.update", "sale.order.list", "order", "orders",
    "id", "statusId", "dateUpdate", "xmlId", ORDER_EVENTS,
)  # fmt: skip
DEALS = Entity(
    "crm.deal.get", "crm.deal.update", "crm.deal.list", None, None,
    "ID", "STAGE_ID", "DATE_MODIFY", "ORIGIN_ID", DEAL_EVENTS,
)  # fmt: skip


def entity(mode: Mode) -> Entity:
    return ORDERS if mode == "orders" else DEALS


def stage_category(stage_id: str) -> int:
    """The pipeline a deal stage belongs to: ``C3:WON`` -> 3, ``WON`` -> 0."""
    match = re.match(r"^C(\d+):", stage_id)
    return int(match.group(1)) if match else 0


# -- pure: events ---------------------------------------------------------------------------


def parse_event(settings: Settings, headers: Mapping[str, str], body: bytes) -> ParsedWebhook:
    """Verify and parse one event delivery (form-encoded, PHP-style bracketed keys)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise WebhookRejected(400, "events must be application/x-www-form-urlencoded")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise WebhookRejected(400, "body is not a valid form") from None
    expected = settings.bitrix24_application_token
    given = form.get("auth[application_token]", [None])[0]
    if not given:
        raise WebhookRejected(401, "missing auth[application_token]")
    if expected is None or not constant_time_equals(expected.get_secret_value(), given):
        raise WebhookRejected(401, "auth[application_token] does not match")
    event = (form.get("event", [""])[0] or "").upper()
    if not event:
        raise WebhookRejected(400, "event is missing")
    if event not in entity(settings.bitrix24_mode).events:
        return ParsedWebhook(event, ())  # another mode's or an unrelated event: ignored
    ids = form.get("data[FIELDS][ID]", [])
    if len(ids) != 1 or not _ID.match(ids[0]):
        raise WebhookRejected(400, "data[FIELDS][ID] must be one numeric id")
    return ParsedWebhook(event, (ids[0],))


# -- pure: answers --------------------------------------------------------------------------


class B24Error(Exception):
    """An error answer: ``code`` as a string (sale codes are numbers), with its HTTP status."""

    def __init__(
        self, code: str, description: str, status: int, retry_after: float | None = None
    ) -> None:
        super().__init__(code, description, status)
        self.code = code
        self.description = description
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.description} (HTTP {self.status})"


def error_of(status: int, body: Any) -> B24Error | None:
    """The error an answer carries, if any (system codes are strings, sale codes numbers)."""
    if isinstance(body, dict) and "error" in body:
        return B24Error(str(body["error"]), str(body.get("error_description") or ""), status)
    if status >= 400 or not isinstance(body, dict):
        return B24Error(f"HTTP_{status}", "no JSON error body", status)
    return None


# Access problems (credentials, scope, plan): named by code, since inside a `batch` every
# command's error comes without its own HTTP status.
# Sale permission codes follow 2xxx4030xxxx (e.g. 200040300010 read, 200040300020 write).
_PERMISSION_CODE = re.compile(r"^2\d{3}4030\d{4}$")
_ACCESS_TEXT = re.compile(r"access denied|insufficient permissions|permission", re.I)
_ACCESS_CODES = frozenset(
    {
        "NO_AUTH_FOUND",
        "INVALID_CREDENTIALS",
        "insufficient_scope",
        "ACCESS_DENIED",
        "user_access_error",
        "invalid_token",
        "expired_token",
        "WRONG_AUTH_TYPE",
    }
)


def classify_error(error: B24Error, now: float) -> Outcome:
    """What an error means for a write (or a read)."""
    code, reason = error.code, str(error)
    if code == "QUERY_LIMIT_EXCEEDED":
        return Outcome("retry", reason=reason, retry_after=error.retry_after)
    if code == "OPERATION_TIME_LIMIT":
        return Outcome("retry", reason=reason, retry_after=error.retry_after or 60.0)
    if _NOT_FOUND_CODE.match(code) or (
        "METHOD" not in code.upper() and _NOT_FOUND_TEXT.search(error.description)
    ):
        return Outcome("not_found", reason=reason)
    if error.status >= 500 or code.startswith("HTTP_"):
        return Outcome("retry", reason=reason)
    if (
        error.status in (401, 403)
        or code in _ACCESS_CODES
        or _PERMISSION_CODE.match(code)
        or _ACCESS_TEXT.search(error.description)
    ):
        # Credentials, scope or plan: a configuration fix makes the pending writes work again.
        return Outcome("retry", reason=f"access refused: {reason}")
    return Outcome("permanent", reason=reason)


def command(method: str, params: Mapping[str, Any]) -> str:
    """A batch sub-command: ``method?query`` with PHP-style bracketed keys."""
    parts: list[str] = []

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{prefix}[{k}]", v)
        elif isinstance(value, list | tuple):
            for v in value:
                add(f"{prefix}[]", v)
        else:
            parts.append(f"{quote(prefix, safe='[]')}={quote(str(value), safe='')}")

    for key, value in params.items():
        add(key, value)
    return f"{method}?{'&'.join(parts)}"


def first_by_key(keys: Iterable[str], found: Iterable[Snapshot]) -> dict[str, Snapshot | None]:
    """Each key's first snapshot that carries exactly that key (lists are ordered by id, so the
    lowest id); None where none does. The portal's IN filter may match more loosely than
    equality (its collation), hence the exact comparison."""
    first: dict[str, Snapshot] = {}
    for snapshot in found:
        if snapshot.order_key is not None:
            first.setdefault(snapshot.order_key, snapshot)
    return {key: first.get(key) for key in keys}


def update_params(mode: Mode, ref: str, native: str) -> dict[str, Any]:
    e = entity(mode)
    return {"id": int(ref), "fields": {e.status_field: native}}


# -- the client -----------------------------------------------------------------------------


class Bitrix24Client(PlatformClient):
    name = NAME

    def __init__(
        self,
        settings: Settings,
        context: ClientContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        context = context or ClientContext()
        self._context = context
        self._mode: Mode = settings.bitrix24_mode
        self._entity = entity(self._mode)
        self._key_field = settings.bitrix24_key_field or self._entity.default_key_field
        self._category = settings.bitrix24_deal_category
        self._store = context.store
        if settings.bitrix24_application_token is None:
            raise ConfigError(
                "BRIDGE_BITRIX24_APPLICATION_TOKEN is required when Bitrix24 is mapped "
                "(it authenticates incoming events)"
            )
        if self._mode == "deals":
            wrong = sorted(n for n in context.natives if stage_category(n) != self._category)
            if wrong:
                raise ConfigError(
                    f"deal stages {', '.join(wrong)} are not in pipeline "
                    f"{self._category} (BRIDGE_BITRIX24_DEAL_CATEGORY); stages of pipeline N "
                    "are written C<N>:STAGE, those of the default pipeline 0 without a prefix"
                )
        self._oauth: dict[str, str] | None = None
        if settings.bitrix24_webhook_url is not None:
            self._base = settings.bitrix24_webhook_url.get_secret_value().rstrip("/") + "/"
        elif settings.bitrix24_portal_url and settings.bitrix24_client_id:
            if settings.bitrix24_client_secret is None or settings.bitrix24_refresh_token is None:
                raise ConfigError(
                    "OAuth needs BRIDGE_BITRIX24_CLIENT_SECRET and BRIDGE_BITRIX24_REFRESH_TOKEN"
                )
            self._base = settings.bitrix24_portal_url.rstrip("/") + "/"
            self._oauth = {
                "client_id": settings.bitrix24_client_id,
                "client_secret": settings.bitrix24_client_secret.get_secret_value(),
                "access_token": (
                    settings.bitrix24_access_token.get_secret_value()
                    if settings.bitrix24_access_token
                    else ""
                ),
                "refresh_token": settings.bitrix24_refresh_token.get_secret_value(),
            }
            self._oauth_url = settings.bitrix24_oauth_url
            self._tokens_loaded = False
        else:
            raise ConfigError(
                "Bitrix24 needs BRIDGE_BITRIX24_WEBHOOK_URL, or OAuth: "
                "BRIDGE_BITRIX24_PORTAL_URL, _CLIENT_ID, _CLIENT_SECRET, _REFRESH_TOKEN"
            )
        try:
            url = httpx.URL(self._base)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError("needs http(s)://host/")
            if url.port is not None and not 0 < url.port < 65536:
                raise ValueError(f"port {url.port} is out of range")
        except (httpx.InvalidURL, ValueError, OverflowError) as exc:
            raise ConfigError(f"the Bitrix24 URL is not a valid http(s) URL ({exc})") from None
        self._http = httpx.AsyncClient(
            # Without this header the portal parses the body as a form and sees no parameters.
            headers={
                "Accept": "application/json",
                "Content-Type": "application/json",
                "User-Agent": "bridge (order-status sync)",
            },
            timeout=httpx.Timeout(settings.bitrix24_timeout_seconds, connect=15.0),
            transport=transport,
        )
        # One bucket for everything that talks to the portal: worker, delivery, poller.
        # Until the portal first answers, one request at a time: should its bucket be full
        # (someone else uses it, or a bridge restarted), one request is refused, not fifty.
        self.bucket: LeakyBucket = LeakyBucket(
            settings.bitrix24_rate_per_second, settings.bitrix24_burst, probe=True
        )
        self._refresh_lock = asyncio.Lock()
        self._operating_until: dict[str, float] = {}  # method -> refused until (unix time)
        self._reset_at: dict[str, float] = {}  # method -> its time budget's next reset
        self.calls = 0

    # -- transport ------------------------------------------------------------------------

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call a REST method; returns the whole answer. Raises B24Error or ReadFailed.

        Waits for the shared bucket before sending; a refusal for the rate limit is waited
        out and sent again (the bucket is then known to be full), so callers only see the
        errors that are really theirs.
        """
        refreshed = False
        for _ in range(5):
            blocked = self._operating_until.get(method, 0.0) - time.time()
            if blocked > 0:
                raise B24Error("OPERATION_TIME_LIMIT", "method time budget used up", 429, blocked)
            await self.bucket.acquire()
            body = dict(params or {})
            try:
                if self._oauth is not None:
                    await self._load_tokens()
                    body["auth"] = self._oauth["access_token"]
                self.calls += 1
                self._context.count(NAME, method)
                response = await self._http.post(self._base + method, content=orjson.dumps(body))
            except BaseException as exc:
                self.bucket.answered(heard=False)
                if isinstance(exc, httpx.HTTPError):
                    raise ReadFailed(f"{method}: {exc!r}") from exc
                raise
            self.bucket.answered()
            try:
                answer = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                answer = None
            error = error_of(response.status_code, answer)
            if error is None:
                self._note_operating(method, answer)
                return answer
            if error.code == "QUERY_LIMIT_EXCEEDED":
                # Someone else shares the portal's bucket: assume it full and wait it out.
                self.bucket.fill()
                log.warning("Bitrix24 refused %s: request rate limit; slowing down", method)
                continue
            if self._oauth is not None and error.code in (
                "expired_token",
                "invalid_token",
                "NO_AUTH_FOUND",
            ):
                # Expired, or never given (an empty BRIDGE_BITRIX24_ACCESS_TOKEN): exchange the
                # refresh token once; a refusal of that surfaces as its own error.
                if refreshed:
                    raise error
                await self._refresh(str(body["auth"]))  # the token this call was refused with
                refreshed = True
                continue
            if error.code == "OPERATION_TIME_LIMIT":
                now = time.time()
                reset = self._reset_at.get(method, 0.0)
                self._operating_until[method] = reset if reset > now else now + 60.0
                wait = self._operating_until[method] - now
                raise B24Error(error.code, error.description, error.status, wait)
            raise error
        raise B24Error("QUERY_LIMIT_EXCEEDED", "still refused after waiting", 503, 1.0)

    def _note_operating(self, method: str, answer: Any) -> None:
        # Remember when the method's time budget frees up, should it run out: the refusal
        # itself does not say, the last successful answer does.
        timing = answer.get("time") if isinstance(answer, dict) else None
        if isinstance(timing, dict) and timing.get("operating_reset_at"):
            self._reset_at[method] = float(timing["operating_reset_at"])

    async def _load_tokens(self) -> None:
        assert self._oauth is not None
        if self._tokens_loaded or self._store is None:
            return
        self._tokens_loaded = True
        stored = await self._store.get_watermark(TOKENS_VALUE)
        if stored:
            tokens = orjson.loads(stored)
            self._oauth["access_token"] = tokens["access_token"]
            self._oauth["refresh_token"] = tokens["refresh_token"]

    async def _refresh(self, stale_access_token: str) -> None:
        """Exchange the refresh token once, however many calls found the token expired."""
        assert self._oauth is not None
        async with self._refresh_lock:
            if self._oauth["access_token"] != stale_access_token:
                return  # another call refreshed meanwhile
            if self._store is not None:
                # Another process (a command beside `serve`) may have refreshed already: its
                # tokens are the valid ones now, and ours are dead.
                stored = await self._store.get_watermark(TOKENS_VALUE)
                if stored:
                    tokens = orjson.loads(stored)
                    if tokens["access_token"] != stale_access_token:
                        self._oauth["access_token"] = tokens["access_token"]
                        self._oauth["refresh_token"] = tokens["refresh_token"]
                        return
            params = {
                "grant_type": "refresh_token",
                "client_id": self._oauth["client_id"],
                "client_secret": self._oauth["client_secret"],
                "refresh_token": self._oauth["refresh_token"],
            }
            try:
                response = await self._http.get(self._oauth_url, params=params)
                answer = orjson.loads(response.content)
            except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
                raise ReadFailed(f"OAuth refresh: {exc!r}") from exc
            if response.status_code != 200 or "access_token" not in answer:
                raise B24Error(
                    str(answer.get("error", f"HTTP_{response.status_code}")),
                    str(answer.get("error_description", "OAuth refresh refused")),
                    401,
                )
            self._oauth["access_token"] = answer["access_token"]
            self._oauth["refresh_token"] = answer["refresh_token"]
            if self._store is not None:
                # The old refresh token is dead now: losing the new one would lock us out.
                await self._store.set_watermark(
                    TOKENS_VALUE,
                    orjson.dumps(
                        {k: answer[k] for k in ("access_token", "refresh_token")}
                    ).decode(),
                )

    # -- reads ----------------------------------------------------------------------------

    def _snapshot(self, item: Mapping[str, Any]) -> Snapshot:
        e = self._entity
        key = item.get(self._key_field)
        return Snapshot(
            NAME,
            str(item.get(e.id_field)),
            str(key) if key not in (None, "") else None,
            str(item.get(e.status_field) or ""),
        )

    async def read(self, ref: str) -> Snapshot | None:
        e = self._entity
        try:
            answer = await self.call(e.get, {"id": int(ref)})
        except B24Error as exc:
            if classify_error(exc, time.time()).kind == "not_found":
                return None
            raise ReadFailed(f"{e.get} {ref}: {exc}", exc.retry_after) from exc
        item = answer.get("result")
        if e.result_key and isinstance(item, dict):
            item = item.get(e.result_key)
        if not isinstance(item, dict):
            raise ReadFailed(f"{e.get} {ref}: answer has no {e.result_key or 'result'}")
        return self._snapshot(item)

    reads_in_batches = BATCH_LIMIT

    async def wait_ready(self) -> bool:
        return await self.bucket.wait_for_room()

    async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
        """Up to 50 reads for the price of one request (``batch``); errors stay per order."""
        e = self._entity
        results: dict[str, Snapshot | ReadFailed | None] = {}
        for start in range(0, len(refs), BATCH_LIMIT):
            chunk = list(refs[start : start + BATCH_LIMIT])
            cmd = {f"r{i}": command(e.get, {"id": int(ref)}) for i, ref in enumerate(chunk)}
            try:
                answer = await self.call("batch", {"halt": 0, "cmd": cmd})
            except B24Error as exc:
                results.update(
                    (ref, ReadFailed(f"batch {e.get}: {exc}", exc.retry_after)) for ref in chunk
                )
                continue
            except ReadFailed as exc:
                results.update((ref, exc) for ref in chunk)
                continue
            outer = answer.get("result") or {}
            found = outer.get("result") or {}
            errors = outer.get("result_error") or {}
            for i, ref in enumerate(chunk):
                key = f"r{i}"
                err = errors.get(key) if isinstance(errors, dict) else None
                item = found.get(key) if isinstance(found, dict) else None
                if err:
                    error = error_of(400, err) or B24Error("0", "", 400)
                    if classify_error(error, time.time()).kind == "not_found":
                        results[ref] = None
                    else:
                        results[ref] = ReadFailed(f"{e.get} {ref}: {error}", error.retry_after)
                    continue
                if e.result_key and isinstance(item, dict):
                    item = item.get(e.result_key)
                if isinstance(item, dict):
                    results[ref] = self._snapshot(item)
                else:
                    results[ref] = ReadFailed(f"{e.get} {ref}: no result in the batch answer")
        return results

    def _list_params(self, filters: Mapping[str, Any], start: int) -> dict[str, Any]:
        e = self._entity
        select = [e.id_field, e.status_field, self._key_field, e.modified_field]
        params: dict[str, Any] = {
            "select": select,
            "filter": dict(filters),
            "order": {e.id_field: "asc"},
            "start": start,
        }
        if self._mode == "deals":
            params["filter"]["CATEGORY_ID"] = self._category
        return params

    def _listed(self, result: Any) -> list[Snapshot]:
        """The items of a list answer's ``result`` (sale wraps them in ``orders``)."""
        items = result
        if self._entity.list_key and isinstance(items, dict):
            items = items.get(self._entity.list_key)
        return [self._snapshot(i) for i in items or [] if isinstance(i, dict)]

    async def _list(
        self, filters: Mapping[str, Any], start: int = 0
    ) -> AsyncIterator[list[Snapshot]]:
        e = self._entity
        while True:
            try:
                answer = await self.call(e.list, self._list_params(filters, start))
            except B24Error as exc:
                raise ReadFailed(f"{e.list}: {exc}", exc.retry_after) from exc
            yield self._listed(answer.get("result"))
            next_start = answer.get("next")
            if next_start is None:
                return
            start = int(next_start)

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        found = (await self.read_many_by_key([order_key]))[order_key]
        if isinstance(found, ReadFailed):
            raise found
        return found

    keys_in_batches = KEYS_PER_CALL

    async def read_many_by_key(
        self, keys: Sequence[str]
    ) -> dict[str, Snapshot | ReadFailed | None]:
        """Up to 2,500 orders by key per request: one ``batch`` of up to 50 list commands, each
        filtering the key field with IN (``@<key field>``) over 50 keys. A command's error fails
        only its keys; a key no order carries is None."""
        unique = list(dict.fromkeys(keys))
        results: dict[str, Snapshot | ReadFailed | None] = {}
        for start in range(0, len(unique), KEYS_PER_CALL):
            part = unique[start : start + KEYS_PER_CALL]
            chunks = [part[i : i + KEYS_PER_LIST] for i in range(0, len(part), KEYS_PER_LIST)]
            if len(chunks) == 1:  # one list costs what a batch of one costs: send it plainly
                results.update(await self._by_keys(chunks[0]))
            else:
                results.update(await self._by_keys_batched(chunks))
        return results

    def _key_filter(self, keys: Sequence[str]) -> dict[str, Any]:
        return {f"@{self._key_field}": list(keys)}

    async def _by_keys(
        self, keys: Sequence[str], start: int = 0, found: Sequence[Snapshot] = ()
    ) -> Mapping[str, Snapshot | ReadFailed | None]:
        """``keys`` looked up with plain list calls from ``start`` on, after the items already
        ``found`` (the first page of the same list, from a batch)."""
        try:
            listed = [s async for page in self._list(self._key_filter(keys), start) for s in page]
        except ReadFailed as exc:
            return dict.fromkeys(keys, exc)
        return first_by_key(keys, [*found, *listed])

    async def _by_keys_batched(
        self, chunks: Sequence[Sequence[str]]
    ) -> Mapping[str, Snapshot | ReadFailed | None]:
        """One ``batch`` call, a list command for each chunk of keys."""
        e = self._entity
        cmd = {
            f"k{i}": command(e.list, self._list_params(self._key_filter(chunk), 0))
            for i, chunk in enumerate(chunks)
        }
        try:
            answer = await self.call("batch", {"halt": 0, "cmd": cmd})
        except B24Error as exc:
            failed = ReadFailed(f"batch {e.list}: {exc}", exc.retry_after)
            return {key: failed for chunk in chunks for key in chunk}
        except ReadFailed as exc:
            return {key: exc for chunk in chunks for key in chunk}
        outer = answer.get("result") or {}
        found = outer.get("result") or {}
        errors = outer.get("result_error") or {}
        more = outer.get("result_next") or {}
        results: dict[str, Snapshot | ReadFailed | None] = {}
        for i, chunk in enumerate(chunks):
            name = f"k{i}"
            err = errors.get(name) if isinstance(errors, dict) else None
            if err:
                error = error_of(400, err) or B24Error("0", "", 400)
                failed = ReadFailed(f"{e.list}: {error}", error.retry_after)
                results.update(dict.fromkeys(chunk, failed))
                continue
            if not isinstance(found, dict) or name not in found:
                failed = ReadFailed(f"{e.list}: no result in the batch answer")
                results.update(dict.fromkeys(chunk, failed))
                continue
            listed = self._listed(found[name])
            next_start = more.get(name) if isinstance(more, dict) else None
            if next_start is None:
                results.update(first_by_key(chunk, listed))
            else:  # more orders than a page (keys shared by several): the rest page by page
                results.update(await self._by_keys(chunk, int(next_start), listed))
        return results

    async def changes_since(self, since: str | None, until: str) -> AsyncIterator[list[NewHint]]:
        modified = self._entity.modified_field
        filters = {f"<={modified}": until}
        if since is not None:
            filters[f">={modified}"] = since
        async for asked, page in self._pages(filters):
            yield [
                NewHint(NAME, s.ref, "poll", asked, s.native_status or None, s.order_key)
                for s in page
            ]

    async def _pages(
        self, filters: Mapping[str, Any]
    ) -> AsyncIterator[tuple[float, list[Snapshot]]]:
        """Every item of a list, with when each part was asked for: the first page by itself
        (its ``total`` tells how many follow), then up to 50 pages per ``batch`` call. After a
        mass update every order shows as changed for a whole poll overlap; 2,500 a request
        instead of 50 keeps those polls from eating the portal's budget."""
        e = self._entity
        asked = time.time()
        try:
            answer = await self.call(e.list, self._list_params(filters, 0))
        except B24Error as exc:
            raise ReadFailed(f"{e.list}: {exc}", exc.retry_after) from exc
        yield asked, self._listed(answer.get("result"))
        start = answer.get("next")
        total = int(answer.get("total") or 0)
        while start is not None:
            starts = list(range(int(start), max(total, int(start) + 1), PAGE_SIZE))[:BATCH_LIMIT]
            cmd = {
                f"p{i}": command(e.list, self._list_params(filters, at))
                for i, at in enumerate(starts)
            }
            asked = time.time()
            try:
                answer = await self.call("batch", {"halt": 0, "cmd": cmd})
            except B24Error as exc:
                raise ReadFailed(f"batch {e.list}: {exc}", exc.retry_after) from exc
            outer = answer.get("result") or {}
            found = outer.get("result") or {}
            errors = outer.get("result_error") or {}
            more = outer.get("result_next") or {}
            if errors:
                raise ReadFailed(f"batch {e.list}: {errors}")
            items: list[Snapshot] = []
            for i in range(len(starts)):
                items += self._listed(found.get(f"p{i}") if isinstance(found, dict) else None)
            yield asked, items
            last = f"p{len(starts) - 1}"
            following = more.get(last) if isinstance(more, dict) else None
            start = None if following is None else int(following)
            totals = outer.get("result_total")
            if isinstance(totals, dict):
                total = max(total, int(totals.get(last) or 0))

    # -- writes ---------------------------------------------------------------------------

    async def _refs_for(self, requests: Sequence[WriteRequest]) -> list[str | Outcome]:
        """Each request's id: its ref, else found by its key, all of those in one look-up. An
        outcome instead where the look-up failed (retry) or no order has the key (not_found)."""
        found = await self.read_many_by_key([r.order_key for r in requests if not r.ref])
        return [r.ref or self._found_ref(r.order_key, found[r.order_key]) for r in requests]

    def _found_ref(self, order_key: str, found: Snapshot | ReadFailed | None) -> str | Outcome:
        if isinstance(found, ReadFailed):
            return Outcome("retry", reason=found.reason, retry_after=found.retry_after)
        if found is None:
            return Outcome(
                "not_found", reason=f"no {self._mode[:-1]} with {self._key_field}={order_key}"
            )
        return found.ref

    async def write(self, request: WriteRequest) -> Outcome:
        [ref] = await self._refs_for([request])
        if isinstance(ref, Outcome):
            return ref
        try:
            await self.call(self._entity.update, update_params(self._mode, ref, request.native))
        except B24Error as exc:
            return classify_error(exc, time.time())
        except ReadFailed as exc:
            return Outcome("retry", reason=exc.reason)
        return Outcome("done", learned_ref=None if request.ref else ref)

    async def write_many(self, requests: Sequence[WriteRequest]) -> list[Outcome]:
        """Up to 50 updates per ``batch`` call; each command's error is its own outcome. Ids
        not known yet are found by key first, all in one look-up."""
        outcomes: dict[int, Outcome] = {}
        refs: dict[int, str] = {}
        for i, ref in enumerate(await self._refs_for(requests)):
            if isinstance(ref, Outcome):
                outcomes[i] = ref
            else:
                refs[i] = ref
        pending = sorted(refs)
        if len(pending) == 1:  # one update costs what a batch of one costs: send it plainly
            i = pending.pop()
            outcome = await self.write(
                WriteRequest(
                    requests[i].order_key, requests[i].native, refs[i], requests[i].options
                )
            )
            if outcome.kind == "done" and not requests[i].ref:
                outcome = Outcome("done", warning=outcome.warning, learned_ref=refs[i])
            outcomes[i] = outcome
        for start in range(0, len(pending), BATCH_LIMIT):
            chunk = pending[start : start + BATCH_LIMIT]
            cmd = {
                f"w{i}": command(
                    self._entity.update, update_params(self._mode, refs[i], requests[i].native)
                )
                for i in chunk
            }
            try:
                answer = await self.call("batch", {"halt": 0, "cmd": cmd})
            except B24Error as exc:
                outcome = classify_error(exc, time.time())
                outcomes.update((i, outcome) for i in chunk)
                continue
            except ReadFailed as exc:
                outcomes.update((i, Outcome("retry", reason=exc.reason)) for i in chunk)
                continue
            result = answer.get("result") or {}
            errors = result.get("result_error") or {}
            for i in chunk:
                err = errors.get(f"w{i}") if isinstance(errors, dict) else None
                if err:
                    outcomes[i] = classify_error(
                        error_of(400, err) or B24Error("0", "", 400), time.time()
                    )
                else:
                    outcomes[i] = Outcome("done", learned_ref=None if requests[i].ref else refs[i])
        return [outcomes[i] for i in range(len(requests))]

    # -- status definitions (the seed API) ------------------------------------------------

    async def status_definitions(self) -> list[StatusDefinition]:
        """Order statuses (type O) in orders mode; the pipeline's stages in deals mode."""
        definitions: list[StatusDefinition] = []
        if self._mode == "orders":
            start: int | None = 0
            while start is not None:
                answer = await self.call(
                    "sale.status.list",
                    {"filter": {"type": "O"}, "order": {"sort": "asc"}, "start": start},
                )
                result = answer.get("result") or {}
                # The docs' example says "statuses", their table "status": accept both.
                rows = result.get("statuses") or result.get("status") or [] if result else []
                definitions += [
                    StatusDefinition(str(r["id"]), str(r.get("type") or "O"), r.get("xmlId"))
                    for r in rows
                    if isinstance(r, dict) and "id" in r
                ]
                start = answer.get("next")
            return definitions
        entity_id = "DEAL_STAGE" if self._category == 0 else f"DEAL_STAGE_{self._category}"
        answer = await self.call("crm.status.list", {"filter": {"ENTITY_ID": entity_id}})
        return [
            StatusDefinition(str(r["STATUS_ID"]), entity_id, None)
            for r in answer.get("result") or []
            if isinstance(r, dict) and "STATUS_ID" in r
        ]

    async def stamp(self, definition: StatusDefinition, canonical: str) -> None:
        """Write the canonical key into a status's xmlId (``type`` is required, even so)."""
        await self.call(
            "sale.status.update",
            {"id": definition.id, "fields": {"type": definition.type, "xmlId": canonical}},
        )

    @property
    def mode(self) -> Mode:
        return self._mode

    async def event_handlers(self) -> list[dict[str, Any]]:
        """The application's event handlers (``event.get``): ``{event, handler, ...}`` each.

        Only an application (OAuth) may ask; an inbound webhook would be answered
        403 WRONG_AUTH_TYPE, so that error is raised here without spending a request.
        """
        if self._oauth is None:
            raise B24Error(
                "WRONG_AUTH_TYPE", "event.get needs OAuth; an inbound webhook may not call it", 403
            )
        answer = await self.call("event.get")
        result = answer.get("result") if isinstance(answer, dict) else None
        return [h for h in result or [] if isinstance(h, dict)]

    async def aclose(self) -> None:
        await self._http.aclose()


@dataclass(frozen=True, slots=True)
class StatusDefinition:
    id: str
    type: str  # "O" for order statuses; the stage entity for deal stages
    xml_id: str | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    mode: Mode
    defined: list[str]
    missing: dict[str, str]  # native status the mapping uses -> its canonical status
    unstamped: list[str]  # defined, mapped, but xmlId is not the canonical key
    stamped: list[str]


def compare_statuses(
    wanted: Mapping[str, str], defined: Sequence[StatusDefinition]
) -> tuple[list[str], list[StatusDefinition]]:
    """Which mapped natives the portal lacks, and which defined ones need a stamp.

    ``wanted`` maps each native status the mapping uses to its canonical status.
    """
    by_id = {d.id: d for d in defined}
    missing = sorted(n for n in wanted if n not in by_id)
    to_stamp = [by_id[n] for n in sorted(wanted) if n in by_id and by_id[n].xml_id != wanted[n]]
    return missing, to_stamp


async def check_statuses(
    client: Bitrix24Client, wanted: Mapping[str, str], *, stamp: bool
) -> StatusReport:
    """Compare the mapping with the portal; stamp xmlIds (orders mode, nothing missing)."""
    defined = await client.status_definitions()
    missing, to_stamp = compare_statuses(wanted, defined)
    stamped: list[str] = []
    if stamp and client.mode == "orders" and not missing:
        for definition in to_stamp:
            await client.stamp(definition, wanted[definition.id])
            stamped.append(definition.id)
    return StatusReport(
        client.mode,
        [d.id for d in defined],
        {n: wanted[n] for n in missing},
        [d.id for d in to_stamp if d.id not in stamped],
        stamped,
    )


SPEC = PlatformSpec(
    name=NAME,
    native_type=str,
    options=Bitrix24Options,
    make_client=Bitrix24Client,
    parse_webhook=parse_event,
    polled=True,
    write_concurrency=1,
    write_batch=BATCH_LIMIT,
)
