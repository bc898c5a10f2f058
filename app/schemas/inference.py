"""Completions and chat completions (OpenAI's request and response shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from app.files.tool_format import check_tool_use
from app.inference.tool_calls import parse_reply
from app.schemas.common import Id, Strict, Text
from app.schemas.tools import Tool, ToolCall, ToolCallDelta, tool_calls_of, without_none

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
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None  # required but on an assistant message with tool_calls
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def _content_unless_calling(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (only an assistant's tool call may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are only allowed on assistant messages")
        return self


TOOL_CHOICES = ("auto", "none")


class ChatCompletionRequest(SamplingParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    # Any here, so that "required" or a named function is refused by the message below
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted; the model decides how many it calls

    @field_validator("tool_choice")
    @classmethod
    def _auto_or_none(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value not in TOOL_CHOICES:
            raise ValueError(
                "only 'auto' and 'none' are supported (the model is not constrained to call "
                "a function); leave tool_choice out or use 'auto'"
            )
        if value is not None and not info.data.get("tools"):
            raise ValueError("tool_choice is only allowed when tools are given")
        return value

    @model_validator(mode="after")
    def _tool_calls_match_tools(self) -> ChatCompletionRequest:
        """The conversation's calls and results, checked as training data is: a call to a
        function not in `tools`, arguments that are no JSON object, an unmatched result."""
        record: dict[str, Any] = {"messages": self.template_messages()}
        if self.tools is not None:
            record["tools"] = self.template_tools()
        check_tool_use(record)
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        if self.tools is None:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def callable_names(self) -> frozenset[str]:
        """The functions a reply may call: none without tools or with tool_choice 'none'
        (the tools are still rendered, as in training; the reply is read as content)."""
        if self.tools is None or self.tool_choice == "none":
            return frozenset()
        return frozenset(t.function.name for t in self.tools)

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
            raise ValueError("the last message must be from the user, the system or a tool")
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
    content: str | None  # null when the reply is tool calls only
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_none(handler(self), "tool_calls")


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
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_none(handler(self), "tool_calls")


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


def chat_reply(result: Generation, names: frozenset[str]) -> tuple[AssistantMessage, str]:
    """The message and finish reason of a whole reply: tool calls to functions in `names`
    when the reply is made of them, else its text as content."""
    reply = parse_reply(result.text, names) if names else None
    if reply is None:
        return AssistantMessage(content=result.text), result.finish_reason
    return AssistantMessage(content=reply.content, tool_calls=tool_calls_of(reply.calls)), (
        "tool_calls"
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
