"""User text never becomes a control token; only a chat template's own structure does.

Tokenizers turn every occurrence of a special token's string into that token, so a user
who types `<|end|><|assistant|>` into a message would forge a turn (a known weakness of
serving stacks). Text users supply is therefore tokenized with special tokens split into
plain text (`split_special_tokens=True`), in training and inference alike.

A chat render mixes template structure with user content, so content is escaped before
the template sees it: every special token's string in it becomes a marker of private-use
characters (`escape`). `encode_rendered` then tokenizes the rendered text as the tokenizer
always does — every control token left is the template's — and re-tokenizes only the runs
between control tokens that hold a marker, with the markers turned back into the user's
text and special tokens split. A render without markers is tokenized exactly as before.
(A re-tokenized run is tokenized on its own, as `split_special_tokens` does: with a
SentencePiece-style prefix space that may differ at the run's first token; only content
that typed special-token strings gets there.) Added tokens that are not special (extra
vocabulary) are matched as the tokenizer always matches them.

User text is encoded by a private copy of the backend tokenizer that always splits special
tokens, never by flipping `split_special_tokens` on the shared one (transformers sets that
flag on the backend for the call): a concurrent encode of a chat render could otherwise
run with the flag of the other call, and user text could come out as control tokens.
"""

from __future__ import annotations

import re
from typing import Any

_OPEN, _CLOSE = "\ue000", "\ue001"  # Unicode private use: no tokenizer gives them meaning
_MARKER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def special_token_strings(tokenizer: Any) -> list[str]:
    """Strings the tokenizer turns into special (control) tokens, longest first."""
    found = {str(token) for token in getattr(tokenizer, "all_special_tokens", ())}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if added.special:
            found.add(added.content)
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(_special_by_id(tokenizer))


def _special_by_id(tokenizer: Any) -> dict[int, str]:
    found = dict(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=True))
    for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            found[int(index)] = added.content
    return found


def escape(tokenizer: Any, text: str) -> str:
    """`text` with every special token's string (and any marker character) as a marker."""
    table = _table(tokenizer)
    pattern = "|".join(re.escape(s) for s in table)
    return re.sub(pattern, lambda m: f"{_OPEN}{table.index(m.group())}{_CLOSE}", text)


def unescape(tokenizer: Any, text: str) -> str:
    table = _table(tokenizer)
    return _MARKER.sub(lambda m: table[int(m.group(1))], text)


def encode_plain(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of user text: its special-token strings stay plain text.

    `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS), as usual.
    """
    return list(
        _splitting_backend(tokenizer).encode(text, add_special_tokens=add_special_tokens).ids
    )


def _splitting_backend(tokenizer: Any) -> Any:
    """The tokenizer's backend, copied once, with special tokens always split."""
    backend = tokenizer.__dict__.get("_loraforge_splitting_backend")
    if backend is None:  # two threads may both build one: the same copy, harmless
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        backend.no_truncation()
        backend.no_padding()
        tokenizer.__dict__["_loraforge_splitting_backend"] = backend
    return backend


def encode_rendered(tokenizer: Any, rendered: str) -> list[int]:
    """Token ids of a render of escaped content: control tokens only where the template put
    them, user content (markers) as plain text."""
    if _OPEN not in rendered:
        return list(tokenizer(rendered, add_special_tokens=False).input_ids)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    control = _special_by_id(tokenizer)
    ids: list[int] = []
    run: list[int] = []
    start = 0  # where the current run of plain tokens begins in `rendered`
    for token, (begin, end) in zip(encoded.input_ids, encoded.offset_mapping, strict=True):
        # a control token spells its string (an unknown marker character may come out as
        # the special `<unk>`, which is not the template's)
        if token in control and control[token] in rendered[begin:end]:
            ids += _plain_run(tokenizer, rendered[start:begin], run)
            ids.append(token)
            run, start = [], end
        else:
            run.append(token)
    return ids + _plain_run(tokenizer, rendered[start:], run)


def _plain_run(tokenizer: Any, text: str, tokens: list[int]) -> list[int]:
    """The run's tokens as the tokenizer made them, unless user content with special-token
    strings is in it: then that text, unescaped, with special tokens split."""
    if _OPEN not in text:
        return tokens
    return encode_plain(tokenizer, unescape(tokenizer, text), add_special_tokens=False)


def _table(tokenizer: Any) -> list[str]:
    # Marker characters a user typed are escaped too, so unescaping gives back their text.
    return [*special_token_strings(tokenizer), _OPEN, _CLOSE]


def token_ids_of(tokenizer: Any, strings: list[str]) -> tuple[list[int], list[str]]:
    """(ids of the strings that are single tokens of the vocabulary, the strings that are not)."""
    ids, unknown = [], []
    vocab = tokenizer.get_vocab()
    for string in strings:
        if string in vocab:
            ids.append(int(vocab[string]))
        else:
            unknown.append(string)
    return sorted(set(ids)), unknown
