"""Token ids → completion text, incrementally, with stop strings and EOS.

Used by the scheduler for every row: after each token it says what new text may be shown
(held back while the text ends with what could be the start of a stop string, or with a
partial UTF-8 character) and whether the row is finished.
"""

from __future__ import annotations

from typing import Any


class TextTracker:
    def __init__(self, tokenizer: Any, stops: tuple[str, ...], eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.text = ""  # text of `tokens`, cut at a matched stop string
        self.shown = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        # Incremental detokenization (as TGI and vLLM do it): each token decodes a window of
        # a few tokens, never the whole generation again (that costs O(n) per token, and a
        # batch of long streams then spends its steps in the tokenizer). The window starts
        # one decoded piece back, so a tokenizer that drops a sequence's leading space
        # (SentencePiece) still gives this piece's; the text equals decoding all tokens.
        self._window = 0  # where the window starts in `tokens`
        self._decoded = 0  # tokens whose text is in `text`
        self._window_text = ""  # the text of tokens[_window:_decoded]

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became safe to show."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            self._decode_new(final=True)
            return self._flush()
        self.tokens.append(token)
        searched = len(self.text)  # no stop string starts wholly before this
        self._decode_new()
        cut = _earliest(self.text, self.stops, searched)
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
            return self._flush()
        safe = len(self.text) - _held_back(self.text, self.stops)
        if safe <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : safe], safe
        return piece

    def finish(self, reason: str) -> str:
        """End the row (e.g. max_tokens reached); return the text still held back."""
        self.finish_reason = self.finish_reason or reason
        if self.finish_reason != "stop":  # a matched stop string cut the text: nothing after
            self._decode_new(final=True)
        return self._flush()

    def _decode_new(self, *, final: bool = False) -> None:
        """Append the text of the tokens not decoded yet. Held back while it ends in a
        partial character (U+FFFD: the next token may complete it), unless `final`."""
        if self._decoded == len(self.tokens):
            return
        window = self.tokenizer.decode(self.tokens[self._window :], skip_special_tokens=True)
        if len(window) <= len(self._window_text) or (window.endswith("\ufffd") and not final):
            return
        self.text += window[len(self._window_text) :]
        self._window, self._decoded = self._decoded, len(self.tokens)
        # decoded on its own, as the next window will start: the same context both times
        self._window_text = self.tokenizer.decode(
            self.tokens[self._window : self._decoded], skip_special_tokens=True
        )

    def _flush(self) -> str:
        piece = self.text[self.shown :] if len(self.text) > self.shown else ""
        self.shown = max(self.shown, len(self.text))
        return piece


def _earliest(text: str, stops: tuple[str, ...], searched: int) -> int | None:
    """Where the first stop string starts; only what may overlap the text after `searched`
    (the text before it was searched already) is searched again."""
    starts = (text.find(stop, max(0, searched - len(stop) + 1)) for stop in stops)
    found = [index for index in starts if index >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still turn into a stop string (a partial character
    never reaches `text` before the end: `_decode_new` holds it)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold
