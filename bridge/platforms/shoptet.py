"""Shoptet: signed ``order:*`` webhooks in, ``PATCH /api/orders/{code}/status`` out.

Facts relied on (docs/platforms.md has the sources):

* webhooks carry no status, only ``{eshopId, event, eventCreated, eventInstance}``, signed with
  lowercase hex HMAC-SHA1 of the raw body in ``Shoptet-Webhook-Signature``;
* mass events carry a JSON-encoded list of order codes in ``eventInstance``;
* order codes are strings (may hold letters and dashes): never cast them to int;
* the status PATCH is all-or-nothing, may answer 200 *with* errors (``document-not-generated``:
  the status did change), 404, 409 ``record-already-changed``, 422, 423 (a repeat write within
  ~5 s), 429 with ``Retry-After`` as an HTTP date, and 5xx;
* at most 3 concurrent connections per token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

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
from bridge.retry import parse_retry_after
from bridge.signing import verify_hmac_sha1_hex

NAME = "shoptet"
SIGNATURE_HEADER = "shoptet-webhook-signature"
ORDER_EVENTS = frozenset({"order:create", "order:update", "order:cancel"})
MASS_EVENTS = frozenset({"order:massUpdate"})
MAX_CODE_LENGTH = 100
ORDER_CODES_LIMIT = 50  # orderCodes per GET /api/orders, and orders per page
# Shoptet's own lock on a repeated write lasts up to 5 s.
LOCKED_RETRY_SECONDS = 5.0


class ShoptetOptions(TargetOptions):
    """Side effects of writing a status to Shoptet (all off unless the mapping says so)."""

    paid: bool | None = None
    billing_method_id: int | None = None
    suppress_email: bool = False
    suppress_sms: bool = False
    suppress_documents: bool = False


# -- pure: webhooks -------------------------------------------------------------------------


def parse_webhook(settings: Settings, headers: Mapping[str, str], body: bytes) -> ParsedWebhook:
    """Verify and parse one webhook delivery. Raises WebhookRejected with status and reason."""
    key = settings.shoptet_webhook_key
    signature = headers.get(SIGNATURE_HEADER)
    if not signature:
        raise WebhookRejected(401, "missing Shoptet-Webhook-Signature header")
    if key is None or not verify_hmac_sha1_hex(key.get_secret_value(), body, signature):
        raise WebhookRejected(401, "Shoptet-Webhook-Signature does not match the body")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookRejected(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise WebhookRejected(400, "body must be a JSON object")
    eshop_id = payload.get("eshopId")
    event = payload.get("event")
    instance = payload.get("eventInstance")
    if isinstance(eshop_id, bool) or not isinstance(eshop_id, int):
        raise WebhookRejected(400, "eshopId must be an integer")
    if not isinstance(event, str) or not event:
        raise WebhookRejected(400, "event must be a non-empty string")
    if not isinstance(payload.get("eventCreated"), str):
        raise WebhookRejected(400, "eventCreated must be a string")
    if not isinstance(instance, str) or not instance:
        raise WebhookRejected(400, "eventInstance must be a non-empty string")
    if settings.shoptet_eshop_id is not None and eshop_id != settings.shoptet_eshop_id:
        raise WebhookRejected(
            400, f"webhook is for e-shop {eshop_id}; this bridge serves {settings.shoptet_eshop_id}"
        )
    if event in ORDER_EVENTS:
        return ParsedWebhook(event, (_order_code(instance),))
    if event in MASS_EVENTS:
        try:
            codes = orjson.loads(instance)
        except orjson.JSONDecodeError:
            raise WebhookRejected(400, f"{event} eventInstance must be a JSON list") from None
        if not isinstance(codes, list) or not all(
            isinstance(c, str | int) and not isinstance(c, bool) for c in codes
        ):
            raise WebhookRejected(400, f"{event} eventInstance must be a list of order codes")
        return ParsedWebhook(event, tuple(dict.fromkeys(_order_code(str(c)) for c in codes)))
    return ParsedWebhook(event, ())


def _order_code(value: str) -> str:
    if len(value) > MAX_CODE_LENGTH or not value.isprintable() or not value.strip():
        raise WebhookRejected(400, "eventInstance is not a valid order code")
    return value


# -- pure: requests and answers -------------------------------------------------------------


def status_path(code: str) -> str:
    return f"/api/orders/{quote(code, safe='')}/status"


def order_path(code: str) -> str:
    return f"/api/orders/{quote(code, safe='')}"


def status_request(native: str, options: ShoptetOptions) -> tuple[dict[str, str], dict[str, Any]]:
    """Query flags and JSON body of the status PATCH for one target."""
    params = {
        name: "true"
        for name, on in (
            ("suppressDocumentGeneration", options.suppress_documents),
            ("suppressEmailSending", options.suppress_email),
            ("suppressSmsSending", options.suppress_sms),
        )
        if on
    }
    data: dict[str, Any] = {"statusId": int(native)}
    if options.paid is not None:
        data["paid"] = options.paid
    if options.billing_method_id is not None:
        data["billingMethodId"] = options.billing_method_id
    return params, {"data": data}


def _errors(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [e for e in body["errors"] if isinstance(e, dict)]
    return []


def _describe(status: int, body: Any) -> str:
    errs = _errors(body)
    if errs:
        return "; ".join(f"{e.get('errorCode')}: {e.get('message')}" for e in errs)
    return f"HTTP {status}"


def classify_write(status: int, headers: Mapping[str, str], body: Any, now: float) -> Outcome:
    """What a status PATCH's answer means for the delivery."""
    if status == 200:
        errs = _errors(body)
        if errs:
            codes = {e.get("errorCode") for e in errs}
            if codes <= {"document-not-generated"}:
                return Outcome("done", warning=_describe(status, body))
            return Outcome(
                "permanent", reason=f"status change reported errors: {_describe(status, body)}"
            )
        return Outcome("done")
    reason = _describe(status, body)
    if status == 404:
        return Outcome("not_found", reason=reason)
    if status == 409:
        return Outcome("conflict", reason=reason)
    if status == 423:
        wait = parse_retry_after(headers.get("retry-after"), now)
        return Outcome("retry", reason=reason, retry_after=wait or LOCKED_RETRY_SECONDS)
    if status == 429 or status >= 500:
        return Outcome(
            "retry", reason=reason, retry_after=parse_retry_after(headers.get("retry-after"), now)
        )
    if status == 401:
        # A private token does not expire: a 401 is a configuration problem someone will fix;
        # keep retrying within the horizon rather than dropping every write.
        return Outcome("retry", reason=f"token rejected: {reason}")
    return Outcome("permanent", reason=reason)


