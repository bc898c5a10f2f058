"""Tools and tool calls in the form chat templates take, user text escaped.

OpenAI's format carries a call's `arguments` as a JSON string; chat templates (Hugging
Face's convention, which Qwen's, Llama 3.1's and Hermes' templates follow) expect a mapping
and write it with `tojson`. Every string a user wrote (names, descriptions, argument values)
is escaped as message content is (`app/ml/special_tokens.py`), so a special token's string
in a function description stays plain text.
"""

from __future__ import annotations

import json
from typing import Any

from app.ml.special_tokens import escape


def template_tools(tokenizer: Any, tools: list[dict[str, Any]] | None) -> list[Any] | None:
    """`tools` as the template's `tools` argument (None: no tools)."""
    if not tools:
        return None
    escaped: list[Any] = _escaped(tokenizer, tools)
    return escaped


def template_tool_fields(tokenizer: Any, message: dict[str, Any]) -> dict[str, Any]:
    """The tool fields of one message as the template takes them: `tool_calls` with
    arguments as mappings, and a tool message's `tool_call_id`."""
    fields: dict[str, Any] = {}
    if message.get("tool_calls"):
        fields["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": escape(tokenizer, call["function"]["name"]),
                    "arguments": _escaped(tokenizer, _arguments(call["function"]["arguments"])),
                },
            }
            for call in message["tool_calls"]
        ]
    if "tool_call_id" in message:
        fields["tool_call_id"] = message["tool_call_id"]
    return fields


def _arguments(arguments: Any) -> Any:
    """A call's arguments as a mapping: OpenAI's JSON string parsed (validated on upload
    and by the inference schema), or a mapping given as one."""
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def _escaped(tokenizer: Any, value: Any) -> Any:
    """`value` with every string in it (keys included) escaped."""
    if isinstance(value, str):
        return escape(tokenizer, value)
    if isinstance(value, list):
        return [_escaped(tokenizer, v) for v in value]
    if isinstance(value, dict):
        return {escape(tokenizer, k): _escaped(tokenizer, v) for k, v in value.items()}
    return value
