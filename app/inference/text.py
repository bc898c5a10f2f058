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

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became safe to show."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush()
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _earliest(self.text, self.stops)
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
        return self._flush()

    def _flush(self) -> str:
        piece = self.text[self.shown :] if len(self.text) > self.shown else ""
        self.shown = max(self.shown, len(self.text))
        return piece


def _earliest(text: str, stops: tuple[str, ...]) -> int | None:
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still turn into a stop string or a character."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold
