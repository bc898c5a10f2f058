"""Loading base models and tokenizers: safetensors only, never remote code.

`ref` is whatever the server-side allowlist maps a base-model name to: a local
directory or a hub id. The same call loads both; a ref spelled like a path that is not
a directory raises `BaseModelUnavailable` instead of becoming a hub lookup
(`app/base_models.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.base_models import checked_ref
from app.errors import UnsafeModelError


def resolve_device(preferred: str = "auto") -> str:
    import torch

    if preferred != "auto":
        return preferred
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(ref: str | Path) -> Any:
    from transformers import AutoTokenizer

    from app.ml.chat import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(checked_ref(str(ref)), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    return tokenizer


def load_base_model(
    ref: str | Path, *, device: str = "auto", dtype: str = "auto", quantization: str = "none"
) -> Any:
    """Load a frozen causal LM (eval mode, no grads) from a directory or hub id.

    quantization: "none", or "nf4" / "int8" to quantize its linear layers with bitsandbytes
    (`app/ml/quantized.py`); `dtype` is then the compute dtype and that of the rest.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = checked_ref(str(ref))  # a path never becomes a hub lookup
    config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
    if getattr(config, "auto_map", None):
        raise UnsafeModelError(f"base model {ref} asks for remote code; refused")
    device = resolve_device(device)
    if device.startswith("cuda"):
        avoid_per_shape_attention_plans()
    torch_dtype = _dtype(dtype, device)
    model: Any  # transformers' `to` and `eval` are not annotated for mypy
    if quantization != "none":
        from app.ml.quantized import load_quantized

        model = load_quantized(
            ref, config, quantization=quantization, device=device, dtype=torch_dtype
        )  # placed on `device` as it loads: a quantized model cannot be moved
    else:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
        )
        model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def avoid_per_shape_attention_plans() -> None:
    """Take cuDNN out of SDPA's choices, process-wide (as vLLM does).

    PyTorch prefers cuDNN attention on Hopper, and cuDNN builds an execution plan for
    every new sequence length (hundreds of ms; `TORCH_CUDNN_SDPA_AVOID_RECOMPILE` is
    opt-in). Our shapes change all the time: one SDPA call per packed example, batches of
    any width, a KV cache that grows each decode step. On an H200 with cuDNN eligible,
    packed training (a call per example length) ran at 1,188 tokens/s against 7,546
    unpacked. Flash and memory-efficient attention need no plan, so they take over.
    """
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)
