"""Whether a tokenizer's chat template renders function calling, found by rendering a probe.

Many chat templates ignore `tools` and an assistant message's `tool_calls` (they print
`content` only): training on such a render would silently drop the calls, and inference
would never show the model its tools. So a probe conversation is rendered as training
renders it, and the template must put into the text the tool's description (the prompt
part), the call's function name and argument (the trained reply) and the tool's result.
The answer is kept on the tokenizer: a template does not change once loaded.
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequest
from app.ml.chat import render_examples

_NAME, _DESCRIPTION = "probe_lookup", "probe-description-7f3"
_ARGUMENT, _RESULT = "probe-argument-41", "probe-result-93"
_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": _NAME,
            "description": _DESCRIPTION,
            "parameters": {"type": "object", "properties": {"key": {"type": "string"}}},
        },
    }
]
_CALL = {
    "id": "call_probe",
    "type": "function",
    "function": {"name": _NAME, "arguments": json.dumps({"key": _ARGUMENT})},
}
_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "content": "", "tool_calls": [_CALL]},
    {"role": "tool", "tool_call_id": "call_probe", "content": _RESULT},
    {"role": "assistant", "content": "probe answer"},
]
_CACHE = "_loraforge_tool_refusal"


def tool_calling_refusal(tokenizer: Any) -> str | None:
    """Why the tokenizer's chat template cannot carry function calling (None: it can)."""
    if _CACHE not in tokenizer.__dict__:
        tokenizer.__dict__[_CACHE] = _probe(tokenizer)
    refusal: str | None = tokenizer.__dict__[_CACHE]
    return refusal


def require_tool_calling(tokenizer: Any, *, param: str) -> None:
    """Refuse (naming `param`) function calling that the chat template would leave out."""
    refusal = tool_calling_refusal(tokenizer)
    if refusal is not None:
        raise InvalidRequest(
            f"the base model cannot take function calling: {refusal}; use a base whose chat "
            "template renders tool calls (or one without a template: loraforge's fallback does)",
            param=param,
            code="unsupported_tool_calls",
        )


def _probe(tokenizer: Any) -> str | None:
    try:
        examples = render_examples(tokenizer, _MESSAGES, _TOOLS)
    except Exception as exc:  # jinja2's TemplateError, or what the template raises
        return f"its chat template fails on a conversation with tool calls ({exc})"
    prompt = "".join(s.text for e in examples for s in e if not s.trainable)
    replies = "".join(s.text for e in examples for s in e if s.trainable)
    missing = [
        what
        for what, text, part in (
            ("the tools (the `tools` argument)", _DESCRIPTION, prompt),
            ("an assistant message's tool_calls", _NAME, replies),
            ("a tool call's arguments", _ARGUMENT, replies),
            ("a tool message's content", _RESULT, prompt),
        )
        if text not in part
    ]
    if missing:
        return "its chat template does not render " + ", ".join(missing)
    return None
