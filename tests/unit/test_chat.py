"""Chat rendering shared by training and inference (app/ml/chat.py)."""

from __future__ import annotations

import pytest

from app.errors import NotPrefixStable
from app.ml.chat import (
    DEFAULT_CHAT_TEMPLATE,
    Segment,
    ensure_chat_template,
    render_examples,
    render_prompt,
    render_segments,
)
from app.ml.tiny_model import build_tokenizer

# A template that ends turns with a newline and never emits EOS itself.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# ChatML as Qwen ships it: EOS (<|end|> here) followed by a newline, inside the template.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "a"},
]


@pytest.fixture
def tok():
    return build_tokenizer()


def test_fallback_template_is_installed_only_when_missing(tok) -> None:
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    tok.chat_template = PLAIN_TEMPLATE
    ensure_chat_template(tok)
    assert tok.chat_template == PLAIN_TEMPLATE


def test_render_prompt_ends_with_the_generation_prompt(tok) -> None:
    assert render_prompt(tok, MESSAGES[:1]) == "<|user|>hi<|end|><|assistant|>"


def test_segments_split_default_template_at_replies(tok) -> None:
    assert render_segments(tok, MESSAGES) == [
        Segment("<|user|>hi<|end|><|assistant|>", trainable=False),
        Segment("yo<|end|>", trainable=True),
        Segment("<|user|>q<|end|><|assistant|>", trainable=False),
        Segment("a<|end|>", trainable=True),
    ]


def test_segments_concatenate_to_the_full_render(tok) -> None:
    messages = [{"role": "system", "content": "s"}, *MESSAGES, {"role": "user", "content": "z"}]
    segments = render_segments(tok, messages)
    assert "".join(s.text for s in segments) == tok.apply_chat_template(messages, tokenize=False)
    assert segments[-1] == Segment("<|user|>z<|end|>", trainable=False)


def test_weight_zero_reply_is_kept_but_not_trainable(tok) -> None:
    messages = [dict(m) for m in MESSAGES]
    messages[1]["weight"] = 0
    segments = render_segments(tok, messages)
    assert segments[1] == Segment("yo<|end|>", trainable=False)
    assert segments[3] == Segment("a<|end|>", trainable=True)


def test_eos_is_appended_when_the_template_has_none_multi_turn(tok) -> None:
    tok.chat_template = PLAIN_TEMPLATE
    assert render_segments(tok, MESSAGES) == [
        Segment("user: hi\nassistant: ", trainable=False),
        Segment("yo\n<|end|>", trainable=True),
        Segment("user: q\nassistant: ", trainable=False),
        Segment("a\n<|end|>", trainable=True),
    ]


def test_eos_is_not_doubled_when_the_template_emits_it_before_a_newline(tok) -> None:
    tok.chat_template = CHATML_TEMPLATE
    segments = render_segments(tok, MESSAGES)
    assert segments[1] == Segment("yo<|end|>\n", trainable=True)
    assert "".join(s.text for s in segments) == tok.apply_chat_template(MESSAGES, tokenize=False)


def test_template_whose_reply_does_not_follow_its_prompt_is_refused(tok) -> None:
    # renders the last message first: a reply is not a continuation of the prompt
    tok.chat_template = (
        "{% for m in messages|reverse %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(ValueError, match="generation prompt"):
        render_examples(tok, MESSAGES)


def test_template_that_rewrites_history_gives_one_example_per_turn(tok) -> None:
    # shows an assistant reply only while it is the last message (history drops it)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(NotPrefixStable):
        render_segments(tok, MESSAGES)
    assert render_examples(tok, MESSAGES) == [
        [Segment("<|user|>hi<|end|><|assistant|>", False), Segment("yo<|end|>", True)],
        [
            Segment("<|user|>hi<|end|><|user|>q<|end|><|assistant|>", False),
            Segment("a<|end|>", True),
        ],
    ]
    messages = [dict(m) for m in MESSAGES]
    messages[1]["weight"] = 0
    assert len(render_examples(tok, messages)) == 1


def test_prefix_stable_template_gives_one_example(tok) -> None:
    assert render_examples(tok, MESSAGES) == [render_segments(tok, MESSAGES)]
