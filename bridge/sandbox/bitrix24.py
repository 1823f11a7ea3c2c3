"""A simulator of one Bitrix24 portal's REST API (``sale`` orders, CRM deals), as a Starlette app.

Serve ``Bitrix24Simulator(...).app`` with :class:`bridge.sandbox.server.ServerThread`; the server
root plays ``https://<portal>``, and ``/oauth/token/`` on the same server plays the OAuth server
(``https://oauth.bitrix.info/oauth/token/``). Tests drive it through its control methods
(``add_order``, ``set_order_status_as_person``, ``add_deal``, ``fail_next``, ...) from any thread
and read what happened from ``requests``, ``calls_by_method``, ``events_sent`` and friends.

It follows the official docs (``bitrix24/b24restdocs``; the copies in
``shared/reference/bitrix24/``) and ``shared/reference/notes/bitrix24.md``.

Methods: ``sale.order.get|update|list``, ``sale.status.get|list|update|add``,
``crm.deal.get|update|list``, ``crm.status.list``, ``batch``, and, for OAuth (application)
callers only, ``event.bind|get|unbind`` and ``events``. Anything else is
``404 ERROR_METHOD_NOT_FOUND``. ``crm.dealcategory.list`` is not modelled (not in the reference
pages; pipelines are 0 and 1, see ``DEFAULT_DEAL_STAGES``).

Order of checks for a REST call: outage (``set_down``) -> ``fail_next`` -> authentication ->
leaky bucket -> method lookup -> scope -> application-only methods -> operating-time limit ->
the method's own checks.

Choices where the docs are silent or disagree (the bridge must not rely on any of them being
exactly so):

* Transport (as ``CRestUtil::getRequestData`` in Bitrix's ``rest`` module does it). GET and POST
  only. Parameters come from the query string (PHP bracket syntax, ``filter[>=dateUpdate]=...``,
  ``select[]=id``) and from the body; body values win. The body is decoded as JSON **only** with
  ``Content-Type: application/json`` (a JSON body that does not parse gives no parameters, not
  an error); with any other or no content type it is parsed as a form, so a JSON body sent
  without the header arrives as one meaningless key (``RecordedCall.content_type`` shows what
  came). Answers escape ``/`` as ``\\/`` like PHP's ``json_encode``; PHP arrays with keys
  0..n-1 come out as JSON lists and empty ones as ``[]`` (so batch's ``result_error`` is ``[]``
  when empty, and a list of commands gives lists).
* Auth. Webhook: ``/rest/{user_id}/{webhook_code}/{method}``; a wrong user id or code ->
  ``401 INVALID_CREDENTIALS`` "Invalid request credentials". The project brief asked for
  ``NO_AUTH_FOUND`` here, but the current system-errors page and the official Python SDK both say
  ``INVALID_CREDENTIALS`` for this case (an older docs revision said ``NO_AUTH_FOUND``).
  ``/rest/{method}`` without ``auth`` -> ``401 NO_AUTH_FOUND`` "Wrong authorization data"; an
  unknown access token -> ``401 invalid_token`` "Unable to get application by token" (SDK); an
  expired one -> ``401 expired_token``. Tokens only in the ``auth`` parameter, not in a header.
  ``event.bind|get|unbind`` and ``events`` through a webhook -> ``403 WRONG_AUTH_TYPE``. A method
  outside ``scopes`` -> ``401 insufficient_scope`` (current docs; older said 403).
* OAuth server: ``GET`` (or form ``POST``) ``/oauth/token/?grant_type=refresh_token&client_id=
  &client_secret=&refresh_token=``. It answers like the real one (``domain`` is
  ``oauth.bitrix.info`` there, as in real answers), issues a new access **and** refresh token,
  and the old refresh token dies at once (old access tokens live on until they expire);
  ``client_endpoint`` is the base URL the token request came to, plus ``/rest/``. Errors:
  wrong client -> ``401 invalid_client``; unknown or used refresh token -> ``400 invalid_grant``;
  other grant types or missing parameters -> ``400 invalid_request``. ``set_down``,
  ``fail_next`` and the bucket do not touch it (it is another server).
* ``set_down`` answers every REST call with HTTP 503 and an nginx-style HTML page (no JSON), as a
  portal behind its balancer does during maintenance; recorded with ``answer=None``.
  ``fail_next`` answers JSON ``{"error", "error_description"}`` with the given status before
  authentication and changes nothing.
* Leaky bucket: only authenticated calls pour into it (the limit is kept per portal and
  caller); a refused call does not pour. Full means a call would take it over ``burst``. A batch
  pours one drop. ``throttled_count`` counts the refusals.
* Operating time: per method, one window (not ten one-minute baskets) that opens with the first
  call and closes ``600 s`` later, when the sum starts again from 0; limit 480 s. The
  simulator's own work is microseconds, so only ``exhaust_operating_time`` makes a method hit it.
  ``time.operating`` / ``operating_reset_at`` are in every non-batch answer and in each
  sub-call's ``result_time``, not in a batch's outer ``time``. Error answers carry no ``time``.
* Dates: times come from ``clock``, are cut to whole seconds and are shown in the portal's fixed
  zone (``portal_timezone``, default UTC+02:00 without DST, as in the doc examples). Filters
  accept ISO 8601 with an offset (any), without one (portal time), a bare date, or
  ``dd.mm.yyyy[ hh:mm:ss]``; anything else -> error ``0`` (sale) / ``""`` (crm), HTTP 400.
* Saves and events: every accepted write fires the entity's events, the API's own writes
  included (``ONSALEORDERSAVED`` and ``ONORDERENTITYSAVED`` for orders, ``ONCRMDEALUPDATE`` for
  deals, ``ONCRMDEALADD`` on creation). A write that changes nothing (the current status again)
  is still a save: it answers normally and **fires the events**, but touches no date, version
  or author.
* ``sale.order.update``: an unknown ``statusId`` or a delivery (type ``D``) status -> error ``0``
  "Unknown order status ..." / "... is a delivery status ...". Read-only, immutable and unknown
  keys in ``fields`` are ignored. A status change sets ``dateStatus`` and ``empStatusId`` (the
  given one, else the caller's user); any change sets ``dateUpdate`` and bumps ``version``.
  ``canceled``/``marked`` set their date and author too. The answer is ``result.order`` with the
  order's own fields plus ``clients`` and ``requisiteLink``; ``sale.order.get`` adds
  ``basketItems``, ``payments``, one shipment (status ``DN``), ``propertyValues`` and
  ``tradeBindings``.
* ``sale.order.list`` / ``sale.status.list``: unknown fields in ``select``, ``filter`` or
  ``order`` -> error ``0`` "Unknown field definition ...". Default order ``id`` ascending. LIKE
  operators are case-insensitive. ``start=-1`` returns the first page without ``total``.
* ``sale.status.update`` checks in order: id (100), fields (100), ``fields.type`` present
  (``0`` "Required fields: type"), status exists (201340400001), type valid (201350000003),
  system type change (201350000006), orders/shipments using it (201350000007/8).
  ``sale.status.add`` ids are at most 2 characters (the column is ``char(2)``).
* CRM: error code ``""`` with the docs' texts. ``crm.deal.update`` to a stage of another pipeline
  (or an unknown one) -> ``Invalid value for the "Stage" field`` (the docs only say to move
  pipelines with ``crm.item.update``); ``CATEGORY_ID`` and unknown fields are ignored, including
  ``UF_CRM_*`` fields the portal does not have (its user fields are those ever given to
  ``add_deal``). Unknown filter and order fields are ignored (old ``CSQLWhere`` behaviour);
  ``select``/``filter``/``order`` keys are accepted in either case. Default order ``ID``
  ascending. Ids, numbers and ``SORT`` come back as strings, money with two decimals.
* ``batch`` (as ``CRestProvider::methodsBatch`` does it): the first 50 commands run; each one
  beyond gets its own ``ERROR_BATCH_LENGTH_EXCEEDED`` in ``result_error`` and the batch answers
  200 (the HTTP 400 the error tables give this code never reaches the caller; the project brief
  asked for a whole-call 400). A nested ``batch`` is likewise that command's own
  ``ERROR_BATCH_METHOD_NOT_ALLOWED`` ("such a subquery ends with an error"). ``halt`` is cast
  like PHP's ``(bool)``: only ``0``, ``"0"``, ``""``, ``false`` are false (``"false"`` is
  true). ``$result[key][field]`` references are resolved. Sub-calls are recorded in
  ``subcalls``; ``fail_next`` and the bucket apply to the outer call only, scopes and operating
  time to each sub-call.
* Events go out from one background thread in the order they happened, as form posts with
  PHP-style keys; ``ts`` is the sending time. Outgoing webhooks (``register_outgoing_webhook``)
  get only ``domain``, ``client_endpoint``, ``server_endpoint``, ``member_id`` and
  ``application_token`` in ``auth``; ``event.bind`` handlers also get a fresh ``access_token``,
  ``expires_in``, ``scope`` and ``status``. Every (webhook, event) pair and every ``event.bind``
  has its own ``event_handler_id``. A post that fails or is not 2xx within ``event_timeout`` is
  recorded and **never** retried. ``client_endpoint`` in events is the base URL of the last
  request the simulator served (``https://{domain}/rest/`` before any).
* ``mode`` does not change what is served: both the ``sale`` and the ``crm`` methods work in
  either mode (a deals-only portal still has the REST methods). It is kept as ``mode`` for the
  harness to know which entity its portal "uses".
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

__all__ = [
    "BATCH_LIMIT",
    "DEFAULT_DEAL_STAGES",
    "DEFAULT_SALE_STATUSES",
    "FIRST_DEAL_ID",
    "FIRST_ORDER_ID",
    "KNOWN_EVENTS",
    "OPERATING_LIMIT",
    "PAGE_SIZE",
    "PERSON_USER_ID",
    "SERVER_ENDPOINT",
    "Bitrix24Simulator",
    "DealStage",
    "RecordedCall",
    "SaleStatus",
    "SentEvent",
    "parse_php_pairs",
]

PAGE_SIZE = 50
BATCH_LIMIT = 50
OPERATING_LIMIT = 480.0  # seconds of a method's execution per window (the docs' example)
OPERATING_WINDOW = 600.0
SERVER_ENDPOINT = "https://oauth.bitrix.info/rest/"
PERSON_USER_ID = 7  # the employee who changes things "as a person" unless told otherwise
KNOWN_EVENTS = frozenset(
    {"ONSALEORDERSAVED", "ONORDERENTITYSAVED", "ONCRMDEALADD", "ONCRMDEALUPDATE"}
)
FIRST_ORDER_ID = 300  # as in the docs' examples; deals start elsewhere so ids never coincide
FIRST_DEAL_ID = 1000

_JSON_TYPE = "application/json; charset=utf-8"
_DOWN_PAGE = (
    "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    "<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>"
    "\r\n</body>\r\n</html>\r\n"
)
_APP_ONLY = frozenset({"event.bind", "event.get", "event.unbind", "events"})
_FILTER_OPS = ("!=%", "!%=", "!@", "!=", "!%", ">=", "<=", "=%", "%=", "@", ">", "<", "=", "!", "%")

Kind = Literal["int", "float", "datetime", "str"]


@dataclass(frozen=True)
class SaleStatus:
    """A ``sale`` status definition: type ``O`` (order) or ``D`` (delivery)."""

    id: str
    type: Literal["O", "D"]
    sort: int
    color: str
    notify: str = "Y"
    xml_id: str | None = None
    system: bool = False


DEFAULT_SALE_STATUSES: tuple[SaleStatus, ...] = (
    SaleStatus("N", "O", 10, "#BEEDF1", system=True),  # accepted, awaiting payment
    SaleStatus("P", "O", 20, "#FFE0B2"),  # paid, preparing
    SaleStatus("S", "O", 30, "#C8E6C9"),  # shipped
    SaleStatus("D", "O", 40, "#FFCDD2", notify="N"),  # canceled
    SaleStatus("F", "O", 200, "#DBFBD0", system=True),  # completed
    SaleStatus("DN", "D", 10, "#DDF0F7", notify="N", system=True),  # awaiting processing
    SaleStatus("DD", "D", 40, "#FFCDD2", notify="N"),  # canceled
    SaleStatus("DF", "D", 50, "#DBFBD0", system=True),  # shipped
)


@dataclass(frozen=True)
class DealStage:
    """A deal stage of one pipeline (``category_id``); semantics P (process), S (won), F (lost)."""

    status_id: str
    name: str
    sort: int
    category_id: int
    semantics: Literal["P", "S", "F"]
    color: str

    @property
    def entity_id(self) -> str:
        return "DEAL_STAGE" if self.category_id == 0 else f"DEAL_STAGE_{self.category_id}"


DEFAULT_DEAL_STAGES: tuple[DealStage, ...] = (
    DealStage("NEW", "New", 10, 0, "P", "#39A8EF"),
    DealStage("PREPARATION", "Preparing documents", 20, 0, "P", "#2FC6F6"),
    DealStage("PREPAYMENT_INVOICE", "Invoice", 30, 0, "P", "#55D0E0"),
    DealStage("EXECUTING", "In progress", 40, 0, "P", "#47E4C2"),
    DealStage("FINAL_INVOICE", "Final invoice", 50, 0, "P", "#FFA900"),
    DealStage("WON", "Deal won", 60, 0, "S", "#7BD500"),
    DealStage("LOSE", "Deal lost", 70, 0, "F", "#FF5752"),
    DealStage("C1:NEW", "New", 10, 1, "P", "#39A8EF"),
    DealStage("C1:PREPARATION", "Preparing", 20, 1, "P", "#2FC6F6"),
    DealStage("C1:EXECUTING", "In progress", 30, 1, "P", "#47E4C2"),
    DealStage("C1:WON", "Deal won", 40, 1, "S", "#7BD500"),
    DealStage("C1:LOSE", "Deal lost", 50, 1, "F", "#FF5752"),
)


@dataclass(frozen=True)
class RecordedCall:
    """One REST call (or batch sub-call, or OAuth token request) as the simulator saw it.

    ``params`` are the parsed parameters without ``auth``; ``auth`` is the kind of credentials
    presented (``None``: none); ``answer`` is None when the answer was not JSON (outage).
    ``content_type`` is the request's media type ("" if none; a JSON body without
    ``application/json`` is read as a form). ``at`` is the simulator's clock when it arrived.
    """

    method: str
    params: dict[str, Any]
    auth: Literal["webhook", "oauth"] | None
    http_status: int
    answer: dict[str, Any] | None
    at: float
    content_type: str = ""


@dataclass(frozen=True)
class SentEvent:
    """One event post. ``http_status`` is None when the post failed (``error`` says why)."""

    event: str
    id: str  # the entity id in data[FIELDS][ID]
    url: str
    handler_id: int
    http_status: int | None
    error: str | None
    form: dict[str, str]
    at: float

    @property
    def ok(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300


class _B24Error(Exception):
    def __init__(self, status: int, code: str | int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


@dataclass
class _Ctx:
    auth: Literal["webhook", "oauth"]
    user_id: int


@dataclass
class _Handler:
    id: int
    event: str
    url: str
    kind: Literal["webhook", "app"]


@dataclass
class _Pending:
    handler: _Handler
    event: str
    fields: dict[str, str]


@dataclass
class _AccessToken:
    user_id: int
    expires_at: float


@dataclass
class _Operating:
    used: float = 0.0
    reset_at: float | None = None


@dataclass
class _Deal:
    values: dict[str, Any]
    user_fields: dict[str, Any] = field(default_factory=dict)


# --- field tables ----------------------------------------------------------------------------

_ORDER_KINDS: dict[str, Kind] = {
    "accountNumber": "str",
    "additionalInfo": "str",
    "affiliateId": "int",
    "canceled": "str",
    "comments": "str",
    "companyId": "int",
    "currency": "str",
    "dateCanceled": "datetime",
    "dateInsert": "datetime",
    "dateLock": "datetime",
    "dateMarked": "datetime",
    "dateStatus": "datetime",
    "dateUpdate": "datetime",
    "deducted": "str",
    "discountValue": "float",
    "empCanceledId": "int",
    "empMarkedId": "int",
    "empStatusId": "int",
    "externalOrder": "str",
    "id": "int",
    "id1c": "str",
    "lid": "str",
    "lockedBy": "str",
    "marked": "str",
    "orderTopic": "str",
    "payed": "str",
    "personTypeId": "int",
    "personTypeXmlId": "str",
    "price": "float",
    "reasonCanceled": "str",
    "reasonMarked": "str",
    "recountFlag": "str",
    "recurringId": "str",
    "responsibleId": "int",
    "statusId": "str",
    "statusXmlId": "str",
    "taxValue": "float",
    "updated1c": "str",
    "userDescription": "str",
    "userId": "int",
    "version": "int",
    "version1c": "str",
    "xmlId": "str",
}
# sale.order.getFields: neither read-only nor immutable
_ORDER_WRITABLE = frozenset(
    {
        "additionalInfo",
        "affiliateId",
        "canceled",
        "comments",
        "companyId",
        "dateInsert",
        "discountValue",
        "empCanceledId",
        "empMarkedId",
        "empStatusId",
        "externalOrder",
        "id1c",
        "lockedBy",
        "marked",
        "orderTopic",
        "price",
        "reasonCanceled",
        "reasonMarked",
        "recountFlag",
        "recurringId",
        "responsibleId",
        "statusId",
        "updated1c",
        "userDescription",
        "version1c",
        "xmlId",
    }
)
# what add_order(**fields) may set besides its own arguments
_ORDER_SEEDABLE = (_ORDER_WRITABLE | {"currency", "lid", "payed", "deducted", "personTypeId"}) - {
    "statusId",
    "xmlId",
    "dateInsert",
}
_STATUS_KINDS: dict[str, Kind] = {
    "color": "str",
    "id": "str",
    "notify": "str",
    "sort": "int",
    "type": "str",
    "xmlId": "str",
}
_DEAL_KINDS: dict[str, Kind] = {
    "ID": "int",
    "TITLE": "str",
    "TYPE_ID": "str",
    "STAGE_ID": "str",
    "PROBABILITY": "int",
    "CURRENCY_ID": "str",
    "OPPORTUNITY": "float",
    "IS_MANUAL_OPPORTUNITY": "str",
    "TAX_VALUE": "float",
    "LEAD_ID": "int",
    "COMPANY_ID": "int",
    "CONTACT_ID": "int",
    "QUOTE_ID": "int",
    "BEGINDATE": "datetime",
    "CLOSEDATE": "datetime",
    "ASSIGNED_BY_ID": "int",
    "CREATED_BY_ID": "int",
    "MODIFY_BY_ID": "int",
    "DATE_CREATE": "datetime",
    "DATE_MODIFY": "datetime",
    "OPENED": "str",
    "CLOSED": "str",
    "COMMENTS": "str",
    "ADDITIONAL_INFO": "str",
    "LOCATION_ID": "str",
    "CATEGORY_ID": "int",
    "STAGE_SEMANTIC_ID": "str",
    "IS_NEW": "str",
    "IS_RECURRING": "str",
    "IS_RETURN_CUSTOMER": "str",
    "IS_REPEATED_APPROACH": "str",
    "SOURCE_ID": "str",
    "SOURCE_DESCRIPTION": "str",
    "ORIGINATOR_ID": "str",
    "ORIGIN_ID": "str",
    "MOVED_BY_ID": "int",
    "MOVED_TIME": "datetime",
    "LAST_ACTIVITY_TIME": "datetime",
    "UTM_SOURCE": "str",
    "UTM_MEDIUM": "str",
    "UTM_CAMPAIGN": "str",
    "UTM_CONTENT": "str",
    "UTM_TERM": "str",
    "LAST_ACTIVITY_BY": "int",
}
_DEAL_WRITABLE = frozenset(
    {
        "TITLE",
        "TYPE_ID",
        "STAGE_ID",
        "IS_RECURRING",
        "IS_RETURN_CUSTOMER",
        "IS_REPEATED_APPROACH",
        "PROBABILITY",
        "CURRENCY_ID",
        "OPPORTUNITY",
        "IS_MANUAL_OPPORTUNITY",
        "TAX_VALUE",
        "COMPANY_ID",
        "CONTACT_ID",
        "BEGINDATE",
        "CLOSEDATE",
        "OPENED",
        "CLOSED",
        "COMMENTS",
        "ASSIGNED_BY_ID",
        "SOURCE_ID",
        "SOURCE_DESCRIPTION",
        "ADDITIONAL_INFO",
        "LOCATION_ID",
        "ORIGINATOR_ID",
        "ORIGIN_ID",
        "UTM_SOURCE",
        "UTM_MEDIUM",
        "UTM_CAMPAIGN",
        "UTM_CONTENT",
        "UTM_TERM",
    }
)
_CRM_STATUS_KINDS: dict[str, Kind] = {
    "ID": "int",
    "ENTITY_ID": "str",
    "STATUS_ID": "str",
    "NAME": "str",
    "NAME_INIT": "str",
    "SORT": "int",
    "SYSTEM": "str",
    "CATEGORY_ID": "int",
    "COLOR": "str",
    "SEMANTICS": "str",
}
_METHOD_SCOPES = {"sale": "sale", "crm": "crm"}


# --- PHP-style parameters ----------------------------------------------------------------------

_KEY_RE = re.compile(r"^([^\[]+)((?:\[[^\]]*\])*)$")
_PART_RE = re.compile(r"\[([^\]]*)\]")
_REF_RE = re.compile(r"\$result((?:\[[^\[\]]*\])+)")


def _next_index(container: dict[str, Any]) -> str:
    numbers = [int(k) for k in container if k.isdigit()]
    return str(max(numbers) + 1 if numbers else 0)


def parse_php_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``a[b][]=1&a[b][]=2&c=3`` -> ``{"a": {"b": ["1", "2"]}, "c": "3"}``, as PHP reads it."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY_RE.match(key)
        if match is None:
            root[key] = value
            continue
        path = [match.group(1), *_PART_RE.findall(match.group(2))]
        node = root
        for i, part in enumerate(path):
            name = _next_index(node) if part == "" else part
            if i == len(path) - 1:
                node[name] = value
                break
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node = child
    normalized = _php_array(root)
    return normalized if isinstance(normalized, dict) else {}


def _php_array(value: Any) -> Any:
    """Dicts keyed 0..n-1 become lists, as PHP's json_encode shows such arrays; empty -> []."""
    if isinstance(value, dict):
        items = {k: _php_array(v) for k, v in value.items()}
        if not items:
            return []
        if all(isinstance(k, str) and k.isdigit() for k in items) and sorted(
            int(k) for k in items
        ) == list(range(len(items))):
            return [items[str(i)] for i in range(len(items))]
        return items
    if isinstance(value, list):
        return [_php_array(v) for v in value]
    return value


