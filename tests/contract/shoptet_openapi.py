"""Check HTTP exchanges with Shoptet against Shoptet's official OpenAPI file.

The spec is vendored next to this module (``shoptet-openapi.yaml``, a copy of
``shoptet/developers`` ``openapi/openapi.yaml``) and validated with openapi-core. Use it on both
sides: on what a client (the bridge, a test) sends to Shoptet, and on what a Shoptet stand-in (the
simulator) answers.

    validate_request("PATCH", "/api/orders/2024000001/status", "suppressEmailSending=true",
                     headers, body)
    validate_response("GET", "/api/orders/2024000001", "", request_headers,
                      status=200, headers=response_headers, body=response_body)
    validate_exchange(recorded)      # anything with method/path/query/headers/body/status/...
    validate_httpx(response)         # an httpx.Response, checks its request too

Each raises :class:`ContractViolation` (an ``AssertionError``) that lists every problem found.

Rules on top of what openapi-core checks, and why:

* ``Content-Type`` must be sent on every request that declares the spec's ``DefaultContentType``
  parameter, GET included. OpenAPI says validators must ignore a header parameter named
  ``Content-Type``, so openapi-core does; Shoptet marks it required and documents it as such.
* A literal ``+`` in a raw query string is rejected: Shoptet reads it as a space, so a datetime
  offset such as ``+0100`` must be sent as ``%2B0100`` (the spec's examples say so).
* An answer whose status the operation does not document is still accepted when it is one of
  the statuses the spec's "Status codes" section says any endpoint may give (400, 401, 403,
  404, 409, 413, 422, 423, 429, 500, 503), provided it is the standard error envelope
  (``data`` null or object, a non-empty ``errors`` list, ``metadata.requestId``). 429, 502, 503
  and 504 may also come with a non-JSON body, because the proxy in front of Shoptet (nginx's
  ``limit_conn``) answers them itself.

Loading the 2 MB YAML takes most of a second, so the parsed form is cached in memory and, as
JSON keyed by the file's hash, under ``.pytest_cache/shoptet-openapi/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

import yaml
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

SPEC_PATH = Path(__file__).with_name("shoptet-openapi.yaml")
SERVER_URL = "https://api.myshoptet.com"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CACHE_DIR = _REPO_ROOT / ".pytest_cache" / "shoptet-openapi"

GENERIC_ERROR_STATUSES = frozenset({400, 401, 403, 404, 409, 413, 422, 423, 429, 500, 503})
GATEWAY_STATUSES = frozenset({429, 502, 503, 504})

QueryLike = str | Mapping[str, Any] | Iterable[tuple[str, Any]] | None
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]] | None


class ContractViolation(AssertionError):
    """A request or response that does not conform to Shoptet's OpenAPI spec."""


