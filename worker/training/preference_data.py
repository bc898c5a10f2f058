"""Preference records → token ids: each pair becomes two consecutive examples, the chosen
answer then the rejected one (the loop keeps them together, `preference.py`).

A record is OpenAI's preference shape (validated on upload, `app/files/preference_format.py`):
each answer is rendered as the assistant turn after `input.messages`, through the same chat
rendering as chat records (`data.encode_record`), so a DPO job's prompt is tokenized exactly
as a supervised job's and as inference renders it. Only the answer's tokens have labels: the
log-probability DPO compares is the answer's given the prompt (assistant turns inside the
input are context, never trained).
"""

from __future__ import annotations

from typing import Any

from worker.training.data import Example, encode_record


def encode_preferences(
    tokenizer: Any, records: list[dict[str, Any]], *, max_seq_length: int
) -> list[Example]:
    """[chosen 0, rejected 0, chosen 1, rejected 1, …] for the records, in order."""
    return [
        example
        for record in records
        for key in ("preferred_output", "non_preferred_output")
        for example in [_answer(tokenizer, record, key, max_seq_length)]
    ]


def _answer(tokenizer: Any, record: dict[str, Any], key: str, max_seq_length: int) -> Example:
    context = [
        {**m, "weight": 0} if m["role"] == "assistant" else m for m in record["input"]["messages"]
    ]
    messages = [*context, *record[key]]
    # the last example is the one whose trained turn is the answer (a template that renders
    # history by what follows it gives one example per trained turn: there is only this one)
    return encode_record(tokenizer, {"messages": messages}, max_seq_length=max_seq_length)[-1]
