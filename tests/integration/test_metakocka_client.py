"""The MetaKocka client against the simulator over real HTTP: many reads side by side, within
the connection limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from bridge.config import Settings
from bridge.models import Snapshot
from bridge.platforms.base import ReadFailed
from bridge.platforms.metakocka import MetaKockaClient
from bridge.sandbox.metakocka import API_PREFIX, MetaKockaSimulator
from bridge.sandbox.server import ServerThread

pytestmark = pytest.mark.integration


class InFlight(httpx.AsyncBaseTransport):
    """The real connection, counting the requests in flight at once (answers read in full)."""

    def __init__(self) -> None:
        self._http = httpx.AsyncHTTPTransport()
        self.in_flight = 0
        self.most = 0
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            response = await self._http.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self._http.aclose()


class Company:
    """A simulated company whose every call takes a moment, so that calls overlap."""

    def __init__(self, sim: MetaKockaSimulator, url: str) -> None:
        self.sim, self.url = sim, url
        self.transport = InFlight()

    def client(self, **overrides: Any) -> MetaKockaClient:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            metakocka_base_url=self.url + API_PREFIX,
            metakocka_company_id=self.sim.company_id,
            metakocka_secret_key=SecretStr(self.sim.secret_key),
            **overrides,
        )
        return MetaKockaClient(settings, transport=self.transport)


@pytest.fixture
def company() -> Iterator[Company]:
    sim = MetaKockaSimulator(call_latency=0.05)
    with ServerThread(sim.app) as server:
        yield Company(sim, server.url)


async def test_reads_by_key_go_side_by_side_within_the_connection_limit(company: Company) -> None:
    keys = [f"20260007{i:02d}" for i in range(20)]
    mk_ids = {key: company.sim.add_order(key, "shipped") for key in keys[:15]}
    client = company.client(metakocka_max_connections=3)
    try:
        result = await client.read_many_by_key(keys)
    finally:
        await client.aclose()
    assert result == {
        key: Snapshot("metakocka", mk_ids[key], key, "shipped") if key in mk_ids else None
        for key in keys
    }
    assert company.sim.calls_by_method == {"get_document": 20}
    assert company.transport.sent == 20
    assert company.transport.most == 3  # side by side, and never more than allowed


async def test_reads_by_ref_go_side_by_side_and_each_keeps_its_own_failure(
    company: Company,
) -> None:
    codes = {company.sim.add_order(f"20260008{i:02d}"): f"20260008{i:02d}" for i in range(10)}
    missing = "400999999999"
    company.sim.fail_next(1, "5", "Quote exceeds")  # one of the calls, whichever comes first
    client = company.client(metakocka_max_connections=4)
    try:
        result = await client.read_many([*codes, missing])
    finally:
        await client.aclose()
    [failed] = [ref for ref, r in result.items() if isinstance(r, ReadFailed)]
    assert "Quote exceeds" in str(result[failed])
    expected = {ref: Snapshot("metakocka", ref, code, "new_order") for ref, code in codes.items()}
    assert {ref: r for ref, r in result.items() if ref != failed} == {
        ref: expected.get(ref) for ref in [*codes, missing] if ref != failed
    }
    assert company.transport.most == 4
