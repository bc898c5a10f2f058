"""Random-init Llama models with the shapes of real ones, built locally (no download).

Memory and speed depend on the shapes, not on the weights' values, so a random-init model
with Llama 3.2 1B's or Llama 3.1 8B's configuration measures what the real one would cost.
The tokenizer is the tiny model's character tokenizer (`app.ml.tiny_model.build_tokenizer`):
the embedding keeps the real vocabulary size (128,256 rows), ids past the tokenizer's few
hundred just never occur in the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 128_256  # Llama 3's vocabulary
SHAPES: dict[str, dict[str, Any]] = {
    # Llama 3.2 1B: ties the output layer to the input embedding
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 8192, "tie_word_embeddings": True},
    # Llama 3.1 8B: a separate output layer
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "tie_word_embeddings": False},
    # rehearsals: the same structure (GQA, tied, the real vocabulary), sizes multiples of 64
    "small": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 512, "tie_word_embeddings": True},
    "small-untied": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 768,
                     "tie_word_embeddings": False},
}  # fmt: skip


def build_llama(
    out_dir: Path, shape: str, *, dtype: str = "float32", device: str = "cpu", seed: int = 0
) -> Path:
    """Write a random-init Llama of `shape` (safetensors, `dtype`) and its tokenizer to
    `out_dir`, unless one is there already. The weights are made on `device` (a GPU builds
    an 8B in seconds) and saved from there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.ml.tiny_model import build_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=131_072,  # Llama 3.x's context: max_seq_length 2048 fits
        rope_theta=500_000.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return out


def parameter_counts(shape: str) -> tuple[int, int]:
    """(all parameters, matmul parameters: the transformer layers and the output layer,
    whose matmuls are the 2N FLOPs per token of a forward; the input embedding is a
    lookup) of a shape, from its configuration."""
    s = SHAPES[shape]
    h, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q o, k v, MLP, norms
    body = layers * per_layer + h
    embeddings = VOCAB * h * (1 if s["tie_word_embeddings"] else 2)
    return body + embeddings, body + VOCAB * h
