"""MetaKocka: no order webhooks; read with ``get_document``, poll with ``search``, write with
``change_document_status``.

Facts relied on (docs/platforms.md has the sources):

* every call is a JSON POST carrying ``secret_key`` and ``company_id``; errors come back as
  HTTP 200 with ``opr_code`` != "0" and a human-readable ``opr_desc`` (sometimes Slovene);
* ``get_document`` answers the status label in ``status_code`` and the code-like "Opis" in
  ``status_desc``; writes take the Opis, so the mapping speaks Opis;
* ``search`` pages hold at most 100 documents and run one at a time per company;
* ``mk_id_list`` changes many orders to one status in one call;
* no call reads several orders: ``get_document`` takes one ``doc_id`` or ``buyer_order``, and
  ``search`` filters one ``customer_order`` (and would queue behind the poller's searches).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from itertools import groupby
from typing import Any, Literal

import httpx
import orjson

from bridge.config import ConfigError, Settings
from bridge.models import NewHint, Snapshot
from bridge.platforms.base import (
    ClientContext,
    Outcome,
    PlatformClient,
    PlatformSpec,
    ReadFailed,
    TargetOptions,
    WriteRequest,
)

NAME = "metakocka"
PAGE_SIZE = 100

# opr_desc patterns. The numeric code alone is not a reliable classifier (the docs reuse
# codes for unrelated errors), so the description decides, the code only breaks ties.
_NOT_FOUND = re.compile(r"cannot find|ne obstaja|not found|ni mogoče najti", re.I)
_PERMANENT = re.compile(
    r"dinamični šifrant|must be set|mora biti nastavljen|invalid value|is required|"
    r"paramether|parameter|wrong form|too long|not allowed for doc_type",
    re.I,
)
_TRANSIENT = re.compile(r"quot|limit|too many|timeout|lock|try again|poskusite|unavailable", re.I)


class MetaKockaOptions(TargetOptions):
    doc_type: Literal["sales_order", "warehouse_receiving_note"] = "sales_order"


# -- pure -----------------------------------------------------------------------------------


def classify_answer(body: Any) -> Outcome:
    """What a MetaKocka answer (HTTP 200) means for a write."""
    if not isinstance(body, dict):
        return Outcome("retry", reason="answer is not a JSON object")
    code = str(body.get("opr_code", ""))
    if code == "0":
        return Outcome("done")
    desc = str(body.get("opr_desc") or body.get("opr_desc_app") or body.get("error_desc") or "")
    reason = f"opr_code {code}: {desc}" if desc else f"opr_code {code}"
    # Quoted values (a status, an id) must not decide: a status named "blocked" says "lock".
    plain = re.sub(r"'[^']*'|\"[^\"]*\"", "", desc)
    if _NOT_FOUND.search(plain):
        return Outcome("not_found", reason=reason)
    if _PERMANENT.search(plain):
        return Outcome("permanent", reason=reason)
    if code == "5" or _TRANSIENT.search(plain):
        return Outcome("retry", reason=reason)
    if code in ("3", "4"):
        # Credentials or IP allow-list: a configuration fix makes every pending write work
        # again, so keep them within the retry horizon instead of dead-lettering them all.
        return Outcome("retry", reason=f"access refused: {reason}")
    if code in ("2", "6"):
        return Outcome("permanent", reason=reason)
    return Outcome("retry", reason=reason)  # "1": unknown internal error


def change_status_body(
    native: str,
    options: MetaKockaOptions,
    *,
    mk_ids: Sequence[str] = (),
    buyer_order: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"doc_type": options.doc_type, "status_code": native}
    if buyer_order is not None:
        body["buyer_order"] = buyer_order
    elif len(mk_ids) == 1:
        body["mk_id"] = mk_ids[0]
    else:
        body["mk_id_list"] = list(mk_ids)
    return body


def search_body(since: str | None, until: str, offset: int) -> dict[str, Any]:
    query = [{"type": "last_change_to", "value": until}]
    if since is not None:
        query.insert(0, {"type": "last_change_from", "value": since})
    return {
        "doc_type": "sales_order",
        "result_type": "doc",
        "limit": str(PAGE_SIZE),
        "offset": str(offset),
        "query_advance": query,
    }


def snapshot_from_document(doc: dict[str, Any]) -> Snapshot:
    mk_id = str(doc.get("mk_id", ""))
    buyer_order = doc.get("buyer_order")
    return Snapshot(
        NAME, mk_id, str(buyer_order) if buyer_order else None, str(doc.get("status_desc") or "")
    )


# -- the client -----------------------------------------------------------------------------


class MetaKockaClient(PlatformClient):
    """Each read is a call of its own, so reads of many orders are sent side by side, at most
    ``BRIDGE_METAKOCKA_MAX_CONNECTIONS`` calls of any kind in flight at once.

    ``reads_in_batches`` and ``keys_in_batches`` stay 0: the worker then sends each order's
    read as soon as it needs it, from all the orders it handles at once, and the connection
    limit lets them out side by side. Gathering them into a ``read_many`` first would save no
    request; it would only add the gathering window and hold each group back until its slowest
    read. Callers that hold many at once (the sweep) pass them to ``read_many`` or
    ``read_many_by_key``, which send them side by side in the same way.
    """

    name = NAME

    def __init__(
        self,
        settings: Settings,
        context: ClientContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._context = context or ClientContext()
        if not settings.metakocka_company_id or settings.metakocka_secret_key is None:
            raise ConfigError(
                "BRIDGE_METAKOCKA_COMPANY_ID and BRIDGE_METAKOCKA_SECRET_KEY are required "
                "when MetaKocka is mapped"
            )
        self._auth = {
            "secret_key": settings.metakocka_secret_key.get_secret_value(),
            "company_id": settings.metakocka_company_id,
        }
        self._user_email = settings.metakocka_api_user_email
        self._batch = settings.metakocka_batch_size
        self._http = httpx.AsyncClient(
            base_url=settings.metakocka_base_url.rstrip("/") + "/",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=httpx.Timeout(settings.metakocka_timeout_seconds, connect=15.0),
            transport=transport,
        )
        # MetaKocka publishes no rate limit, only a "quota exceeded" error: a few calls at once
        # keep a burst of reads from running into it or crowding out the company's other users.
        self._slots = asyncio.Semaphore(settings.metakocka_max_connections)

    async def _call(self, method: str, body: dict[str, Any]) -> Any:
        """POST a call; raises httpx.HTTPError, or ReadFailed for a non-JSON / non-200 answer."""
        async with self._slots:
            self._context.count(NAME, method)
            response = await self._http.post(method, content=orjson.dumps({**self._auth, **body}))
        if response.status_code != 200:
            raise ReadFailed(f"{method}: HTTP {response.status_code}")
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ReadFailed(f"{method}: answer is not JSON") from None

    async def read(self, ref: str) -> Snapshot | None:
        return await self._get_document({"doc_id": ref})

    async def read_by_key(self, order_key: str) -> Snapshot | None:
        # The shop's order number is the sales order's buyer_order ("Naročilo kupca").
        return await self._get_document({"buyer_order": order_key})

    async def read_many(self, refs: Sequence[str]) -> dict[str, Snapshot | ReadFailed | None]:
        """One ``get_document`` per order, all sent at once (the connection limit paces them)."""
        return await _side_by_side(self.read, refs)

    async def read_many_by_key(
        self, keys: Sequence[str]
    ) -> dict[str, Snapshot | ReadFailed | None]:
        """One ``get_document`` by ``buyer_order`` per key, all sent at once, as ``read_many``."""
        return await _side_by_side(self.read_by_key, keys)

    async def _get_document(self, which: dict[str, str]) -> Snapshot | None:
        try:
            body = await self._call("get_document", {"doc_type": "sales_order", **which})
        except httpx.HTTPError as exc:
            raise ReadFailed(f"get_document {which}: {exc!r}") from exc
        outcome = classify_answer(body)
        if outcome.kind == "not_found":
            return None
        if outcome.kind != "done":
            raise ReadFailed(f"get_document {which}: {outcome.reason}")
        return snapshot_from_document(body)

    async def _change(self, body: dict[str, Any]) -> Outcome:
        if self._user_email:
            body["api_user_email"] = self._user_email
        try:
            answer = await self._call("change_document_status", body)
        except (httpx.HTTPError, ReadFailed) as exc:
            reason = exc.reason if isinstance(exc, ReadFailed) else repr(exc)
            return Outcome("retry", reason=f"change_document_status: {reason}")
        return classify_answer(answer)

    async def write(self, request: WriteRequest) -> Outcome:
        assert isinstance(request.options, MetaKockaOptions)
        if request.ref:
            body = change_status_body(request.native, request.options, mk_ids=[request.ref])
        else:
            body = change_status_body(
                request.native, request.options, buyer_order=request.order_key
            )
        return await self._change(body)

    async def write_many(self, requests: Sequence[WriteRequest]) -> list[Outcome]:
        """One ``mk_id_list`` call per (status, doc_type) for orders whose mk_id is known.

        A failed group call is retried order by order, so one bad order cannot hold back the
        others (the answer does not say which id failed).
        """
        outcomes: dict[int, Outcome] = {}
        by_id = [(i, r) for i, r in enumerate(requests) if r.ref]

        def group_key(item: tuple[int, WriteRequest]) -> tuple[str, str]:
            options = item[1].options
            assert isinstance(options, MetaKockaOptions)
            return item[1].native, options.doc_type

        for (native, _doc_type), group in groupby(sorted(by_id, key=group_key), key=group_key):
            items = list(group)
            if len(items) < 2:
                continue
            for start in range(0, len(items), self._batch):
                chunk = items[start : start + self._batch]
                options = chunk[0][1].options
                assert isinstance(options, MetaKockaOptions)
                ids = [r.ref for _, r in chunk if r.ref]
                outcome = await self._change(change_status_body(native, options, mk_ids=ids))
                if outcome.kind == "done":
                    outcomes.update((i, outcome) for i, _ in chunk)
        for i, request in enumerate(requests):
            if i not in outcomes:
                outcomes[i] = await self.write(request)
        return [outcomes[i] for i in range(len(requests))]

    async def changes_since(self, since: str | None, until: str) -> AsyncIterator[list[NewHint]]:
        offset = 0
        while True:
            # The page shows the orders as they were at some moment after this one; stamping
            # the hints with it lets the worker spot a page older than its own latest write.
            asked = time.time()
            try:
                body = await self._call("search", search_body(since, until, offset))
            except httpx.HTTPError as exc:
                raise ReadFailed(f"search: {exc!r}") from exc
            outcome = classify_answer(body)
            if outcome.kind != "done":
                raise ReadFailed(f"search: {outcome.reason}")
            docs = [d for d in body.get("result") or [] if isinstance(d, dict)]
            yield [
                NewHint(
                    NAME,
                    str(d["mk_id"]),
                    "poll",
                    asked,
                    str(d["status_desc"]) if d.get("status_desc") else None,
                    str(d["buyer_order"]) if d.get("buyer_order") else None,
                )
                for d in docs
                if d.get("mk_id")
            ]
            offset += len(docs)
            total = int(body.get("result_all_records") or 0)
            if len(docs) < PAGE_SIZE or offset >= total:
                return

    async def aclose(self) -> None:
        await self._http.aclose()


async def _side_by_side(
    read: Callable[[str], Awaitable[Snapshot | None]], items: Sequence[str]
) -> dict[str, Snapshot | ReadFailed | None]:
    """``read`` of every item at once; each gets its snapshot, None, or its own failure."""

    async def one(item: str) -> Snapshot | ReadFailed | None:
        try:
            return await read(item)
        except ReadFailed as exc:
            return exc

    unique = list(dict.fromkeys(items))
    return dict(zip(unique, await asyncio.gather(*map(one, unique)), strict=True))


SPEC = PlatformSpec(
    name=NAME,
    native_type=str,
    options=MetaKockaOptions,
    make_client=MetaKockaClient,
    parse_webhook=None,
    polled=True,
    write_concurrency=2,
    write_batch=100,
)
