"""The MetaKocka simulator, exercised over real HTTP the way the bridge will call it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from bridge.sandbox.metakocka import API_PREFIX, MAIN_ACCOUNT_EMAIL, MetaKockaSimulator
from bridge.sandbox.server import ServerThread

pytestmark = pytest.mark.integration

LJUBLJANA = ZoneInfo("Europe/Ljubljana")
T0 = datetime(2026, 3, 10, 12, 0, 0, tzinfo=LJUBLJANA).timestamp()
SECRET = "sim-secret"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, LJUBLJANA).isoformat(timespec="seconds")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    sim: MetaKockaSimulator
    url: str
    client: httpx.Client

    def post(self, method: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(API_PREFIX + method, json=body)

    def call(self, method: str, **fields: Any) -> dict[str, Any]:
        response = self.post(method, {"secret_key": SECRET, "company_id": "16", **fields})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        answer: dict[str, Any] = response.json()
        return answer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


class SwappableApp:
    """One server for the whole module, serving whichever simulator the current test made.

    A uvicorn shutdown costs about 0.2 s, which per test would dominate this file's run time.
    """

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        # the simulators need no start-up or shutdown, but uvicorn expects the handshake
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[SwappableApp, str]]:
    swappable = SwappableApp()
    with ServerThread(swappable) as srv:
        yield swappable, srv.url


@pytest.fixture
def start(server: tuple[SwappableApp, str], clock: FakeClock) -> Iterator[Callable[..., Harness]]:
    swappable, url = server
    with httpx.Client(base_url=url, timeout=10) as client:

        def _start(**kwargs: Any) -> Harness:
            assert swappable.app is None, "one simulator per test"
            sim = MetaKockaSimulator(clock=clock, **kwargs)
            swappable.app = sim.app
            return Harness(sim, url, client)

        try:
            yield _start
        finally:
            swappable.app = None


@pytest.fixture
def mk(start: Callable[..., Harness]) -> Harness:
    return start()


def all_strings(value: Any) -> bool:
    if isinstance(value, dict):
        return all(all_strings(v) for v in value.values())
    if isinstance(value, list):
        return all(all_strings(v) for v in value)
    return isinstance(value, str)


# ---- envelope and authentication ---------------------------------------------------------------


def test_wrong_or_missing_credentials_answer_opr_code_3(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001")
    bodies = [
        {"secret_key": "wrong", "company_id": "16"},
        {"secret_key": SECRET, "company_id": "17"},
        {"company_id": "16"},
    ]
    for credentials in bodies:
        response = mk.post(
            "get_document", {**credentials, "doc_type": "sales_order", "doc_id": mk_id}
        )
        assert response.status_code == 200
        answer = response.json()
        assert answer["opr_code"] == "3"
        assert answer["opr_desc"]
        assert "mk_id" not in answer


def test_body_that_is_not_json_is_opr_code_2(mk: Harness) -> None:
    response = mk.client.post(
        API_PREFIX + "get_document",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json()["opr_code"] == "2"


def test_unknown_method_is_a_plain_404_and_get_is_refused(mk: Harness) -> None:
    response = mk.post("no_such_method", {"secret_key": SECRET, "company_id": "16"})
    assert response.status_code == 404
    assert not response.headers["content-type"].startswith("application/json")
    assert mk.client.get(API_PREFIX + "get_document").status_code == 405


def test_calls_are_recorded_with_the_secret_redacted(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001")
    mk.call("get_document", doc_type="sales_order", doc_id=mk_id)
    mk.call("change_document_status", doc_type="sales_order", status_code="shipped", mk_id=mk_id)
    assert [c.method for c in mk.sim.requests] == ["get_document", "change_document_status"]
    assert mk.sim.calls_by_method == {"get_document": 1, "change_document_status": 1}
    first = mk.sim.requests[0]
    assert first.body is not None and first.body["secret_key"] == "***"
    assert first.answer is not None and first.answer["mk_id"] == mk_id
    assert first.http_status == 200


# ---- get_document -------------------------------------------------------------------------------


def test_get_document_by_doc_id_and_by_buyer_order(mk: Harness) -> None:
    mk.sim.add_order("1000")
    mk_id = mk.sim.add_order("1001", "ready_to_ship")
    by_id = mk.call("get_document", doc_type="sales_order", doc_id=mk_id)
    assert by_id["opr_code"] == "0"
    assert by_id["mk_id"] == mk_id and len(mk_id) == 12
    assert by_id["doc_type"] == "sales_order"
    assert by_id["buyer_order"] == "1001"
    assert by_id["count_code"].startswith("PP-")
    assert by_id["status_code"] == "Pripravljen za odpremo"
    assert by_id["status_desc"] == "ready_to_ship"
    assert by_id["doc_date"] == "2026-03-10+01:00"
    assert by_id["partner"]["customer"]
    assert all_strings(by_id)
    assert "document_info" not in by_id

    by_buyer_order = mk.call("get_document", doc_type="sales_order", buyer_order="1001")
    del by_id["opr_time_ms"], by_buyer_order["opr_time_ms"]
    assert by_buyer_order == by_id


def test_get_document_of_an_unknown_order_is_opr_code_6(mk: Harness) -> None:
    mk.sim.add_order("1001")
    for lookup in ({"doc_id": "400000999999"}, {"buyer_order": "nope"}):
        answer = mk.call("get_document", doc_type="sales_order", **lookup)
        assert answer["opr_code"] == "6"
        assert answer["opr_desc"].startswith("Cannot find sales order")
        assert next(iter(lookup.values())) in answer["opr_desc"]
    assert mk.call("get_document", doc_type="sales_order")["opr_code"] == "2"


def test_document_info_records_who_changed_the_status(mk: Harness, clock: FakeClock) -> None:
    mk_id = mk.sim.add_order("1001")
    clock.now += 60
    mk.call(
        "change_document_status",
        doc_type="sales_order",
        status_code="in_progress",
        mk_id=mk_id,
        api_user_email="bridge@example.com",
    )
    clock.now += 60
    mk.sim.set_status_as_person(mk_id, "shipped")
    clock.now += 60
    mk.call("change_document_status", doc_type="sales_order", status_code="completed", mk_id=mk_id)

    answer = mk.call(
        "get_document", doc_type="sales_order", doc_id=mk_id, return_document_info="true"
    )
    info = answer["document_info"]
    assert [e["operation_type"] for e in info] == ["NEW"] + ["DOCUMENT_STATUS_CHANGE"] * 3
    changes = [(e["value_previous"], e["value_new"], e["user_email"]) for e in info[1:]]
    assert changes == [
        ("Novo naročilo", "V obdelavi", "bridge@example.com"),
        ("V obdelavi", "Odpremljen", "prodaja@sim.metakocka.test"),
        ("Odpremljen", "Zaključena", MAIN_ACCOUNT_EMAIL),
    ]
    assert info[1]["operation_time"] == iso(T0 + 60) == "2026-03-10T12:01:00+01:00"
    assert mk.sim.order(mk_id)["document_info"] == info


# ---- change_document_status ---------------------------------------------------------------------


def test_change_by_mk_id(mk: Harness, clock: FakeClock) -> None:
    mk_id = mk.sim.add_order("1001")
    clock.now += 30
    answer = mk.call(
        "change_document_status", doc_type="sales_order", status_code="shipped", mk_id=mk_id
    )
    assert set(answer) == {"opr_code", "opr_time_ms"}
    assert answer["opr_code"] == "0" and answer["opr_time_ms"].isdigit()
    assert mk.sim.order(mk_id)["status_desc"] == "shipped"
    assert mk.sim.order(mk_id)["status_code"] == "Odpremljen"
    assert mk.sim.last_change(mk_id) == T0 + 30
    assert mk.sim.notifications == [(mk_id, "shipped")]


def test_change_by_mk_id_list_sent_as_numbers(mk: Harness) -> None:
    ids = [mk.sim.add_order(str(n)) for n in range(1001, 1004)]
    answer = mk.call(
        "change_document_status",
        doc_type="sales_order",
        status_code="ready_to_ship",
        mk_id_list=[int(ids[0]), int(ids[2])],
    )
    assert answer["opr_code"] == "0"
    assert [mk.sim.order(i)["status_desc"] for i in ids] == [
        "ready_to_ship",
        "new_order",
        "ready_to_ship",
    ]


def test_mk_id_list_with_an_unknown_id_changes_nothing(mk: Harness) -> None:
    ids = [mk.sim.add_order(str(n)) for n in range(1001, 1003)]
    answer = mk.call(
        "change_document_status",
        doc_type="sales_order",
        status_code="shipped",
        mk_id_list=[ids[0], "400000999999", ids[1]],
    )
    assert answer["opr_code"] == "6"
    assert "400000999999" in answer["opr_desc"]
    assert [mk.sim.order(i)["status_desc"] for i in ids] == ["new_order", "new_order"]
    assert mk.sim.notifications == []


def test_change_by_buyer_order_and_unknown_buyer_order(mk: Harness) -> None:
    mk_id = mk.sim.add_order("79473216")
    ok = mk.call(
        "change_document_status",
        doc_type="sales_order",
        status_code="created",
        buyer_order="79473216",
    )
    assert ok["opr_code"] == "0"
    assert mk.sim.order(mk_id)["status_desc"] == "created"
    missing = mk.call(
        "change_document_status", doc_type="sales_order", status_code="created", buyer_order="1"
    )
    assert missing["opr_code"] == "6"
    assert "Cannot find sales order" in missing["opr_desc"]


@pytest.mark.parametrize("status", ["Odpremljen", "lost_in_space", "SHIPPED"])
def test_unknown_status_or_a_label_is_rejected(mk: Harness, status: str) -> None:
    mk_id = mk.sim.add_order("1001")
    answer = mk.call(
        "change_document_status", doc_type="sales_order", status_code=status, mk_id=mk_id
    )
    assert answer["opr_code"] == "1"
    assert answer["opr_desc"] == (
        f"Dinamični šifrant z vrednostjo ''{status}'' tipa ''Prodajna naročila - status'' "
        "mora biti nastavljen"
    )
    assert mk.sim.order(mk_id)["status_desc"] == "new_order"


def test_none_or_several_identifiers_are_opr_code_2(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001")
    for ids in (
        {},
        {"mk_id": mk_id, "buyer_order": "1001"},
        {"mk_id": mk_id, "mk_id_list": [mk_id]},
    ):
        answer = mk.call(
            "change_document_status", doc_type="sales_order", status_code="shipped", **ids
        )
        assert answer["opr_code"] == "2"
        assert "is required" in answer["opr_desc"]
    assert mk.sim.order(mk_id)["status_desc"] == "new_order"


def test_setting_the_same_status_again_is_not_a_no_op(mk: Harness, clock: FakeClock) -> None:
    mk_id = mk.sim.add_order("1001")
    for _ in range(2):
        clock.now += 10
        body = {"doc_type": "sales_order", "status_code": "shipped", "mk_id": mk_id}
        assert mk.call("change_document_status", **body)["opr_code"] == "0"
    assert mk.sim.notifications == [(mk_id, "shipped"), (mk_id, "shipped")]
    assert mk.sim.last_change(mk_id) == T0 + 20


def test_warehouse_receiving_note_ids_are_unknown(mk: Harness) -> None:
    answer = mk.call(
        "change_document_status",
        doc_type="warehouse_receiving_note",
        status_code="x",
        mk_id="1600000001",
    )
    assert answer["opr_code"] == "6"
    assert "warehouse receiving note" in answer["opr_desc"]


# ---- search -------------------------------------------------------------------------------------


def last_change_window(start: float, end: float) -> list[dict[str, str]]:
    return [
        {"type": "last_change_from", "value": iso(start)},
        {"type": "last_change_to", "value": iso(end)},
    ]


def test_search_pages_through_a_last_change_window(mk: Harness, clock: FakeClock) -> None:
    clock.now = T0 - 100
    before = [mk.sim.add_order(f"b{n}") for n in range(3)]
    inside = []
    for n in range(250):
        clock.now = T0 + n
        inside.append(mk.sim.add_order(f"o{n}"))
    clock.now = T0 + 249.7  # still second 249: timestamps compare at whole seconds
    mk.sim.set_status_as_person(before[1], "shipped")
    clock.now = T0 + 250
    mk.sim.add_order("after")
    expected = sorted([*inside, before[1]], key=int)

    seen: list[str] = []
    for offset in (0, 100, 200):
        answer = mk.call(
            "search",
            doc_type="sales_order",
            limit="100",
            offset=str(offset),
            query_advance=last_change_window(T0, T0 + 249),
        )
        assert answer["opr_code"] == "0"
        assert answer["result_all_records"] == "251"
        assert answer["offset"] == str(offset) and answer["limit"] == "100"
        assert answer["result_count"] == str(len(answer["result"]))
        assert all(set(r) == {"mk_id", "opr_code", "count_code"} for r in answer["result"])
        seen += [r["mk_id"] for r in answer["result"]]
    assert [len(seen[:100]), len(seen[100:200]), len(seen[200:])] == [100, 100, 51]
    assert seen == expected

    past_the_end = mk.call(
        "search", doc_type="sales_order", offset=300, query_advance=last_change_window(T0, T0 + 249)
    )
    assert past_the_end["result"] == [] and past_the_end["result_count"] == "0"


def test_search_clamps_limit_to_100_and_sorts_descending(mk: Harness) -> None:
    ids = [mk.sim.add_order(str(n)) for n in range(120)]
    answer = mk.call("search", doc_type="sales_order", limit=500)
    assert answer["limit"] == "100" and answer["result_count"] == "100"
    assert answer["result_all_records"] == "120"
    assert [r["mk_id"] for r in answer["result"]] == ids[:100]
    desc = mk.call("search", doc_type="sales_order", limit=3, order_direction="desc")
    assert [r["mk_id"] for r in desc["result"]] == ids[::-1][:3]


def test_search_by_status_list_with_status_code(mk: Harness) -> None:
    a = mk.sim.add_order("1", "draft")
    mk.sim.add_order("2", "shipped")
    c = mk.sim.add_order("3", "ready_to_ship")
    answer = mk.call(
        "search",
        doc_type="sales_order",
        show_status_code="true",
        query_advance=[{"type": "status_list", "value": "draft, ready_to_ship,Odpremljen"}],
    )
    assert [(r["mk_id"], r["status_code"]) for r in answer["result"]] == [
        (a, "Draft"),
        (c, "Pripravljen za odpremo"),
    ]


def test_search_by_customer_order_status_change_and_query(mk: Harness, clock: FakeClock) -> None:
    a = mk.sim.add_order("SH-1")
    b = mk.sim.add_order("SH-2")
    clock.now += 3600
    mk.sim.set_status_as_person(b, "canceled")
    mk.sim.set_status_as_person(a, "canceled")
    mk.sim.set_status_as_person(a, "new_order")

    by_order = mk.call(
        "search",
        doc_type="sales_order",
        query_advance=[{"type": "customer_order", "value": "SH-2"}],
    )
    assert [r["mk_id"] for r in by_order["result"]] == [b]

    changed = mk.call(
        "search",
        doc_type="sales_order",
        query_advance=[
            {"type": "status_change_from", "value": iso(T0 + 3600)},
            {"type": "status_change_to", "value": iso(T0 + 3600)},
            {"type": "status_change_list", "value": "canceled,lost"},
        ],
    )
    assert [r["mk_id"] for r in changed["result"]] == [a, b]  # a is no longer canceled, but was

    incomplete = mk.call(
        "search",
        doc_type="sales_order",
        query_advance=[{"type": "status_change_list", "value": "lost"}],
    )
    assert incomplete["opr_code"] == "2"

    by_text = mk.call("search", doc_type="sales_order", query="sh-1")
    assert [r["mk_id"] for r in by_text["result"]] == [a]


def test_search_result_type_doc_returns_whole_documents(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001", "paused")
    answer = mk.call("search", doc_type="sales_order", result_type="doc")
    [document] = answer["result"]
    single = mk.call("get_document", doc_type="sales_order", doc_id=mk_id)
    del single["opr_time_ms"]
    assert document == single
    assert document["status_code"] == "Pavziran" and document["status_desc"] == "paused"
    assert all_strings(answer)


def test_search_refuses_unknown_filters_and_bad_timestamps(mk: Harness) -> None:
    unknown = mk.call(
        "search", doc_type="sales_order", query_advance=[{"type": "colour", "value": "red"}]
    )
    assert unknown["opr_code"] == "2"
    no_offset = mk.call(
        "search",
        doc_type="sales_order",
        query_advance=[{"type": "last_change_from", "value": "2026-03-10T12:00:00"}],
    )
    assert no_offset["opr_code"] == "2"


async def test_parallel_searches_queue_one_at_a_time(start: Callable[..., Harness]) -> None:
    mk = start(search_latency=0.2)
    mk.sim.add_order("1001")
    body = {"secret_key": SECRET, "company_id": "16", "doc_type": "sales_order"}
    async with httpx.AsyncClient(base_url=mk.url, timeout=10) as client:
        began = time.monotonic()
        responses = await asyncio.gather(
            *(client.post(API_PREFIX + "search", json=body) for _ in range(3))
        )
        elapsed = time.monotonic() - began
    assert [r.json()["result_count"] for r in responses] == ["1", "1", "1"]
    assert elapsed >= 0.6
    assert mk.sim.max_parallel_searches == 1


async def test_other_calls_do_not_wait_for_a_search(start: Callable[..., Harness]) -> None:
    mk = start(search_latency=0.5)
    mk_id = mk.sim.add_order("1001")
    auth = {"secret_key": SECRET, "company_id": "16", "doc_type": "sales_order"}
    async with httpx.AsyncClient(base_url=mk.url, timeout=10) as client:
        search = asyncio.ensure_future(client.post(API_PREFIX + "search", json=auth))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        got = await client.post(API_PREFIX + "get_document", json={**auth, "doc_id": mk_id})
        assert time.monotonic() - began < 0.3
        assert not search.done()
        assert (await search).json()["opr_code"] == "0"
    assert got.json()["opr_code"] == "0"


# ---- failure injection --------------------------------------------------------------------------


def test_set_down_answers_503_html_everywhere(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001")
    mk.sim.set_down(True)
    body = {"secret_key": SECRET, "company_id": "16", "doc_type": "sales_order", "doc_id": mk_id}
    for path in (API_PREFIX + "get_document", "/anything"):
        response = mk.client.post(path, json=body)
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("text/html")
        assert response.text.lstrip().startswith("<!DOCTYPE html>")
    assert mk.sim.requests[-1].http_status == 503 and mk.sim.requests[-1].answer is None
    mk.sim.set_down(False)
    assert mk.call("get_document", doc_type="sales_order", doc_id=mk_id)["opr_code"] == "0"


def test_fail_next_fails_that_many_calls_without_effect(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001")
    mk.sim.fail_next(2, "5", "Quote exceeds")
    body = {"doc_type": "sales_order", "status_code": "shipped", "mk_id": mk_id}
    answers = [mk.call("change_document_status", **body) for _ in range(3)]
    assert [(a["opr_code"], a.get("opr_desc")) for a in answers] == [
        ("5", "Quote exceeds"),
        ("5", "Quote exceeds"),
        ("0", None),
    ]
    assert mk.sim.notifications == [(mk_id, "shipped")]


def test_call_latency_slows_every_call(start: Callable[..., Harness]) -> None:
    mk = start(call_latency=0.15)
    mk_id = mk.sim.add_order("1001")
    began = time.monotonic()
    answer = mk.call("get_document", doc_type="sales_order", doc_id=mk_id)
    assert time.monotonic() - began >= 0.15
    assert int(answer["opr_time_ms"]) >= 150


def test_controls_refuse_unknown_statuses_and_duplicates(mk: Harness) -> None:
    mk_id = mk.sim.add_order("1001")
    with pytest.raises(ValueError):
        mk.sim.add_order("1001")
    with pytest.raises(ValueError):
        mk.sim.add_order("1002", "Odpremljen")
    with pytest.raises(ValueError):
        mk.sim.set_status_as_person(mk_id, "nope")
    assert mk.sim.add_order("1003", mk_id="400000009000") == "400000009000"
    assert mk.sim.add_order("1004") == "400000009001"
    assert mk.sim.order_by_buyer_order("missing") is None
    found = mk.sim.order_by_buyer_order("1001")
    assert found is not None and found["mk_id"] == mk_id
