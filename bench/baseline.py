"""P1/P2 baseline: a bare Starlette endpoint returning 200, under uvicorn like `bridge serve`."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    await request.body()
    return Response(b'{"status":"accepted","hints":1}', media_type="application/json")


app = Starlette(routes=[Route("/webhooks/{platform}", webhook, methods=["POST"])])

if __name__ == "__main__":
    # The same call `bridge serve` makes (bridge/cli.py), so the same loop and HTTP parser.
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
