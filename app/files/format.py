"""Validation of uploaded JSONL training files: one example per line, line-numbered errors.

Pure Python (no torch): the API runs it on every upload before the file is stored.

A file holds one JSON object per line, all of the same format:

* ``chat``:       ``{"messages": [{"role": ..., "content": ...}, ...]}``. Roles are ``system``,
  ``user``, ``assistant`` and ``tool``; ``content`` is a string (non-empty for user and
  assistant, except an assistant message with ``tool_calls``, whose content may be empty,
  null or absent);
  ``name`` (string) is optional; ``weight`` (the integer 0 or 1) is allowed on assistant
  messages only and says whether that turn is trained on. At least one assistant message,
  and at least one with weight 1 (the default). Function calling (top-level ``tools`` and
  ``parallel_tool_calls``, ``tool_calls`` and ``tool_call_id`` in messages) is checked by
  `app.files.tool_format`.
* ``completion``: ``{"prompt": str, "completion": str}``, the completion non-empty.
* ``text``:       ``{"text": str}``, non-empty.
* ``preference``: OpenAI's DPO shape, ``{"input": {"messages": [...], "tools"?: [...]},
  "preferred_output": [assistant message], "non_preferred_output": [assistant message]}``
  (``preference_format.py``; function calling checked by `app.files.tool_format`).

Unknown keys are refused and named, at the top level and inside messages (so other roles
and fields are refused rather than silently dropped).

The file is read in binary, one line at a time, so memory stays flat however large it is;
lines are split on ``\\n`` only (a U+2028 inside a JSON string is not a line break).
Rules on the bytes:

* UTF-8 only. A UTF-8 byte-order mark at the start is refused (remove it); UTF-16 is refused.
* Lines may end in ``\\r\\n`` (Windows): the ``\\r`` is JSON whitespace and is accepted.
  This is deliberate: the JSON Lines format (jsonlines.org) allows it, since white space
  around a JSON value is ignored, and refusing it would only make Windows users re-save
  valid data; the bytes are stored as uploaded and the trainer parses them the same way.
  A bare ``\\r`` as the line separator (classic Mac) is not a line break, so such a file
  is one long line and is refused at line 1.
* A blank line between examples is an error; blank lines at the very end are tolerated,
  and the last line need not end in a newline.
* JSON extensions Python would accept (``NaN``, ``Infinity``) and duplicate keys are refused,
  as are strings that cannot be encoded as UTF-8 (lone ``\\udXXX`` surrogate escapes).

The whole upload is size-capped by the API while it streams; each line is capped here
(``max_line_bytes``, default 1 MiB), so one huge line is refused without being held whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from app.errors import InvalidFile

CHAT, COMPLETION, TEXT, PREFERENCE = "chat", "completion", "text", "preference"
PREFERENCE_KEYS = frozenset({"preferred_output", "non_preferred_output"})
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_BLANK = b" \t\r\n"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHOWN_CHARS = 40
MAX_LINE_BYTES = 1024 * 1024  # default cap on one example (LORAFORGE_MAX_LINE_BYTES)
# Shown whenever a line (or a file) has none of the accepted shapes, so the fix is in the error.
LINE_SHAPES = (
    "each line must be one JSON object of one of these shapes: "
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    ', {"prompt": "...", "completion": "..."} or {"text": "..."}'
)
# A DPO job's line (preference_format.py); the file error names it for DPO jobs only.
PREFERENCE_SHAPE = (
    '{"input": {"messages": [{"role": "user", "content": "..."}]}, '
    '"preferred_output": [{"role": "assistant", "content": "..."}], '
    '"non_preferred_output": [{"role": "assistant", "content": "..."}]}'
)


@dataclass(frozen=True)
class DatasetSummary:
    examples: int
    format: str  # "chat" | "completion" | "text" | "preference"


class _JsonRefused(ValueError):
    """Valid to Python's json module, but not something we take (NaN, duplicate keys)."""


