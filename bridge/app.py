"""The HTTP face of the bridge: webhook intake and health.

The webhook path does as little as it can: check the size, verify and parse (the platform
module's pure code), store the hint (group commit), answer. Everything slow happens in the
worker, after the answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.models import NewHint
from bridge.platforms import PLATFORMS
from bridge.platforms.base import ParsedWebhook, WebhookRejected
from bridge.store.base import StoreUnavailable

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.service import Bridge

log = logging.getLogger("bridge.app")

_ERROR_NAMES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


def json_response(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error(status: int, detail: str) -> Response:
    return json_response(status, {"error": _ERROR_NAMES.get(status, "error"), "detail": detail})


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _parse(
    parse: Callable[[Settings, Mapping[str, str], bytes], ParsedWebhook],
    settings: Settings,
    headers: Mapping[str, str],
    body: bytes,
) -> ParsedWebhook | WebhookRejected:
    try:
        return parse(settings, headers, body)
    except WebhookRejected as exc:
        return exc


def create_app(
    bridge: Bridge,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    metrics = bridge.metrics

    async def webhook(request: Request) -> Response:
        # Per request, never captured: a renewed Shoptet key replaces the Bridge's settings.
        settings = bridge.settings
        limit = settings.max_webhook_bytes
        platform = request.path_params["platform"]
        spec = PLATFORMS.get(platform)
        if spec is None or platform not in bridge.platforms:
            return error(404, f"no platform {platform!r} is configured here")
        if spec.parse_webhook is None:
            return error(404, f"{platform} sends no order webhooks; it is polled instead")
        try:
            body = await _read_body(request, limit)
        except _TooLarge:
            metrics.webhooks.labels(platform, "too_large").inc()
            return error(413, f"body is larger than {limit} bytes")
        parsed = _parse(spec.parse_webhook, settings, request.headers, body)
        if (
            isinstance(parsed, WebhookRejected)
            and parsed.status == 401
            and await bridge.reload_webhook_key(platform, settings)
        ):
            # The key was renewed from another process (`bridge shoptet-renew-key`).
            parsed = _parse(spec.parse_webhook, bridge.settings, request.headers, body)
        if isinstance(parsed, WebhookRejected):
            metrics.webhooks.labels(platform, f"rejected_{parsed.status}").inc()
            return error(parsed.status, parsed.reason)
        if not parsed.refs:
            metrics.webhooks.labels(platform, "ignored").inc()
            return json_response(200, {"status": "ignored", "event": parsed.event})
        now = time.time()
        hints = [NewHint(platform, ref, parsed.event, now) for ref in parsed.refs]
        try:
            await bridge.inbox.add(hints)
        except StoreUnavailable as exc:
            log.error("store unavailable, webhook refused with 503: %s", exc)
            metrics.webhooks.labels(platform, "store_unavailable").inc()
            return error(503, "the store cannot take writes right now; retry later")
        metrics.webhooks.labels(platform, "accepted").inc()
        metrics.hints.labels(platform, "webhook").inc(len(hints))
        return json_response(200, {"status": "accepted", "hints": len(hints)})

    async def health(request: Request) -> Response:
        try:
            pending = await bridge.store.pending_hints()
        except Exception as exc:  # health must answer, whatever broke
            return error(503, f"store check failed: {exc!r}")
        return json_response(200, {"status": "ok", "pending_hints": pending})

    async def metrics_endpoint(request: Request) -> Response:
        try:
            await bridge.refresh_gauges()
        except Exception as exc:  # the counters are still worth serving; the gauges go stale
            log.warning("metrics: could not refresh the store gauges: %r", exc)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = exc.detail if exc.status_code != 404 else f"no route for {request.url.path}"
        response = error(exc.status_code, str(detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return json_response(500, {"error": "internal", "detail": "unexpected error; see the log"})

    return Starlette(
        routes=[
            Route("/webhooks/{platform}", webhook, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


__all__ = ["create_app", "error", "json_response"]
