"""Validation of function-calling chat examples (OpenAI's fine-tuning format for tools).

A chat example may carry, besides ``messages``:

* ``tools``: a non-empty list of ``{"type": "function", "function": {"name", "description"?,
  "parameters"?}}``, the functions the assistant may call (names unique);
* ``parallel_tool_calls``: a boolean; ``false`` allows one call per assistant message.

In ``messages``, an assistant message may carry ``tool_calls`` (a non-empty list of
``{"id", "type": "function", "function": {"name", "arguments"}}``; its ``content`` may then
be empty, null or absent), and a ``tool`` message answers one call by ``tool_call_id``.

What a careless file gets wrong is refused here, naming the field: ``arguments`` that are
not a JSON object in a string, a call to a function not in ``tools``, a ``tool`` message
whose ``tool_call_id`` matches no earlier call, a call id used twice.

Pure Python, as `app.files.format`, which calls `check_tool_use` on every chat example.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from app.files.format import _kind, _show

TOOL_KEYS = ("tools", "parallel_tool_calls")  # optional top-level keys of a chat example
FUNCTION_KEYS = ("name", "description", "parameters")


def check_tool_use(
    record: dict[str, Any], *, places: Sequence[str] | None = None, prefix: str = ""
) -> None:
    """Check the tools, tool calls and tool messages of a chat example whose messages each
    passed the plain checks; raise ValueError naming the field.

    Errors name message i `messages[i]` and the top-level keys as they are, unless the
    example was assembled from another shape (a preference example's input and one
    output): then `places[i]` names message i and `prefix` goes before `tools` and
    `parallel_tool_calls`."""
    names = _tool_names(record.get("tools"), f"{prefix}tools")
    parallel = record.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ValueError(
            f"{prefix}parallel_tool_calls must be true or false; got {_show(parallel)}"
        )
    calls: set[str] = set()
    for i, message in enumerate(record["messages"]):
        where = places[i] if places is not None else f"messages[{i}]"
        if "tool_calls" in message:
            _check_calls(message["tool_calls"], f"{where}.tool_calls", names, calls, parallel)
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(f"{where}.tool_call_id must be the id of a tool call")
            if call_id not in calls:
                raise ValueError(
                    f"{where}.tool_call_id {_show(call_id)} matches no tool call "
                    "of an earlier assistant message"
                )


def uses_tools(record: dict[str, Any]) -> bool:
    """Whether a chat example carries function calling (tools, tool calls or results)."""
    return "tools" in record or any(
        isinstance(m, dict) and (m.get("role") == "tool" or "tool_calls" in m)
        for m in record.get("messages") or ()
    )


def _tool_names(tools: object, at: str) -> set[str] | None:
    """The function names `tools` (at `at` in the line) declares (None: it has no `tools`)."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise ValueError(f"{at} must be a non-empty list of function definitions")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{at}[{i}]"
        if not isinstance(tool, dict) or set(tool) != {"type", "function"}:
            raise ValueError(f'{where} must be {{"type": "function", "function": {{...}}}}')
        if tool["type"] != "function":
            raise ValueError(f'{where}.type must be "function"; got {_show(tool["type"])}')
        function = tool["function"]
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function must be an object")
        unknown = sorted(set(function) - set(FUNCTION_KEYS))
        if unknown:
            raise ValueError(
                f"{where}.function has unknown key {_show(unknown[0])} "
                f"(allowed: {', '.join(FUNCTION_KEYS)})"
            )
        name = _name(function.get("name"), f"{where}.function.name")
        if name in names:
            raise ValueError(f"{where}.function.name {_show(name)} is declared twice")
        if "description" in function and not isinstance(function["description"], str):
            raise ValueError(f"{where}.function.description must be a string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise ValueError(f"{where}.function.parameters must be a JSON Schema object")
        names.add(name)
    return names


def _check_calls(
    calls: object, where: str, names: set[str] | None, seen: set[str], parallel: bool
) -> None:
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where} must be a non-empty list of tool calls")
    if len(calls) > 1 and not parallel:
        raise ValueError(f"{where} has {len(calls)} calls but parallel_tool_calls is false")
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        if not isinstance(call, dict) or set(call) != {"id", "type", "function"}:
            raise ValueError(f'{here} must be {{"id": ..., "type": "function", "function": ...}}')
        call_id = call["id"]
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"{here}.id must be a non-empty string")
        if call_id in seen:
            raise ValueError(f"{here}.id {_show(call_id)} is used by an earlier call")
        seen.add(call_id)
        if call["type"] != "function":
            raise ValueError(f'{here}.type must be "function"; got {_show(call["type"])}')
        function = call["function"]
        if not isinstance(function, dict) or set(function) != {"name", "arguments"}:
            raise ValueError(f'{here}.function must be {{"name": ..., "arguments": ...}}')
        name = _name(function["name"], f"{here}.function.name")
        if names is None or name not in names:
            declared = "the example has no tools" if names is None else "it is not in tools"
            raise ValueError(f"{here}.function.name {_show(name)} is not callable: {declared}")
        _check_arguments(function["arguments"], f"{here}.function.arguments")


def _check_arguments(arguments: object, where: str) -> None:
    if not isinstance(arguments, str):
        raise ValueError(f"{where} must be a string holding a JSON object; got {_kind(arguments)}")
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):  # bad JSON, a number past the digit limit, nesting
        raise ValueError(f"{where} is not valid JSON: {_show(arguments)}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where} must be a JSON object; got {_kind(parsed)}")


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string")
    return value