def bucket_filling(value: str | None) -> float | None:
    """``X-RateLimit-Bucket-Filling: 12/200`` -> 0.06, how full the bucket is (None if absent
    or unreadable). A fraction, so a bucket of another size than ours still reads right."""
    if not value or "/" not in value:
        return None
    current, _, maximum = value.partition("/")
    try:
        level, size = float(current.strip()), float(maximum.strip())
    except ValueError:
        return None
    return level / size if size > 0 else None


def shoptet_time(value: str) -> str:
    """ISO 8601 as Shoptet writes it: ``2026-11-22T10:00:00+0000`` (no colon in the offset).

    httpx encodes the ``+`` as ``%2B``; a literal ``+`` would arrive as a space.
    """
    return datetime.fromisoformat(value).strftime("%Y-%m-%dT%H:%M:%S%z")


def snapshot_from_summary(order: Mapping[str, Any]) -> Snapshot:
    """A list item of ``GET /api/orders`` (it carries the status: no detail call needed)."""
    code = str(order.get("code") or "")
    status = order.get("status")
    status_id = status.get("id") if isinstance(status, dict) else None
    return Snapshot(NAME, code, code, "" if status_id is None else str(status_id))


def snapshot_from_order(body: Any, code: str) -> Snapshot:
    order = body.get("data", {}).get("order") if isinstance(body, dict) else None
    if not isinstance(order, dict):
        raise ReadFailed("order detail answer has no data.order")
    status = order.get("status")
    status_id = status.get("id") if isinstance(status, dict) else None
    native = "" if status_id is None else str(status_id)
    return Snapshot(NAME, code, str(order.get("code") or code), native)


# -- the client -----------------------------------------------------------------------------


