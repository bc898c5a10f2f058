"""Preference records → token ids: each pair becomes two consecutive examples, the chosen
answer then the rejected one (the loop keeps them together, `preference.py`).

A record is OpenAI's preference shape (validated on upload, `app/files/preference_format.py`):
each answer is rendered as the assistant turn after `input.messages`, through the same chat
rendering as chat records (`data.encode_record`, with `input.tools` as a chat record's
`tools`), so a DPO job's prompt is tokenized exactly as a supervised job's and as inference
renders it, tool calls included. Only the answer's tokens have labels: the log-probability
DPO compares is the answer's (its content and tool calls) given the prompt (assistant turns
inside the input are context, never trained).
"""

from __future__ import annotations

from typing import Any

from app.files.preference_format import conversations
from worker.training.data import Example, encode_record


def encode_preferences(
    tokenizer: Any, records: list[dict[str, Any]], *, max_seq_length: int
) -> list[Example]:
    """[chosen 0, rejected 0, chosen 1, rejected 1, …] for the records, in order."""
    return [
        _answer(tokenizer, conversation, len(record["input"]["messages"]), max_seq_length)
        for record in records
        for conversation in conversations(record)
    ]


def _answer(
    tokenizer: Any, conversation: dict[str, Any], context: int, max_seq_length: int
) -> Example:
    """The example of a conversation's last message, the first `context` ones untrained."""
    messages = [
        {**m, "weight": 0} if i < context and m["role"] == "assistant" else m
        for i, m in enumerate(conversation["messages"])
    ]
    # the last example is the one whose trained turn is the answer (a template that renders
    # history by what follows it gives one example per trained turn: there is only this one)
    record = {**conversation, "messages": messages}
    return encode_record(tokenizer, record, max_seq_length=max_seq_length)[-1]