class Exchange(Protocol):
    """One recorded HTTP exchange, e.g. the simulator's ``RecordedRequest``."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    status: int
    response_headers: Mapping[str, str]
    response_body: bytes


# --- loading -----------------------------------------------------------------------------------


def _stringify_keys(node: Any) -> Any:
    # YAML reads response codes such as `200:` as ints; openapi-core needs string keys, and
    # JSON (the disk cache) would turn them into strings anyway.
    if isinstance(node, dict):
        return {str(k): _stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_stringify_keys(v) for v in node]
    return node


@functools.cache
def spec_dict() -> dict[str, Any]:
    """The parsed spec (cached in memory and on disk; do not mutate)."""
    raw = SPEC_PATH.read_bytes()
    cache_file = _CACHE_DIR / f"spec-{hashlib.sha256(raw).hexdigest()[:20]}.json"
    try:
        cached: dict[str, Any] = json.loads(cache_file.read_bytes())
        return cached
    except (OSError, ValueError):
        pass
    parsed: dict[str, Any] = _stringify_keys(yaml.load(raw, Loader=yaml.CSafeLoader))
    try:
        _CACHE_DIR.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so that parallel test processes never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=_CACHE_DIR, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(parsed, fh, separators=(",", ":"))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only checkout just pays the YAML cost every session
    return parsed


@functools.cache
def openapi() -> OpenAPI:
    # The spec itself is trusted (it is Shoptet's published file); validating it costs seconds.
    return OpenAPI.from_dict(spec_dict(), config=Config(spec_validator_cls=None))


@functools.cache
def _path_patterns() -> list[tuple[re.Pattern[str], str, int]]:
    out = []
    for template in spec_dict()["paths"]:
        n_params = template.count("{")
        regex = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        out.append((re.compile(f"^{regex}$"), template, n_params))
    # Literal segments win over templated ones (`/api/orders/statuses` is not `{code}`).
    out.sort(key=lambda t: t[2])
    return out


def find_operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """(path template, operation object) for a concrete request, or None if undocumented."""
    paths = spec_dict()["paths"]
    for regex, template, _ in _path_patterns():
        if regex.match(path):
            op = paths[template].get(method.lower())
            if op is not None:
                return template, op
    return None


def _resolve(node: Any) -> Any:
    if isinstance(node, dict) and "$ref" in node:
        target: Any = spec_dict()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def _inline_refs(node: Any, depth: int = 0) -> Any:
    if depth > 40:
        raise RecursionError("schema nests too deep to inline")
    if isinstance(node, dict):
        if "$ref" in node:
            merged = dict(_resolve(node))
            merged.update({k: v for k, v in node.items() if k != "$ref"})
            return _inline_refs(merged, depth + 1)
        return {k: _inline_refs(v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, depth + 1) for v in node]
    return node


@functools.cache
def _component_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_inline_refs(spec_dict()["components"]["schemas"][name]))


@functools.cache
def _envelope_validator() -> Draft202012Validator:
    schemas = spec_dict()["components"]["schemas"]
    errors = dict(schemas["Errors"])
    errors["type"] = "array"  # an error answer must say what went wrong
    errors["minItems"] = 1
    return Draft202012Validator(
        {
            "type": "object",
            "required": ["data", "errors", "metadata"],
            "properties": {
                "data": {"type": ["object", "null"]},
                "errors": errors,
                "metadata": schemas["Metadata"],
            },
        }
    )


# --- adapters for openapi-core -----------------------------------------------------------------


def _query_pairs(query: QueryLike) -> list[tuple[str, str]]:
    if query is None:
        return []
    if isinstance(query, str):
        return parse_qsl(query, keep_blank_values=True)
    items = query.items() if isinstance(query, Mapping) else query
    return [(str(k), _query_value(v)) for k, v in items]


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _headers(headers: HeadersLike) -> Headers:
    if headers is None:
        return Headers()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return Headers(list(items))


class _Request:
    def __init__(
        self, method: str, path: str, query: QueryLike, headers: HeadersLike, body: bytes | None
    ) -> None:
        self.host_url = SERVER_URL
        self.path = path
        self.method = method.lower()
        self.body = body or None
        hdrs = _headers(headers)
        self.content_type = (hdrs.get("content-type") or "application/json").lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(_query_pairs(query)),
            header=hdrs,
            cookie=ImmutableMultiDict(),
            path={},
        )

    @property
    def full_url_pattern(self) -> str:
        return self.host_url + self.path


class _Response:
    def __init__(self, status: int, headers: HeadersLike, body: bytes | None) -> None:
        self.status_code = status
        self.headers = _headers(headers)
        self.content_type = (self.headers.get("content-type") or "").lower()
        self.data = body


# --- error reporting ---------------------------------------------------------------------------


def _describe(exc: BaseException) -> Iterator[str]:
    """Flatten openapi-core's exception chain into readable lines, schema errors by JSON path."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    schema_lines: list[str] = []
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        for err in getattr(cur, "schema_errors", None) or []:
            schema_lines.extend(_describe_schema_error(err))
        cur = cur.__cause__ or cur.__context__
    if schema_lines:
        yield f"{type(exc).__name__}:"
        yield from schema_lines
    else:
        yield f"{type(exc).__name__}: {_shorten(str(exc))}"


def _describe_schema_error(err: Any) -> Iterator[str]:
    where = _json_path(getattr(err, "absolute_path", ()))
    message = _shorten(getattr(err, "message", str(err)))
    yield f"at {where}: {message}"
    # For oneOf/anyOf the useful detail sits in the sub-errors; show the deepest few.
    context = list(getattr(err, "context", None) or [])
    for sub in sorted(context, key=lambda e: -len(e.absolute_path))[:3]:
        yield f"  (branch) at {_json_path(sub.absolute_path)}: {_shorten(sub.message)}"


