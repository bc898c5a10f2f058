"""/v1/completions and /v1/chat/completions: OpenAI's shapes, streamed as SSE on request.

The route resolves `model` in the caller's organization, submits to the engine (bad input
is refused right there, before any response starts), then either waits for the whole
completion or streams chunks. A stream starts only once the first piece exists, so an
adapter that fails to load is still a plain JSON error, never a broken stream.

Inference never holds a thread of the pool that control routes (files, jobs, /health,
authentication) share: resolving and tokenizing run on inference's own threads, and the
route then waits for the scheduler on the event loop (`InferenceRequest.next_event`), so a
thousand open streams cost no threads at all. A stream re-checks its API key every
`stream_key_check_seconds` and ends with an error event once the key is revoked.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import anyio
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app import base_models, tenancy
from app.api.deps import EngineDep, OrgDep, SettingsDep, StoreDep
from app.api.errors import domain_error, server_error_body
from app.config import Settings
from app.db.models import Organization
from app.db.session import read_session_scope
from app.errors import LoraforgeError, Unauthorized
from app.ids import new_id
from app.inference.adapter_cache import adapter_cache
from app.inference.tool_calls import ToolCallStream
from app.registry import service as registry
from app.schemas.inference import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingParams,
    chat_logprobs,
    chat_reply,
    completion_logprobs,
    usage_of,
)
from app.schemas.tools import tool_call_deltas
from app.storage import ArtifactStore

if TYPE_CHECKING:
    from app.inference.engine import InferenceEngine
    from app.inference.request import Request as InferenceRequest
    from app.inference.types import Delta

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["inference"])
SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"}
}
T = TypeVar("T")


class _Head(TypedDict):
    """What the response and every chunk of one completion repeat."""

    id: str
    created: int
    model: str


INFERENCE_THREADS = 8  # threads that resolve, tokenize and hand requests to the engine


def _limiter(http: HttpRequest) -> anyio.CapacityLimiter:
    """Inference's own thread limit, apart from the pool that control routes use."""
    limiter = getattr(http.app.state, "inference_limiter", None)
    if limiter is None:  # created on the event loop, once per app
        limiter = http.app.state.inference_limiter = anyio.CapacityLimiter(INFERENCE_THREADS)
    return limiter


async def _off_loop(http: HttpRequest, fn: Callable[..., T], /, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, **kwargs), limiter=_limiter(http))


def _submit(
    body: SamplingParams,
    org: Organization,
    settings: Settings,
    store: ArtifactStore,
    engine: InferenceEngine,
    **inputs: Any,
) -> InferenceRequest:
    """Resolve the model in the caller's organization, then hand the request to the engine."""
    from app.inference import AdapterRef

    with read_session_scope(settings.sqlalchemy_url) as session:  # closed before the model runs
        target = registry.resolve_model(
            session, organization=org, model_id=body.model, base_models=settings.base_models
        )
    # 503 at once, naming the reason, rather than a load that fails (or retries the hub).
    base_models.require_loadable(settings.base_models, target.base_model)
    adapter = None
    if target.adapter is not None:
        adapter = AdapterRef(
            id=target.adapter.id,
            path=adapter_cache(
                store, data_dir=settings.data_dir, max_bytes=settings.adapter_cache_bytes
            ).folder(
                model_id=target.adapter.id,
                key=target.adapter.storage_key,
                sha256=target.adapter.sha256,
            ),
            sha256=target.adapter.sha256,
            owner=org.id,
        )
    return engine.submit(
        base_model=target.base_model,
        adapter=adapter,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        owner=org.id,
        **inputs,
    )


async def _start(http: HttpRequest, submit: Callable[[], InferenceRequest]) -> InferenceRequest:
    """Run `submit` (a `_submit` with its arguments) on inference's threads; attach the
    request to this event loop, which then waits for its tokens without a thread."""
    submitted = await _off_loop(http, submit)
    submitted.attach()
    return submitted


def _key_active(url: str, key_sha256: str) -> bool:
    with read_session_scope(url) as session:
        return tenancy.key_is_active(session, key_sha256=key_sha256)


async def _checked_deltas(
    http: HttpRequest, submitted: InferenceRequest, first: Delta | None, settings: Settings
) -> AsyncIterator[Delta]:
    """The submitted request's deltas; every `stream_key_check_seconds` the caller's key is
    looked up again (a short read-only session) and a revoked key ends the stream."""
    if first is not None:
        yield first
    interval = settings.stream_key_check_seconds
    next_check = time.monotonic() + interval
    while submitted.generation is None:
        wait = max(0.0, next_check - time.monotonic()) if interval > 0 else None
        delta = await submitted.next_event(wait)
        if interval > 0 and time.monotonic() >= next_check:
            key = http.state.key_sha256
            if not await _off_loop(http, _key_active, url=settings.sqlalchemy_url, key_sha256=key):
                raise Unauthorized("the API key of this stream was revoked")
            next_check = time.monotonic() + interval
        if delta is not None:
            yield delta


