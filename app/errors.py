"""Domain errors, all in one place. No HTTP codes here: `app/api/errors.py` maps each
`LoraforgeError` class to one status.

They subclass builtins where callers may expect them (PEFT's habit), and carry the
OpenAI error fields a client can act on: `param` (the field at fault) and `code`.
The errors of a training run (after the API's) end a run or fail its job; they reach a
user as the job's `error`, never as an HTTP answer.

The training core (worker/training) raises these too, so this module imports nothing
heavier than `app.statuses`: no database, API, Celery or torch.
"""

from __future__ import annotations

import re

from app.statuses import RunOutcome


class LoraforgeError(Exception):
    code: str = "error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(LoraforgeError, ValueError):
    """The request is well-formed but asks for something we refuse (400)."""

    code = "invalid_request"


class InvalidFile(InvalidRequest):
    """An uploaded dataset is not valid JSONL of a supported shape (400, names the line)."""

    code = "invalid_file"

    def __init__(self, message: str, *, line: int | None = None, param: str | None = "file"):
        where = f"line {line}: " if line is not None else ""
        super().__init__(where + message, param=param)
        self.line = line


class NotFound(LoraforgeError, LookupError):
    """Unknown id, or an id of another organization: the two are indistinguishable (404)."""

    code = "not_found"


def model_not_found(model_id: str) -> NotFound:
    """OpenAI's answer for a model id that is unknown, deleted or another organization's."""
    return NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


class InvalidState(LoraforgeError):
    """The object exists but is in a state that forbids the operation (409)."""

    code = "invalid_state"


class Unauthorized(LoraforgeError):
    """Missing or unknown API key (401)."""

    code = "invalid_api_key"


class PayloadTooLarge(LoraforgeError):
    """An upload past the configured size cap (413); nothing was stored."""

    code = "file_too_large"


class RequestTimeout(LoraforgeError):
    """The client sent its request body too slowly (408); the connection is closed."""

    code = "request_timeout"


class ServiceUnavailable(LoraforgeError):
    """A dependency (broker, inference engine) cannot serve right now (503)."""

    code = "service_unavailable"


class IntegrityFailure(LoraforgeError):
    """Stored bytes no longer match their recorded sha256; they are never served (500)."""

    code = "integrity_error"


def adapter_weights_changed(model_id: str) -> IntegrityFailure:
    """An adapter whose stored weights are not the ones published: the server's fault (500),
    the same answer at inference and at download."""
    return IntegrityFailure(
        f"the stored weights of {model_id} do not match the sha256 recorded when it was "
        "published; refusing to serve them"
    )


class Forbidden(LoraforgeError):
    """A valid caller asking for something outside its scope, e.g. a tenant key on admin (403)."""

    code = "forbidden"


class RateLimited(LoraforgeError):
    """Too many requests or too many running jobs for one organization (429, Retry-After)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = max(1, retry_after)


class AdapterIntegrityError(InvalidRequest):
    """An adapter's files are not a LoRA this server serves: pickled or missing weights, a
    config or tensors it refuses (400). Weights whose sha256 changed since publishing are
    the server's fault instead (`errors.adapter_weights_changed`, 500)."""

    code = "adapter_integrity"


class NotPrefixStable(ValueError):
    """A chat template renders a message differently depending on what follows it (Qwen 3's
    drops earlier reasoning): training renders such a conversation per assistant turn."""


class IdempotencyKeyReused(InvalidRequest):
    """An Idempotency-Key replayed with a different request body (422, as Stripe does)."""

    code = "idempotency_key_reused"


class UnsafeModelError(ValueError):
    """A model or adapter asks for something we never allow (remote code, pickled weights);
    the API answers 400 `unsafe_model`."""


class QuantizationUnavailable(InvalidRequest):
    """A base model cannot be loaded at the asked quantization (bitsandbytes is missing, the
    checkpoint is already quantized, a layer bitsandbytes cannot take): 400 at job creation
    when the API can know it, else the job fails with it; serving answers 503 naming the
    base's `LORAFORGE_BASE_MODELS` entry."""

    code = "quantization_unavailable"


# Errors of a training run.


class RunAborted(Exception):
    """The run must stop: its job was cancelled, or its lease passed to another attempt."""

    def __init__(self, reason: RunOutcome):
        super().__init__(reason)
        self.reason = reason  # RunOutcome.CANCELLED or RunOutcome.LEASE_LOST


class JobInputError(Exception):
    """The job cannot run as specified (its inputs, or hyperparameters only the loaded model
    can check): it fails at once with this message, code and param, and is never retried."""

    def __init__(self, message: str, *, code: str, param: str | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


class CheckpointError(ValueError):
    """A checkpoint is incomplete or does not match its recorded sha256."""


# An absolute filesystem path: "/" + at least one more character, not inside a word or a URL
# ("and/or", "http://…", "meta-llama/Llama" are not paths), not an API route of ours.
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])/(?!v1/|health\b)[^\s'\"`,;()\[\]{}<>|]+")


def without_server_paths(text: str) -> str:
    """`text` with every absolute path cut to its last component (`…/file-x.jsonl`).

    Messages built from exceptions (an OSError, a library's refusal) name where the server
    keeps things; users see what failed, never the layout of the server's disks.
    """
    return _SERVER_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def public_message(exc: BaseException) -> str:
    """What a user may read of an unexpected exception: its type and its scrubbed text."""
    return f"{type(exc).__name__}: {without_server_paths(str(exc))}"
