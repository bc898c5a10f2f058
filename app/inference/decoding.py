"""One sequence, one token at a time, with a KV cache.

The simple single-request loop; a batched engine can replace `decode` without the
callers noticing (they only see `Generation`).
"""

from __future__ import annotations

import inspect
from typing import Any

from app.inference.sampling import SamplingParams, make_generator, pick_token
from app.inference.types import Generation


def eos_token_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """The tokenizer's EOS plus any its generation config lists (chat models have several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    return frozenset(ids)


def decode(
    model: Any,
    tokenizer: Any,
    input_ids: list[int],
    params: SamplingParams,
    *,
    eos_ids: frozenset[int],
) -> Generation:
    """Generate up to `params.max_tokens` tokens after `input_ids`.

    Stops at an EOS token ("stop"), at a stop string in the decoded text ("stop", text
    cut before it), or after max_tokens ("length").
    """
    import torch

    device = _device_of(model)
    generator = None if params.greedy else make_generator(params.seed, device)
    cache_arg, extra = _forward_options(model)
    tokens: list[int] = []
    finish, cut = "length", None
    step = torch.tensor([input_ids], dtype=torch.long, device=device)
    past = None
    with torch.inference_mode():
        for _ in range(params.max_tokens):
            out = model(input_ids=step, use_cache=True, **{cache_arg: past}, **extra)
            past = getattr(out, cache_arg)
            token = pick_token(out.logits[0, -1], params, generator)
            tokens.append(token)
            if token in eos_ids:
                finish = "stop"
                break
            if params.stop:
                cut = _stop_index(_text(tokenizer, tokens), params.stop)
                if cut is not None:
                    finish = "stop"
                    break
            step = torch.tensor([[token]], dtype=torch.long, device=device)
    shown = tokens[:-1] if finish == "stop" and cut is None else tokens
    text = _text(tokenizer, shown)
    if cut is not None:
        text = text[:cut]
    return Generation(text, finish, len(input_ids), len(tokens))


def _text(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def _forward_options(model: Any) -> tuple[str, dict[str, Any]]:
    """The KV-cache argument's name and extra forward arguments this model accepts.

    transformers 5.x renames `past_key_values` to `cache` (the old name is deprecated);
    `logits_to_keep=1` skips the prompt-long logits matrix at prefill.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        names = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        names = {}
    cache_arg = "cache" if "cache" in names else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in names else {})