def _json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _shorten(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(what: str, method: str, path: str, query: QueryLike, problems: list[str]) -> None:
    if not problems:
        return
    q = query if isinstance(query, str) else "&".join(f"{k}={v}" for k, v in _query_pairs(query))
    target = f"{method.upper()} {path}{'?' + q if q else ''}"
    found = find_operation(method, path)
    op = f" (operationId {found[1].get('operationId')}, {found[0]})" if found else ""
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ContractViolation(f"{what} for {target}{op} does not conform to Shoptet's spec:\n{lines}")


# --- public checks -----------------------------------------------------------------------------


def request_problems(
    method: str,
    path: str,
    query: QueryLike = None,
    headers: HeadersLike = None,
    body: bytes | None = None,
) -> list[str]:
    """Every way in which the request breaks the spec (empty when it conforms)."""
    problems: list[str] = []
    found = find_operation(method, path)
    if found is None:
        return [f"no operation {method.upper()} {path} in the spec"]
    _, op = found
    hdrs = _headers(headers)
    params = [_resolve(p) for p in op.get("parameters", [])]
    needs_ct = any(
        p.get("in") == "header"
        and p.get("name", "").lower() == "content-type"
        and p.get("required")
        for p in params
    )
    if needs_ct and not hdrs.get("content-type"):
        problems.append("missing required header Content-Type (DefaultContentType)")
    if isinstance(query, str) and "+" in query:
        problems.append(
            "literal '+' in the query string is read as a space; encode it as %2B "
            f"(query: {_shorten(query, 200)})"
        )
    req = _Request(method, path, query, headers, body)
    problems.extend("\n    ".join(_describe(err)) for err in openapi().iter_request_errors(req))
    return problems


def validate_request(
    method: str,
    path: str,
    query: QueryLike = None,
    headers: HeadersLike = None,
    body: bytes | None = None,
) -> None:
    """Raise :class:`ContractViolation` unless the request conforms to the spec.

    ``path`` is the decoded URL path (``/api/orders/2024000001``); ``query`` the raw query
    string as sent (preferred: it lets the ``%2B`` rule be checked) or decoded pairs.
    """
    _fail("request", method, path, query, request_problems(method, path, query, headers, body))


def response_problems(
    method: str,
    path: str,
    query: QueryLike = None,
    request_headers: HeadersLike = None,
    request_body: bytes | None = None,
    *,
    status: int,
    headers: HeadersLike = None,
    body: bytes | None = None,
) -> list[str]:
    """Every way in which the response breaks the spec (empty when it conforms)."""
    found = find_operation(method, path)
    documented = found is not None and str(status) in found[1].get("responses", {})
    if not documented:
        if status in GENERIC_ERROR_STATUSES or status in GATEWAY_STATUSES:
            return error_envelope_problems(status, headers, body)
        where = "the spec" if found is None else f"responses of {found[1].get('operationId')}"
        return [f"status {status} is neither in {where} nor a generic Shoptet error status"]
    req = _Request(method, path, query, request_headers, request_body)
    resp = _Response(status, headers, body)
    return ["\n    ".join(_describe(e)) for e in openapi().iter_response_errors(req, resp)]


def validate_response(
    method: str,
    path: str,
    query: QueryLike = None,
    request_headers: HeadersLike = None,
    request_body: bytes | None = None,
    *,
    status: int,
    headers: HeadersLike = None,
    body: bytes | None = None,
) -> None:
    """Raise :class:`ContractViolation` unless the response conforms to the spec."""
    problems = response_problems(
        method,
        path,
        query,
        request_headers,
        request_body,
        status=status,
        headers=headers,
        body=body,
    )
    _fail(f"response {status}", method, path, query, problems)


def error_envelope_problems(status: int, headers: HeadersLike, body: bytes | None) -> list[str]:
    """Problems with an error answer checked against the generic envelope only."""
    content_type = (_headers(headers).get("content-type") or "").lower()
    if "json" not in content_type:
        if status in GATEWAY_STATUSES:
            return []
        return [f"error answer {status} is not JSON (Content-Type {content_type or 'missing'})"]
    try:
        doc = json.loads(body or b"")
    except ValueError as exc:
        return [f"error answer {status} is not valid JSON: {exc}"]
    return [
        f"at {_json_path(e.absolute_path)}: {_shorten(e.message)}"
        for e in _envelope_validator().iter_errors(doc)
    ]


def validate_error_envelope(status: int, headers: HeadersLike, body: bytes | None) -> None:
    """Check an answer to a request that is not in the spec (e.g. an unknown path)."""
    problems = error_envelope_problems(status, headers, body)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ContractViolation(f"error answer {status} is not a Shoptet envelope:\n{lines}")


def validate_exchange(exchange: Exchange, *, check_request: bool = True) -> None:
    """Validate a recorded exchange: the request (unless told not to) and the response."""
    if check_request:
        validate_request(
            exchange.method, exchange.path, exchange.query, exchange.headers, exchange.body
        )
    validate_response(
        exchange.method,
        exchange.path,
        exchange.query,
        exchange.headers,
        exchange.body,
        status=exchange.status,
        headers=exchange.response_headers,
        body=exchange.response_body,
    )


def validate_httpx(response: Any, *, check_request: bool = True) -> None:
    """Validate an ``httpx.Response`` together with the request that produced it."""
    request = response.request
    path = request.url.path
    query = request.url.query.decode("ascii")
    headers = list(request.headers.multi_items())
    body = request.content
    if check_request:
        validate_request(request.method, path, query, headers, body)
    validate_response(
        request.method,
        path,
        query,
        headers,
        body,
        status=response.status_code,
        headers=list(response.headers.multi_items()),
        body=response.content,
    )


def validate_component(name: str, instance: Any) -> None:
    """Validate a value against ``#/components/schemas/<name>`` (e.g. ``notificationData``)."""
    problems = [
        f"at {_json_path(e.absolute_path)}: {_shorten(e.message)}"
        for e in _component_validator(name).iter_errors(instance)
    ]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ContractViolation(f"value does not conform to components/schemas/{name}:\n{lines}")


def validate_webhook_body(body: bytes) -> dict[str, Any]:
    """Validate a webhook notification body (``notificationData``); return it parsed."""
    doc: dict[str, Any] = json.loads(body)
    validate_component("notificationData", doc)
    return doc
