"""The training loss, summed next-token cross-entropy over label tokens, computed in
chunks of tokens so that a micro-batch's [tokens x vocab] logits never exist at once.

At a 128k vocabulary the logits phase is most of a step's peak: 2048 tokens of fp32 logits
are 1 GiB, and the cross-entropy keeps its log-softmax (another GiB) and backward makes
their two gradients. `causal_lm_loss` runs the decoder once, keeps the hidden states of the
label positions only (the others have no target), and applies the output layer and the
cross-entropy to CHUNK_LOGITS_BYTES worth of them at a time, each chunk under
`torch.utils.checkpoint`: forward keeps only the chunk's hidden states, and backward
recomputes that chunk's logits, so the logits phase costs one chunk (the same idea as
Liger's and Unsloth's fused linear cross-entropy, without a custom kernel). The price is
one more output-layer matmul over the label tokens (at 1B and 2048 tokens, ~5 % of a
checkpointed step's FLOPs), paid only when there is more than one chunk; a batch whose
label tokens fit in one chunk runs as a plain forward.

The output layer is whatever module the model returns from `get_output_embeddings()`, so
LoRA on `lm_head` and PEFT's trainable tokens train through it as they do in the model's
own forward. Models whose forward transforms the logits after the output layer (Gemma 2's
soft-capping, Cohere's and Granite's scales), and models without a separate decoder, get
the whole logits from their own forward instead (`token_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.training.data import IGNORE_INDEX

# fp32 logits of one chunk: 261 tokens at a 128,256-entry vocabulary. The logits phase of a
# chunk is four such tensors (logits, log-softmax, their gradients): 512 MiB.
CHUNK_LOGITS_BYTES = 128 << 20
LOGITS_ELEMENT_BYTES = 4  # the loss runs in fp32 (autocast's bf16 logits are upcast)
# config attributes of forwards that change the logits after the output layer
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunk_tokens(vocab: int) -> int:
    """Label tokens per chunk at a vocabulary of `vocab` entries."""
    return max(1, CHUNK_LOGITS_BYTES // (LOGITS_ELEMENT_BYTES * vocab))


def loss_chunk_tokens(config: Mapping[str, Any]) -> int | None:
    """Label tokens per chunk for a model of `config` (its `config.json`, text part);
    None when its forward transforms the logits, so the loss takes them whole."""
    if any(config.get(k) is not None for k in HEAD_TRANSFORMS):
        return None
    return chunk_tokens(int(config["vocab_size"]))


def causal_lm_loss(
    model: Any, batch: dict[str, Any], *, chunk: int | None = None
) -> tuple[Any, int]:
    """Summed next-token cross-entropy over the label tokens of a collated `batch`
    (`packing.collate`) under `model` (a causal LM, PEFT-wrapped or not), and how many
    label tokens there are. `chunk`: label tokens per chunk (default: `chunk_tokens`)."""
    import torch

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head, size = _split(lm)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if decoder is None:
        return token_loss(model(**inputs, use_cache=False).logits, batch["labels"])
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    targets = shifted_labels(batch["labels"]).reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden.reshape(-1, hidden.size(-1))[keep], targets[keep]
    size, n = chunk or size, int(targets.numel())
    # one chunk, or no backward to keep anything for (eval): nothing to recompute
    recompute = n > size and torch.is_grad_enabled()
    parts = [
        _chunk_loss(head, hidden[i : i + size], targets[i : i + size], recompute=recompute)
        for i in range(0, max(n, 1), size)
    ]
    return torch.stack(parts).sum(), n


def token_loss(logits: Any, labels: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over label tokens of whole `logits`, and how many
    label tokens there are (for models `causal_lm_loss` cannot chunk, and for callers that
    have the logits anyway)."""
    import torch.nn.functional as F

    shifted = shifted_labels(labels)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shifted != IGNORE_INDEX).sum())


def shifted_labels(labels: Any) -> Any:
    """Each position's target: the next position's label, IGNORE_INDEX at the end. The
    labels are shifted (padded at the end) rather than the logits sliced, so logits are
    never copied (transformers' way)."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def _chunk_loss(head: Any, hidden: Any, targets: Any, *, recompute: bool) -> Any:
    """One chunk's summed loss; `recompute`: keep only its inputs for backward, which
    runs the output layer again (non-reentrant checkpointing: autocast and RNG state as
    in the forward, so LoRA dropout on the output layer draws the same mask)."""
    if not recompute:
        return _head_loss(head, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_head_loss, head, hidden, targets, use_reentrant=False)


def _head_loss(head: Any, hidden: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _split(lm: Any) -> tuple[Any, Any, int]:
    """The decoder whose hidden states the output layer reads, that layer, and the label
    tokens per chunk; (None, None, 0) when the model has no such split or transforms its
    logits after the output layer."""
    config = getattr(lm, "config", None)
    get_decoder = getattr(lm, "get_decoder", None)
    get_head = getattr(lm, "get_output_embeddings", None)
    if config is None or get_decoder is None or get_head is None:
        return None, None, 0
    size = loss_chunk_tokens(config.get_text_config().to_dict())
    decoder, head = get_decoder(), get_head()
    if size is None or decoder is None or head is None or decoder is lm:
        return None, None, 0
    return decoder, head, size
