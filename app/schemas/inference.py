"""Completions and chat completions (OpenAI's request and response shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from app.schemas.common import Id, Strict, Text

if TYPE_CHECKING:
    from app.inference.types import Generation, TokenLogprob

# Alternatives per token for `logprobs` (completions) and `top_logprobs` (chat): OpenAI's
# completions limit. The engine takes what these schemas let through as given.
MAX_LOGPROBS = 5

StopField = (
    Annotated[Text, Field(min_length=1)]
    | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=4)]
    | None
)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingParams(Strict):
    model: Id
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Literal[1] = 1
    stop: StopField = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingParams):
    prompt: Annotated[Text, Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text
    name: Text | None = None


class ChatCompletionRequest(SamplingParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return value

    @field_validator("messages")
    @classmethod
    def _ends_for_the_assistant(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user or the system")
        return messages


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # a streamed chunk carries none (but the usage chunk)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -- GET /v1/engine/adapters: what the engine holds (app/api/routes/engine.py) --


class EngineAdapter(BaseModel):
    id: str
    object: Literal["engine.adapter"] = "engine.adapter"
    base_model: str
    loaded: bool
    pinned: bool
    rank: int | None
    bytes: int
    hits: int
    misses: int
    loads: int
    evictions: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    last_used: float | None
    last_load_seconds: float | None
    # "peft_fallback": an adapter the batch cannot apply (DoRA, embedding targets), served
    # by its own PEFT scheduler; counted there by requests, loads and evictions only
    served_by: Literal["batched", "peft_fallback"] = "batched"


class EngineKvCache(BaseModel):
    """The base model's KV cache budget (the same for everyone) and the caller's own use."""

    budget_tokens: int  # cache cells (one token, every layer) the budget holds
    budget_bytes: int
    bytes_per_token: int  # 2 x layers x KV heads x head dim x dtype bytes
    fraction: float  # LORAFORGE_KV_CACHE_FRACTION
    cached_tokens: int  # the caller's running requests: tokens cached now
    reserved_tokens: int  # the caller's running requests: prompt + max_tokens each
    waiting_for_cache: int  # the caller's requests whose turn came, waiting for cache


class EngineCacheTotals(EngineKvCache):
    """Admin only (GET /v1/admin/engine/cache): one base model's figures over every
    organization; the per-use fields above count every organization's requests here."""

    name: str
    running: int
    waiting: int
    steps: int  # decode steps
    forwards: int  # decode forwards: one per KV slab per step
    held_tokens: int  # what the running rows can reach together (the budget admits by it)
    allocated: int  # cells allocated, summed over decode steps (spare columns included)
    padded: int  # cells of the slabs' padded width, summed over decode steps
    real: int  # tokens really cached, summed over decode steps
    peak_allocated: int  # the most cells allocated at one step


class EngineCacheList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EngineCacheTotals]


class EngineBaseModel(BaseModel):
    name: str
    running: int
    waiting: int
    steps: int
    mixed_steps: int
    peak_batch: int
    max_batch_size: int
    max_loaded_adapters: int
    loaded: list[str]  # the caller's resident adapters, least recently used first
    kv_cache: EngineKvCache


class EngineAdapters(BaseModel):
    object: Literal["list"] = "list"
    data: list[EngineAdapter]
    base_models: list[EngineBaseModel]


# -- building responses from the engine's results (its types for type checking only) --


def usage_of(result: Generation) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def completion_logprobs(entries: Sequence[TokenLogprob] | None) -> CompletionLogprobs | None:
    if entries is None:
        return None
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[e.top for e in entries],
        text_offset=[e.offset for e in entries],
    )


def chat_logprobs(entries: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None

    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                **top(e.token, e.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in e.top.items()],
            )
            for e in entries
        ]
    )
