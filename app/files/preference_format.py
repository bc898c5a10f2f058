"""Validation of preference (DPO) examples: OpenAI's format, also Together's and Fireworks'.

One example per line::

    {"input": {"messages": [...]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

`input.messages` are chat messages as in a chat file (the same checks, `format.py`) ending
with a user message; each output is exactly one assistant message with non-empty content,
and the two differ (a pair of equal answers teaches nothing). Tool use (`input.tools`,
`tool_calls`, `tool` messages) is refused by name: the DPO path renders plain turns only, and
training on silently dropped calls would teach the wrong answer. Pure Python: the API runs
it on every upload.
"""

from __future__ import annotations

from typing import Any

# The message checks are format.py's own, so a preference file's messages are held to
# exactly the rules of a chat file's.
from app.files.format import PREFERENCE, PREFERENCE_SHAPE, _check_keys, _check_message, _kind

__all__ = ["PREFERENCE", "PREFERENCE_SHAPE", "check_preference"]

OUTPUTS = ("preferred_output", "non_preferred_output")


def check_preference(record: dict[str, Any]) -> None:
    """Raise ValueError naming the first problem of one preference example."""
    _check_keys(record, required=("input", *OUTPUTS), what="a preference example")
    _check_input(record["input"])
    preferred, rejected = (_check_output(record[key], key) for key in OUTPUTS)
    if preferred == rejected:
        raise ValueError("preferred_output and non_preferred_output are the same answer")


def _check_input(value: object) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"input must be an object with 'messages'; got {_kind(value)}")
    _check_keys(value, required=("messages",), what="a preference example's input")
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"input.messages must be a non-empty list; got {_kind(messages)}")
    for i, message in enumerate(messages):
        _check_message(message, f"input.messages[{i}]")
        _refuse_tool_use(message, f"input.messages[{i}]")
    if messages[-1]["role"] != "user":
        raise ValueError("input.messages must end with a user message (the outputs answer it)")


def _check_output(value: object, key: str) -> str:
    """The content of a one-message assistant output."""
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"{key} must be a list of exactly one assistant message")
    where = f"{key}[0]"
    _check_message(value[0], where)
    _refuse_tool_use(value[0], where)
    message = value[0]
    if message["role"] != "assistant":
        raise ValueError(f"{where}.role must be 'assistant'; got {message['role']!r}")
    if "weight" in message:
        raise ValueError(f"{where}.weight is not allowed: both outputs are always trained on")
    content: str = message["content"]
    return content


def _refuse_tool_use(message: dict[str, Any], where: str) -> None:
    if message["role"] == "tool" or "tool_calls" in message or "tool_call_id" in message:
        raise ValueError(
            f"{where}: tool calls are not supported in preference (DPO) data yet; "
            "train them with a supervised job"
        )
