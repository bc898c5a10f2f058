"""Greedy text on one prompt, from the engine and from plain PEFT (the reference it must match)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch

from app.inference import AdapterRef, InferenceEngine
from app.ml.loading import load_base_model, load_tokenizer

PROMPT = "Once upon a time"


def peft_greedy(
    base_dir: Path,
    adapter_dir: Path | str | None,
    prompt_ids: Callable[[Any], list[int]],
    max_tokens: int,
) -> tuple[Any, list[int]]:
    """The tokenizer and the token ids plain PEFT generates greedily (fp32, `generate()`)
    after the prompt that `prompt_ids(tokenizer)` gives, on the base (+ the adapter)."""
    tokenizer = load_tokenizer(base_dir)
    model = load_base_model(base_dir, device="cpu")
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    ids = torch.tensor([prompt_ids(tokenizer)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, ids.shape[1] :].tolist()
    return tokenizer, out


def reference(base_dir: Path, adapter: AdapterRef | None, max_tokens: int) -> str:
    adapter_dir = adapter.path if adapter is not None else None
    tokenizer, out = peft_greedy(
        base_dir, adapter_dir, lambda tokenizer: tokenizer(PROMPT).input_ids, max_tokens
    )
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True)


def new_engine(base_dir: Path, capacity: int = 8) -> InferenceEngine:
    return InferenceEngine(
        base_models={"tiny": str(base_dir)}, max_loaded_adapters=capacity, device="cpu"
    )


def greedy(engine: InferenceEngine, adapter: AdapterRef | None, max_tokens: int = 6) -> str:
    return engine.generate(
        base_model="tiny", adapter=adapter, prompt=PROMPT, max_tokens=max_tokens, temperature=0
    ).text
