"""Rendering chat messages to text, the one way training and inference both use.

The tokenizer's own chat template is used when it has one. When it has none, the
documented fallback is `DEFAULT_CHAT_TEMPLATE`, a ChatML-like format:
`<|role|>content<|end|>` per message, and `<|assistant|>` as the generation prompt.
With function calling it follows the Hermes / Qwen layout: the tools are listed, one JSON
object a line inside `<tools></tools>`, in a system part (the system message's, or one of
their own before the conversation), each tool call follows the assistant's content as
`<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, and a tool's result is a
`<|tool|>…<|end|>` turn. Without tools it renders exactly as it always has.
The assistant turn ends with the tokenizer's EOS token when the template does not
emit one itself, so a trained adapter learns where to stop.

Training renders a conversation as inference would continue it before each assistant
turn (`render_examples`): in one example when the template renders it prefix by prefix,
in one example per assistant turn when the template renders history by what follows it
(Qwen 3's drops earlier turns' reasoning).

Tools (the template's `tools` argument) and tool calls are passed as Hugging Face's chat
templates take them (`app/ml/tool_messages.py`); whether a template renders them at all is
probed by `app/ml/tool_support.py`.

Message content is escaped before the template sees it (`app/ml/special_tokens.py`): the
rendered text holds markers where a user typed a special token's string, and is tokenized
with `encode_rendered` (`prompt_ids` does both), so only the template makes control tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import NotPrefixStable
from app.ml.special_tokens import encode_rendered, escape, special_token_ids
from app.ml.tool_messages import template_tool_fields, template_tools

Tools = list[dict[str, Any]] | None  # OpenAI's `tools` list, as in a request or an example

# The Hermes / Qwen 2.5 layout, its instructions in brief (they are in every prompt).
_TOOLS_SYSTEM = (
    "{% if tools %}<|system|>"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call these functions:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\nReturn each call as <tool_call>\\n'"
    ' + \'{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' }}'
    "<|end|>{% endif %}"
)
_TOOL_CALLS = (
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>\\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": '"
    " + (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}"
)
DEFAULT_CHAT_TEMPLATE = (
    _TOOLS_SYSTEM + "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}" + _TOOL_CALLS + "<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether the loss is computed on its tokens."""

    text: str
    trainable: bool


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the documented fallback."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: Tools = None) -> list[int]:
    """The token ids a model continues to answer `messages` as the assistant."""
    return encode_rendered(tokenizer, render_prompt(tokenizer, messages, tools))


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: Tools = None) -> str:
    """The text a model continues to answer `messages` as the assistant (content escaped)."""
    ensure_chat_template(tokenizer)
    text: str = tokenizer.apply_chat_template(
        _plain(tokenizer, messages),
        tools=template_tools(tokenizer, tools),
        tokenize=False,
        add_generation_prompt=True,
    )
    return text


def render_examples(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Tools = None
) -> list[list[Segment]]:
    """The training examples of a conversation, each a list of segments.

    One example, `render_segments`, when the template renders the conversation prefix by
    prefix. A template that renders history by what follows it (Qwen 3's drops the
    `<think>` reasoning of assistant turns before the last user message) gets one example
    per trained assistant turn instead: the prompt the template renders before that turn,
    exactly what inference renders, then the reply; the loss is on that reply only, as the
    template's semantics imply (a turn with `weight: 0` gets no example).
    """
    try:
        return [render_segments(tokenizer, messages, tools)]
    except NotPrefixStable:
        examples = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant" and message.get("weight", 1):
                prompt, reply, _ = _turn(tokenizer, messages, index, tools)
                examples.append([Segment(prompt, trainable=False), Segment(reply, trainable=True)])
        return examples


def render_segments(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Tools = None
) -> list[Segment]:
    """Split a rendered conversation into segments; assistant replies are trainable.

    Segment texts hold escaped content: tokenize each with `encode_rendered`.

    Each assistant message i is the text between the render of messages[:i] with a
    generation prompt and the render of messages[:i+1]. Messages with `weight: 0`
    (OpenAI's per-message flag) are rendered but not trained on. `NotPrefixStable` when
    a render of a prefix is not a prefix of the render of the conversation.
    """
    ensure_chat_template(tokenizer)
    segments: list[Segment] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, reply, full = _turn(tokenizer, messages, index, tools)
        if not prompt.startswith(done):
            raise NotPrefixStable(
                "the chat template does not render conversations prefix by prefix"
            )
        segments.append(Segment(prompt[len(done) :], trainable=False))
        segments.append(Segment(reply, trainable=bool(message.get("weight", 1))))
        done = full  # position in the rendered text (an appended EOS is not part of it)
    rendered = _render(tokenizer, messages, tools)
    tail = rendered[len(done) :]
    if tail:
        segments.append(Segment(tail, trainable=False))
    return segments


def _turn(
    tokenizer: Any, messages: list[dict[str, Any]], index: int, tools: Tools = None
) -> tuple[str, str, str]:
    """(prompt, reply, full render) for the assistant message at `index`: the reply is what
    the render of messages[:index+1] adds to the generation prompt, with EOS."""
    prompt = render_prompt(tokenizer, messages[:index], tools)
    full = _render(tokenizer, messages[: index + 1], tools)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render a reply after its generation prompt")
    reply = full[len(prompt) :]
    eos = tokenizer.eos_token or ""
    if eos and eos not in reply:  # e.g. ChatML emits "<|im_end|>\n" itself
        reply += eos
    return prompt, reply, full


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Tools = None) -> str:
    text: str = tokenizer.apply_chat_template(
        _plain(tokenizer, messages), tools=template_tools(tokenizer, tools), tokenize=False
    )
    return text


def _plain(tokenizer: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content escaped; training-only keys (weight) dropped: the template should not see them."""
    return [
        {
            "role": m["role"],
            "content": escape(tokenizer, m.get("content") or ""),
            **template_tool_fields(tokenizer, m),
        }
        for m in messages
    ]


def template_token_ids(tokenizer: Any) -> list[int]:
    """The special tokens a conversation in the chat template is made of, and EOS: what
    `train_special_tokens: true` trains (a base may never have trained a template's tokens)."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids: set[int] = set()
    for messages in ([{"role": "system", "content": "s"}, *probe], probe):
        try:  # some templates refuse a system message
            examples = render_examples(tokenizer, messages)
        except Exception:  # jinja2 TemplateError, or whatever the template raises
            continue
        ids.update(t for e in examples for s in e for t in encode_rendered(tokenizer, s.text))
        ids.update(prompt_ids(tokenizer, messages[:-1]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids & special_token_ids(tokenizer))
