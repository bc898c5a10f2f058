"""Validation of preference (DPO) examples: OpenAI's format, also Together's and Fireworks'.

One example per line::

    {"input": {"messages": [...], "tools": [...]?, "parallel_tool_calls": bool?},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

`input.messages` are chat messages as in a chat file (the same checks, `format.py`) ending
with a user message (or a tool's result, which the outputs then answer); each output is
exactly one assistant message, with content or `tool_calls` or both, and the two differ (a
pair of equal answers teaches nothing). Function calling is held to exactly a chat file's
rules (`tool_format.py`): the input followed by each output is checked as the chat example
it stands for (`conversations`, which training renders too), errors naming the field where
it is in the line. Pure Python: the API runs it on every upload.
"""

from __future__ import annotations

from typing import Any

# The message checks are format.py's own, so a preference file's messages are held to
# exactly the rules of a chat file's.
from app.files.format import PREFERENCE, PREFERENCE_SHAPE, _check_keys, _check_message, _kind
from app.files.tool_format import TOOL_KEYS, check_tool_use

__all__ = ["PREFERENCE", "PREFERENCE_SHAPE", "check_preference", "conversations"]

OUTPUTS = ("preferred_output", "non_preferred_output")


def check_preference(record: dict[str, Any]) -> None:
    """Raise ValueError naming the first problem of one preference example."""
    _check_keys(record, required=("input", *OUTPUTS), what="a preference example")
    _check_input(record["input"])
    for key in OUTPUTS:
        _check_output(record[key], key)
    places = [f"input.messages[{i}]" for i in range(len(record["input"]["messages"]))]
    for key, conversation in zip(OUTPUTS, conversations(record), strict=True):
        check_tool_use(conversation, places=[*places, f"{key}[0]"], prefix="input.")
    preferred, rejected = (_said(record[key][0]) for key in OUTPUTS)
    if preferred == rejected:
        raise ValueError("preferred_output and non_preferred_output are the same answer")


def conversations(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The two chat examples a preference example stands for, preferred then non-preferred:
    `input.messages` then the output, with the input's `tools` and `parallel_tool_calls`."""
    given = record["input"]
    tools = {key: given[key] for key in TOOL_KEYS if key in given}
    return [{"messages": [*given["messages"], *record[key]], **tools} for key in OUTPUTS]


def _check_input(value: object) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"input must be an object with 'messages'; got {_kind(value)}")
    _check_keys(
        value, required=("messages",), optional=TOOL_KEYS, what="a preference example's input"
    )
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"input.messages must be a non-empty list; got {_kind(messages)}")
    for i, message in enumerate(messages):
        _check_message(message, f"input.messages[{i}]")
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(
            "input.messages must end with a user message or a tool's result (the outputs answer it)"
        )


def _check_output(value: object, key: str) -> None:
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"{key} must be a list of exactly one assistant message")
    where = f"{key}[0]"
    _check_message(value[0], where)
    message = value[0]
    if message["role"] != "assistant":
        raise ValueError(f"{where}.role must be 'assistant'; got {message['role']!r}")
    if "weight" in message:
        raise ValueError(f"{where}.weight is not allowed: both outputs are always trained on")


def _said(message: dict[str, Any]) -> tuple[str, list[Any]]:
    """What an answer says: its content and its calls, ids aside (two answers that differ
    only in a call's id teach nothing)."""
    calls = [call["function"] for call in message.get("tool_calls") or ()]
    return message.get("content") or "", calls
