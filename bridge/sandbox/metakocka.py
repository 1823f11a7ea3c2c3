"""A simulator of one MetaKocka company's REST API (``/rest/eshop/v1/``), as a Starlette app.

It models what the bridge uses: ``get_document``, ``change_document_status`` and ``search`` for
sales orders, following the MetaKocka docs (``metakocka/metakocka_api_base``) and
``reference/notes/metakocka.md``. Everything is POST with a JSON body, credentials travel in the
body, every value in an answer is a string, and API errors are HTTP 200 with ``opr_code`` != "0".

Where the docs are silent the simulator takes the notes' best reading. These are guesses, and a
test that depends on one of them tests the guess, not MetaKocka:

- Missing or wrong ``secret_key``/``company_id`` -> ``opr_code "3"`` (old code table). A body that
  is not a JSON object -> ``opr_code "2"``. A request without ``Content-Type: application/json``
  -> HTTP 415, as a JAX-RS server would answer (the docs only say the header is required).
- Unknown ``mk_id``/``buyer_order`` -> ``opr_code "6"`` with "Cannot find sales order ...",
  by analogy with ``get_proof_of_delivery``.
- ``change_document_status``: exactly one of ``mk_id`` | ``mk_id_list`` | ``buyer_order``; none or
  several -> ``opr_code "2"``. The status is checked before the documents. A status that is not
  an Opis of the register (a label such as "Odpremljen" included) -> ``opr_code "1"`` with the
  "Dinamični šifrant ..." text seen in a third-party client's tests. With ``mk_id_list``, one
  unknown id fails the whole call and changes nothing (``opr_code "6"`` naming the first unknown
  id); repeated ids are changed once.
- Setting the status an order already has is NOT a no-op: the docs promise no-op behaviour only
  for ``update_document``, so the simulator records another change-log entry, another
  notification and a new last-change time. A change made "as a person" behaves the same way.
- ``document_info`` attributes an API change to ``api_user_email`` when given, else to the
  company's main account.
- ``warehouse_receiving_note`` is accepted as a doc_type, but the simulator holds no receiving
  notes, so every id is unknown (``opr_code "6"``); ``buyer_order`` is refused for it.
- ``search``: ``last_change_from``/``last_change_to`` are both inclusive and compare at whole
  seconds, the resolution of every timestamp the API shows, so a change at 12:00:00.7 matches a
  window ending at 12:00:00 (and a poller whose windows share an edge sees it twice).
  ``status_change_from``/``_to``/``_list`` (all three required, as documented) match an order
  that changed to a listed Opis inside the window, even if it has changed again since.
  ``customer_order`` matches ``buyer_order`` exactly. ``status_list`` values that are not an Opis
  match nothing. An unknown ``query_advance`` type -> ``opr_code "2"`` (never silently ignored).
  ``query`` is a case-insensitive substring match on count_code, buyer_order and customer name.
  Only ``doc_type: "sales_order"`` is searchable; other types -> ``opr_code "2"``.
  No ``limit`` means 100; more than 100 is clamped to 100. An empty result is ``opr_code "0"`` with
  an empty list. ``result_type: "doc"`` returns documents exactly as ``get_document`` does
  (``status_desc`` included; ``return_document_info`` is not honoured in search). The answer
  reflects the data when the search starts executing, not when it returns.
- Searches run one at a time per company (documented); the ``searchGroup`` header is ignored, as
  on a company without ``REST_MAX_SEARCH_LOCK_GROUP_PER_COMPANY``. Other calls do not queue.
- ``set_down`` answers every path with HTTP 503 and an HTML page, as a proxy does during an
  upgrade (recorded with ``answer=None``); ``fail_next`` failures take precedence over
  authentication and have no effect.
- ``add_order`` refuses a second order with the same ``buyer_order``, as on a company with the
  unique-customer-order check enabled, so lookups by ``buyer_order`` are never ambiguous.
"""

from __future__ import annotations

