"""The error responses every route declares, so the OpenAPI schema tells the truth.

Schema-driven clients and fuzzers (schemathesis) check every status a route answers
against the schema; each of these is OpenAI's error envelope.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Bad input; `param` names the field"),
    401: _error("Missing or unknown API key"),
    403: _error("The key may not use this route (admin routes)"),
    404: _error("Unknown id, or an id of another organization"),
    408: _error("The request body arrived too slowly; the connection is closed"),
    409: _error("The object's state forbids the operation"),
    413: _error("Upload or request body larger than the configured cap"),
    422: _error("Idempotency-Key replayed with a different request"),
    429: _error("Rate limit, active-job or inference quota reached; see Retry-After"),
    500: _error("Stored bytes failed their integrity check, or an unexpected error"),
    503: _error("A dependency (database, broker, inference engine) is unavailable or busy"),
}
