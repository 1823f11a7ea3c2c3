"""The simulators, in a helper process of their own, with a small control API.

``python -m bench.sims --dir DIR --codes N`` starts the Shoptet, MetaKocka and Bitrix24
(sale orders) simulators on loopback, adds N orders ("new" everywhere), records them as already
linked in DIR/bridge.sqlite3 (as after a first sync, like tests/integration/test_economy.py)
and writes DIR/bridge.toml. It prints one JSON line (URLs, keys) and serves until stdin closes.

Control API (JSON): POST /set_shoptet {code, status}; POST /register_bitrix {url};
GET /writes?mk=I (target writes since those indexes, with the simulators' timestamps);
GET /counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridge.sandbox.bitrix24 import DEFAULT_SALE_STATUSES, Bitrix24Simulator
from bridge.sandbox.metakocka import MetaKockaSimulator
from bridge.sandbox.server import ServerThread
from bridge.sandbox.shoptet import ShoptetSimulator
from tests.integration.conftest import BITRIX_EVENTS, PROCESSING_STATUS, World
from tests.integration.test_economy import seed_links
from tests.mappings import mapping_file


def codes(n: int) -> list[str]:
    return [f"2026{i:06d}" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--codes", type=int, default=400)
    ap.add_argument("--bitrix-rate", type=float, default=1000.0)
    ap.add_argument("--bitrix-burst", type=int, default=1000)
    args = ap.parse_args()

    shoptet = ShoptetSimulator()
    metakocka = MetaKockaSimulator()
    bitrix = Bitrix24Simulator(
        mode="orders",
        rate_per_second=args.bitrix_rate,
        burst=args.bitrix_burst,
        sale_statuses=(*DEFAULT_SALE_STATUSES, PROCESSING_STATUS),
    )
    with (
        ServerThread(shoptet.app) as s,
        ServerThread(metakocka.app) as m,
        ServerThread(bitrix.app) as b,
    ):
        world = World(shoptet, s.url, metakocka, m.url, args.dir, bitrix=bitrix, bitrix_url=b.url)
        world.bitrix_rate, world.bitrix_burst = args.bitrix_rate, args.bitrix_burst
        all_codes = codes(args.codes)
        for code in all_codes:
            world.add_order(code)
        asyncio.run(seed_links(world, all_codes))
        mapping = mapping_file(args.dir, ("shoptet", "metakocka", "bitrix24"), "orders")
        mk_code = {v: k for k, v in world.mk_ids.items()}
        bx_code = {str(v): k for k, v in world.bitrix_ids.items()}

        async def set_shoptet(request: Request) -> JSONResponse:
            body = await request.json()
            shoptet.set_status_as_person(body["code"], int(body["status"]))
            return JSONResponse({"ok": True})

        async def register_bitrix(request: Request) -> JSONResponse:
            body = await request.json()
            bitrix.register_outgoing_webhook(body["url"], BITRIX_EVENTS["orders"])
            return JSONResponse({"ok": True})

        async def writes(request: Request) -> JSONResponse:
            mk_from = int(request.query_params.get("mk", 0))
            out = []
            mk_calls = list(metakocka.requests)
            for c in mk_calls[mk_from:]:
                if c.method != "change_document_status" or not c.body:
                    continue
                ids = [c.body.get("mk_id")] + [str(i) for i in c.body.get("mk_id_list") or []]
                for i in ids:
                    if i in mk_code:
                        out.append(["metakocka", mk_code[i], c.at])
            bx_calls = list(bitrix.requests) + list(bitrix.subcalls)
            for c in bx_calls:
                if c.method == "sale.order.update" and c.at:
                    i = str((c.params or {}).get("id"))
                    if i in bx_code:
                        out.append(["bitrix24", bx_code[i], c.at])
            return JSONResponse({"writes": out, "mk": len(mk_calls), "bx": len(bitrix.requests)})

        async def counts(request: Request) -> JSONResponse:
            return JSONResponse(
                {
                    "shoptet": len(shoptet.requests),
                    "metakocka": len(metakocka.requests),
                    "bitrix24": len(bitrix.requests),
                    "bitrix24_subcalls": len(bitrix.subcalls),
                    "shoptet_throttled": shoptet.throttled_count,
                    "bitrix24_throttled": bitrix.throttled_count,
                }
            )

        control = Starlette(
            routes=[
                Route("/set_shoptet", set_shoptet, methods=["POST"]),
                Route("/register_bitrix", register_bitrix, methods=["POST"]),
                Route("/writes", writes, methods=["GET"]),
                Route("/counts", counts, methods=["GET"]),
            ]
        )
        with ServerThread(control) as c:
            info = {
                "control": c.url,
                "shoptet_url": s.url,
                "shoptet_token": shoptet.token,
                "shoptet_key": shoptet.signature_key,
                "shoptet_eshop_id": shoptet.eshop_id,
                "metakocka_url": m.url,
                "metakocka_company_id": metakocka.company_id,
                "metakocka_secret_key": metakocka.secret_key,
                "bitrix_webhook_url": b.url + bitrix.webhook_path,
                "bitrix_application_token": bitrix.application_token,
                "mapping_file": str(mapping),
                "database": str(args.dir / "bridge.sqlite3"),
                "codes": all_codes,
            }
            sys.stdout.write(json.dumps(info) + "\n")
            sys.stdout.flush()
            sys.stdin.read()  # until the parent closes the pipe
        bitrix.close()
        shoptet.close()


if __name__ == "__main__":
    main()
