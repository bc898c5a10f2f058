"""How one request picks its next tokens; picking them from logits, with their logprobs.

The values were validated at the API edge (`app/schemas/inference.py` holds every bound);
the engine takes them as given.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from app.inference.types import TokenLogprob


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: Any) -> Any:
    """A torch.Generator on `device`; the same seed gives the same samples."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def pick_token(logits: Any, sampling: Sampling, generator: Any) -> int:
    """Next token from a 1-D logits vector: argmax when greedy, else temperature + top-p."""
    import torch

    if sampling.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def choose_tokens(logits: Any, rows: list[tuple[Sampling, Any]]) -> list[int]:
    """Next token per row of `logits` ([rows, vocab]), each row's (sampling, generator):
    one argmax for all greedy rows, seeded sampling for the rest."""
    greedy = [i for i, (sampling, _) in enumerate(rows) if sampling.greedy]
    tokens = [0] * len(rows)
    if greedy:
        picked = (
            logits[greedy].argmax(dim=-1).tolist()
            if len(greedy) < len(rows)
            else logits.argmax(dim=-1).tolist()
        )
        for index, token in zip(greedy, picked, strict=True):
            tokens[index] = token
    for index, (sampling, generator) in enumerate(rows):
        if not sampling.greedy:
            tokens[index] = pick_token(logits[index], sampling, generator)
    return tokens


def token_logprob(tokenizer: Any, logits: Any, token: int, offset: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under 1-D `logits`, with the `top` most likely tokens'."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: dict[str, float] = {}
    if top:
        values, ids = torch.topk(logprobs, top)
        for value, other in zip(values.tolist(), ids.tolist(), strict=True):
            alternatives.setdefault(tokenizer.decode([other]), value)
    return TokenLogprob(tokenizer.decode([token]), float(logprobs[token]), alternatives, offset)
