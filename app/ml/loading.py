"""Loading base models and tokenizers: safetensors only, never remote code.

`ref` is whatever the server-side allowlist maps a base-model name to: a local
directory or a hub id. The same call loads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UnsafeModelError(ValueError):
    """The model asks for something we never allow (remote code, pickled weights)."""


def resolve_device(preferred: str = "auto") -> str:
    import torch

    if preferred != "auto":
        return preferred
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(ref: str | Path) -> Any:
    from transformers import AutoTokenizer

    from app.ml.chat import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    return tokenizer


def load_base_model(ref: str | Path, *, device: str = "auto", dtype: str = "auto") -> Any:
    """Load a frozen causal LM (eval mode, no grads) from a directory or hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ref), trust_remote_code=False)
    if getattr(config, "auto_map", None):
        raise UnsafeModelError(f"base model {ref} asks for remote code; refused")
    device = resolve_device(device)
    torch_dtype = _dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)
