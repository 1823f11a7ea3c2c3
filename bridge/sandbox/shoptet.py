"""A simulator of one Shoptet e-shop's REST API, its webhooks included.

Serve ``ShoptetSimulator(...).app`` (a Starlette app) with
:class:`bridge.sandbox.server.ServerThread`; the server root plays ``https://api.myshoptet.com``.
Tests drive it through its control methods (``add_order``, ``set_status_as_person``,
``fail_next``, ...) from any thread and read what happened from ``requests``,
``webhook_deliveries`` and ``order_side_effects``.

It follows Shoptet's OpenAPI file (``shoptet/developers`` ``openapi/openapi.yaml``) and the
project's notes (``shared/reference/notes/shoptet.md``). Every JSON answer validates against the
spec (``tests/sandbox/test_shoptet_simulator.py`` checks that).

Endpoints: ``GET /api/eshop``, ``GET /api/orders``, ``GET /api/orders/changes``,
``GET /api/orders/statuses``, ``GET /api/orders/{code}``, ``PATCH /api/orders/{code}/status``,
``GET|POST /api/webhooks``, ``GET|PATCH|DELETE /api/webhooks/{id}``,
``POST /api/webhooks/renew-signature-key``, ``GET /api/webhooks/notifications``. Anything else is
a 404 envelope, including real endpoints the simulator does not model.

Order of checks for each request: maintenance (``set_down``) -> connections per token (nginx
``limit_conn``) -> ``fail_next`` -> token -> leaky bucket -> routing -> URL lock (writes) ->
``set_latency`` delay -> the endpoint.

Choices where the docs are silent or only secondary sources speak (the bridge must not rely on
any of them being exactly so):

* A status PATCH that changes nothing (same status, same ``paid``, same billing method) does not
  touch ``changeTime``, has no side effects and sends **no** webhook. The spec only says
  "no change is done and no document is generated".
* Every real change sends ``order:update``, the bridge's own PATCHes included (assumed, as in the
  notes). ``order:paid`` is also sent when ``paid`` goes to true from false/null, and
  ``order:cancel`` when the status becomes -4 (the spec's "Cancelled" example).
* Status names: -1 "Nevyřízená" (default for new orders), -2 "Vyřizuje se", -3 "Vyřízena",
  -4 "Stornována"; only -4/"Cancelled" and -1 as the default are in the spec. Which statuses
  send e-mails/SMS or generate documents is invented but plausible (see ``DEFAULT_STATUSES``).
* ``document_error_statuses`` fail only when a document is actually attempted: the status must
  generate one, it must not exist yet, and ``suppressDocumentGeneration`` must not be set.
* Error codes not in the spec: ``invalid-token`` (401, wrong token; ``missing-access-token``
  when absent is in the spec), ``too-many-requests`` (429 from the bucket), ``locked`` (423),
  ``system-maintenance`` (503), ``unknown-error`` (500), ``endpoint-not-found`` (404),
  ``webhook-event-conflict`` (409), ``too-many-items`` (413, over 50 webhooks in one POST),
  ``simulated-failure`` (any other ``fail_next`` status); messages are modelled on the spec's.
  A duplicate webhook event gives 422 ``invalid-request-data`` with the spec's message "Webhook
  already exists for this event". Bad query values give 400 ``invalid-parameter`` (an
  unencoded ``+`` in a datetime arrives as a space and fails this way); a missing required one
  400 ``missing-parameter``. A body that breaks the PATCH schema gives 422
  ``invalid-request-data`` with ``instance`` naming the field (``payload`` for the whole body).
* Only ``Shoptet-Private-API-Token`` is accepted (any case); the token sent as
  ``Shoptet-Access-Token`` (add-on mode) is 401 ``invalid-token``. ``Content-Type`` is not
  enforced here; the contract validator in ``tests/contract`` flags a missing one.
* The 429 for too many connections per token comes from nginx in reality, so it has nginx's HTML
  body, not the JSON envelope. It carries ``Retry-After`` (an HTTP date one second ahead) as the
  project asked, although nginx itself would not send one.
* The URL lock (423) is keyed on the path without the query string and covers a write from its
  arrival until ``lock_seconds`` after it finished, whatever its outcome.
* Each request adds exactly one drop to the bucket (Shoptet weighs a request by its result size).
* ``GET /api/orders`` lists newest first (by creation); the real order is undocumented.
  ``GET /api/orders/changes`` lists oldest change first. Times have whole-second resolution, as
  Shoptet's do.
* ``mass_update`` sends one ``order:massUpdate`` (and ``order:massPaid`` for orders that became
  paid) besides the per-order events, as Shoptet does "for now".
* Webhooks: a 2xx answer within ``webhook_timeout`` counts as delivered (the docs say "200").
  The body is fixed when the event happens; the signature is computed at each attempt with the
  key valid then. Any http(s) URL and port may be registered (Shoptet allows only HTTPS on
  ports 80, 8080, 443 and 8443). Event names must look like ``entity:action``; ``addon:*``
  system events are refused. ``sendPayload`` is stored and echoed but never adds a payload, since
  the spec marks every event "Payload supported: no".
* ``include`` sections are honoured only for ``orderStatuses`` on ``GET /api/eshop``; others are
  ignored.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import heapq
import hmac
import itertools
import json
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = [
    "CANCELLED_STATUS_ID",
    "DEFAULT_STATUSES",
    "RecordedRequest",
    "ShoptetSimulator",
    "ShoptetStatus",
    "SideEffects",
    "WebhookDelivery",
]


def _eshop_timezone() -> tzinfo:
    try:
        return ZoneInfo("Europe/Prague")
    except ZoneInfoNotFoundError:  # a machine without tzdata: winter time is still plausible
        return timezone(timedelta(hours=1))


_TZ = _eshop_timezone()
_JSON_TYPE = "application/json; charset=utf-8"
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CANCELLED_STATUS_ID = -4
_BILLING_METHODS = {1: "Dobírka", 2: "Převodem", 3: "Hotově", 4: "Kartou"}
_DOCUMENT_NAMES = {
    "proformaInvoice": "Proforma invoice",
    "invoice": "Invoice",
    "deliveryNote": "Delivery note",
    "proofPayment": "Proof of payment",
}
# Registering both events of a pair answers 409 (spec, webhook event code list).
_EXCLUSIVE_EVENTS = {
    "order:update": {"order:cancel"},
    "order:cancel": {"order:update"},
    "customer:update": {"customer:disableOrders", "customer:enableOrders"},
    "customer:disableOrders": {"customer:update"},
    "customer:enableOrders": {"customer:update"},
}
_EVENT_RE = re.compile(r"^[a-zA-Z]+:[a-zA-Z]+$")
_NGINX_429 = (
    b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n"
    b"<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class ShoptetStatus:
    """One order status definition of the e-shop (negative id = system status)."""

    id: int
    name: str
    order: int
    mark_as_paid: bool = False
    send_email: bool = False
    send_sms: bool = False
    generate_proforma_invoice: bool = False
    generate_invoice: bool = False
    generate_delivery_note: bool = False
    generate_proof_payment: bool | None = False
    color: str | None = None
    background_color: str | None = None
    change_order_items: bool = False
    stock_claim_resolved: bool = False

    @property
    def system(self) -> bool:
        return self.id < 0

    def document_kinds(self) -> list[str]:
        flags = [
            ("proformaInvoice", self.generate_proforma_invoice),
            ("invoice", self.generate_invoice),
            ("deliveryNote", self.generate_delivery_note),
            ("proofPayment", bool(self.generate_proof_payment)),
        ]
        return [kind for kind, on in flags if on]


DEFAULT_STATUSES: tuple[ShoptetStatus, ...] = (
    ShoptetStatus(-1, "Nevyřízená", 1, color="#000000", background_color="#ffffff"),
    ShoptetStatus(-2, "Vyřizuje se", 2, send_email=True, color="#000000"),
    ShoptetStatus(-3, "Vyřízena", 3, send_email=True, generate_invoice=True, color="#009900"),
    ShoptetStatus(-4, "Stornována", 4, send_email=True, color="#cc0000"),
    ShoptetStatus(
        2,
        "Zaplaceno",
        5,
        mark_as_paid=True,
        send_email=True,
        generate_invoice=True,
        generate_proof_payment=True,
        color="#0066cc",
    ),
    ShoptetStatus(3, "Expedována", 6, send_email=True, send_sms=True, generate_delivery_note=True),
    ShoptetStatus(4, "Připravena k odběru", 7, send_email=True, send_sms=True),
)


@dataclass(frozen=True)
class RecordedRequest:
    """One API request as received and the answer given. Header keys are lower-case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int
    response_headers: dict[str, str]
    response_body: bytes

    def response_json(self) -> Any:
        return json.loads(self.response_body)