class ShoptetClient(PlatformClient):
    name = NAME

    def __init__(
        self,
        settings: Settings,
        context: ClientContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._context = context or ClientContext()
        token = settings.shoptet_api_token
        if token is None:
            raise ConfigError("BRIDGE_SHOPTET_API_TOKEN is required when Shoptet is mapped")
        self._http = httpx.AsyncClient(
            base_url=settings.shoptet_base_url,
            headers={
                "Shoptet-Private-API-Token": token.get_secret_value(),
                # Required on every request, GET included; httpx adds none to a bodyless GET.
                "Content-Type": settings.shoptet_content_type,
                "Accept": "application/json",
            },
            timeout=httpx.Timeout(settings.shoptet_timeout_seconds, connect=30.0),
            transport=transport,
        )
        # 3 concurrent connections per token, shared by reads, writes and polls.
        self._slots = asyncio.Semaphore(settings.shoptet_max_connections)
        # Our copy of the token's leaky bucket, corrected by every X-RateLimit-Bucket-Filling.
        # Until the first answer tells how full it is, one request at a time.
        self.bucket: LeakyBucket = LeakyBucket(
            settings.shoptet_bucket_drain_per_second, settings.shoptet_bucket_capacity, probe=True
        )
        self._paused_until = 0.0

    async def _request(self, method: str, path: str, label: str, **kwargs: Any) -> httpx.Response:
        wait = self._paused_until - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        # The bucket first: a request waiting for its turn (a low-priority read behind writes)
        # must not hold one of the token's three connections meanwhile.
        async with self.bucket.slot(), self._slots:
            self._context.count(NAME, label)
            response = await self._http.request(method, path, **kwargs)
            filling = bucket_filling(response.headers.get("x-ratelimit-bucket-filling"))
            if filling is not None:
                self.bucket.set_level(filling * self.bucket.burst)
            if response.status_code == 429:
                # The bucket belongs to the token, not to the order: everyone waits.
                delay = parse_retry_after(response.headers.get("retry-after"), time.time())
                self._paused_until = max(self._paused_until, time.time() + (delay or 1.0))
            return response

    async def read(self, ref: str) -> Snapshot | None:
        try:
            response = await self._request("GET", order_path(ref), "GET /api/orders/{code}")
        except httpx.HTTPError as exc:
            raise ReadFailed(f"GET order {ref}: {exc!r}") from exc
        if response.status_code == 404:
            return None
        body = _json(response)
        if response.status_code != 200:
            wait = parse_retry_after(response.headers.get("retry-after"), time.time())
            raise ReadFailed(f"GET order {ref}: {_describe(response.status_code, body)}", wait)
        return snapshot_from_order(body, ref)

    reads_in_batches = ORDER_CODES_LIMIT

    async def wait_ready(self) -> bool:
        return await self.bucket.wait_for_room()

    async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
        """Up to 50 orders per ``GET /api/orders?orderCodes=``; a code not listed is missing."""
        results: dict[str, Snapshot | ReadFailed | None] = {}
        for start in range(0, len(refs), ORDER_CODES_LIMIT):
            chunk = list(refs[start : start + ORDER_CODES_LIMIT])
            if len(chunk) == 1:  # the detail costs the same and says "not found" plainly
                try:
                    results[chunk[0]] = await self.read(chunk[0])
                except ReadFailed as exc:
                    results[chunk[0]] = exc
                continue
            try:
                orders = [
                    o async for page in self._list({"orderCodes": ",".join(chunk)}) for o in page
                ]
            except ReadFailed as exc:
                results.update((code, exc) for code in chunk)
                continue
            by_code = {s.ref: s for s in orders}
            results.update((code, by_code.get(code)) for code in chunk)
        return results

    async def _list(self, params: Mapping[str, str]) -> AsyncIterator[list[Snapshot]]:
        """Pages of ``GET /api/orders`` (50 a page, the most the API gives)."""
        page = 1
        while True:
            query = {**params, "page": str(page), "itemsPerPage": str(ORDER_CODES_LIMIT)}
            try:
                response = await self._request(
                    "GET", "/api/orders", "GET /api/orders", params=query
                )
            except httpx.HTTPError as exc:
                raise ReadFailed(f"GET orders: {exc!r}") from exc
            body = _json(response)
            if response.status_code != 200:
                wait = parse_retry_after(response.headers.get("retry-after"), time.time())
                raise ReadFailed(f"GET orders: {_describe(response.status_code, body)}", wait)
            data = body.get("data") if isinstance(body, dict) else None
            items = data.get("orders") if isinstance(data, dict) else None
            yield [snapshot_from_summary(o) for o in items or [] if isinstance(o, dict)]
            paginator = data.get("paginator") if isinstance(data, dict) else None
            page_count = paginator.get("pageCount") if isinstance(paginator, dict) else None
            if not isinstance(page_count, int) or page >= page_count:
                return
            page += 1

    async def changes_since(self, since: str | None, until: str) -> AsyncIterator[list[NewHint]]:
        params = {"changeTimeTo": shoptet_time(until)}
        if since is not None:
            params["changeTimeFrom"] = shoptet_time(since)
        asked = time.time()
        async for page in self._list(params):
            yield [
                NewHint(NAME, s.ref, "poll", asked, s.native_status or None, s.order_key)
                for s in page
            ]
            asked = time.time()

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        return await self.read(order_key)  # the order key is the Shoptet order code

    keys_in_batches = ORDER_CODES_LIMIT

    async def read_many_by_key(
        self, keys: Sequence[str]
    ) -> dict[str, Snapshot | ReadFailed | None]:
        """The order key is the order code: up to 50 a call, as ``read_many``."""
        return await self.read_many(keys)

    async def write(self, request: WriteRequest) -> Outcome:
        assert isinstance(request.options, ShoptetOptions)
        code = request.ref or request.order_key
        params, body = status_request(request.native, request.options)
        try:
            response = await self._request(
                "PATCH",
                status_path(code),
                "PATCH /api/orders/{code}/status",
                params=params,
                json=body,
            )
        except httpx.HTTPError as exc:
            return Outcome("retry", reason=f"PATCH status: {exc!r}")
        return classify_write(response.status_code, response.headers, _json(response), time.time())

    # -- webhook subscriptions (bridge.subscriptions) -------------------------------------

    async def _webhooks_call(
        self, method: str, path: str, expect: int, **kwargs: Any
    ) -> dict[str, Any]:
        """``data`` of one /api/webhooks answer; ReadFailed for anything but ``expect``."""
        label = f"{method} {path}"
        try:
            response = await self._request(method, path, label, **kwargs)
        except httpx.HTTPError as exc:
            raise ReadFailed(f"{label}: {exc!r}") from exc
        body = _json(response)
        if response.status_code != expect:
            wait = parse_retry_after(response.headers.get("retry-after"), time.time())
            raise ReadFailed(f"{label}: {_describe(response.status_code, body)}", wait)
        data = body.get("data") if isinstance(body, dict) else None
        return data if isinstance(data, dict) else {}

    async def list_webhooks(self) -> list[dict[str, Any]]:
        """Every registered webhook, ``{id, event, url, ...}``, from all pages."""
        hooks: list[dict[str, Any]] = []
        page = 1
        while True:
            # 500 a page is the most Shoptet gives: one call in practice.
            query = {"page": str(page), "itemsPerPage": "500"}
            data = await self._webhooks_call("GET", "/api/webhooks", 200, params=query)
            hooks += [w for w in data.get("webhooks") or [] if isinstance(w, dict)]
            paginator = data.get("paginator")
            page_count = paginator.get("pageCount") if isinstance(paginator, dict) else None
            if not isinstance(page_count, int) or page >= page_count:
                return hooks
            page += 1

    async def register_webhooks(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``POST /api/webhooks`` (``{event, url}`` each), 50 a call; the webhooks created.

        Shoptet refuses a whole call for one bad item (422 for an event already registered,
        409 for ``order:update`` with ``order:cancel``): ReadFailed says which.
        """
        created: list[dict[str, Any]] = []
        for start in range(0, len(items), ORDER_CODES_LIMIT):  # 50, the same limit
            chunk = [dict(item) for item in items[start : start + ORDER_CODES_LIMIT]]
            data = await self._webhooks_call("POST", "/api/webhooks", 201, json={"data": chunk})
            created += [w for w in data.get("webhooks") or [] if isinstance(w, dict)]
        return created

    async def renew_signature_key(self) -> str:
        """A new webhook signature key; the old one stops working at once. Never retried:
        every call makes another key, and one lost in transit cannot be asked for again."""
        path = "/api/webhooks/renew-signature-key"
        key = (await self._webhooks_call("POST", path, 200)).get("signatureKey")
        if not isinstance(key, str) or not key:
            raise ReadFailed(f"POST {path}: the answer has no data.signatureKey")
        return key

    async def aclose(self) -> None:
        await self._http.aclose()


def _json(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


SPEC = PlatformSpec(
    name=NAME,
    native_type=int,
    options=ShoptetOptions,
    make_client=ShoptetClient,
    parse_webhook=parse_webhook,
    polled=True,  # webhooks are given up after 3 tries; the poller catches what they miss
    write_concurrency=3,
    write_batch=3,
)
