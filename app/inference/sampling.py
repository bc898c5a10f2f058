"""Sampling parameters (validated) and picking the next token from logits."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequest

# Alternatives per token for `logprobs` (completions) and `top_logprobs` (chat): OpenAI's
# completions limit. The request schemas use this bound, so nothing past it gets this far.
MAX_LOGPROBS = 5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    @classmethod
    def checked(
        cls,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | str | None,
        seed: int | None,
    ) -> SamplingParams:
        """Validate request values; each bad one is an `InvalidRequest` naming its field."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(
                f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens"
            )
        if not _finite(temperature) or temperature < 0:
            raise InvalidRequest(
                f"temperature must be a number >= 0, got {temperature!r}", param="temperature"
            )
        if not _finite(top_p) or not 0 < top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("stop must be a string or a list of strings", param="stop")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest(f"seed must be an integer, got {seed!r}", param="seed")
        # An empty stop string would match at once; it carries no meaning, so it is dropped.
        return cls(max_tokens, float(temperature), float(top_p), tuple(s for s in stops if s), seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def make_generator(seed: int | None, device: Any) -> Any:
    """A torch.Generator on `device`; the same seed gives the same samples."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def pick_token(logits: Any, params: SamplingParams, generator: Any) -> int:
    """Next token from a 1-D logits vector: argmax when greedy, else temperature + top-p."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
