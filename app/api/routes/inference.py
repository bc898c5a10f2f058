from __future__ import annotations

import time

from fastapi import APIRouter

from app import registry
from app.api.deps import EngineDep, OrgDep, SessionDep, SettingsDep, StoreDep
from app.ids import new_id
from app.schemas.inference import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingParams,
    Usage,
)

router = APIRouter(prefix="/v1", tags=["inference"])


def _run(
    body: SamplingParams, max_tokens: int | None, org, session, settings, store, engine, **inputs
):  # type: ignore[no-untyped-def]
    """Resolve the model in the caller's organization, then generate."""
    from app.inference.engine import AdapterRef

    target = registry.resolve_model(
        session, organization=org, model_id=body.model, base_models=settings.base_models
    )
    adapter = None
    if target.adapter_id is not None:
        adapter = AdapterRef(
            id=target.adapter_id, path=store.path(target.storage_key), sha256=target.sha256
        )
    session.close()  # release the connection while the model runs
    return engine.generate(
        base_model=target.base_model,
        adapter=adapter,
        max_tokens=max_tokens or 16,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        **inputs,
    )


def _usage(result) -> Usage:  # type: ignore[no-untyped-def]
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


@router.post("/completions", response_model=CompletionResponse)
def create_completion(
    body: CompletionRequest,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    engine: EngineDep,
) -> CompletionResponse:
    result = _run(body, body.max_tokens, org, session, settings, store, engine, prompt=body.prompt)
    return CompletionResponse(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=body.model,
        usage=_usage(result),
        choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
def create_chat_completion(
    body: ChatCompletionRequest,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    engine: EngineDep,
) -> ChatCompletionResponse:
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    result = _run(body, max_tokens, org, session, settings, store, engine, messages=messages)
    return ChatCompletionResponse(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=body.model,
        usage=_usage(result),
        choices=[
            ChatChoice(
                message=AssistantMessage(content=result.text), finish_reason=result.finish_reason
            )
        ],
    )
