"""Peak memory of a LoRA training run, estimated from the base model's shape (no torch).

The memory plan (`memory_plan.py`) weighs settings with it before the base is loaded, so a
job that cannot fit fails naming a change that would fit, instead of dying mid-step.

    peak = weights + lora + activations + transient, plus a margin (10 % + a fixed part)

- weights: every parameter at the training precision (bf16 on CUDA, fp32 on CPU:
  `app/ml/loading.py`); with `quantization` the decoder layers' linear weights cost
  NF4_BYTES or INT8_BYTES each instead, and one of them is dequantized at a time.
- lora: the LoRA factors, r x (in + out) per targeted linear, in fp32 with their
  gradients and AdamW's two moments: 16 bytes a parameter.
- activations, per token of a micro-batch (batch_size x max_seq_length tokens, the
  longest one packing or padding can make): what autograd saves for the backward pass.
  Counted with `torch.autograd.graph.saved_tensors_hooks` on Llama layers with LoRA on
  every linear (tests/worker/test_memory_estimate.py): per layer 6h + 2·kv + 4·I + heads
  + 7·r elements (h hidden, kv the key/value width, I the MLP width); LoRA dropout adds
  1.5·(6h + I) (its outputs and masks). Fewer targets save a little less: the count for
  all of them is the bound. With gradient checkpointing only each layer's input (h) is
  kept, and one layer is recomputed at a time.
- transient: the larger of the logits phase and one recomputed layer, plus the gradient
  flowing back through the residual stream. The logits phase is 3 (CPU) or 3.5 (CUDA,
  bf16 logits) fp32 tensors of chunk x vocab alive at once: the loss takes the
  label tokens a chunk at a time (`chunked_loss.py`), so chunk is the smaller of the
  micro-batch's tokens and `loss_chunk_tokens` (261 at a 128k vocabulary; all the tokens
  for a model whose logits cannot be chunked).

Calibrated on CPU against the process's peak RSS (bench/memory_calibration.py, figures in
docs/design.md "Memory planning"), with glibc's mmap threshold fixed as the worker fixes it
(`worker/heap.py`): with the default dynamic one, the heap keeps freed activations beyond
the live tensors, by an amount no formula of the shape predicts. Llama-family layouts
(q/k/v/o, gate/up/down) are what the activation count describes; other architectures
are estimated with the same formula from their config's sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from app.jobs.hyperparameters import unmatched_modules
from app.jobs.spec import SupervisedHyperparameters
from worker.training.chunked_loss import loss_chunk_tokens

MIB = 1 << 20
GIB = 1 << 30
LORA_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
# NF4: 4 bits, one 8-bit absmax per 64-weight block, one fp32 constant per 256 blocks
# (double quantization); int8: 1 byte and an fp32 scale per output row (counted apart).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0
MARGIN = 0.10  # allocator rounding and fragmentation, kernels' scratch
# Kernels' first-use buffers and workspaces, and what the heap keeps of blocks under the
# mmap threshold (CPU: measured ~97 MiB on the tiny model, whose tensors are all under it;
# CUDA: cuBLAS workspaces and the caching allocator's rounding, not yet measured here).
FIXED_OVERHEAD = {"cpu": 104 * MIB, "cuda": 768 * MIB}
# Logits phase, bytes per token x vocab entry. CPU: fp32, at most three alive at once
# (log-softmax, its gradient, the logits' gradient: measured 3.0 x the logits on the
# vocab128k case). CUDA: bf16 logits, fp32 log-softmax and gradients (reasoned).
LOGITS_BYTES = {"cpu": 12, "cuda": 14}
GRAD_STREAM = 3  # hidden-sized tensors alive beside a layer's backward (residual gradients)
# Modules every Llama-family decoder layer has, (name, in, out) as functions of the shape,
# for a base whose weights cannot be read before loading (a hub id).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its training memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    n_params: int
    # (module name, in, out) of the linear layers inside the decoder layers: LoRA targets
    linears: tuple[tuple[str, int, int], ...]
    loss_chunk: int | None  # label tokens per chunk of the loss; None: whole logits

    @classmethod
    def of(
        cls, config: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]] | None = None
    ) -> ModelShape:
        """From a transformers `config.json` and, when readable, the safetensors shapes
        (`app.jobs.hyperparameters.tensor_shapes`): exact parameter and LoRA counts."""
        c = {**config, **(config.get("text_config") or {})}
        hidden = _first(c, "hidden_size", "n_embd", "d_model")
        heads = _first(c, "num_attention_heads", "n_head")
        kv_heads = c.get("num_key_value_heads") or (1 if c.get("multi_query") else heads)
        shape = cls(
            hidden=hidden,
            layers=_first(c, "num_hidden_layers", "n_layer", "num_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=c.get("head_dim") or hidden // heads,
            intermediate=c.get("intermediate_size") or c.get("n_inner") or 4 * hidden,
            vocab=_first(c, "vocab_size"),
            n_params=0,
            linears=(),
            loss_chunk=loss_chunk_tokens(c),
        )
        if tensors:
            return shape.with_tensors(tensors)
        return shape.with_llama_layout(tied=bool(c.get("tie_word_embeddings", False)))

    def with_tensors(self, tensors: Mapping[str, tuple[int, ...]]) -> ModelShape:
        linears = tuple(
            (name[: -len(".weight")], dims[1], dims[0])
            for name, dims in tensors.items()
            if name.endswith(".weight") and len(dims) == 2 and self.vocab not in dims
        )
        n_params = sum(math.prod(dims) for dims in tensors.values())
        return replace(self, n_params=n_params, linears=linears)

    def with_llama_layout(self, *, tied: bool) -> ModelShape:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        sizes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip
        linears = tuple(
            (f"model.layers.{n}.{'mlp' if m in LLAMA_LINEARS[4:] else 'self_attn'}.{m}", *sizes[m])
            for n in range(self.layers)
            for m in LLAMA_LINEARS
        )
        norms = (2 * self.layers + 1) * h
        embeddings = self.vocab * h * (1 if tied else 2)
        n_params = sum(a * b for _, a, b in linears) + norms + embeddings
        return replace(self, n_params=n_params, linears=linears)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Estimate:
    """Bytes at the peak of a training step, by part."""

    weights: int
    lora: int
    activations: int
    transient: int
    margin: int

    @property
    def total(self) -> int:
        return sum(v for k, v in self.parts().items() if k != "total")

    def parts(self) -> dict[str, int]:
        """Bytes by part (not the total)."""
        return {
            "weights": self.weights,
            "lora": self.lora,
            "activations": self.activations,
            "transient": self.transient,
            "margin": self.margin,
        }


def estimate(shape: ModelShape, hp: SupervisedHyperparameters, *, device: Device) -> Estimate:
    """The peak of one training step with `hp` as it will run: `batch_size` examples per
    micro-batch, `gradient_checkpointing` decided (not "auto")."""
    checkpointing = hp.gradient_checkpointing
    if checkpointing == "auto":
        raise ValueError("estimate a decided gradient_checkpointing, not 'auto'")
    element = 2 if device == "cuda" else 4  # autocast bf16 on CUDA, fp32 on CPU
    tokens = hp.batch_size * hp.EXAMPLES_PER_ITEM * hp.max_seq_length  # a DPO item: 2 rows
    per_layer = layer_activation_elements(shape, hp) * element
    if device == "cuda":
        per_layer += 2 * shape.hidden * 2  # the two RMSNorms keep fp32 copies of their input
    if checkpointing:
        saved, recomputed = shape.layers * shape.hidden * element, per_layer
    else:
        saved, recomputed = shape.layers * per_layer, 0
    logits = min(tokens, shape.loss_chunk or tokens) * shape.vocab * LOGITS_BYTES[device]
    transient = max(logits, tokens * recomputed) + tokens * GRAD_STREAM * shape.hidden * element
    weights = _weights(shape, hp.quantization, element)
    lora = lora_parameters(shape, hp.lora_r, hp.lora_target_modules) * LORA_BYTES_PER_PARAM
    if hp.quantization != "none" or hp.use_dora:  # one whole weight materialised at a time
        transient += 2 * max((i * o for _, i, o in shape.linears), default=0) * element
    subtotal = weights + lora + tokens * saved + transient
    return Estimate(
        weights=weights,
        lora=lora,
        activations=tokens * saved,
        transient=transient,
        margin=int(MARGIN * subtotal) + FIXED_OVERHEAD[device],
    )


def layer_activation_elements(shape: ModelShape, hp: SupervisedHyperparameters) -> int:
    """Elements one decoder layer saves for the backward pass, per token (see the module doc)."""
    h, i = shape.hidden, shape.intermediate
    count = 6 * h + 2 * shape.kv_dim + 4 * i + shape.heads + len(LLAMA_LINEARS) * hp.lora_r
    if hp.lora_dropout > 0:
        count += math.ceil(1.5 * (6 * h + i))
    return count


def lora_parameters(shape: ModelShape, r: int, targets: Literal["all-linear"] | list[str]) -> int:
    """LoRA factors' parameters: r x (in + out) for each targeted linear (PEFT's matching:
    the module's full name or its last dotted components; "all-linear": every one)."""
    return sum(
        r * (fan_in + fan_out)
        for name, fan_in, fan_out in shape.linears
        if targets == "all-linear" or len(unmatched_modules(targets, [name])) < len(targets)
    )


def _weights(shape: ModelShape, quantization: str, element: int) -> int:
    """The frozen base: decoder linears at the quantized size, everything else at `element`."""
    if quantization == "none":
        return shape.n_params * element
    per = NF4_BYTES if quantization == "nf4" else INT8_BYTES
    quantized = sum(i * o for _, i, o in shape.linears)
    row_scales = 4 * sum(o for _, _, o in shape.linears) if quantization == "int8" else 0
    return int(quantized * per) + row_scales + (shape.n_params - quantized) * element


def _first(config: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"the model's config has none of {', '.join(keys)}")


def gib(n_bytes: float) -> str:
    """Bytes as GiB for messages: '3.2 GiB' (MiB below one GiB)."""
    if n_bytes < GIB:
        return f"{n_bytes / MIB:.0f} MiB"
    return f"{n_bytes / GIB:.1f} GiB"
