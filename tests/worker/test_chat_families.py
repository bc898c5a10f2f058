"""Chat data in each family's format (issue 15, §3): the loss falls on exactly the assistant
tokens, the prompt before each reply is the one inference renders, and typed special tokens
stay text. The families' tokenizers and templates are in tests/chat_families.py."""

from __future__ import annotations

import pytest
from jinja2 import TemplateError

from app.ml.chat import prompt_ids, template_token_ids
from app.ml.special_tokens import special_token_ids
from tests.chat_families import FAMILIES, Family
from worker.training.data import IGNORE_INDEX, Example, encode_record

THINKING = ["<think>\nfirst thoughts\n</think>\n\nyo", "<think>\nmore\n</think>\n\nfine"]


def conversation(family: Family, replies: list[str]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": "be brief"}] if family.system else []
    return [
        *system,
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": replies[1]},
    ]


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def expected_example(tok, family: Family, messages, index: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of the template's render of messages[:index+1] with the loss on
    the last reply alone, built from the template's output and `Family.reply`."""
    full = tok.apply_chat_template(messages[: index + 1], tokenize=False)
    reply = family.reply(messages[index]["content"])
    assert full.endswith(reply)
    prompt = ids(tok, full[: -len(reply)])
    return prompt + ids(tok, reply), [IGNORE_INDEX] * len(prompt) + ids(tok, reply)


def assistant_indices(messages) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("replies", [["yo", "fine"], THINKING], ids=["plain", "thinking"])
def test_loss_is_on_exactly_the_assistant_tokens(family: Family, replies) -> None:
    tok = family.tokenizer()
    messages = conversation(family, replies)
    examples = encode_record(tok, {"messages": messages}, max_seq_length=4096)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    dropped = replies == THINKING and "first thoughts" not in rendered
    assert dropped == (family.name == "qwen3" and replies == THINKING)
    if dropped:  # the template drops earlier reasoning from history: one example per turn
        expected = [expected_example(tok, family, messages, i) for i in assistant_indices(messages)]
        assert [(e.input_ids, e.labels) for e in examples] == expected
        trained = [t for t in examples[0].labels if t != IGNORE_INDEX]
        assert "first thoughts" in tok.decode(trained)  # kept while it is the last turn
        return
    [example] = examples
    full_ids = ids(tok, rendered)
    assert example.input_ids == full_ids
    # token by token: each reply as the template renders it, end of turn included, and
    # nothing else
    labels = [IGNORE_INDEX] * len(full_ids)
    start = 0
    for index in assistant_indices(messages):
        turn, turn_labels = expected_example(tok, family, messages, index)
        begin = next(i for i, t in enumerate(turn_labels) if t != IGNORE_INDEX)
        assert turn == full_ids[: len(turn)] and begin >= start
        labels[begin : len(turn)] = turn[begin:]
        start = len(turn)
    assert example.labels == labels


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("replies", [["yo", "fine"], THINKING], ids=["plain", "thinking"])
def test_inference_prompt_is_the_training_prefix(family: Family, replies) -> None:
    tok = family.tokenizer()
    messages = conversation(family, replies)
    examples = encode_record(tok, {"messages": messages}, max_seq_length=4096)
    for number, index in enumerate(assistant_indices(messages)):
        example = examples[number] if len(examples) > 1 else examples[0]
        prompt = prompt_ids(tok, messages[:index])
        assert example.input_ids[: len(prompt)] == prompt
        # the reply's loss starts right after the prompt
        assert example.labels[len(prompt) - 1] == IGNORE_INDEX
        assert example.labels[len(prompt)] != IGNORE_INDEX


def control_tokens(tok, example: Example) -> list[int]:
    controls = special_token_ids(tok)
    return [t for t in example.input_ids if t in controls]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_typed_special_tokens_stay_text(family: Family) -> None:
    tok = family.tokenizer()
    typed = "".join([*family.special, tok.eos_token])

    def encoded(user: str, reply: str) -> list[Example]:
        messages = conversation(family, [reply, "ok"])
        messages[-2]["content"] = user
        return encode_record(tok, {"messages": messages}, max_seq_length=4096)

    forged, benign = encoded(typed, typed), encoded("x", "x")
    assert [control_tokens(tok, e) for e in forged] == [control_tokens(tok, e) for e in benign]
    assert typed in tok.decode(forged[-1].input_ids)
    plain = encoded("x", "x")[-1].input_ids
    assert len(forged[-1].input_ids) == len(plain) - 2 + 2 * len(typed)  # one token a char


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_template_tokens_are_the_familys_control_tokens(family: Family) -> None:
    # what `train_special_tokens: true` trains; Gemma's refused system message is skipped
    tok = family.tokenizer()
    expected = set(family.special) | ({family.bos} if family.bos else set())
    assert tok.convert_ids_to_tokens(template_token_ids(tok)) == sorted(
        expected, key=tok.convert_tokens_to_ids
    )


def test_gemma_refuses_a_system_message() -> None:
    [gemma] = [f for f in FAMILIES if f.name == "gemma"]
    messages = [{"role": "system", "content": "s"}, *conversation(gemma, ["a", "b"])]
    with pytest.raises(TemplateError, match="System role not supported"):
        encode_record(gemma.tokenizer(), {"messages": messages}, max_seq_length=4096)
