"""Function calling in OpenAI's chat shapes: tools, tool calls and their streamed pieces,
and the answer built from a reply the model gave as tool calls (`app/inference/tool_calls.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from app.inference.tool_calls import ParsedCall  # pure Python: no torch
from app.schemas.common import Strict, Text


class FunctionCall(Strict):
    name: Annotated[Text, Field(min_length=1)]
    arguments: Text  # a JSON object, as a string (checked with the conversation)


class ToolCall(Strict):
    id: Annotated[Text, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(Strict):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # OpenAI's structured-outputs flag: accepted, not enforced


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    """OpenAI's streamed piece of a tool call: `index` says which call it extends; the
    first piece of a call carries its id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _first_piece_names_the_call(self, handler: SerializerFunctionWrapHandler) -> Any:
        return without_none(handler(self), "id", "type")


def without_none(dumped: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`dumped` less those of `keys` whose value is None: fields OpenAI sends only when set."""
    return {k: v for k, v in dumped.items() if not (k in keys and v is None)}


def tool_calls_of(calls: list[ParsedCall]) -> list[ToolCall]:
    """The `message.tool_calls` of a reply made of `calls`."""
    return [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]


def tool_call_deltas(calls: list[ParsedCall]) -> list[ToolCallDelta]:
    """The streamed `delta.tool_calls` of `calls`: each whole in one piece (the SDKs join
    pieces by `index`, so one piece per call is a complete stream)."""
    return [
        ToolCallDelta(
            index=i,
            id=c.id,
            type="function",
            function=FunctionCallDelta(name=c.name, arguments=c.arguments),
        )
        for i, c in enumerate(calls)
    ]