import asyncio
import copy
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

__all__ = [
    "API_PREFIX",
    "DEFAULT_STATUSES",
    "MAIN_ACCOUNT_EMAIL",
    "PERSON_EMAIL",
    "MetaKockaSimulator",
    "RecordedCall",
]

API_PREFIX = "/rest/eshop/v1/"

# Opis -> Vrednost. The first ten rows are the register screenshot in the docs; new_order and the
# last three appear in doc examples (their labels other than "Novo naročilo" are guesses);
# in_progress stands for a row a company added itself.
DEFAULT_STATUSES: dict[str, str] = {
    "paused": "Pavziran",
    "shipped": "Odpremljen",
    "created": "Novo",
    "ready_to_ship": "Pripravljen za odpremo",
    "completed": "Zaključena",
    "manually_closed": "Brisan",
    "duplicate": "Duplikat",
    "canceled": "Preklican",
    "package_returned": "Vračilo paketa",
    "draft": "Draft",
    "new_order": "Novo naročilo",
    "in_progress": "V obdelavi",
    "problem": "Problem",
    "lost": "Izgubljen",
    "damaged": "Poškodovan",
}

MAIN_ACCOUNT_EMAIL = "glavni.account@sim.metakocka.test"
PERSON_EMAIL = "prodaja@sim.metakocka.test"

_FIRST_MK_ID = 400000003364
_DOC_LABELS = {"sales_order": "sales order", "warehouse_receiving_note": "warehouse receiving note"}
_SEARCH_FILTERS = frozenset(
    {
        "last_change_from",
        "last_change_to",
        "status_list",
        "customer_order",
        "status_change_from",
        "status_change_to",
        "status_change_list",
    }
)
_STATUS_CHANGE_FILTERS = ("status_change_from", "status_change_to", "status_change_list")

_DOWN_PAGE = (
    "<!DOCTYPE html><html><head><title>503 Service Temporarily Unavailable</title></head>"
    "<body><h1>Service Temporarily Unavailable</h1>"
    "<p>MetaKocka se nadgrajuje. Poskusite znova čez nekaj minut.</p></body></html>"
)

_CUSTOMERS = (
    ("Janez Novak", "Slovenska cesta 1", "1000", "Ljubljana"),
    ("Maja Kovač", "Glavni trg 5", "2000", "Maribor"),
    ("Luka Horvat", "Prešernova ulica 12", "4000", "Kranj"),
    ("Ana Zupan", "Cankarjeva cesta 3", "3000", "Celje"),
)


def _local_zone() -> tzinfo:
    try:
        return ZoneInfo("Europe/Ljubljana")
    except ZoneInfoNotFoundError:  # no tz database on this machine: winter time is close enough
        return timezone(timedelta(hours=1))


_ZONE = _local_zone()


def _timestamp(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), _ZONE).isoformat(timespec="seconds")


def _date(epoch: float) -> str:
    local = datetime.fromtimestamp(epoch, _ZONE)
    offset = local.isoformat(timespec="seconds")[-6:]
    return f"{local.date().isoformat()}{offset}"


def _mk_id_sort_key(mk_id: str) -> tuple[int, int, str]:
    return (0, int(mk_id), "") if mk_id.isdigit() else (1, 0, mk_id)


class _McError(Exception):
    """An API error: answered as HTTP 200 with this opr_code/opr_desc."""

    def __init__(self, opr_code: str, opr_desc: str) -> None:
        super().__init__(opr_desc)
        self.opr_code = opr_code
        self.opr_desc = opr_desc


@dataclass(frozen=True)
class RecordedCall:
    """One call to an API method, as the simulator saw it.

    ``body`` is None when it was not a JSON object; ``answer`` is None when the call got no JSON
    answer (simulator down). ``at`` is the simulator's clock when the call arrived.
    """

    method: str
    body: dict[str, Any] | None
    answer: dict[str, Any] | None
    http_status: int
    at: float


