"""The KV cache of one running batch: rows left-padded to a common length, grown in place.

transformers' `DynamicCache` concatenates the whole cache on every decode step (O(length)
copies per token); here each layer owns a buffer with spare capacity and a decode step
writes one column. Rows join after their own prefill (copied in, right-aligned) and leave
when they finish (their row is dropped); leading columns that every row pads are trimmed
then. A left-padded row is masked by `attention_mask()`; its position ids count only its
real tokens, so each row decodes exactly as it would alone.

A slab costs rows x its longest row: the scheduler keeps rows of very different lengths in
separate slabs (`padding.py`), and `peak_cells` bounds what a set of slabs will ever hold,
which is what the KV budget admits against (`kv_budget.py`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

_GROW = 64  # spare columns added when a buffer fills (amortises the copy)


# transformers leaves CacheLayerMixin's __init_subclass__ and __init__ unannotated
class _SlabLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One layer's keys/values in a preallocated buffer shared in shape by the batch."""

    def __init__(self, owner: BatchKV) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.owner = owner
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_buf, v_buf = self.k_buf, self.v_buf
        assert k_buf is not None and v_buf is not None, "a forward before any row joined"
        start = self.owner.length
        end = start + key_states.shape[-2]
        k_buf[:, :, start:end] = key_states
        v_buf[:, :, start:end] = value_states
        keys, values = k_buf[:, :, :end], v_buf[:, :, :end]
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.owner.length + query_length, 0


class BatchKV:
    """The running batch's cache: `rows` sequences, `length` columns, `pad[i]` leading pads."""

    def __init__(self, num_layers: int, device: Any) -> None:
        self.layers = [_SlabLayer(self) for _ in range(num_layers)]
        # transformers types `layers` as an invariant list of its own layer classes
        self.cache = Cache(layers=self.layers)  # type: ignore[arg-type]
        self.device = device
        self.length = 0
        self.pad = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return int(self.pad.shape[0])

    def capacity(self) -> int:
        first = self.layers[0].k_buf
        return 0 if first is None else first.shape[2]

    def attention_mask(self) -> torch.Tensor:
        """[rows, length + 1]: 1 for real tokens (and the one being fed), 0 for padding."""
        columns = torch.arange(self.length + 1, device=self.device)
        return (columns[None, :] >= self.pad[:, None]).long()

    def positions(self) -> torch.Tensor:
        """[rows, 1]: the position id of the token each row feeds next."""
        return (self.length - self.pad).unsqueeze(1)

    def real_lengths(self) -> list[int]:
        """Tokens each row really caches (its columns minus its padding)."""
        return (self.length - self.pad).tolist() if self.rows else []

    def advance(self, horizon: int = _GROW) -> None:
        """Commit the column the last forward wrote; grow the buffers when they are full.
        `horizon`: the most decode steps any row still has (spare columns past it are waste)."""
        self.length += 1
        if self.length >= self.capacity():
            self._rebuild(torch.arange(self.rows, device=self.device), [], horizon)

    def keep(self, rows: list[int], horizon: int = _GROW) -> None:
        """Drop every row not in `rows` (finished or cancelled sequences)."""
        if len(rows) == self.rows:
            return
        self._rebuild(torch.tensor(rows, dtype=torch.long, device=self.device), [], horizon)

    def join(self, prefilled: list[tuple[Cache, int]], horizon: int = _GROW) -> None:
        """Append rows (a prefill's cache and the row in it), right-aligned."""
        self._rebuild(torch.arange(self.rows, device=self.device), prefilled, horizon)

    def _rebuild(self, keep: torch.Tensor, new: list[tuple[Cache, int]], horizon: int) -> None:
        old_real = self.length - self.pad[keep] if self.rows else self.pad[:0]
        new_lengths = [_prefilled(cache, 0, "keys").shape[-2] for cache, _ in new]
        lengths = old_real.tolist() + new_lengths
        length = max(lengths, default=0)
        capacity = length + _spare(horizon)
        pad = [length - n for n in lengths]
        for index, layer in enumerate(self.layers):
            layer.k_buf, layer.v_buf = (
                self._moved(layer, name, keep, new, index, pad, capacity)
                for name in ("k_buf", "v_buf")
            )
            layer.keys = layer.values = None
        self.length = length
        self.pad = torch.tensor(pad, dtype=torch.long, device=self.device)

    def _moved(
        self,
        layer: _SlabLayer,
        name: str,
        keep: torch.Tensor,
        new: list[tuple[Cache, int]],
        index: int,
        pad: list[int],
        capacity: int,
    ) -> torch.Tensor | None:
        old = getattr(layer, name)
        old_pad = self.pad.tolist()
        sources: list[torch.Tensor] = (
            []
            if old is None
            else [old[row, :, old_pad[row] : self.length] for row in keep.tolist()]
        )
        attr = "keys" if name == "k_buf" else "values"
        sources += [_prefilled(cache, index, attr)[row] for cache, row in new]
        if not sources:
            return None
        heads, _, dim = sources[0].shape
        buf = sources[0].new_zeros((len(sources), heads, capacity, dim))
        for row, (source, offset) in enumerate(zip(sources, pad, strict=True)):
            buf[row, :, offset : offset + source.shape[1]] = source
        return buf


def _spare(horizon: int) -> int:
    """Columns a rebuilt buffer holds past its length: a chunk (amortises the copy), but
    never more than the rows can still write (`horizon` decode steps, +1: the column the
    next forward writes before its row is dropped)."""
    return min(_GROW, max(0, horizon) + 1)


def peak_cells(slabs: list[list[tuple[int, int]]]) -> int:
    """The most cache cells (token slots per layer, padding and spare included) that slabs
    whose rows are (tokens cached now, decode steps left) will ever hold at once.

    Slabs advance at their own pace (a step forwards one organization's slabs while
    organizations share a base: `turns.py`), so any slab may reach its peak while the others
    are at theirs: the sum of each slab's own peak, which some order of turns reaches. Rows
    that end early (EOS, a cancel) or join later (admitted against this) only lower what is
    already projected, so admission against it never runs out mid-stream.
    """
    return sum(_slab_peak(slab) for slab in slabs)


def _slab_peak(rows: list[tuple[int, int]]) -> int:
    """At its step t a slab holds its rows with steps left >= t, each as wide as the longest
    (max cached + t) plus the spare `_rebuild` gives. Between two rows' ends that only grows,
    so the peak is at t = 0 or at some row's last step."""
    peak = 0
    for t in {0} | {left for _, left in rows}:
        alive = [(cached, left) for cached, left in rows if left >= t]
        if alive:
            width = max(cached for cached, _ in alive) + t
            peak = max(peak, len(alive) * (width + _spare(max(left for _, left in alive) - t)))
    return peak


def _prefilled(cache: Cache, index: int, attr: str) -> torch.Tensor:
    """Layer `index`'s keys or values in a prefill's cache (set: the prefill wrote them)."""
    tensor: torch.Tensor = getattr(cache.layers[index], attr)
    return tensor


def forward_options(model: Any) -> tuple[str, dict[str, Any]]:
    """The KV-cache argument's name (transformers 5 renamed `past_key_values` to `cache`)
    and `logits_to_keep=1` where supported (skips the prompt-long logits at prefill)."""
    names: Mapping[str, inspect.Parameter]
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        names = {}
    cache_arg = "cache" if "cache" in names else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in names else {})
