"""Reading a model's reply as tool calls, in the layout the fallback template trains.

The Hermes / Qwen layout (`app/ml/chat.py`): optional content, then one or more
`<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks, nothing but white space
between and after them. A reply is tool calls only when every block is a JSON object
naming a function of the request's `tools` with an object of arguments; anything else
(a broken block, an unknown function, text after a call) stays plain content, whole.

`ToolCallStream` does the same on a stream: content goes out as it comes, but for what
could still be the start of a call (trailing white space, a partial `<tool_call>`), which
is held back; from the first `<tool_call>` on, everything waits for the end of the reply.
Pure Python: the API and the tests use it without torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass

from app.ids import new_id

OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    id: str  # call_…, as OpenAI names calls
    name: str
    arguments: str  # a JSON object, as a string


@dataclass(frozen=True)
class ToolReply:
    content: str | None  # what the model said before its calls, if anything
    calls: list[ParsedCall]


def parse_reply(text: str, names: Collection[str]) -> ToolReply | None:
    """`text` as tool calls to functions in `names`, or None (it is plain content)."""
    start = text.find(OPEN)
    if start < 0:
        return None
    calls: list[ParsedCall] = []
    end = start
    for block in _BLOCK.finditer(text, start):
        call = _call(block.group(1), names)
        if text[end : block.start()].strip() or call is None:
            return None
        calls.append(call)
        end = block.end()
    if not calls or text[end:].strip():
        return None
    return ToolReply(text[:start].rstrip() or None, calls)


def _call(body: str, names: Collection[str]) -> ParsedCall | None:
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not set(call) <= {"name", "arguments"}:
        return None
    name, arguments = call.get("name"), call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    return ParsedCall(new_id("call", sep="_"), name, json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """A streamed reply's content, sent as soon as it cannot be part of a tool call."""

    def __init__(self, names: Collection[str]):
        self._names = names
        self._text = ""
        self._sent = 0  # characters of `_text` already sent as content
        self._calling = False  # a `<tool_call>` has begun

    def feed(self, text: str) -> str:
        """Take the next piece of the reply; return the content that can go out now."""
        self._text += text
        if self._calling:
            return ""
        start = self._text.find(OPEN)
        if start >= 0:
            self._calling = True
            safe = len(self._text[:start].rstrip())
        else:
            safe = _safe_end(self._text)
        piece = self._text[self._sent : max(safe, self._sent)]
        self._sent = max(safe, self._sent)
        return piece

    def finish(self) -> tuple[str, ToolReply | None]:
        """At the end of the reply: (content still to send, the tool calls or None).

        With tool calls, the content sent is exactly `ToolReply.content`."""
        reply = parse_reply(self._text, self._names)
        rest = "" if reply is not None else self._text[self._sent :]
        self._sent = len(self._text)
        return rest, reply


def _safe_end(text: str) -> int:
    """How much of `text` (with no `<tool_call>` in it) cannot start a call: all but a
    trailing partial `<tool_call>` and the white space before it."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:size]):
            text = text[:-size]
            break
    return len(text.rstrip())
