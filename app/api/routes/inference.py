"""/v1/completions and /v1/chat/completions: OpenAI's shapes, streamed as SSE on request.

The route resolves `model` in the caller's organization, submits to the engine (bad input
is refused right there, before any response starts), then either waits for the whole
completion or streams chunks. A stream starts only once the first piece exists, so an
adapter that fails to load is still a plain JSON error, never a broken stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app import base_models, registry
from app.api.deps import EngineDep, OrgDep, ReadSessionDep, SettingsDep, StoreDep
from app.errors import without_server_paths
from app.ids import new_id
from app.schemas.inference import (
    AssistantMessage,
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
    completion_logprobs,
    usage_of,
)

router = APIRouter(prefix="/v1", tags=["inference"])
SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"}}


def _submit(body: SamplingParams, org, session, settings, store, engine, **inputs):  # type: ignore[no-untyped-def]
    """Resolve the model in the caller's organization, then hand the request to the engine."""
    from app.inference import AdapterRef

    target = registry.resolve_model(
        session, organization=org, model_id=body.model, base_models=settings.base_models
    )
    # 503 at once, naming the reason, rather than a load that fails (or retries the hub).
    base_models.require_loadable(settings.base_models, target.base_model)
    adapter = None
    if target.adapter_id is not None:
        adapter = AdapterRef(
            id=target.adapter_id,
            path=store.path(target.storage_key),
            sha256=target.sha256,
            owner=org.id,
        )
    session.close()  # release the connection while the model runs
    return engine.submit(
        base_model=target.base_model,
        adapter=adapter,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        **inputs,
    )


def _sse(request, chunks: Callable[[Iterator], Iterator[BaseModel]]) -> StreamingResponse:  # type: ignore[no-untyped-def]
    """SSE of `chunks(deltas)`, started only once the first delta (or the end) is there."""
    deltas = request.deltas()
    first = next(deltas, None)  # raises here (a JSON error) if the request failed to start

    def pieces() -> Iterator:
        if first is not None:
            yield first
        yield from deltas

    def events() -> Iterator[str]:
        try:
            for chunk in chunks(pieces()):
                yield f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:  # mid-stream: report in the stream, the status is sent
            message = without_server_paths(str(exc))
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            request.cancel()  # a client that went away frees its batch row

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/completions", response_model=CompletionResponse, responses=SSE)
def create_completion(
    body: CompletionRequest,
    org: OrgDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    store: StoreDep,
    engine: EngineDep,
) -> Any:
    request = _submit(
        body,
        org,
        session,
        settings,
        store,
        engine,
        prompt=body.prompt,
        max_tokens=body.max_tokens or 16,
        logprobs=body.logprobs,
    )
    head = {"id": new_id("cmpl"), "created": int(time.time()), "model": body.model}
    if body.stream:
        return _sse(request, lambda deltas: _completion_chunks(head, request, deltas, body))
    result = request.result()
    choice = CompletionChoice(
        text=result.text,
        finish_reason=result.finish_reason,
        logprobs=completion_logprobs(result.logprobs),
    )
    return CompletionResponse(**head, choices=[choice], usage=usage_of(result))


def _completion_chunks(head, request, deltas, body) -> Iterator[CompletionResponse]:  # type: ignore[no-untyped-def]
    for delta in deltas:
        logprobs = completion_logprobs(delta.logprobs) if body.logprobs is not None else None
        choice = CompletionChoice(
            text=delta.text, finish_reason=delta.finish_reason, logprobs=logprobs
        )
        yield CompletionResponse(**head, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(**head, choices=[], usage=usage_of(request.generation))


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=SSE)
def create_chat_completion(
    body: ChatCompletionRequest,
    org: OrgDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    store: StoreDep,
    engine: EngineDep,
) -> Any:
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    request = _submit(
        body,
        org,
        session,
        settings,
        store,
        engine,
        messages=messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,  # None: what fits
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": body.model}
    if body.stream:
        return _sse(request, lambda deltas: _chat_chunks(head, request, deltas, body))
    result = request.result()
    choice = ChatChoice(
        message=AssistantMessage(content=result.text),
        finish_reason=result.finish_reason,
        logprobs=chat_logprobs(result.logprobs),
    )
    return ChatCompletionResponse(**head, choices=[choice], usage=usage_of(result))


def _chat_chunks(head, request, deltas, body) -> Iterator[ChatCompletionChunk]:  # type: ignore[no-untyped-def]
    role = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
    yield ChatCompletionChunk(**head, choices=[role])
    for delta in deltas:
        choice = ChatChunkChoice(
            delta=ChatDelta(content=delta.text) if delta.text else ChatDelta(),
            finish_reason=delta.finish_reason,
            logprobs=chat_logprobs(delta.logprobs) if body.logprobs else None,
        )
        yield ChatCompletionChunk(**head, choices=[choice])
    if body.include_usage:
        yield ChatCompletionChunk(**head, choices=[], usage=usage_of(request.generation))