@dataclass
class _Order:
    mk_id: str
    seq: int
    buyer_order: str
    status_desc: str
    created_at: float
    last_change: float
    info: list[dict[str, str]] = field(default_factory=list)
    # (time, new Opis) for the status_change_* search filter, which matches on the Opis
    status_changes: list[tuple[float, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _SearchParams:
    filters: dict[str, str]
    query: str | None
    result_doc: bool
    show_status_code: bool
    limit: int
    offset: int
    descending: bool


class MetaKockaSimulator:
    """One MetaKocka company. Serve ``app``; drive and inspect it with the other members.

    The control methods are thread-safe, so a test can call them while ``app`` runs in a
    server thread.
    """

    def __init__(
        self,
        *,
        company_id: str = "16",
        secret_key: str = "sim-secret",
        statuses: dict[str, str] | None = None,
        search_latency: float = 0.0,
        call_latency: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.company_id = company_id
        self.secret_key = secret_key
        self.statuses: dict[str, str] = dict(DEFAULT_STATUSES if statuses is None else statuses)
        self.search_latency = search_latency
        self.call_latency = call_latency
        self._clock = clock

        self.requests: list[RecordedCall] = []
        self.calls_by_method: Counter[str] = Counter()
        self.max_parallel_searches = 0
        self.notifications: list[tuple[str, str]] = []

        self._lock = threading.Lock()
        self._orders: dict[str, _Order] = {}
        self._by_buyer_order: dict[str, str] = {}
        self._next_mk_id = _FIRST_MK_ID
        self._next_seq = 1
        self._down = False
        self._fail: tuple[int, str, str] = (0, "", "")
        self._searches_running = 0
        # asyncio.Lock binds to the loop it first waits in; a simulator may outlive one server
        self._search_lock: asyncio.Lock | None = None
        self._search_lock_loop: asyncio.AbstractEventLoop | None = None

        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "get_document": self._get_document,
            "change_document_status": self._change_document_status,
            "search": self._search,
        }
        self.app = Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._dispatch,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                )
            ]
        )

    # ---- controls -------------------------------------------------------------------------

    def add_order(
        self, buyer_order: str, status_desc: str = "new_order", *, mk_id: str | None = None
    ) -> str:
        """Create a sales order (as a shop import would) and return its mk_id."""
        if status_desc not in self.statuses:
            raise ValueError(f"status {status_desc!r} is not in the register")
        with self._lock:
            if buyer_order in self._by_buyer_order:
                raise ValueError(f"an order with buyer_order {buyer_order!r} already exists")
            if mk_id is None:
                mk_id = str(self._next_mk_id)
            if mk_id in self._orders:
                raise ValueError(f"an order with mk_id {mk_id!r} already exists")
            if mk_id.isdigit():
                self._next_mk_id = max(self._next_mk_id, int(mk_id) + 1)
            now = self._clock()
            order = _Order(mk_id, self._next_seq, buyer_order, status_desc, now, now)
            order.info.append(self._info_entry("NEW", now, MAIN_ACCOUNT_EMAIL, "Glavni", "account"))
            self._next_seq += 1
            self._orders[mk_id] = order
            self._by_buyer_order[buyer_order] = mk_id
            return mk_id

    def set_status_as_person(
        self, mk_id: str, status_desc: str, *, user_email: str = PERSON_EMAIL
    ) -> None:
        """A status change made by someone in the MetaKocka UI (or by MK automation)."""
        if status_desc not in self.statuses:
            raise ValueError(f"status {status_desc!r} is not in the register")
        with self._lock:
            order = self._orders[mk_id]
            self._apply_status(order, status_desc, self._clock(), user_email, "Prodaja", "Oseba")

    def order(self, mk_id: str) -> dict[str, Any]:
        """The order as get_document shows it, with its document_info. KeyError if unknown."""
        with self._lock:
            return self._snapshot(self._orders[mk_id])

    def order_by_buyer_order(self, buyer_order: str) -> dict[str, Any] | None:
        with self._lock:
            mk_id = self._by_buyer_order.get(buyer_order)
            return None if mk_id is None else self._snapshot(self._orders[mk_id])

    def last_change(self, mk_id: str) -> float:
        """The order's last-change time (clock seconds), which the API never shows directly."""
        with self._lock:
            return self._orders[mk_id].last_change

    def set_down(self, down: bool) -> None:
        with self._lock:
            self._down = down

    def fail_next(
        self, count: int, opr_code: str = "1", opr_desc: str = "Neznana napaka na strežniku."
    ) -> None:
        """The next ``count`` API calls answer HTTP 200 with this error and change nothing."""
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            self._fail = (count, opr_code, opr_desc)

    # ---- HTTP -----------------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        started = time.monotonic()
        path = request.url.path
        method = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else None
        known = method is not None and method in self._handlers
        with self._lock:
            down = self._down
            if down and known:
                assert method is not None
                self._record(method, None, None, 503)
        if down:
            return HTMLResponse(_DOWN_PAGE, status_code=503)
        if not known:
            return PlainTextResponse("Not Found", status_code=404)
        assert method is not None
        if request.method != "POST":
            return PlainTextResponse(
                "Method Not Allowed", status_code=405, headers={"Allow": "POST"}
            )
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            return PlainTextResponse("Unsupported Media Type", status_code=415)

        if self.call_latency > 0:
            await asyncio.sleep(self.call_latency)
        try:
            raw = await request.body()
        except ClientDisconnect:  # the caller went away (e.g. killed); nothing to answer
            return PlainTextResponse("", status_code=499)
        body = self._parse_body(raw)
        with self._lock:
            fail_count, fail_code, fail_desc = self._fail
            if fail_count > 0:
                self._fail = (fail_count - 1, fail_code, fail_desc)
        try:
            if fail_count > 0:
                raise _McError(fail_code, fail_desc)
            if body is None:
                raise _McError("2", "Request body is not a valid JSON object.")
            self._authenticate(body)
            answer = await self._handlers[method](body)
        except _McError as exc:
            answer = {"opr_code": exc.opr_code, "opr_desc": exc.opr_desc}
        answer["opr_time_ms"] = str(int((time.monotonic() - started) * 1000))
        with self._lock:
            self._record(method, body, answer, 200)
        return Response(orjson.dumps(answer), media_type="application/json")

    @staticmethod
    def _parse_body(raw: bytes) -> dict[str, Any] | None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None

    def _record(
        self, method: str, body: dict[str, Any] | None, answer: dict[str, Any] | None, status: int
    ) -> None:
        if body is not None and "secret_key" in body:
            body = {**body, "secret_key": "***"}
        self.requests.append(
            RecordedCall(method, copy.deepcopy(body), copy.deepcopy(answer), status, self._clock())
        )
        self.calls_by_method[method] += 1

    def _authenticate(self, body: dict[str, Any]) -> None:
        company = body.get("company_id")
        if isinstance(company, int) and not isinstance(company, bool):
            company = str(company)
        if body.get("secret_key") != self.secret_key or company != self.company_id:
            raise _McError("3", "Napačen secret_key ali company_id.")

    # ---- get_document ---------------------------------------------------------------------

    async def _get_document(self, body: dict[str, Any]) -> dict[str, Any]:
        doc_type = _doc_type(body, ("sales_order", "warehouse_receiving_note"))
        with self._lock:
            if _present(body, "doc_id"):
                order = self._find(doc_type, "mk_id", _id_value(body["doc_id"], "doc_id"))
            elif _present(body, "buyer_order"):
                order = self._find(
                    doc_type, "buyer order", _id_value(body["buyer_order"], "buyer_order")
                )
            else:
                raise _McError("2", "Paramether 'doc_id' is required")
            answer = self._document(order)
            if _flag(body, "return_document_info"):
                answer["document_info"] = copy.deepcopy(order.info)
            return answer

    # ---- change_document_status -----------------------------------------------------------

    async def _change_document_status(self, body: dict[str, Any]) -> dict[str, Any]:
        doc_type = _doc_type(body, ("sales_order", "warehouse_receiving_note"))
        status = _required_str(body, "status_code")
        given = [key for key in ("mk_id", "mk_id_list", "buyer_order") if _present(body, key)]
        if len(given) != 1:
            raise _McError(
                "2",
                "Paramether 'mk_id' is required (use exactly one of 'mk_id', 'mk_id_list', "
                "'buyer_order')",
            )
        if given == ["buyer_order"] and doc_type != "sales_order":
            raise _McError("2", "Paramether 'buyer_order' is supported only for sales_order")
        if doc_type == "sales_order" and status not in self.statuses:
            raise _McError(
                "1",
                f"Dinamični šifrant z vrednostjo ''{status}'' tipa ''Prodajna naročila - status'' "
                "mora biti nastavljen",
            )
        email = body.get("api_user_email")
        by_api_user = isinstance(email, str) and email != ""

        with self._lock:
            if given == ["mk_id"]:
                targets = [self._find(doc_type, "mk_id", _id_value(body["mk_id"], "mk_id"))]
            elif given == ["buyer_order"]:
                buyer_order = _id_value(body["buyer_order"], "buyer_order")
                targets = [self._find(doc_type, "buyer order", buyer_order)]
            else:
                targets = []
                for mk_id in dict.fromkeys(_id_list(body["mk_id_list"])):
                    targets.append(self._find(doc_type, "mk_id", mk_id))
            now = self._clock()
            for order in targets:
                if by_api_user:
                    self._apply_status(order, status, now, str(email), "", "")
                else:
                    self._apply_status(order, status, now, MAIN_ACCOUNT_EMAIL, "Glavni", "account")
        return {"opr_code": "0"}

    # ---- search ---------------------------------------------------------------------------

    def _search_lock_for_running_loop(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._search_lock is None or self._search_lock_loop is not loop:
                self._search_lock = asyncio.Lock()
                self._search_lock_loop = loop
            return self._search_lock

    async def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        async with self._search_lock_for_running_loop():
            with self._lock:
                self._searches_running += 1
                self.max_parallel_searches = max(self.max_parallel_searches, self._searches_running)
            try:
                params = self._search_params(body)
                with self._lock:
                    answer = self._run_search(params)
                if self.search_latency > 0:
                    await asyncio.sleep(self.search_latency)
                return answer
            finally:
                with self._lock:
                    self._searches_running -= 1

    def _search_params(self, body: dict[str, Any]) -> _SearchParams:
        _doc_type(body, ("sales_order",))
        raw_filters = body.get("query_advance", [])
        if not isinstance(raw_filters, list):
            raise _McError("2", "Paramether 'query_advance' has invalid value")
        filters: dict[str, str] = {}
        for item in raw_filters:
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise _McError("2", "Paramether 'query_advance' has invalid value")
            kind = item["type"]
            if kind not in _SEARCH_FILTERS:
                raise _McError("2", f"Unknown query_advance type : {kind}")
            value = item.get("value")
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise _McError("2", f"Paramether '{kind}' has invalid value : {value}")
            filters[kind] = str(value)
        present = [name for name in _STATUS_CHANGE_FILTERS if name in filters]
        if present and len(present) != len(_STATUS_CHANGE_FILTERS):
            missing = next(n for n in _STATUS_CHANGE_FILTERS if n not in filters)
            raise _McError("2", f"Paramether '{missing}' is required")
        for name in (
            "last_change_from",
            "last_change_to",
            "status_change_from",
            "status_change_to",
        ):
            if name in filters:
                _parse_timestamp(filters[name], name)

        query = body.get("query")
        direction = body.get("order_direction", "asc")
        if direction not in ("asc", "desc"):
            raise _McError(
                "2",
                f"Paramether 'order_direction' has invalid value : {direction}. "
                "Valid values : asc,desc",
            )
        limit = _int_param(body, "limit", 100)
        if limit < 1:
            raise _McError("2", f"Paramether 'limit' has invalid value : {limit}")
        return _SearchParams(
            filters=filters,
            query=query if isinstance(query, str) and query else None,
            result_doc=body.get("result_type") == "doc",
            show_status_code=_flag(body, "show_status_code"),
            limit=min(limit, 100),
            offset=_int_param(body, "offset", 0),
            descending=direction == "desc",
        )

    def _run_search(self, params: _SearchParams) -> dict[str, Any]:
        matches = [o for o in self._orders.values() if self._matches(o, params)]
        matches.sort(key=lambda o: _mk_id_sort_key(o.mk_id), reverse=params.descending)
        page = matches[params.offset : params.offset + params.limit]
        result: list[dict[str, Any]] = []
        for order in page:
            if params.result_doc:
                result.append(self._document(order))
                continue
            item = {"mk_id": order.mk_id, "opr_code": "0", "count_code": _count_code(order)}
            if params.show_status_code:
                item["status_code"] = self.statuses[order.status_desc]
            result.append(item)
        return {
            "opr_code": "0",
            "result_all_records": str(len(matches)),
            "result_count": str(len(result)),
            "offset": str(params.offset),
            "limit": str(params.limit),
            "result": result,
        }

    def _matches(self, order: _Order, params: _SearchParams) -> bool:
        f = params.filters
        changed = math.floor(order.last_change)
        if "last_change_from" in f and changed < _parse_timestamp(f["last_change_from"], ""):
            return False
        if "last_change_to" in f and changed > _parse_timestamp(f["last_change_to"], ""):
            return False
        if "status_list" in f and order.status_desc not in _split_list(f["status_list"]):
            return False
        if "customer_order" in f and order.buyer_order != f["customer_order"]:
            return False
        if "status_change_list" in f:
            wanted = _split_list(f["status_change_list"])
            start = _parse_timestamp(f["status_change_from"], "")
            end = _parse_timestamp(f["status_change_to"], "")
            if not any(
                start <= math.floor(at) <= end and desc in wanted
                for at, desc in order.status_changes
            ):
                return False
        if params.query is not None:
            needle = params.query.casefold()
            haystack = (_count_code(order), order.buyer_order, _customer(order)[0])
            if not any(needle in text.casefold() for text in haystack):
                return False
        return True

    # ---- state helpers (call with self._lock held) ----------------------------------------

    def _find(self, doc_type: str, key: str, value: str) -> _Order:
        order: _Order | None = None
        if doc_type == "sales_order":
            mk_id = value if key == "mk_id" else self._by_buyer_order.get(value)
            order = None if mk_id is None else self._orders.get(mk_id)
        if order is None:
            raise _McError("6", f"Cannot find {_DOC_LABELS[doc_type]} with {key} '{value}'")
        return order

    def _apply_status(
        self, order: _Order, status_desc: str, now: float, email: str, name: str, surname: str
    ) -> None:
        entry = self._info_entry("DOCUMENT_STATUS_CHANGE", now, email, name, surname)
        entry["value_previous"] = self.statuses[order.status_desc]
        entry["value_new"] = self.statuses[status_desc]
        order.info.append(entry)
        order.status_desc = status_desc
        order.last_change = now
        order.status_changes.append((now, status_desc))
        self.notifications.append((order.mk_id, status_desc))

    @staticmethod
    def _info_entry(kind: str, now: float, email: str, name: str, surname: str) -> dict[str, str]:
        return {
            "user_email": email,
            "name": name,
            "surname": surname,
            "operation_type": kind,
            "operation_time": _timestamp(now),
        }

    def _snapshot(self, order: _Order) -> dict[str, Any]:
        document = self._document(order)
        del document["opr_code"]
        document["document_info"] = copy.deepcopy(order.info)
        return document

    def _document(self, order: _Order) -> dict[str, Any]:
        customer, street, post_number, place = _customer(order)
        partner_id = str(180600025000 + order.seq)
        partner = {
            "business_entity": "false",
            "taxpayer": "false",
            "foreign_county": "false",
            "customer": customer,
            "street": street,
            "post_number": post_number,
            "place": place,
            "country": "Slovenia",
            "country_iso_2": "SI",
            "count_code": str(50000 + order.seq),
            "useCustomerAsContact": "false",
            "mk_id": partner_id,
            "mk_address_id": str(180600073000 + order.seq),
            "partner_contact": {
                "name": customer,
                "gsm": f"041 {order.seq % 1000:03d} 000",
                "email": f"kupec{order.seq}@example.com",
            },
        }
        return {
            "mk_id": order.mk_id,
            "doc_type": "sales_order",
            "opr_code": "0",
            "count_code": _count_code(order),
            "doc_date": _date(order.created_at),
            "eshop_name": "Shoptet",
            "webshop_eshop_sync_id": "1600632725",
            "salesOrderTrackingType": "bill",
            "partner": partner,
            "receiver": copy.deepcopy(partner),
            "currency_code": "EUR",
            "status_code": self.statuses[order.status_desc],
            "status_desc": order.status_desc,
            "doc_created_email": MAIN_ACCOUNT_EMAIL,
            "buyer_order": order.buyer_order,
            "warehouse": "glavno",
            "delivery_type": "GLS",
            "product_list": [
                {
                    "count_code": "PA-4143",
                    "mk_id": "1600162716",
                    "code": "sim-1",
                    "name": "Simulirani izdelek",
                    "unit": "kos",
                    "amount": "1",
                    "price_with_tax": "24.4",
                    "tax": "EX4",
                }
            ],
            "sum_basic": "20",
            "sum_tax_ex4": "4.4",
            "sum_all": "24.4",
            "sum_paid": "0",
            "method_of_payment": "Po povzetju",
            "order_create_ts": _timestamp(order.created_at),
            "created_ts": _timestamp(order.created_at),
            "extra_column": [{"name": "store_url", "value": "https://shop.example/"}],
        }


# ---- request parsing ------------------------------------------------------------------------


def _present(body: dict[str, Any], name: str) -> bool:
    return body.get(name) not in (None, "")


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value in (None, ""):
        raise _McError("2", f"Paramether '{name}' is required")
    if not isinstance(value, str):
        raise _McError("2", f"Paramether '{name}' has invalid value : {value}")
    return value


def _doc_type(body: dict[str, Any], supported: tuple[str, ...]) -> str:
    doc_type = _required_str(body, "doc_type")
    if doc_type not in supported:
        raise _McError("2", f"Unknown document type : {doc_type}")
    return doc_type


def _id_value(value: Any, name: str) -> str:
    # the docs' own examples send ids both as strings and as JSON numbers
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _McError("2", f"Paramether '{name}' has invalid value : {value}")


def _id_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _McError("2", f"Paramether 'mk_id_list' has invalid value : {value}")
    return [_id_value(item, "mk_id_list") for item in value]


def _flag(body: dict[str, Any], name: str) -> bool:
    # documented as "true"/"false", but some doc examples send a JSON true
    return body.get(name) in ("true", True)


def _int_param(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise _McError("2", f"Paramether '{name}' has invalid value : {value}")


def _parse_timestamp(value: str, name: str) -> float:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise _McError("2", f"Paramether '{name}' has invalid value : {value}")
    return parsed.timestamp()


def _split_list(value: str) -> set[str]:
    return {part.strip() for part in value.split(",") if part.strip()}


def _count_code(order: _Order) -> str:
    return f"PP-{order.seq:05d}"


def _customer(order: _Order) -> tuple[str, str, str, str]:
    return _CUSTOMERS[order.seq % len(_CUSTOMERS)]