@dataclass(frozen=True)
class WebhookDelivery:
    """One delivery attempt. ``status`` is None when the request failed (``error`` says why)."""

    event: str
    instance: str
    url: str
    attempt: int
    status: int | None
    error: str | None
    body: bytes
    signature: str
    dropped: bool  # this attempt failed and it was the last one allowed

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class SideEffects:
    """What the simulated status changes of one order "sent" or generated.

    ``emails`` and ``sms`` hold the status id whose definition sent the message; ``documents``
    the kinds generated (``proformaInvoice``, ``invoice``, ``deliveryNote``, ``proofPayment``);
    ``suppressed`` the (status id, ``"email"``/``"sms"``/``"document:<kind>"``) effects a
    ``suppress*`` query flag prevented.
    """

    emails: list[int]
    sms: list[int]
    documents: list[str]
    suppressed: list[tuple[int, str]]


@dataclass
class _Order:
    code: str
    number: int
    creation_time: int
    change_time: int
    status_id: int
    paid: bool | None
    billing_method_id: int = 2
    emails: list[int] = field(default_factory=list)
    sms: list[int] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    suppressed: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Webhook:
    id: int
    event: str
    url: str
    created: int
    updated: int | None = None
    send_payload: str | None = None


@dataclass
class _Notification:
    id: int
    webhook_id: int
    url: str
    event: str
    instance: str
    event_created: int
    body: bytes
    attempts: int = 0
    attempted: int | None = None
    status: str = "new"
    active: bool = True


@dataclass
class _Answer:
    status: int
    data: Any = None
    errors: list[dict[str, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, instance: str) -> None:
        super().__init__(message)
        self.answer = _Answer(status, None, [_error(code, message, instance)])


@dataclass(frozen=True)
class _Ctx:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: bytes


def _error(code: str, message: str, instance: str) -> dict[str, str]:
    return {"errorCode": code, "message": message, "instance": instance}


def _format_time(ts: float) -> str:
    # Shoptet's format: local time, offset without a colon (typeDateTime in the spec).
    return datetime.fromtimestamp(ts, _TZ).strftime("%Y-%m-%dT%H:%M:%S%z")


def _http_date(ts: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(ts, UTC), usegmt=True)


def _request_id() -> str:
    # Shoptet's request ids are UUIDv7 (time-ordered); Python 3.11 has no uuid7().
    value = (time.time_ns() // 1_000_000 & (2**48 - 1)) << 80 | int.from_bytes(os.urandom(10))
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))


def _guid(kind: str, key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"shoptet-sim:{kind}:{key}"))


def _abbreviate(token: str) -> str:
    return token if len(token) <= 6 else f"{token[:3]}..{token[-3:]}"


