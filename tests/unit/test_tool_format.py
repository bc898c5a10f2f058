"""Function-calling examples on upload (app/files/tool_format.py): the accepted shape, and
each mistake a careless file makes, named by line and field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from app.errors import InvalidFile
from app.files.format import DatasetSummary, validate_jsonl_file
from tests.tool_data import WEATHER_TOOL, call, weather_example

GOOD = weather_example("Paris")


def write(tmp_path: Path, *rows: dict) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def broken(change) -> dict:
    row = copy.deepcopy(GOOD)
    change(row)
    return row


def test_openai_function_calling_example_is_accepted(tmp_path: Path) -> None:
    parallel = broken(lambda r: r["messages"][1]["tool_calls"].append(call("Oslo", "call_2")))
    parallel["messages"].insert(3, {"role": "tool", "tool_call_id": "call_2", "content": "9C"})
    rows = [GOOD, weather_example("Oslo", weight=0) | {"parallel_tool_calls": False}, parallel]
    assert validate_jsonl_file(write(tmp_path, *rows), max_lines=10) == DatasetSummary(3, "chat")


def _arguments(value: object):
    return lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments=value)


MISTAKES = [
    (
        "arguments-not-json",
        _arguments("{city: Paris}"),
        "messages[1].tool_calls[0].function.arguments is not valid JSON: '{city: Paris}'",
    ),
    (
        "arguments-an-object-not-a-string",
        _arguments({"city": "Paris"}),
        "messages[1].tool_calls[0].function.arguments must be a string holding a JSON object",
    ),
    (
        "arguments-a-json-array",
        _arguments("[1]"),
        "messages[1].tool_calls[0].function.arguments must be a JSON object; got an array",
    ),
    (
        "tool-message-without-matching-call",
        lambda r: r["messages"][2].update(tool_call_id="call_9"),
        "messages[2].tool_call_id 'call_9' matches no tool call of an earlier assistant message",
    ),
    (
        "tool-message-before-its-call",
        lambda r: r["messages"].insert(
            1, {"role": "tool", "tool_call_id": "call_1", "content": ""}
        ),
        "messages[1].tool_call_id 'call_1' matches no tool call",
    ),
    (
        "function-not-in-tools",
        lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_time"),
        "messages[1].tool_calls[0].function.name 'get_time' is not callable: it is not in tools",
    ),
    (
        "call-without-tools",
        lambda r: r.pop("tools"),
        "function.name 'get_weather' is not callable: the example has no tools",
    ),
    (
        "two-calls-but-not-parallel",
        lambda r: (
            r["messages"][1]["tool_calls"].append(call("Oslo", "call_2")),
            r.update(parallel_tool_calls=False),
        ),
        "messages[1].tool_calls has 2 calls but parallel_tool_calls is false",
    ),
    (
        "call-id-reused",
        lambda r: r["messages"][1]["tool_calls"].append(call("Oslo", "call_1")),
        "messages[1].tool_calls[1].id 'call_1' is used by an earlier call",
    ),
    (
        "tool-calls-on-a-user-message",
        lambda r: r["messages"][0].update(tool_calls=[call("Paris", "call_0")]),
        "messages[0].tool_calls is only allowed on assistant messages",
    ),
    (
        "tool-type-not-function",
        lambda r: r["tools"][0].update(type="retrieval"),
        "tools[0].type must be \"function\"; got 'retrieval'",
    ),
    (
        "tool-declared-twice",
        lambda r: r["tools"].append(WEATHER_TOOL),
        "tools[1].function.name 'get_weather' is declared twice",
    ),
    ("tools-empty", lambda r: r.update(tools=[]), "tools must be a non-empty list"),
    (
        "parallel-not-boolean",
        lambda r: r.update(parallel_tool_calls="yes"),
        "parallel_tool_calls must be true or false; got 'yes'",
    ),
]


@pytest.mark.parametrize(
    ("change", "phrase"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_mistake_is_named_by_line_and_field(tmp_path: Path, change, phrase: str) -> None:
    with pytest.raises(InvalidFile) as info:
        validate_jsonl_file(write(tmp_path, GOOD, broken(change)), max_lines=10)
    assert info.value.line == 2
    assert phrase in str(info.value), str(info.value)
