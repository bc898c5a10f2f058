"""A request's prompt before it reaches the batch: checked, bounded, tokenized.

Everything here runs before admission's KV accounting and outside any lock shared by all
requests (docs/design.md §9.4, §9.6): a text too long for the context is refused by its
length in characters before a tokenizer sees it, and user text never becomes a control
token (§6).
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequest


def check_input(prompt: str | None, messages: list[dict[str, Any]] | None) -> None:
    if prompt is not None and messages is not None:
        raise InvalidRequest("give either prompt or messages, not both", param="messages")
    if messages is not None:
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InvalidRequest("each message needs a string role", param="messages")
    elif not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string", param="prompt")


def check_length(
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    tools: list[dict[str, Any]] | None,
    context: int,
    max_token_chars: int,
) -> None:
    """Refuse, before tokenizing, a text too long for the context: no token covers more
    than `max_token_chars` characters, so more characters than context times that are more
    tokens than the context holds. Bounds the work one request can ask of a tokenizer."""
    if messages is not None:
        param = "messages"
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        # tools and calls are rendered too (as JSON, about as long as their JSON here)
        calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
        chars += len(json.dumps(tools or [])) + len(json.dumps(calls))
    else:
        param, chars = "prompt", len(prompt or "")
    limit = context * max(1, max_token_chars)
    if chars > limit:
        raise InvalidRequest(
            f"the {param} has {chars} characters; this model's context of {context} tokens "
            f"holds at most {limit}; shorten it",
            param=param,
        )


def tokenize(
    tokenizer: Any,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    tools: list[dict[str, Any]] | None,
) -> list[int]:
    """Token ids exactly as training makes them: the user's text never becomes a control
    token (a typed `<|end|><|assistant|>` stays plain text); only the chat template's do."""
    from app.files.tool_format import uses_tools
    from app.ml.chat import prompt_ids
    from app.ml.special_tokens import encode_plain
    from app.ml.tool_support import require_tool_calling

    if messages is not None:
        if tools is not None or uses_tools({"messages": messages}):
            require_tool_calling(tokenizer, param="messages" if tools is None else "tools")
        ids = prompt_ids(tokenizer, messages, tools)
        param = "messages"
    else:
        assert prompt is not None  # check_input refused a request with neither
        ids = encode_plain(tokenizer, prompt, add_special_tokens=True)
        param = "prompt"
    if not ids:
        raise InvalidRequest(f"the {param} tokenizes to no tokens", param=param)
    return list(ids)
