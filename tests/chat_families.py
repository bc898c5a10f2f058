"""Tokenizers in the chat formats of the model families, built locally for tests.

Each is the tiny model's character-level tokenizer with the family's special tokens added
and a Jinja template written here that produces the family's token layout (not a copy of
a published template): ChatML with a default system prompt and function calling in the
Hermes layout (Qwen 2.5; the others render no tool calls), Llama 3 (headers,
a date in the system block), Mistral (`[INST] ... [/INST]`, the system folded into the first
user turn), Gemma (no system role: a system message is refused, as Gemma 1 and 2 do) and
Qwen 3 (ChatML whose history drops the `<think>` reasoning of assistant turns before the
last user message, so a conversation does not render prefix by prefix).

`Family.reply` is how the template renders an assistant reply, end of turn included: the
tokens training puts the loss on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.ml.tiny_model import build_tokenizer

CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Qwen 2.5 renders function calling (Hermes layout): the tools in the system turn, each call
# as `<tool_call>` JSON after the assistant's content, results as user `<tool_response>`s.
QWEN25_TOOLS = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' + (messages[0]['content'] if messages[0]['role'] == 'system' "
    "else 'You are a helpful assistant.') + '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for t in tools -%}{{ '\\n' + (t | tojson) }}{%- endfor -%}"
    '{{ \'\\n</tools>\\n\\nCall a function as <tool_call>{"name": ..., "arguments": ...}\''
    " + '</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' and tools -%}"
    "{%- elif m['role'] == 'assistant' and m['tool_calls'] -%}"
    "{{ '<|im_start|>assistant' + ('\\n' + m['content'] if m['content'] else '') }}"
    "{%- for c in m['tool_calls'] -%}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + c['function']['name'] + '\", \"arguments\": '"
    " + (c['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] }}"
    "{{ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- if date_string is not defined -%}{%- set date_string = '1 Jan 2025' -%}{%- endif -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{ 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{ system + '<|eot_id|>' }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] }}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)
MISTRAL = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('roles must be user or assistant after system') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
GEMMA = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ raise_exception('System role not supported') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    special: list[str]  # the family's control tokens
    eos: str
    bos: str | None = None
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen 3's <think>)
    system: bool = True  # the template accepts a system message
    reply: Callable[[str], str] = lambda content: content

    def tokenizer(self) -> Any:
        tok = build_tokenizer()
        tok.add_special_tokens(
            {"additional_special_tokens": self.special}, replace_extra_special_tokens=False
        )
        tok.add_tokens(list(self.plain))
        tok.eos_token = self.eos
        if self.bos is not None:
            tok.bos_token = self.bos
        tok.chat_template = self.template
        return tok


IM = ["<|im_start|>", "<|im_end|>"]
FAMILIES = [
    Family("chatml_qwen", QWEN25_TOOLS, IM, "<|im_end|>", reply=lambda c: c + "<|im_end|>\n"),
    Family(
        "llama3",
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        bos="<|begin_of_text|>",
        reply=lambda c: c + "<|eot_id|>",
    ),
    Family(
        "mistral",
        MISTRAL,
        ["[INST]", "[/INST]", "</s>"],
        "</s>",
        bos="<s>",
        reply=lambda c: " " + c + "</s>",
    ),
    Family(
        "gemma",
        GEMMA,
        ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        bos="<bos>",
        system=False,
        reply=lambda c: c + "<end_of_turn>\n",
    ),
    Family(
        "qwen3",
        QWEN3,
        IM,
        "<|im_end|>",
        plain=("<think>", "</think>"),
        reply=lambda c: c + "<|im_end|>\n",
    ),
]
