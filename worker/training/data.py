"""Dataset records → token ids and loss masks. Pure: no DB, no Celery.

Three record shapes are supported, one per JSONL line:

- chat: `{"messages": [...], "tools": [...]?}` — rendered with `render_examples` (the
  tools through the template's `tools` argument); loss only on assistant replies, tool
  calls included (and not on those with `weight: 0`). Each segment is tokenized with
  `encode_rendered` (no special tokens added), exactly as inference's `prompt_ids`.
  One example per record, except where the chat template renders history by what follows
  it (Qwen 3's drops earlier reasoning): one example per trained assistant turn.
- completion: `{"prompt": ..., "completion": ...}` — the prompt is tokenized with the
  tokenizer's default special tokens (BOS if it adds one) and masked; the completion
  plus EOS is trained on. Inference tokenizes completion prompts the same way.
- text: `{"text": ...}` — default special tokens, plus EOS; every token is trained on.

What users wrote is always plain text: a special token's string in a message, prompt,
completion or text is split into ordinary tokens (`app/ml/special_tokens.py`); only the
chat template's structure and the EOS added here are control tokens.

`train_on_inputs=True` trains chat and completion records on every token too (the default,
False, is the rule above; `text` is always trained on everywhere).

Sequences are truncated to `max_seq_length` (the tail is dropped); `Example.truncated`
says so, and the job runner reports how many were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidFile
from app.ml.chat import Segment, render_examples
from app.ml.special_tokens import encode_plain, encode_rendered

IGNORE_INDEX = -100  # label value for tokens without loss (PyTorch's cross_entropy default)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is computed
    truncated: bool = False  # it was longer than max_seq_length


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file into records; blank lines are skipped, errors name the line."""
    records: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidFile(f"invalid JSON: {error.msg}", line=number) from error
            if not isinstance(record, dict):
                raise InvalidFile("each line must be a JSON object", line=number)
            records.append(record)
    return records


def encode_record(
    tokenizer: Any,
    record: dict[str, Any],
    *,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> list[Example]:
    """Token ids and labels for one record: its examples (see the module docstring)."""
    if "messages" in record:
        encoded = [
            _encode_chat(tokenizer, e)
            for e in render_examples(tokenizer, record["messages"], record.get("tools"))
        ]
    elif "prompt" in record and "completion" in record:
        encoded = [_encode_completion(tokenizer, record["prompt"], record["completion"])]
    elif "text" in record:
        input_ids = _ids(tokenizer, record["text"], special=True) + _eos(tokenizer)
        encoded = [(input_ids, list(input_ids))]
    else:
        raise InvalidFile("a record needs 'messages', 'prompt' and 'completion', or 'text'")
    return [
        Example(
            input_ids=input_ids[:max_seq_length],
            labels=(input_ids if train_on_inputs else labels)[:max_seq_length],
            truncated=len(input_ids) > max_seq_length,
        )
        for input_ids, labels in encoded
    ]


def encode_dataset(
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> list[Example]:
    """Encode every record, in order (a record's examples in turn order)."""
    return [
        example
        for r in records
        for example in encode_record(
            tokenizer, r, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs
        )
    ]


def _encode_chat(tokenizer: Any, segments: list[Segment]) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = encode_rendered(tokenizer, segment.text)
        input_ids += ids
        labels += ids if segment.trainable else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _encode_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = _ids(tokenizer, prompt, special=True)
    completion_ids = _ids(tokenizer, completion, special=False) + _eos(tokenizer)
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return prompt_ids + completion_ids, labels


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return encode_plain(tokenizer, text, add_special_tokens=special)


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
