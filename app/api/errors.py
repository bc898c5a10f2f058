"""The one error handler: domain errors → OpenAI's error envelope and one status each."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from app import errors

logger = logging.getLogger(__name__)

ErrorBody = dict[str, dict[str, str | None]]

STATUS = {
    errors.InvalidRequest: 400,
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.InvalidState: 409,
    errors.RequestTimeout: 408,
    errors.PayloadTooLarge: 413,
    errors.Forbidden: 403,
    errors.IdempotencyKeyReused: 422,
    errors.RateLimited: 429,
    errors.ServiceUnavailable: 503,
    errors.IntegrityFailure: 500,
}


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> ErrorBody:
    """OpenAI's error envelope: the one place it is built (JSON answers and SSE error events)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def server_error_body() -> ErrorBody:
    """What a client reads of an unexpected failure: none of its details (the log has them)."""
    return error_body("The server had an error processing your request.", type="server_error")


def _status_for(exc: errors.LoraforgeError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


async def _domain_error(request: Request, exc: errors.LoraforgeError) -> JSONResponse:
    response = error_response(exc)
    if response.status_code == 500:  # the server's fault (say, changed adapter bytes): say so
        logger.error(
            "%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc.message
        )
    return response


def domain_error(exc: errors.LoraforgeError) -> tuple[int, ErrorBody]:
    """A domain error's status and envelope (JSON answers and SSE error events alike)."""
    status = _status_for(exc)
    kind = "invalid_request_error" if status < 500 else "server_error"
    if isinstance(exc, errors.RateLimited):
        kind = "rate_limit_error"
    message = errors.without_server_paths(exc.message)  # some wrap a library's or OS's text
    return status, error_body(message, type=kind, param=exc.param, code=exc.code)


def error_response(exc: errors.LoraforgeError, *, close: bool = False) -> JSONResponse:
    """A domain error as its status and OpenAI's envelope (also used by ASGI middleware).

    `close`: end the connection after the answer (the rest of the body is never read).
    """
    status, body = domain_error(exc)
    headers = {}
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if close or isinstance(exc, errors.RequestTimeout):
        headers["Connection"] = "close"
    return JSONResponse(body, status, headers=headers or None)


# pydantic tags errors of union members with the member's type ("literal['auto']", "int");
# those are not fields, so they are left out of `param`.
_TYPE_TAGS = {
    "int",
    "float",
    "str",
    "bool",
    "dict",
    "list",
    "body",
    "query",
    "path",
    "header",
    "form",
    "file",
}


def _field_path(loc: tuple[int | str, ...]) -> str | None:
    parts = [
        str(part)
        for part in loc
        if not (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part))
    ]
    return ".".join(parts) or None


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    # For a union ("auto" or a number) the literal mismatch says least; report the other one.
    first = next((p for p in problems if p.get("type") != "literal_error"), problems[0])
    param = _field_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        message = unrecognized_arguments(
            [_field_path(p.get("loc", ())) for p in problems if p.get("type") == "extra_forbidden"]
        )
    elif first.get("type") == "missing":
        message = f"Missing required parameter: {param}"
    else:
        message = (
            f"Invalid value for {param}: {first.get('msg')}" if param else str(first.get("msg"))
        )
    return JSONResponse(error_body(message, type="invalid_request_error", param=param), 400)


def unrecognized_arguments(names: Sequence[str | None]) -> str:
    """One message naming every unknown argument (a user fixes them all at once)."""
    unique = list(dict.fromkeys(name for name in names if name))
    if len(unique) == 1:
        return f"Unrecognized request argument supplied: {unique[0]}"
    return f"Unrecognized request arguments supplied: {', '.join(unique)}"


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(
        error_body(str(exc.detail), type=kind), exc.status_code, headers=exc.headers
    )


async def _unsafe_model(_: Request, exc: errors.UnsafeModelError) -> JSONResponse:
    return JSONResponse(
        error_body(
            errors.without_server_paths(str(exc)), type="invalid_request_error", code="unsafe_model"
        ),
        400,
    )


async def _database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
    # A restart or failover of the database is the server's state, not the request's fault:
    # answer 503 with Retry-After so clients back off and retry, never a 500.
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    body = error_body(
        "The database is unavailable; retry shortly.",
        type="server_error",
        code="service_unavailable",
    )
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


async def _database_busy(request: Request, exc: PoolTimeout) -> JSONResponse:
    # Every pooled connection is in use (app/db/session.POOL_TIMEOUT_SECONDS): the server is
    # saturated, not broken; 503 + Retry-After tells clients to back off, never a 500.
    logger.warning("database pool exhausted on %s %s: %s", request.method, request.url.path, exc)
    body = error_body(
        "The server is busy; retry shortly.", type="server_error", code="service_unavailable"
    )
    return JSONResponse(body, 503, headers={"Retry-After": "2"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(server_error_body(), 500)


# Starlette types a handler as taking any Exception; each of ours takes the class it is
# registered for, hence Any.
_Handler = Callable[[Request, Any], Awaitable[JSONResponse]]
_HANDLERS: tuple[tuple[type[Exception], _Handler], ...] = (
    (errors.LoraforgeError, _domain_error),
    (RequestValidationError, _validation_error),
    (HTTPException, _http_error),
    (errors.UnsafeModelError, _unsafe_model),
    (OperationalError, _database_unavailable),
    (PoolTimeout, _database_busy),
    (Exception, _unexpected),
)


def install_error_handlers(app: FastAPI) -> None:
    for cls, handler in _HANDLERS:
        app.add_exception_handler(cls, handler)
