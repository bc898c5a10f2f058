"""Preference (DPO) lines: OpenAI's shape accepted, each mistake named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import InvalidFile
from app.files.format import validate_jsonl_file, validate_record
from tests.tool_data import call, weather_preference

GOOD = {
    "input": {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello!"}],
    "non_preferred_output": [{"role": "assistant", "content": "What."}],
}
ANSWER = [{"role": "assistant", "content": "Hello!"}]
TOOL_REPLY = {"role": "tool", "tool_call_id": "call_1", "content": "20 C"}
USER = {"role": "user", "content": "And tomorrow?"}
TOOLS = weather_preference("Paris")


def calling(*calls: dict) -> list[dict]:
    return [{"role": "assistant", "content": "", "tool_calls": list(calls)}]


def with_arguments(arguments: str) -> dict:
    bad = call("Paris")
    bad["function"]["arguments"] = arguments
    return bad


def test_a_pair_with_tools_and_tool_calls_is_a_preference_example() -> None:
    assert validate_record(TOOLS) == "preference"
    # the input may end with a tool's result, which the outputs answer
    asked = {"role": "user", "content": "Weather?"}
    given = {
        "messages": [asked, *calling(call("Paris")), TOOL_REPLY],
        "tools": TOOLS["input"]["tools"],
    }
    assert validate_record(GOOD | {"input": given}) == "preference"


def test_openais_shape_is_a_preference_example() -> None:
    assert validate_record(GOOD) == "preference"


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"extra": 1}, "unknown key 'extra'"),
        ({"input": {"messages": GOOD["input"]["messages"], "x": []}}, "unknown key 'x'"),
        ({"input": {"messages": [{"role": "assistant", "content": "x"}]}}, "end with a user"),
        ({"input": {"messages": []}}, "input.messages must be a non-empty list"),
        ({"input": {"messages": [{"role": "user"}]}}, "input.messages[0] is missing 'content'"),
        ({"preferred_output": ANSWER * 2}, "preferred_output must be a list of exactly one"),
        ({"non_preferred_output": ANSWER}, "are the same answer"),
        ({"preferred_output": [ANSWER[0] | {"weight": 1}]}, "preferred_output[0].weight"),
        ({"non_preferred_output": [{"role": "user", "content": "x"}]}, "must be 'assistant'"),
        ({"preferred_output": [{"role": "assistant", "content": ""}]}, "must not be empty"),
        # tool use is held to a chat file's rules, named where it is in the line
        ({"preferred_output": calling(call("Paris"))}, "the example has no tools"),
        (
            {"input": {"messages": [*GOOD["input"]["messages"][:1], TOOL_REPLY, USER]}},
            "input.messages[1].tool_call_id 'call_1' matches no tool call",
        ),
    ],
)
def test_a_mistake_is_named(change: dict, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_record(GOOD | change)
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (
            {
                "non_preferred_output": calling(
                    {**call("Paris"), "function": {"name": "get_time", "arguments": "{}"}}
                )
            },
            "non_preferred_output[0].tool_calls[0].function.name 'get_time' is not callable",
        ),
        (
            {"preferred_output": calling(with_arguments("{city: Paris}"))},
            "preferred_output[0].tool_calls[0].function.arguments is not valid JSON",
        ),
        ({"non_preferred_output": TOOLS["preferred_output"]}, "are the same answer"),
        (
            {"non_preferred_output": calling(call("Paris", call_id="call_2"))},
            "are the same answer",  # the call ids aside, the two say the same
        ),
        (
            {"input": TOOLS["input"] | {"tools": []}},
            "input.tools must be a non-empty list",
        ),
        (
            {
                "input": TOOLS["input"] | {"parallel_tool_calls": False},
                "preferred_output": calling(call("Paris"), call("Oslo", "call_2")),
            },
            "preferred_output[0].tool_calls has 2 calls but parallel_tool_calls is false",
        ),
    ],
)
def test_a_tool_mistake_is_named_with_its_path(change: dict, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_record(TOOLS | change)
    assert phrase in str(info.value)


def test_a_file_mixing_chat_and_preference_lines_names_the_line(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(chat) + "\n")
    with pytest.raises(InvalidFile) as info:
        validate_jsonl_file(path, max_lines=10)
    assert info.value.line == 2 and "line 1 is a preference example" in str(info.value)
