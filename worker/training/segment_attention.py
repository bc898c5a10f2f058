"""Attention for packed rows, one example (segment) at a time.

A packed row holds several examples whose position ids restart at 0. transformers' default
(sdpa) path turns that into a block-diagonal [W, W] mask: every block is computed, the masked
ones included, and the fused causal kernel cannot be used. Here each segment gets its own
causal SDPA call: attention costs the sum of Lᵢ² instead of W², no mask is built, so a whole
micro-batch fits in one row with no padding at all (`packing.row_length`).

It is a transformers attention implementation (`AttentionInterface` plus a mask function that
builds nothing: https://huggingface.co/docs/transformers/en/attention_interface). Anything it
was not written for — a given attention mask, a KV cache, rows that do not start at
position 0 — goes to transformers' own sdpa path unchanged.
"""

from __future__ import annotations

from typing import Any

NAME = "loraforge_segments"
_registered = False


def use_segment_attention(model: Any) -> bool:
    """Switch `model` (a transformers model) to segment attention where it allows it.

    Only from the stock sdpa / eager paths (a flash-attention model packs with its own
    varlen kernel already), and only for full causal attention: a sliding window or mixed
    layer types need masks this does not build. True when the model now runs it.
    """
    config = model.config
    if config._attn_implementation == NAME:
        return True
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if config._attn_implementation not in ("sdpa", "eager") or can_set is None or not can_set():
        return False
    if getattr(config, "sliding_window", None) or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()
    ):
        return False
    _register()
    model.set_attn_implementation(NAME)
    enabled: bool = model.config._attn_implementation == NAME
    return enabled


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, _mask)
    _registered = True


def _mask(**kwargs: Any) -> Any:
    """No mask for a plain training forward (segments come from position_ids); sdpa's
    mask for anything else (a padding mask, a KV cache), which `segment_attention` then
    hands to sdpa."""
    from transformers.masking_utils import sdpa_mask

    plain = (
        kwargs.get("attention_mask") is None
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
        and kwargs.get("q_length") == kwargs.get("kv_length")
    )
    return None if plain else sdpa_mask(**kwargs)


def segment_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """[B, W, H, D] attention output: causal within each segment of each row."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    positions = kwargs.get("position_ids")
    segments = _segments(positions) if attention_mask is None and positions is not None else None
    if segments is not None and len(segments) == 1:  # [1, W] position ids serve every row
        segments = segments * query.shape[0]
    if (
        segments is None
        or positions is None
        or len(segments) != query.shape[0]
        or query.shape[2] != key.shape[2]
        or query.shape[2] != positions.shape[1]
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for row, bounds in enumerate(segments):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
            )
            for start, end in bounds
        ]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


_cache: tuple[Any, list[list[tuple[int, int]]] | None] = (None, None)


def _segments(positions: Any) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each run of positions restarting at 0; None when a row
    does not start at 0. Computed once per forward (every layer gets the same tensor)."""
    global _cache
    if _cache[0] is positions:
        return _cache[1]
    table = positions.tolist()
    found: list[list[tuple[int, int]]] | None = None
    if all(row and row[0] == 0 for row in table):
        found = []
        for row in table:
            starts = [i for i, p in enumerate(row) if p == 0]
            found.append(list(zip(starts, [*starts[1:], len(row)], strict=True)))
    _cache = (positions, found)
    return found
