"""Reading replies as tool calls (app/inference/tool_calls.py): the trained layout becomes
calls, anything unparsable stays content whole, and a stream sends the same content."""

from __future__ import annotations

import json

import pytest

from app.inference.tool_calls import ToolCallStream, parse_reply

NAMES = {"get_weather", "get_time"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_call_in_the_trained_layout_is_read() -> None:
    reply = parse_reply(CALL, NAMES)
    assert reply is not None and reply.content is None
    [call] = reply.calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and len(call.id) > len("call_")


def test_content_before_parallel_calls_is_kept() -> None:
    time = '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
    reply = parse_reply(f"Checking both.\n{CALL}\n{time}\n", NAMES)
    assert reply is not None and reply.content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in reply.calls}) == 2


UNPARSABLE = {
    "plain": "It is sunny.",
    "broken-json": '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>',
    "unknown-function": '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
    "arguments-not-an-object": '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
    "unclosed": CALL.removesuffix("</tool_call>"),
    "text-after-the-call": CALL + " and then some",
    "extra-keys": '<tool_call>{"name": "get_time", "arguments": {}, "x": 1}</tool_call>',
}


@pytest.mark.parametrize("text", UNPARSABLE.values(), ids=UNPARSABLE.keys())
def test_anything_unparsable_stays_content(text: str) -> None:
    assert parse_reply(text, NAMES) is None
    stream = ToolCallStream(NAMES)
    sent = "".join(stream.feed(piece) for piece in _pieces(text))
    rest, reply = stream.finish()
    assert reply is None and sent + rest == text


@pytest.mark.parametrize("text", [CALL, "Let me look.  \n" + CALL, "A <tool of my own. " + CALL])
def test_a_stream_sends_exactly_the_content_and_then_the_calls(text: str) -> None:
    whole = parse_reply(text, NAMES)
    assert whole is not None
    stream = ToolCallStream(NAMES)
    sent = "".join(stream.feed(piece) for piece in _pieces(text))
    rest, reply = stream.finish()
    assert rest == "" and reply is not None
    assert sent == (whole.content or "")
    assert [(c.name, c.arguments) for c in reply.calls] == [
        (c.name, c.arguments) for c in whole.calls
    ]


def test_a_stream_holds_back_only_what_may_start_a_call() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed("Hello") == "Hello"
    assert stream.feed(" wor") == " wor"
    assert stream.feed("ld <tool") == "ld"  # " <tool" may begin a call
    assert stream.feed("s>") == " <tools>"


def _pieces(text: str) -> list[str]:
    """`text` in pieces of 3 characters, as a model streams it a token or so at a time."""
    return [text[i : i + 3] for i in range(0, len(text), 3)]
