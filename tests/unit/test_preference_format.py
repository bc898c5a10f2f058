"""Preference (DPO) lines: OpenAI's shape accepted, each mistake named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import InvalidFile
from app.files.format import validate_jsonl_file, validate_record

GOOD = {
    "input": {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello!"}],
    "non_preferred_output": [{"role": "assistant", "content": "What."}],
}
ANSWER = [{"role": "assistant", "content": "Hello!"}]
TOOL_REPLY = {"role": "tool", "tool_call_id": "call_1", "content": "20 C"}
USER = {"role": "user", "content": "And tomorrow?"}


def test_openais_shape_is_a_preference_example() -> None:
    assert validate_record(GOOD) == "preference"


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"extra": 1}, "unknown key 'extra'"),
        ({"input": {"messages": GOOD["input"]["messages"], "tools": []}}, "unknown key 'tools'"),
        ({"input": {"messages": [{"role": "assistant", "content": "x"}]}}, "end with a user"),
        ({"input": {"messages": []}}, "input.messages must be a non-empty list"),
        ({"input": {"messages": [{"role": "user"}]}}, "input.messages[0] is missing 'content'"),
        ({"preferred_output": ANSWER * 2}, "preferred_output must be a list of exactly one"),
        ({"non_preferred_output": ANSWER}, "are the same answer"),
        ({"preferred_output": [ANSWER[0] | {"weight": 1}]}, "preferred_output[0].weight"),
        ({"non_preferred_output": [{"role": "user", "content": "x"}]}, "must be 'assistant'"),
        ({"preferred_output": [{"role": "assistant", "content": ""}]}, "must not be empty"),
        # tool use trains in supervised jobs only (the DPO path renders plain turns)
        ({"preferred_output": [ANSWER[0] | {"tool_calls": []}]}, "tool calls are not supported"),
        (
            {"input": {"messages": [*GOOD["input"]["messages"][:1], TOOL_REPLY, USER]}},
            "input.messages[1]: tool calls are not supported",
        ),
    ],
)
def test_a_mistake_is_named(change: dict, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_record(GOOD | change)
    assert phrase in str(info.value)


def test_a_file_mixing_chat_and_preference_lines_names_the_line(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(chat) + "\n")
    with pytest.raises(InvalidFile) as info:
        validate_jsonl_file(path, max_lines=10)
    assert info.value.line == 2 and "line 1 is a preference example" in str(info.value)