def validate_jsonl_file(
    path: Path, *, max_lines: int, max_line_bytes: int = MAX_LINE_BYTES
) -> DatasetSummary:
    """Check every line of `path`; raise `InvalidFile` naming the first bad line (1-based).

    At most `max_lines` examples of at most `max_line_bytes` bytes each. Reads in binary,
    one line at a time, never more than `max_line_bytes` + 1 bytes of a line.
    """
    examples, first_format, pending_blank = 0, "", None
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(_lines(f, max_line_bytes), start=1):
            if lineno == 1:
                _check_file_start(raw)
            if not raw.strip(_BLANK):
                pending_blank = pending_blank or lineno
                continue
            if pending_blank is not None:
                raise InvalidFile(
                    "blank line; remove empty lines between examples", line=pending_blank
                )
            examples += 1
            if examples > max_lines:
                raise InvalidFile(f"too many examples: the limit is {max_lines}", line=lineno)
            fmt = _validate_line(raw, lineno)
            if not first_format:
                first_format = fmt
            elif fmt != first_format:
                raise InvalidFile(
                    f"this is a {fmt} example but line 1 is a {first_format} example; "
                    "all lines of a file must have the same format",
                    line=lineno,
                )
    if examples == 0:
        raise InvalidFile("the file contains no examples")
    return DatasetSummary(examples=examples, format=first_format)


def _lines(f: BinaryIO, max_line_bytes: int) -> Iterator[bytes]:
    """The file's lines, refusing one longer than `max_line_bytes` before reading it all."""
    lineno = 0
    while raw := f.readline(max_line_bytes + 1):
        lineno += 1
        if len(raw.rstrip(b"\r\n")) > max_line_bytes:
            raise InvalidFile(
                f"line is longer than {max_line_bytes} bytes; split or shorten the example",
                line=lineno,
            )
        yield raw


def _check_file_start(raw: bytes) -> None:
    if raw.startswith(_BOM):
        raise InvalidFile(
            "the file starts with a UTF-8 byte-order mark; remove the byte-order mark", line=1
        )
    if raw.startswith(_UTF16_BOMS):
        raise InvalidFile("the file is UTF-16 encoded; save it as UTF-8", line=1)