def _dump(payload: Any) -> bytes:
    # "/" only ever occurs inside strings in JSON text, so this is PHP's escaping of slashes.
    return json.dumps(payload, separators=(",", ":")).replace("/", "\\/").encode()


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        return int(value.strip())
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _num(value: float | None) -> float | int | None:
    # PHP prints 100.0 as 100
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def _php_bool(value: Any) -> bool:
    """PHP's ``(bool)`` cast: ``"0"`` and ``""`` are false, ``"false"`` is true."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def _like(pattern: str) -> re.Pattern[str]:
    parts = [".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern]
    return re.compile("^" + "".join(parts) + "$", re.IGNORECASE | re.DOTALL)


def _find_param(params: Mapping[str, Any], name: str) -> Any:
    for key, value in params.items():
        if key.lower() == name:
            return value
    return None


class Bitrix24Simulator:
    """One Bitrix24 portal: REST app, state, controls, an OAuth server and an event sender.

    Thread-safe: the app runs on a server thread, the controls may be called from any other.
    """

    def __init__(
        self,
        *,
        mode: Literal["orders", "deals"] = "orders",
        user_id: int = 1,
        webhook_code: str = "sim0webhook0code",
        application_token: str = "sim-app-token",
        client_id: str = "local.sim",
        client_secret: str = "sim-client-secret",
        access_token_lifetime: float = 3600.0,
        rate_per_second: float = 2.0,
        burst: int = 50,
        domain: str = "sim.bitrix24.test",
        event_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        scopes: Iterable[str] = ("sale", "crm"),
        portal_timezone: tzinfo | None = None,
        sale_statuses: Iterable[SaleStatus] = DEFAULT_SALE_STATUSES,
        deal_stages: Iterable[DealStage] = DEFAULT_DEAL_STAGES,
    ) -> None:
        if rate_per_second <= 0 or burst < 1:
            raise ValueError("rate_per_second must be positive and burst at least 1")
        self.mode = mode
        self.user_id = user_id
        self.webhook_code = webhook_code
        self.application_token = application_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.domain = domain
        self.member_id = hashlib.md5(domain.encode()).hexdigest()
        self._token_lifetime = access_token_lifetime
        self._rate = rate_per_second
        self._burst = burst
        self._event_timeout = event_timeout
        self._clock = clock
        self._scopes = frozenset(scopes)
        self._tz = portal_timezone or timezone(timedelta(hours=2))

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._statuses: dict[str, SaleStatus] = {s.id: s for s in sale_statuses}
        self._stages: dict[str, DealStage] = {s.status_id: s for s in deal_stages}
        self._orders: dict[int, dict[str, Any]] = {}
        self._next_order_id = FIRST_ORDER_ID
        self._deals: dict[int, _Deal] = {}
        self._next_deal_id = FIRST_DEAL_ID
        self._user_field_names: list[str] = []
        self._handlers: list[_Handler] = []
        self._next_handler_id = 1
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, int] = {}  # live refresh token -> user id
        self._bucket_level = 0.0
        self._bucket_time = clock()
        self._operating: dict[str, _Operating] = {}
        self._down = False
        self._fail: tuple[int, int, str, str] = (0, 500, "", "")
        self._throttled = 0
        self._base_url = f"https://{domain}"

        self._queue: deque[_Pending] = deque()
        self._in_flight = 0
        self._sender: threading.Thread | None = None
        self._closing = False

        self.requests: list[RecordedCall] = []
        """Every top-level REST call, whatever its outcome."""
        self.subcalls: list[RecordedCall] = []
        """Every batch sub-command, as if it had been called on its own."""
        self.oauth_requests: list[RecordedCall] = []
        self.calls_by_method: Counter[str] = Counter()
        """Top-level calls by method; a batch counts once, as ``batch``."""
        self.subcalls_by_method: Counter[str] = Counter()
        self.events_sent: list[SentEvent] = []

        self._methods: dict[str, Callable[[dict[str, Any], _Ctx], dict[str, Any]]] = {
            "sale.order.get": self._sale_order_get,
            "sale.order.update": self._sale_order_update,
            "sale.order.list": self._sale_order_list,
            "sale.status.get": self._sale_status_get,
            "sale.status.list": self._sale_status_list,
            "sale.status.update": self._sale_status_update,
            "sale.status.add": self._sale_status_add,
            "crm.deal.get": self._crm_deal_get,
            "crm.deal.update": self._crm_deal_update,
            "crm.deal.list": self._crm_deal_list,
            "crm.status.list": self._crm_status_list,
            "event.bind": self._event_bind,
            "event.get": self._event_get,
            "event.unbind": self._event_unbind,
            "events": self._events,
        }
        self.app = Starlette(
            routes=[
                Route("/oauth/token", self._oauth_token, methods=["GET", "POST"]),
                Route("/oauth/token/", self._oauth_token, methods=["GET", "POST"]),
                Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"]),
            ]
        )

    # --- context manager -------------------------------------------------------------------

    def __enter__(self) -> Bitrix24Simulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- controls: orders ----------------------------------------------------------------------

    @property
    def webhook_path(self) -> str:
        """The inbound webhook's path prefix: ``/rest/{user_id}/{webhook_code}/``."""
        return f"/rest/{self.user_id}/{self.webhook_code}/"

    def add_order(
        self,
        status_id: str = "N",
        *,
        xml_id: str = "",
        account_number: str | None = None,
        **fields: Any,
    ) -> int:
        """Create an order as the shop would; fires the save events. Returns its id."""
        unknown = set(fields) - _ORDER_SEEDABLE
        if unknown:
            raise ValueError(f"add_order cannot set {sorted(unknown)}")
        with self._lock:
            self._order_status_or_raise(status_id, ValueError)
            order_id = self._next_order_id
            self._next_order_id += 1
            now = self._clock()
            order: dict[str, Any] = {
                "accountNumber": account_number if account_number is not None else str(order_id),
                "additionalInfo": "",
                "affiliateId": None,
                "canceled": "N",
                "comments": "",
                "companyId": 1,
                "currency": "EUR",
                "dateCanceled": None,
                "dateInsert": now,
                "dateLock": None,
                "dateMarked": None,
                "dateStatus": now,
                "dateUpdate": now,
                "deducted": "N",
                "discountValue": 0.0,
                "empCanceledId": None,
                "empMarkedId": None,
                "empStatusId": self.user_id,
                "externalOrder": "N",
                "id": order_id,
                "id1c": "",
                "lid": "s1",
                "lockedBy": "",
                "marked": "N",
                "orderTopic": "",
                "payed": "N",
                "personTypeId": 1,
                "personTypeXmlId": "",
                "price": 100.0,
                "reasonCanceled": "",
                "reasonMarked": "",
                "recountFlag": "Y",
                "recurringId": "",
                "responsibleId": self.user_id,
                "statusId": status_id,
                "taxValue": 0.0,
                "updated1c": "N",
                "userDescription": "",
                "userId": self.user_id,
                "version": 1,
                "version1c": "",
                "xmlId": xml_id,
            }
            order.update(fields)
            self._orders[order_id] = order
            self._order_saved(order)
            return order_id

    def set_order_status_as_person(
        self, order_id: int, status_id: str, *, user_id: int = PERSON_USER_ID
    ) -> None:
        """A person changes the order's status in the UI: a save, with its events."""
        self.edit_order_as_person(order_id, user_id=user_id, statusId=status_id)

    def edit_order_as_person(
        self, order_id: int, *, user_id: int = PERSON_USER_ID, **fields: Any
    ) -> None:
        """A person edits and saves the order (``comments``, ``statusId``, ...): its events fire."""
        unknown = set(fields) - _ORDER_WRITABLE
        if unknown:
            raise ValueError(f"a person cannot set {sorted(unknown)} here")
        with self._lock:
            order = self._orders[order_id]
            if "statusId" in fields:
                self._order_status_or_raise(fields["statusId"], ValueError)
            self._apply_order_fields(order, fields, user_id)
            self._order_saved(order)

    def order(self, order_id: int) -> dict[str, Any]:
        """The order as ``sale.order.get`` shows it in ``result.order``. KeyError if unknown."""
        with self._lock:
            return self._order_full(self._orders[order_id])

    # --- controls: deals -----------------------------------------------------------------------

    def add_deal(self, stage_id: str = "NEW", *, category_id: int = 0, **fields: Any) -> int:
        """Create a deal (fields may hold ``UF_CRM_*`` and ``ORIGIN_ID``); fires ONCRMDEALADD."""
        unknown = {k for k in fields if not k.startswith("UF_CRM_")} - (
            _DEAL_WRITABLE - {"STAGE_ID"}
        )
        if unknown:
            raise ValueError(f"add_deal cannot set {sorted(unknown)}")
        with self._lock:
            stage = self._stage_or_raise(stage_id, category_id, ValueError)
            deal_id = self._next_deal_id
            self._next_deal_id += 1
            now = self._clock()
            day = datetime.fromtimestamp(now, self._tz).replace(hour=0, minute=0, second=0)
            values: dict[str, Any] = {
                "ID": deal_id,
                "TITLE": f"Deal #{deal_id}",
                "TYPE_ID": "SALE",
                "STAGE_ID": stage.status_id,
                "PROBABILITY": None,
                "CURRENCY_ID": "EUR",
                "OPPORTUNITY": 100.0,
                "IS_MANUAL_OPPORTUNITY": "N",
                "TAX_VALUE": 0.0,
                "LEAD_ID": None,
                "COMPANY_ID": 0,
                "CONTACT_ID": None,
                "QUOTE_ID": None,
                "BEGINDATE": day.timestamp(),
                "CLOSEDATE": (day + timedelta(days=7)).timestamp(),
                "ASSIGNED_BY_ID": self.user_id,
                "CREATED_BY_ID": self.user_id,
                "MODIFY_BY_ID": self.user_id,
                "DATE_CREATE": now,
                "DATE_MODIFY": now,
                "OPENED": "Y",
                "CLOSED": "N",
                "COMMENTS": "",
                "ADDITIONAL_INFO": None,
                "LOCATION_ID": None,
                "CATEGORY_ID": category_id,
                "STAGE_SEMANTIC_ID": stage.semantics,
                "IS_NEW": "Y",
                "IS_RECURRING": "N",
                "IS_RETURN_CUSTOMER": "N",
                "IS_REPEATED_APPROACH": "N",
                "SOURCE_ID": "WEB",
                "SOURCE_DESCRIPTION": None,
                "ORIGINATOR_ID": None,
                "ORIGIN_ID": None,
                "MOVED_BY_ID": self.user_id,
                "MOVED_TIME": now,
                "LAST_ACTIVITY_TIME": now,
                "UTM_SOURCE": None,
                "UTM_MEDIUM": None,
                "UTM_CAMPAIGN": None,
                "UTM_CONTENT": None,
                "UTM_TERM": None,
                "LAST_ACTIVITY_BY": self.user_id,
            }
            deal = _Deal(values)
            for key, value in fields.items():
                if key.startswith("UF_CRM_"):
                    if key not in self._user_field_names:
                        self._user_field_names.append(key)
                    deal.user_fields[key] = value
                else:
                    values[key] = value
            self._set_stage_derived(deal, stage)
            self._deals[deal_id] = deal
            self._emit("ONCRMDEALADD", {"ID": str(deal_id)})
            return deal_id

    def set_deal_stage_as_person(
        self, deal_id: int, stage_id: str, *, user_id: int = PERSON_USER_ID
    ) -> None:
        """A person moves the deal to another stage of its pipeline: ONCRMDEALUPDATE."""
        self.edit_deal_as_person(deal_id, user_id=user_id, STAGE_ID=stage_id)

    def edit_deal_as_person(
        self, deal_id: int, *, user_id: int = PERSON_USER_ID, **fields: Any
    ) -> None:
        """A person edits and saves the deal (any writable field or known ``UF_CRM_*``)."""
        with self._lock:
            deal = self._deals[deal_id]
            unknown = {
                k for k in fields if k not in _DEAL_WRITABLE and k not in self._user_field_names
            }
            if unknown:
                raise ValueError(f"a person cannot set {sorted(unknown)} here")
            if "STAGE_ID" in fields:
                self._stage_or_raise(fields["STAGE_ID"], deal.values["CATEGORY_ID"], ValueError)
            self._apply_deal_fields(deal, fields, user_id)
            self._emit("ONCRMDEALUPDATE", {"ID": str(deal.values["ID"])})

    def deal(self, deal_id: int) -> dict[str, Any]:
        """The deal as ``crm.deal.get`` shows it in ``result``. KeyError if unknown."""
        with self._lock:
            return self._deal_json(self._deals[deal_id], None)

    # --- controls: events, OAuth, failures ---------------------------------------------------

    def register_outgoing_webhook(self, url: str, events: Iterable[str]) -> None:
        """Set up an outgoing webhook as in the UI: one handler per ticked event."""
        names = [e.upper() for e in events]
        unknown = set(names) - KNOWN_EVENTS
        if unknown:
            raise ValueError(f"events not modelled: {sorted(unknown)}")
        if not url.startswith(("http://", "https://")):
            raise ValueError("the handler URL must be http(s)")
        with self._lock:
            for name in names:
                self._add_handler(name, url, "webhook")

    def issue_oauth_tokens(self) -> tuple[str, str]:
        """(access_token, refresh_token), as a local app gets them on installation."""
        with self._lock:
            return self._issue_tokens(self.user_id)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far now answers ``401 expired_token``."""
        with self._lock:
            for token in self._access.values():
                token.expires_at = -math.inf

    def set_down(self, down: bool) -> None:
        """While down, every REST call answers 503 with an HTML page (the OAuth server stays up)."""
        with self._lock:
            self._down = down

    def fail_next(
        self,
        count: int,
        status: int = 500,
        error: str = "INTERNAL_SERVER_ERROR",
        description: str = "Internal server error",
    ) -> None:
        """The next ``count`` REST calls answer this JSON error and change nothing."""
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            self._fail = (count, status, error, description)

    def exhaust_operating_time(self, method: str, seconds: float) -> None:
        """``method`` answers ``429 OPERATION_TIME_LIMIT`` until the clock is ``seconds`` on."""
        with self._lock:
            state = self._operating.setdefault(method.lower(), _Operating())
            state.used = max(state.used, OPERATING_LIMIT) + 1.0
            state.reset_at = self._clock() + seconds

    @property
    def throttled_count(self) -> int:
        """How many calls were refused with ``503 QUERY_LIMIT_EXCEEDED``."""
        with self._lock:
            return self._throttled

    def pending_events(self) -> int:
        with self._lock:
            return len(self._queue) + self._in_flight

    def wait_events_idle(self, timeout: float = 5.0) -> None:
        """Block until every event so far has been posted (or failed); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"events still busy: {self._in_flight} in flight, {len(self._queue)} queued"
                    )
                self._cond.wait(min(remaining, 0.05))

    def close(self) -> None:
        """Stop the event sender; events not yet posted are dropped."""
        with self._cond:
            self._closing = True
            self._queue.clear()
            self._cond.notify_all()
            sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(timeout=self._event_timeout + 2)

    # --- HTTP: REST ----------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:  # the caller went away; nothing to answer
            return Response(status_code=499)
        match = re.fullmatch(r"/rest/(?:([^/]+)/([^/]+)/)?([^/]+)", request.url.path)
        if match is None:
            return PlainTextResponse("Not Found", status_code=404)
        method = match.group(3)
        if method.lower().endswith(".json"):
            method = method[: -len(".json")]
        webhook = (match.group(1), match.group(2)) if match.group(1) is not None else None
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        query = request.scope.get("query_string", b"").decode("latin-1")
        base_url = str(request.base_url).rstrip("/")
        if request.method not in ("GET", "POST"):
            return PlainTextResponse("Method Not Allowed", status_code=405)
        with self._lock:
            self._base_url = base_url
            status, answer, record = self._process(method, webhook, query, content_type, body)
            self.requests.append(record)
            self.calls_by_method[method] += 1
        if answer is None:
            return HTMLResponse(_DOWN_PAGE, status_code=status)
        return Response(_dump(answer), status_code=status, media_type=_JSON_TYPE)

    def _process(
        self,
        method: str,
        webhook: tuple[str, str] | None,
        query: str,
        content_type: str,
        body: bytes,
    ) -> tuple[int, dict[str, Any] | None, RecordedCall]:
        """Under the lock: one top-level REST call, start to end."""
        at = self._clock()
        params = self._parse_params(query, content_type, body)
        token = params.pop("auth", None)
        auth_kind: Literal["webhook", "oauth"] | None = (
            "webhook" if webhook is not None else "oauth" if token is not None else None
        )

        def done(status: int, answer: dict[str, Any] | None) -> tuple[int, Any, RecordedCall]:
            record = RecordedCall(method, params, auth_kind, status, answer, at, content_type)
            return status, answer, record

        if self._down:
            return done(503, None)
        count, status, code, description = self._fail
        if count > 0:
            self._fail = (count - 1, status, code, description)
            return done(status, {"error": code, "error_description": description})
        try:
            ctx = self._authenticate(webhook, token)
        except _B24Error as exc:
            return done(exc.status, exc.body())
        if not self._take_drop():
            self._throttled += 1
            return done(
                503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
            )
        if method.lower() == "batch":
            started = time.perf_counter()
            try:
                result = self._batch(params, ctx)
            except _B24Error as exc:
                return done(exc.status, exc.body())
            answer = {"result": result, "time": self._time(at, started, None)}
            return done(200, answer)
        status, answer = self._execute(method, params, ctx, at)
        return done(status, answer)

    def _parse_params(self, query: str, content_type: str, body: bytes) -> dict[str, Any]:
        params = parse_php_pairs(parse_qsl(query, keep_blank_values=True))
        if not body:
            return params
        if content_type == "application/json":
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None  # Bitrix swallows the decoding error: no parameters
            if isinstance(doc, dict):
                params.update(doc)
            return params
        # Any other type, or none, is run through PHP's parse_str.
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params.update(parse_php_pairs(form))
        return params

    def _authenticate(self, webhook: tuple[str, str] | None, token: Any) -> _Ctx:
        if webhook is not None:
            user, code = webhook
            if user != str(self.user_id) or code != self.webhook_code:
                raise _B24Error(401, "INVALID_CREDENTIALS", "Invalid request credentials")
            return _Ctx("webhook", self.user_id)
        if token is None or token == "":
            raise _B24Error(401, "NO_AUTH_FOUND", "Wrong authorization data")
        known = self._access.get(str(token))
        if known is None:
            raise _B24Error(401, "invalid_token", "Unable to get application by token")
        if self._clock() >= known.expires_at:
            raise _B24Error(401, "expired_token", "The access token provided has expired.")
        return _Ctx("oauth", known.user_id)

    def _take_drop(self) -> bool:
        now = self._clock()
        drained = max(0.0, now - self._bucket_time) * self._rate
        self._bucket_level = max(0.0, self._bucket_level - drained)
        self._bucket_time = now
        if self._bucket_level + 1 > self._burst:
            return False
        self._bucket_level += 1
        return True

    def _execute(
        self, method: str, params: dict[str, Any], ctx: _Ctx, at: float
    ) -> tuple[int, dict[str, Any]]:
        """Under the lock: run one method (top level or in a batch); (http status, answer)."""
        key = method.lower()
        handler = self._methods.get(key)
        try:
            if handler is None:
                raise _B24Error(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
            scope = _METHOD_SCOPES.get(key.split(".")[0])
            if scope is not None and scope not in self._scopes:
                whose = "webhook" if ctx.auth == "webhook" else "access"
                raise _B24Error(
                    401,
                    "insufficient_scope",
                    f"The request requires higher privileges than provided by the {whose} token",
                )
            if key in _APP_ONLY and ctx.auth != "oauth":
                raise _B24Error(
                    403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method"
                )
            state = self._operating.setdefault(key, _Operating())
            if state.reset_at is not None and self._clock() >= state.reset_at:
                state.used, state.reset_at = 0.0, None
            if state.used > OPERATING_LIMIT:
                raise _B24Error(
                    429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."
                )
            started = time.perf_counter()
            answer = handler(params, ctx)
        except _B24Error as exc:
            return exc.status, exc.body()
        elapsed = time.perf_counter() - started
        if state.reset_at is None:
            state.reset_at = self._clock() + OPERATING_WINDOW
        state.used += elapsed
        answer["time"] = self._time(at, started, state)
        return 200, answer

    def _time(self, at: float, started: float, state: _Operating | None) -> dict[str, Any]:
        elapsed = time.perf_counter() - started
        timing: dict[str, Any] = {
            "start": at,
            "finish": at + elapsed,
            "duration": elapsed,
            "processing": elapsed,
            "date_start": self._iso(at),
            "date_finish": self._iso(at + elapsed),
        }
        if state is not None:
            timing["operating_reset_at"] = int(state.reset_at or at + OPERATING_WINDOW)
            timing["operating"] = state.used
        return timing

    # --- batch ---------------------------------------------------------------------------------

    def _batch(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        raw = _find_param(params, "cmd")
        if isinstance(raw, list):
            commands = {str(i): v for i, v in enumerate(raw)}
        elif isinstance(raw, dict):
            commands = {str(k): v for k, v in raw.items()}
        else:
            commands = {}
        halt = _php_bool(_find_param(params, "halt"))
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        totals: dict[str, Any] = {}
        nexts: dict[str, Any] = {}
        times: dict[str, Any] = {}
        for count, (key, command) in enumerate(commands.items(), start=1):
            at = self._clock()
            method, _, query = str(command).partition("?")
            if method.lower().endswith(".json"):
                method = method[: -len(".json")]
            pairs = [(k, _resolve_refs(v, results)) for k, v in parse_qsl(query, True)]
            sub_params = parse_php_pairs(pairs)
            sub_params.pop("auth", None)
            if count > BATCH_LIMIT:
                status, answer = (
                    400,
                    {
                        "error": "ERROR_BATCH_LENGTH_EXCEEDED",
                        "error_description": "Max batch length exceeded",
                    },
                )
            elif method.lower() == "batch":
                status, answer = (
                    405,
                    {
                        "error": "ERROR_BATCH_METHOD_NOT_ALLOWED",
                        "error_description": "Method is not allowed for batch usage",
                    },
                )
            else:
                status, answer = self._execute(method, sub_params, ctx, at)
            self.subcalls.append(RecordedCall(method, sub_params, ctx.auth, status, answer, at))
            self.subcalls_by_method[method] += 1
            if "error" in answer:
                errors[key] = {
                    "error": answer["error"],
                    "error_description": answer["error_description"],
                }
                if halt:
                    break
                continue
            results[key] = answer["result"]
            if "total" in answer:
                totals[key] = answer["total"]
            if "next" in answer:
                nexts[key] = answer["next"]
            times[key] = answer["time"]
        return {
            "result": _php_array(results),
            "result_error": _php_array(errors),
            "result_total": _php_array(totals),
            "result_next": _php_array(nexts),
            "result_time": _php_array(times),
        }

    # --- HTTP: OAuth server --------------------------------------------------------------------

    async def _oauth_token(self, request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)
        params = dict(parse_qsl(request.url.query, keep_blank_values=True))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body and content_type == "application/x-www-form-urlencoded":
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        client_endpoint = str(request.base_url).rstrip("/") + "/rest/"
        with self._lock:
            at = self._clock()
            status, answer = self._refresh_tokens(params, client_endpoint)
            shown = {k: v for k, v in params.items() if k not in ("client_secret",)}
            self.oauth_requests.append(RecordedCall("oauth/token", shown, None, status, answer, at))
        return Response(_dump(answer), status_code=status, media_type=_JSON_TYPE)

    def _refresh_tokens(
        self, params: dict[str, str], client_endpoint: str
    ) -> tuple[int, dict[str, Any]]:
        def error(status: int, code: str, description: str) -> tuple[int, dict[str, Any]]:
            return status, {"error": code, "error_description": description}

        if params.get("grant_type") != "refresh_token" or not params.get("refresh_token"):
            return error(400, "invalid_request", "Only grant_type=refresh_token is supported")
        if params.get("client_id") != self.client_id or params.get("client_secret") != (
            self.client_secret
        ):
            return error(401, "invalid_client", "Invalid client credentials")
        user_id = self._refresh.pop(params["refresh_token"], None)
        if user_id is None:
            return error(400, "invalid_grant", "Invalid grant")
        access, refresh = self._issue_tokens(user_id)
        now = self._clock()
        return 200, {
            "access_token": access,
            "expires": int(now + self._token_lifetime),
            "expires_in": int(self._token_lifetime),
            "scope": ",".join(sorted(self._scopes)),
            "domain": "oauth.bitrix.info",
            "server_endpoint": SERVER_ENDPOINT,
            "status": "L",
            "client_endpoint": client_endpoint,
            "member_id": self.member_id,
            "user_id": user_id,
            "refresh_token": refresh,
        }

    def _issue_tokens(self, user_id: int) -> tuple[str, str]:
        access = secrets.token_hex(35)
        refresh = secrets.token_hex(35)
        self._access[access] = _AccessToken(user_id, self._clock() + self._token_lifetime)
        self._refresh[refresh] = user_id
        return access, refresh

    # --- sale: orders --------------------------------------------------------------------------

    def _order_status_or_raise(self, status_id: Any, exc_type: type[Exception]) -> SaleStatus:
        status = self._statuses.get(str(status_id))
        if status is None:
            raise exc_type(f"Unknown order status '{status_id}'")
        if status.type != "O":
            raise exc_type(f"Status '{status_id}' is a delivery status, not an order status")
        return status

    def _order_or_raise(self, params: dict[str, Any], code: int) -> dict[str, Any]:
        raw = params.get("id")
        if raw is None or raw == "":
            raise _B24Error(400, 100, "Could not find value for parameter {id}")
        order_id = _int(raw)
        order = self._orders.get(order_id) if order_id is not None else None
        if order is None:
            raise _B24Error(400, code, "order does not exist")
        return order

    def _sale_order_get(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        order = self._order_or_raise(params, 201240400001)
        return {"result": {"order": self._order_full(order)}}

    def _sale_order_update(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        if params.get("id") in (None, ""):
            raise _B24Error(400, 100, "Could not find value for parameter {id}")
        fields = params.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise _B24Error(400, 100, "Could not find value for parameter {fields}")
        order = self._order_or_raise(params, 200540400001)
        if "statusId" in fields:
            try:
                self._order_status_or_raise(fields["statusId"], ValueError)
            except ValueError as exc:
                raise _B24Error(400, 0, str(exc)) from None
        writable = {k: v for k, v in fields.items() if k in _ORDER_WRITABLE}
        self._apply_order_fields(order, writable, ctx.user_id)
        self._order_saved(order)
        rendered = self._order_json(order)
        rendered["clients"] = []
        rendered["requisiteLink"] = []
        return {"result": {"order": dict(sorted(rendered.items()))}}

    def _apply_order_fields(self, order: dict[str, Any], fields: dict[str, Any], user: int) -> None:
        """Under the lock: store the values; a real change stamps dates, author and version."""
        now = self._clock()
        new: dict[str, Any] = {}
        for key, value in fields.items():
            kind = _ORDER_KINDS[key]
            if kind == "int":
                value = _int(value) if value not in (None, "") else None
            elif kind == "float":
                value = _float(value)
            elif kind == "datetime":
                value = self._parse_datetime(value, lambda m: _B24Error(400, 0, m))
            else:
                value = "" if value is None else str(value)
            new[key] = value
        changed = {key for key, value in new.items() if order.get(key) != value}
        order.update({key: new[key] for key in changed})
        # (flag, its date, its author): a flag that really changed stamps both
        for flag, date_key, author_key in (
            ("statusId", "dateStatus", "empStatusId"),
            ("canceled", "dateCanceled", "empCanceledId"),
            ("marked", "dateMarked", "empMarkedId"),
        ):
            if flag not in changed:
                continue
            on = flag == "statusId" or order[flag] == "Y"
            order[date_key] = now if on else None
            if author_key not in new:
                order[author_key] = user
        if changed:
            order["dateUpdate"] = now
            order["version"] += 1

    def _order_saved(self, order: dict[str, Any]) -> None:
        self._emit(
            "ONSALEORDERSAVED",
            {"ID": str(order["id"]), "XML_ID": order["xmlId"] or "", "ACTION": "save"},
        )
        self._emit("ONORDERENTITYSAVED", {"ID": str(order["id"])})

    def _status_xml_id(self, status_id: str) -> str:
        status = self._statuses.get(status_id)
        return (status.xml_id or "") if status is not None else ""

    def _order_json(self, order: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, kind in _ORDER_KINDS.items():
            value: Any = order[key] if key != "statusXmlId" else None
            if key == "statusXmlId":  # derived from the status definition, read-only
                value = self._status_xml_id(order["statusId"])
            if kind == "datetime":
                value = self._iso(value) if value is not None else None
            elif kind == "float":
                value = _num(value)
            out[key] = value
        return out

    def _order_full(self, order: dict[str, Any]) -> dict[str, Any]:
        out = self._order_json(order)
        order_id = order["id"]
        out["basketItems"] = [
            {
                "id": str(order_id * 10),
                "orderId": str(order_id),
                "name": "Simulated product",
                "price": _num(order["price"]),
                "quantity": 1,
                "currency": order["currency"],
                "productId": 348,
                "xmlId": f"bx_basket_{order_id}",
            }
        ]
        out["payments"] = [
            {
                "id": order_id * 10 + 1,
                "orderId": order_id,
                "accountNumber": f"{order['accountNumber']}/1",
                "paid": order["payed"],
                "sum": _num(order["price"]),
                "currency": order["currency"],
                "paySystemId": 1,
                "paySystemName": "Card Payment",
            }
        ]
        out["shipments"] = [
            {
                "id": order_id * 10 + 2,
                "orderId": order_id,
                "accountNumber": f"{order['accountNumber']}/2",
                "allowDelivery": "N",
                "canceled": "N",
                "deducted": order["deducted"],
                "deliveryId": 1,
                "deliveryName": "Courier Delivery",
                "priceDelivery": 0,
                "currency": order["currency"],
                "statusId": "DN",
                "statusXmlId": self._status_xml_id("DN"),
                "system": "N",
                "xmlId": f"bx_shipment_{order_id}",
            }
        ]
        out["propertyValues"] = []
        out["clients"] = []
        out["requisiteLink"] = []
        out["tradeBindings"] = []
        return dict(sorted(out.items()))

    def _sale_order_list(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        rows = [self._order_json(o) for o in self._orders.values()]
        page, total, nxt = self._sale_list(params, rows, _ORDER_KINDS, default_order="id")
        answer: dict[str, Any] = {"result": {"orders": page}}
        return self._paged(answer, total, nxt)

    # --- sale: statuses ------------------------------------------------------------------------

    @staticmethod
    def _status_json(status: SaleStatus) -> dict[str, Any]:
        return {
            "color": status.color,
            "id": status.id,
            "notify": status.notify,
            "sort": status.sort,
            "type": status.type,
            "xmlId": status.xml_id,
        }

    def _status_or_raise(self, params: dict[str, Any]) -> SaleStatus:
        raw = params.get("id")
        if raw is None or raw == "":
            raise _B24Error(400, 100, "Could not find value for parameter {id}")
        status = self._statuses.get(str(raw))
        if status is None:
            raise _B24Error(400, 201340400001, "status does not exist")
        return status

    def _sale_status_get(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        return {"result": {"status": self._status_json(self._status_or_raise(params))}}

    def _sale_status_list(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        rows = [self._status_json(s) for s in self._statuses.values()]
        page, total, nxt = self._sale_list(params, rows, _STATUS_KINDS, default_order="sort")
        return self._paged({"result": {"statuses": page}}, total, nxt)

    def _sale_status_update(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        if params.get("id") in (None, ""):
            raise _B24Error(400, 100, "Could not find value for parameter {id}")
        fields = params.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise _B24Error(400, 100, "Could not find value for parameter {fields}")
        if "type" not in fields:
            raise _B24Error(400, 0, "Required fields: type")
        status = self._status_or_raise(params)
        new_type = fields["type"]
        if new_type not in ("O", "D"):
            raise _B24Error(400, 201350000003, "Status type value is incorrect")
        if new_type != status.type:
            if status.system:
                raise _B24Error(400, 201350000006, "Type of a system status cannot be changed")
            if status.type == "O" and any(
                o["statusId"] == status.id for o in self._orders.values()
            ):
                raise _B24Error(
                    400, 201350000007, "Status type cannot be changed: orders use this status"
                )
            if status.type == "D" and status.id == "DN" and self._orders:
                raise _B24Error(
                    400, 201350000008, "Status type cannot be changed: deliveries use this status"
                )
        xml_id = status.xml_id
        if "xmlId" in fields:
            xml_id = None if fields["xmlId"] is None else str(fields["xmlId"])
        updated = SaleStatus(
            id=status.id,
            type=new_type,
            sort=_int(fields.get("sort", status.sort)) or 0,
            color=str(fields.get("color", status.color)),
            notify=str(fields.get("notify", status.notify)),
            xml_id=xml_id,
            system=status.system,
        )
        self._statuses[status.id] = updated
        return {"result": {"status": self._status_json(updated)}}

    def _sale_status_add(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        fields = params.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise _B24Error(400, 100, "Could not find value for parameter {fields}")
        missing = [name for name in ("id", "type") if name not in fields]
        if missing:
            raise _B24Error(400, 0, f"Required fields: {', '.join(missing)}")
        status_id = str(fields["id"] or "")
        if not status_id:
            raise _B24Error(400, 201350000004, "Status id is empty")
        if len(status_id) > 2:
            raise _B24Error(400, 201350000005, "Status id is longer than 2 characters")
        if fields["type"] not in ("O", "D"):
            raise _B24Error(400, 201350000003, "Status type value is incorrect")
        if status_id in self._statuses:
            raise _B24Error(400, 201350000001, "Duplicate entry for key [id]")
        status = SaleStatus(
            id=status_id,
            type=fields["type"],
            sort=_int(fields.get("sort", 100)) or 100,
            color=str(fields.get("color", "#CCCCCC")),
            notify=str(fields.get("notify", "Y")),
            xml_id=str(fields["xmlId"]) if fields.get("xmlId") is not None else None,
        )
        self._statuses[status_id] = status
        return {"result": {"status": self._status_json(status)}}

    # --- sale: list machinery ------------------------------------------------------------------

    def _sale_list(
        self,
        params: dict[str, Any],
        rows: list[dict[str, Any]],
        kinds: Mapping[str, Kind],
        default_order: str,
    ) -> tuple[list[dict[str, Any]], int | None, int | None]:
        def unknown(name: str) -> _B24Error:
            return _B24Error(400, 0, f"Unknown field definition `{name}`")

        select = params.get("select") or []
        if not isinstance(select, list):
            select = [select]
        for name in select:
            if name not in kinds:
                raise unknown(str(name))
        filters = params.get("filter") or {}
        if not isinstance(filters, dict):
            raise _B24Error(400, 0, "Parameter 'filter' must be an object")
        conditions = []
        for key, value in filters.items():
            op, name = _split_op(str(key))
            if name not in kinds:
                raise unknown(name)
            wanted = self._filter_value(value, op, kinds[name], lambda m: _B24Error(400, 0, m))
            conditions.append((name, op, wanted, kinds[name]))
        rows = [r for r in rows if all(self._match(r.get(n), o, w, k) for n, o, w, k in conditions)]
        order = params.get("order") or {}
        if not isinstance(order, dict):
            raise _B24Error(400, 0, "Parameter 'order' must be an object")
        keys: list[tuple[str, bool]] = []
        for name, direction in order.items():
            if name not in kinds:
                raise unknown(str(name))
            if str(direction).lower() not in ("asc", "desc"):
                raise _B24Error(400, 0, f"Invalid order direction `{direction}`")
            keys.append((str(name), str(direction).lower() == "desc"))
        if not keys:
            keys = [(default_order, False)]
        rows = self._sorted(rows, keys, kinds)
        page, total, nxt = self._page(rows, params.get("start"))
        if select:
            page = [{name: row[name] for name in select} for row in page]
        return page, total, nxt

    def _page(
        self, rows: list[dict[str, Any]], raw_start: Any
    ) -> tuple[list[dict[str, Any]], int | None, int | None]:
        start = _int(raw_start) if raw_start not in (None, "") else 0
        if start == -1:  # "huge data" mode: no count, no next
            return rows[:PAGE_SIZE], None, None
        start = max(start or 0, 0)
        page = rows[start : start + PAGE_SIZE]
        nxt = start + PAGE_SIZE if start + PAGE_SIZE < len(rows) else None
        return page, len(rows), nxt

    @staticmethod
    def _paged(answer: dict[str, Any], total: int | None, nxt: int | None) -> dict[str, Any]:
        if nxt is not None:
            answer["next"] = nxt
        if total is not None:
            answer["total"] = total
        return answer

    def _sorted(
        self, rows: list[dict[str, Any]], keys: list[tuple[str, bool]], kinds: Mapping[str, Kind]
    ) -> list[dict[str, Any]]:
        def sort_key(name: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
            kind = kinds.get(name, "str")

            def key(row: dict[str, Any]) -> tuple[int, Any]:
                value = self._comparable(row.get(name), kind)
                return (0, 0) if value is None else (1, value)  # NULLs first, as in MySQL

            return key

        for name, descending in reversed(keys):
            rows = sorted(rows, key=sort_key(name), reverse=descending)
        return rows

    def _comparable(self, value: Any, kind: Kind) -> Any:
        """A row's (rendered) value in a form that compares like the database does."""
        if value is None:
            return None
        if kind == "int":
            return _int(value)
        if kind == "float":
            return _float(value)
        if kind == "datetime":
            if isinstance(value, int | float):
                return float(math.floor(value))
            return datetime.fromisoformat(str(value)).timestamp()
        if isinstance(value, list):
            return str(value)
        return str(value)

    def _filter_value(
        self, value: Any, op: str, kind: Kind, error: Callable[[str], _B24Error]
    ) -> Any:
        def one(item: Any) -> Any:
            if op in ("%", "!%", "=%", "%=", "!=%", "!%="):
                return str(item)
            if item is None or (item == "" and kind != "str"):
                return None
            if kind == "int":
                number = _int(item)
                return number if number is not None else 0  # a cast, as the database does
            if kind == "float":
                real = _float(item)
                return real if real is not None else 0.0
            if kind == "datetime":
                return float(math.floor(self._parse_datetime(item, error)))
            return str(item)

        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return [one(v) for v in value]
        return one(value)

    def _match(self, row_value: Any, op: str, wanted: Any, kind: Kind) -> bool:
        have = self._comparable(row_value, kind)
        if kind == "str" and have is None:
            have = ""  # an empty filter value finds NULLs too
        if op in ("%", "!%"):
            found = have is not None and str(wanted).lower() in str(have).lower()
            return found if op == "%" else not found
        if op in ("=%", "%=", "!=%", "!%="):
            found = have is not None and bool(_like(str(wanted)).match(str(have)))
            return found if op in ("=%", "%=") else not found
        if op in ("@", "!@") or isinstance(wanted, list):
            values = wanted if isinstance(wanted, list) else [wanted]
            found = have in values
            return not found if op in ("!@", "!", "!=") else found
        if op == "=":
            return bool(have == wanted)
        if op in ("!", "!="):
            return bool(have != wanted)
        if have is None or wanted is None:
            return False
        try:
            if op == ">":
                return bool(have > wanted)
            if op == ">=":
                return bool(have >= wanted)
            if op == "<":
                return bool(have < wanted)
            return bool(have <= wanted)
        except TypeError:
            return False

    # --- crm: deals ----------------------------------------------------------------------------

    def _stage_or_raise(
        self, stage_id: Any, category_id: int, exc_type: Callable[[str], Exception]
    ) -> DealStage:
        stage = self._stages.get(str(stage_id))
        if stage is None or stage.category_id != category_id:
            raise exc_type('Invalid value for the "Stage" field')
        return stage

    @staticmethod
    def _set_stage_derived(deal: _Deal, stage: DealStage) -> None:
        deal.values["STAGE_SEMANTIC_ID"] = stage.semantics
        deal.values["CLOSED"] = "N" if stage.semantics == "P" else "Y"
        deal.values["IS_NEW"] = "Y" if stage.status_id.split(":")[-1] == "NEW" else "N"

    def _deal_or_raise(self, params: dict[str, Any]) -> _Deal:
        deal_id = _int(_find_param(params, "id"))
        if deal_id is None or deal_id <= 0:
            raise _B24Error(400, "", "ID is not defined or invalid.")
        deal = self._deals.get(deal_id)
        if deal is None:
            raise _B24Error(400, "", "Not found")
        return deal

    def _deal_json(self, deal: _Deal, select: list[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        names = select if select is not None else [*_DEAL_KINDS, *self._user_field_names]
        for name in names:
            if name in _DEAL_KINDS:
                value = deal.values.get(name)
                kind = _DEAL_KINDS[name]
                if value is None:
                    out[name] = None
                elif kind == "int":
                    out[name] = str(value)
                elif kind == "float":
                    out[name] = f"{float(value):.2f}"
                elif kind == "datetime":
                    out[name] = self._iso(float(value))
                else:
                    out[name] = str(value)
            elif name in self._user_field_names:
                out[name] = copy.deepcopy(deal.user_fields.get(name))
        return out

    def _crm_deal_get(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        return {"result": self._deal_json(self._deal_or_raise(params), None)}

    def _crm_deal_update(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        deal_id = _int(_find_param(params, "id"))
        if deal_id is None or deal_id <= 0:
            raise _B24Error(400, "", "ID is not defined or invalid.")
        fields = _find_param(params, "fields")
        if fields == []:
            fields = {}
        if not isinstance(fields, dict):
            raise _B24Error(400, "", "Parameter 'fields' must be array.")
        deal = self._deal_or_raise(params)
        usable = {
            k: v for k, v in fields.items() if k in _DEAL_WRITABLE or k in self._user_field_names
        }
        if "STAGE_ID" in usable:
            self._stage_or_raise(
                usable["STAGE_ID"], deal.values["CATEGORY_ID"], lambda m: _B24Error(400, "", m)
            )
        self._apply_deal_fields(deal, usable, ctx.user_id)
        self._emit("ONCRMDEALUPDATE", {"ID": str(deal.values["ID"])})
        return {"result": True}

    def _apply_deal_fields(self, deal: _Deal, fields: dict[str, Any], user: int) -> None:
        now = self._clock()
        changed = False
        old_stage = deal.values["STAGE_ID"]
        for key, value in fields.items():
            if key in self._user_field_names:
                if deal.user_fields.get(key) != value:
                    deal.user_fields[key] = value
                    changed = True
                continue
            kind = _DEAL_KINDS[key]
            if kind == "int":
                value = _int(value) if value not in (None, "") else None
            elif kind == "float":
                value = _float(value)
            elif kind == "datetime":
                value = self._parse_datetime(value, lambda m: _B24Error(400, "", m))
            elif value is not None:
                value = str(value)
            if deal.values.get(key) != value:
                deal.values[key] = value
                changed = True
        if deal.values["STAGE_ID"] != old_stage:
            self._set_stage_derived(deal, self._stages[deal.values["STAGE_ID"]])
            deal.values["MOVED_TIME"] = now
            deal.values["MOVED_BY_ID"] = user
        if changed:
            deal.values["DATE_MODIFY"] = now
            deal.values["MODIFY_BY_ID"] = user

    def _crm_deal_list(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        filters = _find_param(params, "filter")
        if filters in (None, "", []):
            filters = {}
        if not isinstance(filters, dict):
            raise _B24Error(400, "", "Parameter 'filter' must be array.")
        order = _find_param(params, "order")
        if order in (None, "", []):
            order = {}
        if not isinstance(order, dict):
            raise _B24Error(400, "", "Parameter 'order' must be array.")
        raw_select = _find_param(params, "select")
        if raw_select in (None, "", []):
            raw_select = ["*", "UF_*"]
        if not isinstance(raw_select, list):
            raw_select = [raw_select]
        select: list[str] = []
        for name in (str(n).upper() for n in raw_select):
            if name == "*":
                select.extend(n for n in _DEAL_KINDS if n not in select)
            elif name == "UF_*":
                select.extend(n for n in self._user_field_names if n not in select)
            elif (name in _DEAL_KINDS or name in self._user_field_names) and name not in select:
                select.append(name)
        kinds: dict[str, Kind] = dict(_DEAL_KINDS)
        deals = list(self._deals.values())
        for name in self._user_field_names:
            sample = next((d.user_fields[name] for d in deals if name in d.user_fields), None)
            is_number = isinstance(sample, int | float) and not isinstance(sample, bool)
            kinds[name] = "float" if is_number else "str"
        rows = [self._deal_json(d, None) for d in deals]
        rows = self._crm_filter(rows, filters, kinds)
        keys = [
            (str(n).upper(), str(d).lower() == "desc")
            for n, d in order.items()
            if str(n).upper() in kinds
        ] or [("ID", False)]
        rows = self._sorted(rows, keys, kinds)
        page, total, nxt = self._page(rows, _find_param(params, "start"))
        result = [{name: row.get(name) for name in select} for row in page]
        return self._paged({"result": result}, total, nxt)

    def _crm_filter(
        self, rows: list[dict[str, Any]], filters: dict[str, Any], kinds: Mapping[str, Kind]
    ) -> list[dict[str, Any]]:
        conditions = []
        for key, value in filters.items():
            op, name = _split_op(str(key))
            name = name.upper()
            if name not in kinds:
                continue  # unknown filter fields are ignored
            wanted = self._filter_value(value, op, kinds[name], lambda m: _B24Error(400, "", m))
            conditions.append((name, op, wanted, kinds[name]))
        return [r for r in rows if all(self._match(r.get(n), o, w, k) for n, o, w, k in conditions)]

    def _crm_status_list(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        filters = _find_param(params, "filter")
        if filters in (None, "", []):
            filters = {}
        if not isinstance(filters, dict):
            raise _B24Error(400, "", "Parameter 'filter' must be array.")
        order = _find_param(params, "order")
        if not isinstance(order, dict) or not order:
            order = {"SORT": "ASC"}
        rows = []
        for i, stage in enumerate(self._stages.values(), start=1):
            semantics = {"P": None, "S": "S", "F": "F"}[stage.semantics]
            rows.append(
                {
                    "ID": str(i),
                    "ENTITY_ID": stage.entity_id,
                    "STATUS_ID": stage.status_id,
                    "NAME": stage.name,
                    "NAME_INIT": stage.name,
                    "SORT": str(stage.sort),
                    "SYSTEM": "Y" if stage.semantics != "P" or stage.sort == 10 else "N",
                    "CATEGORY_ID": str(stage.category_id) if stage.category_id else None,
                    "COLOR": stage.color,
                    "SEMANTICS": semantics,
                    "EXTRA": {
                        "SEMANTICS": {"P": "process", "S": "success", "F": "failure"}[
                            stage.semantics
                        ],
                        "COLOR": stage.color,
                    },
                }
            )
        rows = self._crm_filter(rows, filters, _CRM_STATUS_KINDS)
        keys = [
            (str(n).upper(), str(d).lower() == "desc")
            for n, d in order.items()
            if str(n).upper() in _CRM_STATUS_KINDS
        ] or [("SORT", False)]
        rows = self._sorted(rows, [("ENTITY_ID", False), *keys], _CRM_STATUS_KINDS)
        page, total, nxt = self._page(rows, _find_param(params, "start"))
        return self._paged({"result": page}, total, nxt)

    # --- events: application handlers ----------------------------------------------------------

    def _event_bind(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        event = str(_find_param(params, "event") or "").upper()
        handler = str(_find_param(params, "handler") or "")
        if event not in KNOWN_EVENTS:
            raise _B24Error(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        if not handler.startswith(("http://", "https://")):
            raise _B24Error(400, "ERROR_ARGUMENT", "Argument 'handler' is null or empty")
        if any(h.kind == "app" and h.event == event and h.url == handler for h in self._handlers):
            raise _B24Error(400, "ERROR_CORE", "Handler already binded")
        self._add_handler(event, handler, "app")
        return {"result": True}

    def _event_get(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        result = [
            {"event": h.event, "handler": h.url, "auth_type": "0", "offline": 0}
            for h in self._handlers
            if h.kind == "app"
        ]
        return {"result": result}

    def _event_unbind(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        event = str(_find_param(params, "event") or "").upper()
        handler = _find_param(params, "handler")
        before = len(self._handlers)
        self._handlers = [
            h
            for h in self._handlers
            if not (h.kind == "app" and h.event == event and handler in (None, "", h.url))
        ]
        return {"result": {"count": before - len(self._handlers)}}

    def _events(self, params: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
        return {"result": sorted(KNOWN_EVENTS)}

    # --- events: sending -----------------------------------------------------------------------

    def _add_handler(self, event: str, url: str, kind: Literal["webhook", "app"]) -> None:
        self._handlers.append(_Handler(self._next_handler_id, event, url, kind))
        self._next_handler_id += 1

    def _emit(self, event: str, fields: dict[str, str]) -> None:
        """Under the lock: queue the event for every handler bound to it."""
        for handler in self._handlers:
            if handler.event != event or self._closing:
                continue
            self._queue.append(_Pending(handler, event, dict(fields)))
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._sender_loop, name="bitrix24-sim-events", daemon=True
                )
                self._sender.start()
            self._cond.notify_all()

    def _event_form(self, pending: _Pending, now: float) -> dict[str, str]:
        """Under the lock: the flat form the queue server posts (PHP-style keys)."""
        form = {"event": pending.event, "event_handler_id": str(pending.handler.id)}
        for key, value in pending.fields.items():
            form[f"data[FIELDS][{key}]"] = value
        form["ts"] = str(int(now))
        auth = {
            "domain": self.domain,
            "client_endpoint": f"{self._base_url}/rest/",
            "server_endpoint": SERVER_ENDPOINT,
            "member_id": self.member_id,
            "application_token": self.application_token,
        }
        if pending.handler.kind == "app":
            access, _ = self._issue_tokens(self.user_id)
            auth |= {
                "access_token": access,
                "expires_in": str(int(self._token_lifetime)),
                "scope": ",".join(sorted(self._scopes)),
                "status": "L",
            }
        form.update({f"auth[{k}]": v for k, v in auth.items()})
        return form

    def _sender_loop(self) -> None:
        with httpx.Client(timeout=self._event_timeout) as client:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        return
                    pending = self._queue.popleft()
                    self._in_flight += 1
                    at = self._clock()
                    form = self._event_form(pending, at)
                status: int | None = None
                error: str | None = None
                try:
                    status = client.post(pending.handler.url, data=form).status_code
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    # Never retried: the queue server only logs a failure.
                    self.events_sent.append(
                        SentEvent(
                            event=pending.event,
                            id=pending.fields.get("ID", ""),
                            url=pending.handler.url,
                            handler_id=pending.handler.id,
                            http_status=status,
                            error=error,
                            form=form,
                            at=at,
                        )
                    )
                    self._in_flight -= 1
                    self._cond.notify_all()

    # --- dates ---------------------------------------------------------------------------------

    def _iso(self, ts: float) -> str:
        return datetime.fromtimestamp(math.floor(ts), self._tz).isoformat(timespec="seconds")

    def _parse_datetime(self, value: Any, error: Callable[[str], _B24Error]) -> float:
        if isinstance(value, str):
            text = value.strip()
            parsed: datetime | None = None
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                for fmt in ("%d.%m.%Y %H:%M:%S", "%d.%m.%Y"):
                    try:
                        parsed = datetime.strptime(text, fmt)
                        break
                    except ValueError:
                        continue
            if parsed is not None:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=self._tz)
                return parsed.timestamp()
        raise error(f"Invalid date/time value '{value}'")


def _split_op(key: str) -> tuple[str, str]:
    for op in _FILTER_OPS:
        if key.startswith(op):
            return op, key[len(op) :]
    return "=", key


def _resolve_refs(value: str, results: Mapping[str, Any]) -> str:
    """``$result[key][field][0]`` -> that value of an earlier command's result (PHP strings)."""

    def substitute(match: re.Match[str]) -> str:
        node: Any = results
        for part in _PART_RE.findall(match.group(1)):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return ""
        if node is None or node is False:
            return ""
        if node is True:
            return "1"
        if isinstance(node, dict | list):
            return "Array"
        return str(node)

    return _REF_RE.sub(substitute, value)