async def _sse(
    http: HttpRequest,
    submitted: InferenceRequest,
    settings: Settings,
    chunks: Callable[[AsyncIterator[Delta]], AsyncIterator[BaseModel]],
) -> StreamingResponse:
    """SSE of `chunks(deltas)`, started only once the first delta (or the end) is there."""
    first = await submitted.next_event()  # raises here (a JSON error) if the request failed

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks(_checked_deltas(http, submitted, first, settings)):
                yield f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:  # mid-stream: report in the stream, the status is sent
            yield f"data: {json.dumps(_stream_error(exc))}\n\n"
        finally:
            submitted.cancel()  # a client that went away (or a revoked key) frees its row

    return StreamingResponse(events(), media_type="text/event-stream")


def _stream_error(exc: Exception) -> dict[str, Any]:
    """The error event that ends a stream once its 200 is sent, in OpenAI's envelope.

    A domain error keeps its message, as its JSON answer would: it is written for the client
    (a revoked key, a deleted model, refused adapter files) and cut of server paths. Any other
    error is the server's fault: the log keeps it with its traceback, the client gets the
    generic message and nothing of `str(exc)`.
    """
    if isinstance(exc, LoraforgeError):
        logger.warning("stream ended by %s: %s", type(exc).__name__, exc.message)
        return domain_error(exc)[1]
    logger.error("stream failed mid-way", exc_info=exc)
    return server_error_body()


@router.post("/completions", response_model=CompletionResponse, responses=SSE)
async def create_completion(
    http: HttpRequest,
    body: CompletionRequest,
    org: OrgDep,
    settings: SettingsDep,
    store: StoreDep,
    engine: EngineDep,
) -> Any:
    submitted = await _start(
        http,
        functools.partial(
            _submit,
            body,
            org,
            settings,
            store,
            engine,
            prompt=body.prompt,
            max_tokens=body.max_tokens or 16,
            logprobs=body.logprobs,
        ),
    )
    head = _Head(id=new_id("cmpl"), created=int(time.time()), model=body.model)
    if body.stream:
        return await _sse(
            http, submitted, settings, lambda d: _completion_chunks(head, submitted, d, body)
        )
    result = await submitted.aresult()
    choice = CompletionChoice(
        text=result.text,
        finish_reason=result.finish_reason,
        logprobs=completion_logprobs(result.logprobs),
    )
    return CompletionResponse(**head, choices=[choice], usage=usage_of(result))


async def _completion_chunks(
    head: _Head,
    submitted: InferenceRequest,
    deltas: AsyncIterator[Delta],
    body: CompletionRequest,
) -> AsyncIterator[CompletionResponse]:
    async for delta in deltas:
        logprobs = completion_logprobs(delta.logprobs) if body.logprobs is not None else None
        choice = CompletionChoice(
            text=delta.text, finish_reason=delta.finish_reason, logprobs=logprobs
        )
        yield CompletionResponse(**head, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(**head, choices=[], usage=usage_of(await submitted.aresult()))


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=SSE)
async def create_chat_completion(
    http: HttpRequest,
    body: ChatCompletionRequest,
    org: OrgDep,
    settings: SettingsDep,
    store: StoreDep,
    engine: EngineDep,
) -> Any:
    submitted = await _start(
        http,
        functools.partial(
            _submit,
            body,
            org,
            settings,
            store,
            engine,
            messages=body.template_messages(),
            tools=body.template_tools(),
            max_tokens=body.max_completion_tokens or body.max_tokens,  # None: what fits
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        ),
    )
    head = _Head(id=new_id("chatcmpl"), created=int(time.time()), model=body.model)
    if body.stream:
        return await _sse(
            http, submitted, settings, lambda d: _chat_chunks(head, submitted, d, body)
        )
    result = await submitted.aresult()
    message, finish_reason = chat_reply(result, body.callable_names())
    choice = ChatChoice(
        message=message, finish_reason=finish_reason, logprobs=chat_logprobs(result.logprobs)
    )
    return ChatCompletionResponse(**head, choices=[choice], usage=usage_of(result))


async def _chat_chunks(
    head: _Head,
    submitted: InferenceRequest,
    deltas: AsyncIterator[Delta],
    body: ChatCompletionRequest,
) -> AsyncIterator[ChatCompletionChunk]:
    role = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
    yield ChatCompletionChunk(**head, choices=[role])
    names = body.callable_names()
    calls = ToolCallStream(names) if names else None  # content held while it may be a call
    async for delta in deltas:
        text = calls.feed(delta.text) if calls else delta.text
        finish_reason = delta.finish_reason
        if calls is not None and finish_reason is not None:
            rest, reply = calls.finish()
            text += rest
            if reply is not None:  # OpenAI's order: any content, the calls, then the finish
                if text:
                    yield ChatCompletionChunk(**head, choices=[_content_choice(text)])
                tool_calls = ChatDelta(tool_calls=tool_call_deltas(reply.calls))
                yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=tool_calls)])
                text, finish_reason = "", "tool_calls"
        choice = _content_choice(text, finish_reason)
        choice.logprobs = chat_logprobs(delta.logprobs) if body.logprobs else None
        yield ChatCompletionChunk(**head, choices=[choice])
    if body.include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=usage_of(await submitted.aresult()))


def _content_choice(text: str, finish_reason: str | None = None) -> ChatChunkChoice:
    return ChatChunkChoice(
        delta=ChatDelta(content=text) if text else ChatDelta(), finish_reason=finish_reason
    )