class ShoptetSimulator:
    """A fake Shoptet e-shop: API app, state, controls and a webhook sender.

    Thread-safe: the app runs on a server thread, the controls may be called from any other.
    """

    def __init__(
        self,
        *,
        token: str = "sim-token",
        eshop_id: int = 222651,
        statuses: Sequence[ShoptetStatus] | None = None,
        signature_key: str | None = None,
        bucket_capacity: int = 200,
        drain_per_second: float = 10.0,
        max_connections_per_token: int = 3,
        lock_seconds: float = 0.3,
        webhook_retry_delay: float = 900.0,
        webhook_attempts: int = 3,
        webhook_timeout: float = 4.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if drain_per_second <= 0:
            raise ValueError("drain_per_second must be positive")
        self._token = token
        self._eshop_id = eshop_id
        self._statuses: dict[int, ShoptetStatus] = {
            s.id: s for s in (DEFAULT_STATUSES if statuses is None else statuses)
        }
        self._default_status_id = -1 if -1 in self._statuses else min(self._statuses, default=-1)
        self._signature_key = signature_key or secrets.token_hex(16)
        self._capacity = bucket_capacity
        self._drain = drain_per_second
        self._max_conns = max_connections_per_token
        self._lock_seconds = lock_seconds
        self._retry_delay = webhook_retry_delay
        self._max_attempts = webhook_attempts
        self._webhook_timeout = webhook_timeout
        self._clock = clock

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._orders: dict[str, _Order] = {}
        self._changes: dict[str, tuple[int, str]] = {}  # code -> (time, add|edit|delete)
        self._order_numbers = itertools.count(1)
        self._webhooks: dict[int, _Webhook] = {}
        self._webhook_ids = itertools.count(1)
        self._notifications: dict[int, _Notification] = {}
        self._notification_ids = itertools.count(1)
        self._queue: list[tuple[float, int, int]] = []  # (due, seq, notification id)
        self._queue_seq = itertools.count()
        self._sending = 0
        self._sender: threading.Thread | None = None
        self._closing = False

        self._bucket_level = 0.0
        self._bucket_time = clock()
        self._conns: defaultdict[str, int] = defaultdict(int)
        self._locked_until: dict[str, float] = {}
        self._writing: set[str] = set()
        self._fail_count = 0
        self._fail_status = 503
        self._fail_method: str | None = None
        self._down = False
        self._conflicts = 0
        self._latency = 0.0
        self._throttled = 0

        self.document_error_statuses: set[int] = set()
        """PATCH to these statuses changes the status but answers 200 + document-not-generated."""
        self.requests: list[RecordedRequest] = []
        self.webhook_deliveries: list[WebhookDelivery] = []

        self._routes: list[tuple[str, re.Pattern[str], Callable[[_Ctx], _Answer]]] = [
            ("GET", re.compile(r"^/api/eshop$"), self._get_eshop),
            ("GET", re.compile(r"^/api/orders$"), self._list_orders),
            ("GET", re.compile(r"^/api/orders/changes$"), self._order_changes),
            ("GET", re.compile(r"^/api/orders/statuses$"), self._list_statuses),
            ("GET", re.compile(r"^/api/orders/(?P<code>[^/]+)$"), self._get_order),
            ("PATCH", re.compile(r"^/api/orders/(?P<code>[^/]+)/status$"), self._patch_status),
            ("GET", re.compile(r"^/api/webhooks$"), self._list_webhooks),
            ("POST", re.compile(r"^/api/webhooks$"), self._post_webhooks),
            ("POST", re.compile(r"^/api/webhooks/renew-signature-key$"), self._renew_key),
            ("GET", re.compile(r"^/api/webhooks/notifications$"), self._list_notifications),
            ("GET", re.compile(r"^/api/webhooks/(?P<id>-?\d+)$"), self._get_webhook),
            ("PATCH", re.compile(r"^/api/webhooks/(?P<id>-?\d+)$"), self._patch_webhook),
            ("DELETE", re.compile(r"^/api/webhooks/(?P<id>-?\d+)$"), self._delete_webhook),
        ]
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=_ALL_METHODS)])

    # --- context manager -------------------------------------------------------------------

    def __enter__(self) -> ShoptetSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- controls ----------------------------------------------------------------------------

    @property
    def token(self) -> str:
        return self._token

    @property
    def eshop_id(self) -> int:
        return self._eshop_id

    @property
    def signature_key(self) -> str:
        with self._lock:
            return self._signature_key

    @property
    def throttled_count(self) -> int:
        """How many requests were answered 429 (bucket or connections)."""
        with self._lock:
            return self._throttled

    @property
    def statuses(self) -> list[ShoptetStatus]:
        with self._lock:
            return list(self._statuses.values())

    def add_order(
        self, code: str, status_id: int, *, paid: bool | None = False, notify: bool = False
    ) -> None:
        """Create an order as a customer would; ``notify`` sends ``order:create``."""
        with self._lock:
            if code in self._orders:
                raise ValueError(f"order {code!r} already exists")
            self._status_or_raise(status_id)
            now = self._now()
            self._orders[code] = _Order(
                code=code,
                number=next(self._order_numbers),
                creation_time=now,
                change_time=now,
                status_id=status_id,
                paid=paid,
            )
            self._changes[code] = (now, "edit")  # creation is logged as "edit" (spec)
            if notify:
                self._emit("order:create", code, now)

    def delete_order(self, code: str) -> None:
        """Delete an order as an admin would; sends ``order:delete``."""
        with self._lock:
            self._order_or_raise(code)
            del self._orders[code]
            now = self._now()
            self._changes[code] = (now, "delete")
            self._emit("order:delete", code, now)

    def set_status_as_person(self, code: str, status_id: int) -> None:
        """Change the status as an admin in Shoptet would (side effects and webhooks included)."""
        with self._lock:
            order = self._order_or_raise(code)
            self._status_or_raise(status_id)
            self._apply_change(order, status_id=status_id, paid=None, billing_method_id=None)

    def mass_update(self, codes: Iterable[str], status_id: int) -> None:
        """An admin's mass status change: per-order events plus ``order:massUpdate``."""
        with self._lock:
            self._status_or_raise(status_id)
            orders = [self._order_or_raise(c) for c in codes]
            changed: list[str] = []
            became_paid: list[str] = []
            for order in orders:
                was_paid = order.paid is True
                if self._apply_change(
                    order, status_id=status_id, paid=None, billing_method_id=None
                )[0]:
                    changed.append(order.code)
                    if order.paid is True and not was_paid:
                        became_paid.append(order.code)
            now = self._now()
            if changed:
                self._emit("order:massUpdate", json.dumps(changed), now)
            if became_paid:
                self._emit("order:massPaid", json.dumps(became_paid), now)

    def order(self, code: str) -> dict[str, Any]:
        """A copy of the order as ``GET /api/orders/{code}`` returns it in ``data.order``."""
        with self._lock:
            return self._order_json(self._order_or_raise(code))

    def order_side_effects(self, code: str) -> SideEffects:
        with self._lock:
            o = self._order_or_raise(code)
            return SideEffects(list(o.emails), list(o.sms), list(o.documents), list(o.suppressed))

    def upsert_status(self, status: ShoptetStatus) -> None:
        """Create or redefine a status; sends ``orderStatusesList:change``."""
        with self._lock:
            self._statuses[status.id] = status
            self._emit("orderStatusesList:change", str(status.id), self._now())

    def remove_status(self, status_id: int) -> None:
        with self._lock:
            self._status_or_raise(status_id)
            del self._statuses[status_id]
            self._emit("orderStatusesList:change", str(status_id), self._now())

    def register_webhook(self, event: str, url: str) -> None:
        """Register as ``POST /api/webhooks`` would; raises ``ValueError`` where it answers 4xx."""
        with self._lock:
            try:
                self._register([{"event": event, "url": url}])
            except _ApiError as exc:
                raise ValueError(exc.args[0]) from None

    def renew_signature_key(self) -> str:
        with self._lock:
            self._signature_key = secrets.token_hex(16)
            return self._signature_key

    def fail_next(self, count: int, status: int = 503, method: str | None = None) -> None:
        """Answer the next ``count`` API requests with ``status`` (after the connection check);
        only requests with that HTTP ``method`` when one is given (e.g. only the writes)."""
        with self._lock:
            self._fail_count = count
            self._fail_status = status
            self._fail_method = method

    def set_down(self, down: bool) -> None:
        """While down, every API request gets the 503 maintenance envelope."""
        with self._lock:
            self._down = down

    def conflict_next(self, count: int) -> None:
        """The next ``count`` valid status PATCHes answer 409 ``record-already-changed``."""
        with self._lock:
            self._conflicts = count

    def set_latency(self, seconds: float) -> None:
        """Delay every routed request by ``seconds`` (to make requests overlap)."""
        with self._lock:
            self._latency = seconds

    def pending_webhooks(self) -> int:
        """Notifications waiting for a (re)try or being sent."""
        with self._lock:
            return len(self._queue) + self._sending

    def wait_webhooks_idle(self, timeout: float = 5.0) -> None:
        """Block until no delivery is in flight and none is due before the timeout ends.

        Retries scheduled beyond the timeout (e.g. the default 15 minutes) are not waited for.
        Raises ``TimeoutError`` if deliveries due in that window are still unsent.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                remaining = deadline - time.monotonic()
                horizon = self._clock() + max(remaining, 0.0)
                due_soon = any(due <= horizon for due, _, _ in self._queue)
                if not self._sending and not due_soon:
                    return
                if remaining <= 0:
                    raise TimeoutError(
                        f"webhooks still busy: {self._sending} in flight, {len(self._queue)} queued"
                    )
                self._cond.wait(min(remaining, 0.05))

    def close(self) -> None:
        """Stop the webhook sender (queued notifications are dropped unsent)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(timeout=self._webhook_timeout + 2)

    # --- ASGI entry --------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:  # the caller went away (e.g. killed); nothing to answer
            return Response(status_code=499)
        method = request.method
        path = request.url.path
        query = request.scope.get("query_string", b"").decode("latin-1")
        # Route on the encoded path so that an order code containing "%2F" stays one segment.
        raw_path = (request.scope.get("raw_path") or path.encode()).decode("latin-1")
        headers = {k.lower(): v for k, v in request.headers.items()}
        # nginx's limit_conn keys on the token header's value, valid or not.
        conn_key = headers.get("shoptet-private-api-token") or headers.get(
            "shoptet-access-token", ""
        )
        with self._lock:
            self._conns[conn_key] += 1
            connections = self._conns[conn_key]
        try:
            response = await self._process(
                method, path, raw_path, query, headers, body, connections
            )
        finally:
            with self._lock:
                self._conns[conn_key] -= 1
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    method=method,
                    path=path,
                    query=query,
                    headers=headers,
                    body=body,
                    status=response.status_code,
                    response_headers={k.lower(): v for k, v in response.headers.items()},
                    response_body=bytes(response.body),
                )
            )
        return response

    async def _process(
        self,
        method: str,
        path: str,
        raw_path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        connections: int,
    ) -> Response:
        request_id = _request_id()
        with self._lock:
            if self._down:
                return self._render(
                    _ApiError(
                        503,
                        "system-maintenance",
                        "System maintenance. Please try later.",
                        "unknown",
                    ).answer,
                    request_id,
                )
            if connections > self._max_conns:
                self._throttled += 1
                return Response(
                    _NGINX_429,
                    status_code=429,
                    media_type="text/html",
                    headers=self._common_headers(request_id)
                    | {"Retry-After": _http_date(math.ceil(self._clock()) + 1)},
                )
            if self._fail_count > 0 and self._fail_method in (None, method):
                self._fail_count -= 1
                return self._render(self._failure(self._fail_status), request_id)
            auth_error = self._check_token(headers)
            if auth_error is not None:
                return self._render(auth_error, request_id)
            throttled = self._take_drop()
            if throttled is not None:
                return self._render(throttled, request_id)
            route = self._match(method, raw_path)
            if route is None:
                return self._render(
                    _ApiError(
                        404,
                        "endpoint-not-found",
                        f'Endpoint "{method} {path}" not found.',
                        path,
                    ).answer,
                    request_id,
                )
            handler, params = route
            is_write = method in _WRITE_METHODS
            if is_write:
                now = self._clock()
                if path in self._writing or now < self._locked_until.get(path, 0.0):
                    return self._render(
                        _ApiError(
                            423,
                            "locked",
                            "The resource is locked by another request, try again later.",
                            path,
                        ).answer,
                        request_id,
                    )
                self._writing.add(path)
            latency = self._latency
        try:
            if latency > 0:
                await asyncio.sleep(latency)
            ctx = _Ctx(method, path, params, dict(parse_qsl(query, keep_blank_values=True)), body)
            with self._lock:
                try:
                    answer = handler(ctx)
                except _ApiError as exc:
                    answer = exc.answer
                return self._render(answer, request_id)
        finally:
            if is_write:
                with self._lock:
                    self._writing.discard(path)
                    self._locked_until[path] = self._clock() + self._lock_seconds

    def _match(
        self, method: str, raw_path: str
    ) -> tuple[Callable[[_Ctx], _Answer], dict[str, str]] | None:
        for route_method, regex, handler in self._routes:
            m = regex.match(raw_path)
            if m is not None and route_method == method:
                return handler, {k: unquote(v) for k, v in m.groupdict().items()}
        return None

    def _common_headers(self, request_id: str) -> dict[str, str]:
        self._drain_bucket()
        filling = max(0, math.ceil(self._bucket_level - 1e-9))
        return {
            "X-Request-ID": request_id,
            "X-RateLimit-Bucket-Filling": f"{filling}/{self._capacity}",
        }

    def _render(self, answer: _Answer, request_id: str) -> Response:
        envelope = {
            "data": answer.data,
            "errors": answer.errors,
            "metadata": {"requestId": request_id},
        }
        content = json.dumps(envelope, ensure_ascii=False).encode("utf-8")
        return Response(
            content,
            status_code=answer.status,
            headers=self._common_headers(request_id) | answer.headers,
            media_type=_JSON_TYPE,
        )

    def _failure(self, status: int) -> _Answer:
        if status == 503:
            return _ApiError(
                503, "system-maintenance", "System maintenance. Please try later.", "unknown"
            ).answer
        if status == 500:
            return _ApiError(500, "unknown-error", "Unknown error.", "unknown").answer
        if status == 429:
            answer = _ApiError(429, "too-many-requests", "Too many requests.", "unknown").answer
            answer.headers["Retry-After"] = _http_date(math.ceil(self._clock()) + 1)
            return answer
        return _ApiError(status, "simulated-failure", f"Simulated HTTP {status}.", "unknown").answer

    def _check_token(self, headers: Mapping[str, str]) -> _Answer | None:
        token = headers.get("shoptet-private-api-token")
        if token is None and "shoptet-access-token" not in headers:
            return _ApiError(
                401,
                "missing-access-token",
                "Missing access token. Please add `Shoptet-Private-API-Token` header to your "
                "request.",
                "unknown",
            ).answer
        given = token if token is not None else headers.get("shoptet-access-token", "")
        # Only the private-API header can carry this token; an OAuth header is another realm.
        if token is None or not hmac.compare_digest(token.encode(), self._token.encode()):
            return _ApiError(
                401,
                "invalid-token",
                f'Invalid access token "{_abbreviate(given)}".',
                "access-token",
            ).answer
        return None

    def _drain_bucket(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._bucket_time)
        self._bucket_level = max(0.0, self._bucket_level - elapsed * self._drain)
        self._bucket_time = now

    def _take_drop(self) -> _Answer | None:
        self._drain_bucket()
        if self._bucket_level + 1 > self._capacity:
            self._throttled += 1
            wait = (self._bucket_level + 1 - self._capacity) / self._drain
            answer = _ApiError(
                429,
                "too-many-requests",
                "Leaky bucket is full. Please slow down and retry after the time in Retry-After.",
                "unknown",
            ).answer
            answer.headers["Retry-After"] = _http_date(math.ceil(self._clock() + wait))
            return answer
        self._bucket_level += 1
        return None

    # --- helpers -----------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _status_or_raise(self, status_id: int) -> ShoptetStatus:
        try:
            return self._statuses[status_id]
        except KeyError:
            raise ValueError(f"unknown status id {status_id}") from None

    def _order_or_raise(self, code: str) -> _Order:
        try:
            return self._orders[code]
        except KeyError:
            raise KeyError(f"no order {code!r}") from None

    def _apply_change(
        self,
        order: _Order,
        *,
        status_id: int | None,
        paid: bool | None,
        billing_method_id: int | None,
        paid_given: bool = False,
        suppress: frozenset[str] = frozenset(),
    ) -> tuple[bool, list[dict[str, str]]]:
        """Apply a change; returns (changed?, document errors). Emits webhooks on change."""
        errors: list[dict[str, str]] = []
        status_changed = status_id is not None and status_id != order.status_id
        was_paid = order.paid is True
        new_paid = order.paid
        if paid_given:
            new_paid = paid
        elif status_changed and status_id is not None and self._statuses[status_id].mark_as_paid:
            new_paid = True
        billing_changed = (
            billing_method_id is not None and billing_method_id != order.billing_method_id
        )
        changed = status_changed or new_paid != order.paid or billing_changed
        if not changed:
            return False, errors
        if status_changed and status_id is not None:
            order.status_id = status_id
            errors = self._status_side_effects(order, self._statuses[status_id], suppress)
        order.paid = new_paid
        if billing_method_id is not None:
            order.billing_method_id = billing_method_id
        now = self._now()
        order.change_time = now
        self._changes[order.code] = (now, "edit")
        self._emit("order:update", order.code, now)
        if order.paid is True and not was_paid:
            self._emit("order:paid", order.code, now)
        if status_changed and status_id == CANCELLED_STATUS_ID:
            self._emit("order:cancel", order.code, now)
        return True, errors

    def _status_side_effects(
        self, order: _Order, status: ShoptetStatus, suppress: frozenset[str]
    ) -> list[dict[str, str]]:
        errors: list[dict[str, str]] = []
        if status.send_email:
            if "email" in suppress:
                order.suppressed.append((status.id, "email"))
            else:
                order.emails.append(status.id)
        if status.send_sms:
            if "sms" in suppress:
                order.suppressed.append((status.id, "sms"))
            else:
                order.sms.append(status.id)
        for kind in status.document_kinds():
            if kind in order.documents:
                continue  # generated only "if not existent" (spec)
            if "document" in suppress:
                order.suppressed.append((status.id, f"document:{kind}"))
            elif status.id in self.document_error_statuses:
                errors.append(
                    _error(
                        "document-not-generated",
                        f'{_DOCUMENT_NAMES[kind]} belonging to order "{order.code}" was not '
                        "created. Generating document code failed.",
                        order.code,
                    )
                )
            else:
                order.documents.append(kind)
        return errors

    # --- JSON shapes -------------------------------------------------------------------------

    def _status_ref(self, status_id: int) -> dict[str, Any]:
        status = self._statuses.get(status_id)
        return {"id": status_id, "name": status.name if status else None}

    def _order_json(self, o: _Order) -> dict[str, Any]:
        summary = self._order_summary(o)
        address = {
            "company": None,
            "fullName": "Jan Novák",
            "street": "Dlouhá",
            "houseNumber": "12",
            "city": "Praha",
            "district": None,
            "additional": None,
            "zip": "110 00",
            "countryCode": "CZ",
            "regionName": None,
            "regionShortcut": None,
        }
        return {
            "code": o.code,
            "guid": summary["guid"],
            "externalCode": None,
            "creationTime": summary["creationTime"],
            "changeTime": summary["changeTime"],
            "email": summary["email"],
            "phone": summary["phone"],
            "birthDate": None,
            "clientIPAddress": "192.0.2.10",
            "customerGuid": None,
            "cashDeskOrder": False,
            "stockId": 1,
            "addressesEqual": True,
            "vatPayer": True,
            "vatMode": "Normal",
            "billingMethod": {
                "id": o.billing_method_id,
                "name": _BILLING_METHODS[o.billing_method_id],
            },
            "paymentMethod": summary["paymentMethod"],
            "shipping": summary["shipping"],
            "adminUrl": summary["adminUrl"],
            "status": summary["status"],
            "source": summary["source"],
            "price": summary["price"],
            "paid": o.paid,
            "billingAddress": address | {"companyId": None, "vatId": None, "taxId": None},
            "deliveryAddress": None,
            "onlinePaymentLink": None,
            "referer": None,
            "paymentMethods": [{"paymentMethod": summary["paymentMethod"], "itemId": 3}],
            "shippings": [{"shipping": summary["shipping"], "itemId": 2}],
            "items": [
                self._item(o, 1, "product", "Tričko s potiskem", "TRI-001", "200.00", "42.00"),
                self._item(o, 2, "shipping", "PPL", None, "0.00", "0.00"),
                self._item(
                    o, 3, "billing", _BILLING_METHODS[o.billing_method_id], None, "0.00", "0.00"
                ),
            ],
        }

    def _item(
        self,
        o: _Order,
        item_id: int,
        item_type: str,
        name: str,
        code: str | None,
        without_vat: str,
        vat: str,
    ) -> dict[str, Any]:
        with_vat = f"{float(without_vat) + float(vat):.2f}"
        rate = "21.00" if item_type == "product" else "0.00"
        price = {"withVat": with_vat, "withoutVat": without_vat, "vat": vat, "vatRate": rate}
        return {
            "productGuid": _guid("product", code) if code else None,
            "code": code,
            "ean": None,
            "itemType": item_type,
            "name": name,
            "variantName": None,
            "brand": None,
            "remark": None,
            "weight": "0.200" if item_type == "product" else "0.000",
            "additionalField": None,
            "amount": "1.000",
            "amountUnit": "ks",
            "priceRatio": "1.0000",
            "status": self._status_ref(o.status_id),
            "itemPrice": price,
            "unitPrice": price,
            "purchasePrice": None,
            "recyclingFee": None,
            "itemId": item_id,
            "warrantyDescription": None,
            "amountCompleted": "0.000",
        }

    def _order_summary(self, o: _Order) -> dict[str, Any]:
        return {
            "code": o.code,
            "guid": _guid("order", o.code),
            "creationTime": _format_time(o.creation_time),
            "changeTime": _format_time(o.change_time),
            "fullName": "Jan Novák",
            "company": None,
            "email": "jan.novak@example.com",
            "phone": "+420777123456",
            "remark": None,
            "customerGuid": None,
            "cashDeskOrder": False,
            "adminUrl": f"https://www.sim-eshop.cz/admin/objednavky-detail/?id={o.number}",
            "status": self._status_ref(o.status_id),
            "source": {"id": -1, "name": "E-shop"},
            "shipping": {"guid": _guid("shipping", "ppl"), "name": "PPL"},
            "paymentMethod": {"guid": _guid("payment", "transfer"), "name": "Převodem"},
            "price": {
                "vat": "42.00",
                "toPay": "242.00",
                "currencyCode": "CZK",
                "withoutVat": "200.00",
                "withVat": "242.00",
                "exchangeRate": "1.00000000",
            },
            "paid": o.paid,
        }

    def _webhook_json(self, w: _Webhook) -> dict[str, Any]:
        return {
            "id": w.id,
            "event": w.event,
            "url": w.url,
            "created": _format_time(w.created),
            "updated": _format_time(w.updated) if w.updated is not None else None,
            "sendPayload": w.send_payload,
        }

    # --- query parsing -----------------------------------------------------------------------

    @staticmethod
    def _int_param(query: Mapping[str, str], name: str, default: int | None) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise _ApiError(
                400, "invalid-parameter", f'Invalid "{name}" parameter "{raw}".', name
            ) from None

    @staticmethod
    def _bool_param(query: Mapping[str, str], name: str) -> bool | None:
        raw = query.get(name)
        if raw is None:
            return None
        value = raw.lower()
        if value in ("true", "1"):
            return True
        if value in ("false", "0", ""):
            return False
        raise _ApiError(400, "invalid-parameter", f'Invalid "{name}" parameter "{raw}".', name)

    @staticmethod
    def _time_param(query: Mapping[str, str], name: str) -> float | None:
        raw = query.get(name)
        if raw is None:
            return None
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            # Typically a '+' sent unencoded, which arrives as a space.
            raise _ApiError(
                400,
                "invalid-parameter",
                f'Invalid "{name}" parameter "{raw}". Expected ISO 8601 date and time.',
                name,
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_TZ)
        return parsed.timestamp()

    def _page(
        self, query: Mapping[str, str], items: list[Any], default_per_page: int, max_per_page: int
    ) -> tuple[list[Any], dict[str, int]]:
        page = self._int_param(query, "page", None)
        page = 1 if page is None else page
        per_page = self._int_param(query, "itemsPerPage", None)
        per_page = default_per_page if per_page is None else per_page
        if page < 1:
            raise _ApiError(400, "invalid-parameter", f'Invalid "page" parameter "{page}".', "page")
        if per_page < 1:
            raise _ApiError(
                400,
                "invalid-parameter",
                f'Invalid "itemsPerPage" parameter "{per_page}".',
                "itemsPerPage",
            )
        per_page = min(per_page, max_per_page)  # "the maximum is applied automatically"
        chunk = items[(page - 1) * per_page : page * per_page]
        paginator = {
            "totalCount": len(items),
            "page": page,
            "pageCount": max(1, math.ceil(len(items) / per_page)),
            "itemsOnPage": len(chunk),
            "itemsPerPage": per_page,
        }
        return chunk, paginator

    # --- endpoints: e-shop and statuses ------------------------------------------------------

    def _get_eshop(self, ctx: _Ctx) -> _Answer:
        include = {s.strip() for s in ctx.query.get("include", "").split(",") if s.strip()}
        data: dict[str, Any] = {
            "contactInformation": {
                "eshopId": self._eshop_id,
                "eshopName": "www.sim-eshop.cz",
                "eshopCategory": None,
                "url": "https://www.sim-eshop.cz/",
                "eshopTitle": "Simulovaný e-shop",
                "eshopSubtitle": None,
                "contactPerson": "Jana Nováková",
                "email": "info@sim-eshop.cz",
                "phone": "+420777888999",
                "mobilePhone": None,
                "skypeAccount": None,
                "contactPhotoUrl": None,
            },
            "settings": {
                "vatPayer": True,
                "cashDeskOnly": False,
                "trackStockClaims": True,
                "maxProductAmount": 50000,
                "maxEmailAmount": 10000,
                "defaultPricelist": {"id": 1, "name": "Výchozí ceník"},
                "eshopLanguage": "cs",
                "timezone": "Europe/Prague",
                "dateFormat": "j.n.Y",
                "timeFormat": "H:i",
                "internals": "cs",
                "exchangeRateFlip": False,
                "negativeStockAmount": "allowed",
                "oss": False,
                "stockControlDisabled": False,
                "wholesaleSplitActive": False,
            },
            "currencies": [
                {
                    "code": "CZK",
                    "title": "Česká koruna",
                    "isDefault": True,
                    "isDefaultAdmin": True,
                    "isDefaultDocuments": True,
                    "isVisible": True,
                    "exchangeRate": "1.00000000",
                    "priority": 1,
                    "display": {
                        "text": "Kč",
                        "location": "right",
                        "decimalsSeparator": ",",
                        "thousandsSeparator": " ",
                    },
                    "priceDecimalPlaces": 0,
                    "documentPriceDecimalPlaces": 2,
                    "rounding": "math",
                    "minimalOrderValue": None,
                    "bankAccount": {
                        "accountNumber": "123456789/0100",
                        "iban": None,
                        "bic": None,
                        "ownerName": None,
                    },
                }
            ],
            "taxClasses": [
                {
                    "title": "Základní",
                    "rates": [{"zone": "CZ", "vatRate": "21.00"}],
                    "isDefault": True,
                }
            ],
            "activeModules": [{"title": "Privátní API", "name": "privateApi"}],
            "urls": [
                {"ident": "eshop", "url": "https://www.sim-eshop.cz/"},
                {"ident": "admin", "url": "https://www.sim-eshop.cz/admin/"},
            ],
        }
        if "orderStatuses" in include:
            data["orderStatuses"] = {
                "defaultStatus": self._default_status_id,
                "statuses": [
                    {"id": s.id, "order": s.order, "name": s.name, "markAsPaid": s.mark_as_paid}
                    for s in sorted(self._statuses.values(), key=lambda s: s.order)
                ],
            }
        return _Answer(200, data)

    def _list_statuses(self, ctx: _Ctx) -> _Answer:
        statuses = [
            {
                "id": s.id,
                "name": s.name,
                "system": s.system,
                "order": s.order,
                "markAsPaid": s.mark_as_paid,
                "color": s.color,
                "backgroundColor": s.background_color,
                "changeOrderItems": s.change_order_items,
                "stockClaimResolved": s.stock_claim_resolved,
                "documents": {
                    "generateProformaInvoice": s.generate_proforma_invoice,
                    "generateInvoice": s.generate_invoice,
                    "generateDeliveryNote": s.generate_delivery_note,
                    "generateProofPayment": s.generate_proof_payment,
                },
            }
            for s in sorted(self._statuses.values(), key=lambda s: s.order)
        ]
        return _Answer(200, {"defaultStatus": self._default_status_id, "statuses": statuses})

    # --- endpoints: orders -------------------------------------------------------------------

    def _list_orders(self, ctx: _Ctx) -> _Answer:
        q = ctx.query
        orders = list(self._orders.values())
        if "orderCodes" in q:
            codes = [c for c in q["orderCodes"].split(",") if c]
            if not codes:
                raise _ApiError(
                    400,
                    "missing-parameter",
                    'Missing value for parameter "orderCodes".',
                    "orderCodes",
                )
            if len(codes) > 50:
                raise _ApiError(
                    400,
                    "invalid-parameter",
                    'Invalid "orderCodes" parameter. Expected max. 50 elements, '
                    f"but {len(codes)} given.",
                    "orderCodes",
                )
            wanted = set(codes)
            orders = [o for o in orders if o.code in wanted]
        else:
            status_id = self._int_param(q, "statusId", None)
            bounds = {
                name: self._time_param(q, name)
                for name in ("changeTimeFrom", "changeTimeTo", "creationTimeFrom", "creationTimeTo")
            }
            if status_id is not None:
                orders = [o for o in orders if o.status_id == status_id]
            if (t := bounds["changeTimeFrom"]) is not None:
                orders = [o for o in orders if o.change_time >= t]
            if (t := bounds["changeTimeTo"]) is not None:
                orders = [o for o in orders if o.change_time <= t]
            if (t := bounds["creationTimeFrom"]) is not None:
                orders = [o for o in orders if o.creation_time >= t]
            if (t := bounds["creationTimeTo"]) is not None:
                orders = [o for o in orders if o.creation_time <= t]
            if code_from := q.get("codeFrom"):
                orders = [o for o in orders if o.code >= code_from]
            if code_to := q.get("codeTo"):
                orders = [o for o in orders if o.code <= code_to]
        orders.sort(key=lambda o: (o.creation_time, o.number), reverse=True)
        chunk, paginator = self._page(q, orders, 50, 50)
        return _Answer(
            200, {"orders": [self._order_summary(o) for o in chunk], "paginator": paginator}
        )

    def _order_changes(self, ctx: _Ctx) -> _Answer:
        q = ctx.query
        if not q.get("from"):
            raise _ApiError(400, "missing-parameter", 'Missing value for parameter "from".', "from")
        since = self._time_param(q, "from") or 0.0
        change_type = q.get("changeType")
        if change_type not in (None, "edit", "delete"):
            raise _ApiError(
                400,
                "invalid-parameter",
                f'Invalid "changeType" parameter "{change_type}". Use "edit" or "delete".',
                "changeType",
            )
        entries = sorted(
            (t, code, kind)
            for code, (t, kind) in self._changes.items()
            if t >= since and (change_type is None or kind == change_type)
        )
        chunk, paginator = self._page(q, entries, 20, 1000)
        changes = [
            {"code": code, "changeTime": _format_time(t), "changeType": kind}
            for t, code, kind in chunk
        ]
        return _Answer(200, {"changes": changes, "paginator": paginator})

    def _order_not_found(self, code: str) -> _ApiError:
        return _ApiError(404, "order-not-found", f'Order "{code}" not found.', code)

    def _get_order(self, ctx: _Ctx) -> _Answer:
        order = self._orders.get(ctx.params["code"])
        if order is None:
            raise self._order_not_found(ctx.params["code"])
        return _Answer(200, {"order": self._order_json(order)})

    def _patch_status(self, ctx: _Ctx) -> _Answer:
        code = ctx.params["code"]
        suppress = frozenset(
            kind
            for kind, name in (
                ("document", "suppressDocumentGeneration"),
                ("email", "suppressEmailSending"),
                ("sms", "suppressSmsSending"),
            )
            if self._bool_param(ctx.query, name)
        )
        data = _validate_status_body(ctx.body)
        order = self._orders.get(code)
        if order is None:
            raise self._order_not_found(code)
        status_id = data.get("statusId")
        if status_id is not None and status_id not in self._statuses:
            raise _ApiError(
                422, "invalid-request-data", f'Invalid statusId "{status_id}".', "data.statusId"
            )
        billing = data.get("billingMethodId")
        if billing is not None and billing not in _BILLING_METHODS:
            raise _ApiError(
                422,
                "invalid-request-data",
                f'Invalid billingMethodId "{billing}".',
                "data.billingMethodId",
            )
        if self._conflicts > 0:
            self._conflicts -= 1
            raise _ApiError(
                409, "record-already-changed", "Order has been changed before update.", "payload"
            )
        _, errors = self._apply_change(
            order,
            status_id=status_id,
            paid=data.get("paid"),
            paid_given="paid" in data,
            billing_method_id=billing,
            suppress=suppress,
        )
        return _Answer(200, {"order": self._order_json(order)}, errors or None)

    # --- endpoints: webhooks -----------------------------------------------------------------

    def _webhook_or_404(self, ctx: _Ctx) -> _Webhook:
        webhook_id = int(ctx.params["id"])
        webhook = self._webhooks.get(webhook_id)
        if webhook is None:
            raise _ApiError(
                404,
                "webhook-not-found",
                f'Webhook with id "{webhook_id}" not found.',
                str(webhook_id),
            )
        return webhook

    def _list_webhooks(self, ctx: _Ctx) -> _Answer:
        hooks = sorted(self._webhooks.values(), key=lambda w: w.id)
        chunk, paginator = self._page(ctx.query, hooks, 20, 500)
        return _Answer(
            200, {"webhooks": [self._webhook_json(w) for w in chunk], "paginator": paginator}
        )

    def _get_webhook(self, ctx: _Ctx) -> _Answer:
        return _Answer(200, {"webhook": self._webhook_json(self._webhook_or_404(ctx))})

    def _post_webhooks(self, ctx: _Ctx) -> _Answer:
        doc = _parse_json(ctx.body)
        if not isinstance(doc, dict) or set(doc) != {"data"} or not isinstance(doc["data"], list):
            raise _ApiError(
                422,
                "invalid-request-data",
                'The request body must be {"data": [...]}.',
                "payload",
            )
        created = self._register(doc["data"])
        return _Answer(201, {"webhooks": [self._webhook_json(w) for w in created]})

    def _register(self, items: list[Any]) -> list[_Webhook]:
        if len(items) > 50:
            raise _ApiError(
                413, "too-many-items", "Maximum number of webhooks per request is 50.", "data"
            )
        existing = {w.event for w in self._webhooks.values()}
        batch: list[tuple[str, str, str | None]] = []
        for i, item in enumerate(items):
            where = f"data[{i}]"
            if not isinstance(item, dict) or not {"event", "url"} <= set(item):
                raise _ApiError(
                    422, "invalid-request-data", "The properties event and url are required.", where
                )
            extra = set(item) - {"event", "url", "sendPayload"}
            if extra:
                raise _ApiError(
                    422,
                    "invalid-request-data",
                    f"The property {sorted(extra)[0]} is not allowed.",
                    where,
                )
            event, url, send_payload = item["event"], item["url"], item.get("sendPayload")
            if (
                not isinstance(event, str)
                or not _EVENT_RE.match(event)
                or event.startswith("addon:")
            ):
                raise _ApiError(
                    422, "invalid-request-data", f'Invalid event "{event}".', f"{where}.event"
                )
            if (
                not isinstance(url, str)
                or len(url) > 2000
                or not url.startswith(("http://", "https://"))
            ):
                raise _ApiError(422, "invalid-request-data", "Invalid webhook URL.", f"{where}.url")
            if send_payload not in (None, "full"):
                raise _ApiError(
                    422,
                    "invalid-request-data",
                    f'Invalid sendPayload "{send_payload}".',
                    f"{where}.sendPayload",
                )
            if event in existing or any(event == b[0] for b in batch):
                raise _ApiError(
                    422,
                    "invalid-request-data",
                    "Webhook already exists for this event",
                    f"{where}.event",
                )
            clash = _EXCLUSIVE_EVENTS.get(event, set()) & (existing | {b[0] for b in batch})
            if clash:
                raise _ApiError(
                    409,
                    "webhook-event-conflict",
                    f'Webhook "{event}" cannot be registered together with "{sorted(clash)[0]}".',
                    f"{where}.event",
                )
            batch.append((event, url, send_payload))
        now = self._now()
        created = []
        for event, url, send_payload in batch:
            webhook = _Webhook(next(self._webhook_ids), event, url, now, None, send_payload)
            self._webhooks[webhook.id] = webhook
            created.append(webhook)
        return created

    def _patch_webhook(self, ctx: _Ctx) -> _Answer:
        webhook = self._webhook_or_404(ctx)
        doc = _parse_json(ctx.body)
        data = doc.get("data") if isinstance(doc, dict) else None
        if (
            not isinstance(data, dict)
            or not data
            or set(data) - {"url", "sendPayload"}
            or set(doc) != {"data"}
        ):
            raise _ApiError(
                422,
                "invalid-request-data",
                'The request body must be {"data": {url?, sendPayload?}} with at least one '
                "property.",
                "payload",
            )
        url = data.get("url", webhook.url)
        if (
            not isinstance(url, str)
            or len(url) > 2000
            or not url.startswith(("http://", "https://"))
        ):
            raise _ApiError(422, "invalid-request-data", "Invalid webhook URL.", "data.url")
        send_payload = data.get("sendPayload", webhook.send_payload)
        if send_payload not in (None, "full"):
            raise _ApiError(422, "invalid-request-data", "Invalid sendPayload.", "data.sendPayload")
        webhook.url = url
        webhook.send_payload = send_payload
        webhook.updated = self._now()
        return _Answer(200, {"webhook": self._webhook_json(webhook)})

    def _delete_webhook(self, ctx: _Ctx) -> _Answer:
        webhook = self._webhook_or_404(ctx)
        del self._webhooks[webhook.id]
        return _Answer(200, None)

    def _renew_key(self, ctx: _Ctx) -> _Answer:
        return _Answer(200, {"signatureKey": self.renew_signature_key()})

    def _list_notifications(self, ctx: _Ctx) -> _Answer:
        q = ctx.query
        since = self._time_param(q, "from")
        active = self._bool_param(q, "active")
        items = [
            n
            for n in sorted(self._notifications.values(), key=lambda n: n.id)
            if (q.get("status") is None or n.status == q["status"])
            and (q.get("event") is None or n.event == q["event"])
            and (active is None or n.active == active)
            and (since is None or n.event_created >= since)
        ]
        chunk, paginator = self._page(q, items, 20, 500)
        notifications = [
            {
                "id": n.id,
                "webhookId": n.webhook_id,
                "webhookUrl": n.url,
                "event": n.event,
                "eventCreated": _format_time(n.event_created),
                "created": _format_time(n.event_created),
                "attempted": _format_time(n.attempted) if n.attempted is not None else None,
                "attempts": n.attempts,
                "status": n.status,
                "active": n.active,
                "data": json.loads(n.body),
            }
            for n in chunk
        ]
        return _Answer(200, {"notifications": notifications, "paginator": paginator})

    # --- webhook sending ---------------------------------------------------------------------

    def _emit(self, event: str, instance: str, when: int) -> None:
        for webhook in self._webhooks.values():
            if webhook.event != event:
                continue
            body = json.dumps(
                {
                    "eshopId": self._eshop_id,
                    "event": event,
                    "eventCreated": _format_time(when),
                    "eventInstance": instance,
                },
                separators=(",", ":"),
            ).encode()
            notification = _Notification(
                id=next(self._notification_ids),
                webhook_id=webhook.id,
                url=webhook.url,
                event=event,
                instance=instance,
                event_created=when,
                body=body,
            )
            self._notifications[notification.id] = notification
            self._schedule(notification.id, self._clock())

    def _schedule(self, notification_id: int, due: float) -> None:
        heapq.heappush(self._queue, (due, next(self._queue_seq), notification_id))
        if self._sender is None and not self._closing:
            self._sender = threading.Thread(
                target=self._sender_loop, name="shoptet-sim-webhooks", daemon=True
            )
            self._sender.start()
        self._cond.notify_all()

    def _next_due(self) -> tuple[_Notification, str] | None:
        """Under the lock: pop the next due notification and sign it, or wait a little."""
        while not self._closing:
            now = self._clock()
            if self._queue and self._queue[0][0] <= now:
                _, _, nid = heapq.heappop(self._queue)
                self._sending += 1
                notification = self._notifications[nid]
                key = self._signature_key.encode()
                return notification, hmac.new(key, notification.body, hashlib.sha1).hexdigest()
            if not self._queue:
                self._cond.wait()
            else:
                remaining = self._queue[0][0] - now
                # An injected clock may jump, so poll it instead of trusting a long sleep.
                self._cond.wait(remaining if self._clock is time.time else min(remaining, 0.05))
        return None

    def _sender_loop(self) -> None:
        with httpx.Client(timeout=self._webhook_timeout) as client:
            while True:
                with self._cond:
                    nxt = self._next_due()
                if nxt is None:
                    return
                notification, signature = nxt
                status: int | None = None
                error: str | None = None
                try:
                    response = client.post(
                        notification.url,
                        content=notification.body,
                        headers={
                            "Content-Type": "application/json",
                            "Shoptet-Webhook-Signature": signature,
                        },
                    )
                    status = response.status_code
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    self._record_attempt(notification, signature, status, error)
                    self._sending -= 1
                    self._cond.notify_all()

    def _record_attempt(
        self, n: _Notification, signature: str, status: int | None, error: str | None
    ) -> None:
        n.attempts += 1
        n.attempted = self._now()
        ok = status is not None and 200 <= status < 300
        n.status = "success" if ok else "failed"
        retry = not ok and n.attempts < self._max_attempts
        n.active = retry
        self.webhook_deliveries.append(
            WebhookDelivery(
                event=n.event,
                instance=n.instance,
                url=n.url,
                attempt=n.attempts,
                status=status,
                error=error,
                body=n.body,
                signature=signature,
                dropped=not ok and not retry,
            )
        )
        if retry:
            self._schedule(n.id, self._clock() + self._retry_delay)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        raise _ApiError(
            422, "invalid-request-data", "Request body is not a valid JSON.", "payload"
        ) from None


def _validate_status_body(body: bytes) -> dict[str, Any]:
    """The PATCH body per the spec's schema; any flaw rejects the whole request (422)."""
    doc = _parse_json(body)
    if not isinstance(doc, dict) or "data" not in doc:
        raise _ApiError(422, "invalid-request-data", "The property data is required", "payload")
    data = doc["data"]
    if not isinstance(data, dict):
        raise _ApiError(422, "invalid-request-data", "The property data must be an object.", "data")
    if not data:
        raise _ApiError(
            422, "invalid-request-data", "Object must have at least 1 property.", "data"
        )
    for key, value in data.items():
        if key not in ("statusId", "paid", "billingMethodId"):
            raise _ApiError(
                422, "invalid-request-data", f"The property {key} is not allowed.", f"data.{key}"
            )
        if key == "paid":
            ok = value is None or isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            expected = "boolean or null" if key == "paid" else "integer"
            raise _ApiError(
                422,
                "invalid-request-data",
                f"Invalid type of {key}. Expected {expected}.",
                f"data.{key}",
            )
    return dict(data)
