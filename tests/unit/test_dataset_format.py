"""JSONL training-file validation: accepted shapes, line-numbered errors, streaming."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from app.errors import InvalidFile
from app.files.format import DatasetSummary, validate_jsonl_file, validate_record

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
CHAT = {"messages": [USER, ASSISTANT]}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "once upon a time"}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def chat(*messages: dict, **top: object) -> bytes:
    return line({"messages": list(messages), **top})


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    return path


# --- accepted files -------------------------------------------------------------------------


def test_chat_file_with_every_optional_field(tmp_path: Path) -> None:
    data = (
        chat(
            {"role": "system", "content": ""},
            USER,
            {**ASSISTANT, "weight": 0, "name": "bot"},
            {**USER, "name": "ann"},
            {**ASSISTANT, "weight": 1},
        )
        + line(CHAT)
        + chat(USER, ASSISTANT, USER)  # the last message need not be the assistant's
    )
    assert validate_jsonl_file(write(tmp_path, data), max_lines=10) == DatasetSummary(3, "chat")


def test_completion_file_allows_an_empty_prompt(tmp_path: Path) -> None:
    data = line(COMPLETION) + line({"prompt": "", "completion": "x"})
    summary = validate_jsonl_file(write(tmp_path, data), max_lines=10)
    assert summary == DatasetSummary(examples=2, format="completion")


def test_text_file_without_final_newline(tmp_path: Path) -> None:
    data = line(TEXT) * 2 + json.dumps(TEXT).encode()
    assert validate_jsonl_file(write(tmp_path, data), max_lines=10) == DatasetSummary(3, "text")


def test_crlf_line_endings_and_trailing_blank_lines_are_accepted(tmp_path: Path) -> None:
    data = line(TEXT).replace(b"\n", b"\r\n") * 3 + b"\r\n\n  \n"
    assert validate_jsonl_file(write(tmp_path, data), max_lines=3) == DatasetSummary(3, "text")


def test_unicode_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    data = json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False).encode() + b"\n"
    assert validate_jsonl_file(write(tmp_path, data), max_lines=1) == DatasetSummary(1, "text")


def test_exactly_max_lines_examples_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, line(TEXT) * 5)
    assert validate_jsonl_file(path, max_lines=5).examples == 5


@pytest.mark.parametrize(
    ("record", "fmt"), [(CHAT, "chat"), (COMPLETION, "completion"), (TEXT, "text")]
)
def test_validate_record_returns_the_format(record: dict, fmt: str) -> None:
    assert validate_record(record) == fmt


def test_validate_record_raises_value_error_without_a_line_number() -> None:
    with pytest.raises(ValueError, match=r"^messages\[1\]\.role must be one of") as info:
        validate_record({"messages": [USER, {"role": "bot", "content": "x"}]})
    assert not isinstance(info.value, InvalidFile)


# --- malformed files: (id, bytes, line, phrase, max_lines) ---------------------------------

BAD_FILES = [
    ("bom", b"\xef\xbb\xbf" + line(TEXT), 1, "remove the byte-order mark"),
    ("utf16", json.dumps(TEXT).encode("utf-16"), 1, "UTF-16"),
    ("bad-utf8", line(TEXT) + b'{"text": "caf\xe9"}\n', 2, "invalid UTF-8 at byte 14"),
    (
        "json-single-quotes",
        line(TEXT) * 2 + b"{\"text\": 'a'}\n",
        3,
        "invalid JSON: Expecting value (column 10)",
    ),
    ("json-truncated", line(TEXT) + b'{"text": "a"\n', 2, "invalid JSON: Expecting ','"),
    ("cr-only-separators", line(TEXT).replace(b"\n", b"\r") * 2, 1, "invalid JSON: Extra data"),
    ("nan", b'{"text": NaN}\n', 1, "NaN is not valid JSON"),
    ("duplicate-key", b'{"text": "a", "text": "b"}\n', 1, "duplicate key 'text'"),
    ("huge-number", b'{"text": 1' + b"1" * 5000 + b"}\n", 1, "too many digits"),
    ("deep-nesting", b"[" * 100_000 + b"\n", 1, "nested too deeply"),
    ("array", line(TEXT) + line(["a"]), 2, '{"text": "..."}; got an array'),
    ("string", line("hello"), 1, '{"text": "..."}; got a string'),
    ("empty-object", line({}), 1, "got an empty object"),
    ("unrecognised", line({"question": "x", "output": "y"}), 1, "got keys 'question', 'output'"),
    ("input-output", line({"input": "x", "output": "y"}), 1, "got keys 'input', 'output'"),
    ("blank-middle", line(TEXT) + b"\n" + line(TEXT), 2, "blank line"),
    ("whitespace-middle", line(TEXT) * 2 + b" \t\r\n\n" + line(TEXT), 3, "blank line"),
    ("blank-first", b"\n" + line(TEXT), 1, "blank line"),
    (
        "messages-string",
        line({"messages": "hi"}),
        1,
        "messages must be a list of messages; got a string",
    ),
    ("messages-empty", line({"messages": []}), 1, "messages must not be empty"),
    ("message-string", chat("hi"), 1, "messages[0] must be an object; got a string"),
    (
        "role-bot",
        chat(USER, ASSISTANT, {"role": "bot", "content": "x"}),
        1,
        "messages[2].role must be one of system, user, assistant, tool; got 'bot'",
    ),
    (
        "tool-message-without-call",
        chat(USER, ASSISTANT, {"role": "tool", "content": "x"}),
        1,
        "messages[2].tool_call_id must be the id of a tool call",
    ),
    (
        "role-number",
        chat({"role": 3, "content": "x"}, ASSISTANT),
        1,
        "messages[0].role must be one of system, user, assistant, tool; got 3",
    ),
    ("role-missing", chat(USER, {"content": "x"}), 1, "messages[1] is missing 'role'"),
    ("content-missing", chat({"role": "user"}, ASSISTANT), 1, "messages[0] is missing 'content'"),
    (
        "content-null",
        chat(USER, {"role": "assistant", "content": None}),
        1,
        "messages[1].content must be a string; got null",
    ),
    (
        "content-parts",
        chat({"role": "user", "content": [{"type": "text", "text": "hi"}]}, ASSISTANT),
        1,
        "messages[0].content must be a string; content parts are not supported",
    ),
    (
        "user-content-empty",
        chat({"role": "user", "content": ""}, ASSISTANT),
        1,
        "messages[0].content must not be empty",
    ),
    (
        "assistant-content-empty",
        chat(USER, {"role": "assistant", "content": ""}),
        1,
        "messages[1].content must not be empty",
    ),
    (
        "message-unknown-key",
        chat(USER, {**ASSISTANT, "function_call": {}}),
        1,
        "messages[1] has unknown key 'function_call'",
    ),
    (
        "top-level-tools",
        chat(USER, ASSISTANT, functions=[]),
        1,
        "unknown key 'functions': a chat example has only 'messages' (and optionally 'tools',",
    ),
    (
        "no-assistant",
        chat({"role": "system", "content": "s"}, USER),
        1,
        "at least one assistant message",
    ),
    (
        "weight-on-user",
        chat({**USER, "weight": 1}, ASSISTANT),
        1,
        "messages[0].weight is only allowed on assistant messages",
    ),
    (
        "weight-2",
        chat(USER, {**ASSISTANT, "weight": 2}),
        1,
        "messages[1].weight must be 0 or 1; got 2",
    ),
    ("weight-bool", chat(USER, {**ASSISTANT, "weight": True}), 1, "must be 0 or 1; got true"),
    ("weight-float", chat(USER, {**ASSISTANT, "weight": 1.0}), 1, "must be 0 or 1; got 1.0"),
    ("weights-all-zero", chat(USER, {**ASSISTANT, "weight": 0}), 1, "nothing to train on"),
    (
        "name-number",
        chat({**USER, "name": 7}, ASSISTANT),
        1,
        "messages[0].name must be a string; got a number",
    ),
    ("completion-missing", line(COMPLETION) + line({"prompt": "p"}), 2, "missing key 'completion'"),
    ("prompt-missing", line({"completion": "c"}), 1, "missing key 'prompt'"),
    ("completion-extra-key", line({**COMPLETION, "extra": 1}), 1, "unknown key 'extra'"),
    (
        "completion-empty",
        line({"prompt": "p", "completion": ""}),
        1,
        "completion must not be empty",
    ),
    (
        "prompt-number",
        line({"prompt": 1, "completion": "c"}),
        1,
        "prompt must be a string; got a number",
    ),
    ("text-empty", line({"text": ""}), 1, "text must not be empty"),
    ("text-null", line({"text": None}), 1, "text must be a string; got null"),
    ("text-extra-keys", line({**TEXT, "meta": 1, "id": 2}), 1, "unknown keys 'meta', 'id'"),
    ("lone-surrogate", b'{"text": "a\\ud800"}\n', 1, "unpaired UTF-16 surrogate"),
    (
        "mixed-chat-text",
        line(CHAT) * 2 + line(TEXT),
        3,
        "this is a text example but line 1 is a chat example",
    ),
    (
        "mixed-text-completion",
        line(TEXT) + line(COMPLETION),
        2,
        "this is a completion example but line 1 is a text example",
    ),
    (
        "first-bad-line-wins",
        line(TEXT) + line({"text": ""}) + b"{oops\n",
        2,
        "text must not be empty",
    ),
    ("too-many", line(TEXT) * 4, 4, "too many examples: the limit is 3"),
]


@pytest.mark.parametrize(
    ("data", "lineno", "phrase"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_malformed_file_names_the_line(
    tmp_path: Path, data: bytes, lineno: int, phrase: str
) -> None:
    with pytest.raises(InvalidFile) as info:
        validate_jsonl_file(write(tmp_path, data), max_lines=3)
    assert info.value.line == lineno
    assert str(info.value).startswith(f"line {lineno}: ")
    assert phrase in str(info.value)


@pytest.mark.parametrize("data", [b"", b"\n", b"\n \r\n\t\n"], ids=["empty", "newline", "blanks"])
def test_file_without_examples_has_no_line_number(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InvalidFile) as info:
        validate_jsonl_file(write(tmp_path, data), max_lines=3)
    assert info.value.line is None
    assert str(info.value) == "the file contains no examples"


# --- large files --------------------------------------------------------------------------


def test_large_file_is_counted_and_its_last_line_checked(tmp_path: Path) -> None:
    good = chat({"role": "system", "content": "be brief"}, USER, ASSISTANT)
    path = write(tmp_path, good * 50_000)
    assert validate_jsonl_file(path, max_lines=50_000) == DatasetSummary(50_000, "chat")

    with pytest.raises(InvalidFile, match=r"^line 50000: too many examples"):
        validate_jsonl_file(path, max_lines=49_999)

    path.write_bytes(good * 49_999 + chat(USER))
    with pytest.raises(InvalidFile, match=r"^line 50000: messages must contain at least one"):
        validate_jsonl_file(path, max_lines=50_000)


def test_validation_streams_instead_of_reading_the_whole_file(tmp_path: Path) -> None:
    body = "x" * 500
    path = write(tmp_path, line({"text": body}) * 20_000)  # ~10 MB
    tracemalloc.start()
    try:
        summary = validate_jsonl_file(path, max_lines=20_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary == DatasetSummary(20_000, "text")
    assert peak < 1024 * 1024, f"peak {peak} bytes: the file was not streamed"