def _validate_line(raw: bytes, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidFile(
            f"invalid UTF-8 at byte {e.start + 1} of the line; save the file as UTF-8",
            line=lineno,
        ) from None
    try:
        record = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError as e:
        message = f"invalid JSON: {e.msg} (column {e.colno})"
        raise InvalidFile(message + _shape_hint(text), line=lineno) from None
    except RecursionError:
        raise InvalidFile("invalid JSON: nested too deeply", line=lineno) from None
    except _JsonRefused as e:
        raise InvalidFile(f"invalid JSON: {e}", line=lineno) from None
    except ValueError:  # int() refuses numbers past sys.get_int_max_str_digits()
        raise InvalidFile("invalid JSON: a number has too many digits", line=lineno) from None
    try:
        return validate_record(record)
    except ValueError as e:
        raise InvalidFile(str(e), line=lineno) from None


def _shape_hint(text: str) -> str:
    """For a line that is not even trying to be a JSON object: what a line must look like."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return ""  # a broken object: the column says where
    csv_like = any(separator in stripped for separator in (",", "\t", ";"))
    return ("; this looks like CSV, not JSON Lines: " if csv_like else "; ") + LINE_SHAPES


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JsonRefused(f"duplicate key {_show(key)}")
            seen.add(key)
    return obj


def _constant(name: str) -> object:
    raise _JsonRefused(f"{name} is not valid JSON")


def validate_record(record: object) -> str:
    """Return the format ("chat", "completion", "text" or "preference") of one parsed line.

    Raises ValueError with a message a user can act on (no line number).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{LINE_SHAPES}; got {_kind(record)}")
    # A preference line by its outputs, or by an `input` object; `{"input": "…", "output":
    # "…"}`, a shape other services use, gets the list of the shapes we accept instead.
    if PREFERENCE_KEYS & record.keys() or isinstance(record.get("input"), dict):
        from app.files.preference_format import check_preference  # it uses this module's checks

        check_preference(record)
        return PREFERENCE
    if "messages" in record:
        from app.files.tool_format import TOOL_KEYS, check_tool_use  # it imports this module

        _check_keys(record, required=("messages",), optional=TOOL_KEYS, what="a chat example")
        _check_messages(record["messages"])
        check_tool_use(record)
        return CHAT
    if "prompt" in record or "completion" in record:
        _check_keys(record, required=("prompt", "completion"), what="a prompt/completion example")
        _check_string(record["prompt"], "prompt", allow_empty=True)
        _check_string(record["completion"], "completion", allow_empty=False)
        return COMPLETION
    if "text" in record:
        _check_keys(record, required=("text",), what="a text example")
        _check_string(record["text"], "text", allow_empty=False)
        return TEXT
    got = f"keys {_names(record)}" if record else "an empty object"
    raise ValueError(f"unrecognised example: {LINE_SHAPES}; got {got}")


def _check_keys(
    record: dict[str, Any], *, required: tuple[str, ...], what: str, optional: tuple[str, ...] = ()
) -> None:
    allowed = " and ".join(repr(k) for k in required)
    unknown = [k for k in record if k not in required + optional]
    if unknown:
        word = "key" if len(unknown) == 1 else "keys"
        also = f" (and optionally {_names(optional)})" if optional else ""
        raise ValueError(f"unknown {word} {_names(unknown)}: {what} has only {allowed}{also}")
    for key in required:
        if key not in record:
            raise ValueError(f"missing key {key!r}: {what} needs {allowed}")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of messages; got {_kind(messages)}")
    if not messages:
        raise ValueError("messages must not be empty")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise ValueError("messages must contain at least one assistant message")
    if all(m.get("weight", 1) == 0 for m in assistants):
        raise ValueError("every assistant message has weight 0: there is nothing to train on")


def _check_message(message: object, where: str) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object; got {_kind(message)}")
    unknown = [k for k in message if k not in MESSAGE_KEYS]
    if unknown:
        word = "key" if len(unknown) == 1 else "keys"
        raise ValueError(
            f"{where} has unknown {word} {_names(unknown)} (allowed: {', '.join(MESSAGE_KEYS)})"
        )
    if "role" not in message:
        raise ValueError(f"{where} is missing 'role'")
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}; got {_show(role)}")
    calls = "tool_calls" in message
    if calls and role != "assistant":
        raise ValueError(f"{where}.tool_calls is only allowed on assistant messages")
    if "tool_call_id" in message and role != "tool":
        raise ValueError(f"{where}.tool_call_id is only allowed on tool messages")
    if calls and message.get("content") in (None, ""):
        pass  # a pure tool call: nothing said besides the call
    elif "content" not in message:
        raise ValueError(f"{where} is missing 'content'")
    else:
        content = message["content"]
        if isinstance(content, list):
            raise ValueError(f"{where}.content must be a string; content parts are not supported")
        _check_string(content, f"{where}.content", allow_empty=role in ("system", "tool"))
    if "name" in message:
        _check_string(message["name"], f"{where}.name", allow_empty=False)
    if "weight" in message:
        if role != "assistant":
            raise ValueError(f"{where}.weight is only allowed on assistant messages")
        weight = message["weight"]
        if type(weight) is not int or weight not in (0, 1):
            raise ValueError(f"{where}.weight must be 0 or 1; got {_show(weight)}")


def _check_string(value: object, where: str, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string; got {_kind(value)}")
    if not value and not allow_empty:
        raise ValueError(f"{where} must not be empty")
    if _SURROGATE.search(value):
        raise ValueError(f"{where} contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)")


def _kind(value: object) -> str:
    """The JSON type of `value`, as a user would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show(value: object) -> str:
    """A short display of a bad value: quoted if a string (truncated), else its JSON text."""
    if isinstance(value, str):
        if len(value) > _SHOWN_CHARS:
            value = value[:_SHOWN_CHARS] + "…"
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return _kind(value)


def _names(keys: Iterable[str]) -> str:
    return ", ".join(_show(k) for k in keys)
