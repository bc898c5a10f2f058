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


def choose_tokens(logits: Any, rows: list[tuple[Sampling, Any]]) -> list[int]:
    """Next token per row of `logits` ([rows, vocab]), each row's (sampling, generator).

    One argmax for all greedy rows; one softmax, top-p and inverse-CDF draw for all sampled
    rows, each row's uniform number from its own generator (a seed gives the same tokens
    whatever else shares the batch). Per-row tensor calls would make every row of a large
    batch cost each step a fixed overhead that a tiny or CPU-bound model feels.
    """
    tokens = [0] * len(rows)
    greedy = [i for i, (sampling, _) in enumerate(rows) if sampling.greedy]
    if greedy:
        picked = logits[greedy].argmax(dim=-1).tolist()
        for index, token in zip(greedy, picked, strict=True):
            tokens[index] = token
    sampled = [i for i, (sampling, _) in enumerate(rows) if not sampling.greedy]
    if sampled:
        drawn = _sample([rows[i] for i in sampled], logits[sampled])
        for index, token in zip(sampled, drawn, strict=True):
            tokens[index] = token
    return tokens


def _sample(rows: list[tuple[Sampling, Any]], logits: Any) -> list[int]:
    """Temperature, then top-p (the smallest prefix whose mass reaches it, at least one
    token), then a draw by inverse CDF with each row's generator."""
    import torch

    device = logits.device
    temperature = torch.tensor([sampling.temperature for sampling, _ in rows], device=device)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    if any(sampling.top_p < 1 for sampling, _ in rows):
        # a row without top-p gets a threshold no prefix reaches (rounding may sum past 1)
        top_p = [s.top_p if s.top_p < 1 else 2.0 for s, _ in rows]
        threshold = torch.tensor(top_p, device=device)[:, None]
        ordered, order = torch.sort(probs, descending=True, dim=-1)
        outside = (torch.cumsum(ordered, dim=-1) - ordered) >= threshold
        probs = torch.zeros_like(probs).scatter(-1, order, ordered.masked_fill(outside, 0.0))
    uniform = torch.cat(
        [torch.rand(1, generator=generator, device=generator.device) for _, generator in rows]
    ).to(device)
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniform * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1).tolist()


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
