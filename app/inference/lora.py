"""Many LoRA adapters applied in one forward pass, each row of the batch with its own.

Every base `nn.Linear` an adapter targets is wrapped once in a `MultiLoraLinear` that holds
the low-rank factors of every resident adapter for that module. Before each forward the
scheduler sets one `Plan` on the shared `LoraState`: the adapter of each row (None = the
bare base). The wrapped module then adds, per row, only that row's adapter:

- every row on the same adapter (and prefill of one request): `B(A(x)) * scale`, PEFT's
  computation, as one matmul and one in-place `addmm` (no temporaries the size of `out`);
- mixed adapters (and the bare base): adapters are bucketed by rank (nothing is padded to
  the largest rank); per bucket the rows are gathered into [adapters, rows-per-adapter],
  and two batched matmuls against the stacked factors of the adapters present (each read
  once, however many rows use it) give every row its own delta, added back by row index
  (S-LoRA / Punica's grouped gather-bmm). About six kernels per bucket per module, however
  many adapters the batch spans; the stacks are built once per batch composition.

A row whose adapter has no factors for a module is left out there; a bare-base row is never
touched, so its output is the base model's exactly.

An adapter that trained token rows (PEFT's trainable tokens, `train_special_tokens`) has
them applied per row by `MultiTokenRows` around the input embedding and the output layer:
for that adapter's rows, its rows replace the base's for its tokens, as PEFT computes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_versions = itertools.count(1)


@dataclass(frozen=True)
class Factors:
    """One adapter's factors for one module: A [r, in], B [out, r], and its scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class Group:
    """Rows of one rank bucket laid out [adapters, G] (G = most rows on one adapter).

    `gather[k * G + j]` is the j-th row of the bucket's k-th adapter; short adapters are
    padded with row 0, whose results `slots` (the real positions) leave out again.
    """

    keys: tuple[str, ...]
    size: int  # G
    gather: torch.Tensor
    slots: torch.Tensor | None  # None when no padding
    rows: torch.Tensor  # the batch row of each real slot, in slot order


@dataclass
class Plan:
    """The adapter of each row for the next forward; immutable once set."""

    row_keys: tuple[str | None, ...]
    version: int = field(default_factory=lambda: next(_versions))
    groups: dict[tuple[str, ...], Group] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unique = tuple(dict.fromkeys(key for key in self.row_keys if key is not None))
        self.uniform = len(self.unique) == 1 and None not in self.row_keys

    def group(self, keys: tuple[str, ...], device: torch.device) -> Group:
        """The layout of the rows using `keys` (one rank bucket), cached per plan."""
        found = self.groups.get(keys)
        if found is None:
            members = [[i for i, k in enumerate(self.row_keys) if k == key] for key in keys]
            size = max(len(rows) for rows in members)
            gather: list[int] = []
            slots: list[int] = []
            rows: list[int] = []
            for rows_of_key in members:
                for j in range(size):
                    if j < len(rows_of_key):
                        slots.append(len(gather))
                        rows.append(rows_of_key[j])
                    gather.append(rows_of_key[j] if j < len(rows_of_key) else 0)
            padded = len(slots) != len(gather)
            found = self.groups[keys] = Group(
                keys,
                size,
                _long(gather, device),
                _long(slots, device) if padded else None,
                _long(rows, device),
            )
        return found


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


# One rank bucket's (group, A^T [K, in, r], B^T [K, r, out], scale [K, 1, 1]).
_Stack = tuple[Group, torch.Tensor, torch.Tensor, torch.Tensor]


class LoraState:
    """Shared by the wrapped modules of one base model; set by the scheduler thread only."""

    def __init__(self) -> None:
        self.plan: Plan | None = None


class MultiLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus the LoRA factors of every resident adapter for it."""

    def __init__(self, base: nn.Linear, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.factors: dict[str, Factors] = {}
        self._built: tuple[int, tuple[str, ...], list[_Stack]] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        plan = self.state.plan
        if plan is None or not plan.unique:
            return out
        present = tuple(key for key in plan.unique if key in self.factors)
        if not present:
            return out
        if plan.uniform:  # PEFT's computation, fused: out += scale * (x A^T) B^T in place
            f = self.factors[present[0]]
            flat = out.view(-1, out.shape[-1])
            flat.addmm_(x.reshape(-1, x.shape[-1]) @ f.a.t(), f.b.t(), alpha=f.scale)
            return out
        return self._grouped(x, out, plan, present)

    def _grouped(
        self, x: torch.Tensor, out: torch.Tensor, plan: Plan, present: tuple[str, ...]
    ) -> torch.Tensor:
        """Per rank bucket: gather rows by adapter, two batched matmuls, add back per row."""
        rows, tokens = x.shape[0], x[0].numel() // x.shape[-1]
        flat_out = out.view(rows, tokens, out.shape[-1])
        for group, a, b, scale in self._stacks(plan, present, x.device):
            picked = x.reshape(rows, tokens, -1).index_select(0, group.gather)
            picked = picked.view(len(group.keys), group.size * tokens, -1)
            delta = torch.bmm(torch.bmm(picked, a), b).mul_(scale)
            delta = delta.view(-1, tokens, delta.shape[-1])
            if group.slots is not None:
                delta = delta.index_select(0, group.slots)
            flat_out.index_add_(0, group.rows, delta)
        return out

    def _stacks(self, plan: Plan, present: tuple[str, ...], device: torch.device) -> list[_Stack]:
        """One stack per rank, built once per plan."""
        if self._built is not None and self._built[:2] == (plan.version, present):
            return self._built[2]
        by_rank: dict[int, list[str]] = {}
        for key in present:
            by_rank.setdefault(self.factors[key].rank, []).append(key)
        stacks: list[_Stack] = []
        for keys in by_rank.values():
            chosen = [self.factors[key] for key in keys]
            scale = torch.tensor([f.scale for f in chosen], dtype=chosen[0].a.dtype)
            stacks.append(
                (
                    plan.group(tuple(keys), device),
                    torch.stack([f.a.t() for f in chosen]),
                    torch.stack([f.b.t() for f in chosen]),
                    scale.view(-1, 1, 1).to(device),
                )
            )
        self._built = (plan.version, present, stacks)
        return stacks


def wrap_module(model: nn.Module, name: str, state: LoraState) -> MultiLoraLinear:
    """The `MultiLoraLinear` at `name`, wrapping the plain `nn.Linear` there on first use
    (inside the output layer's `MultiTokenRows`, when it has one)."""
    module = model.get_submodule(name)
    if isinstance(module, MultiTokenRows):
        if not isinstance(module.base, MultiLoraLinear):
            module.base = MultiLoraLinear(_linear(module.base, name), state)
        return module.base
    if isinstance(module, MultiLoraLinear):
        return module
    return _replace(model, name, MultiLoraLinear(_linear(module, name), state))


def _linear(module: nn.Module, name: str) -> nn.Linear:
    """`module`, a plain `nn.Linear` (adapters are checked against `linear_shapes`)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is not a linear layer: {type(module).__name__}")
    return module


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer an adapter may target (wrapped or not)."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiLoraLinear | nn.Linear) and not name.endswith(".base"):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


@dataclass(frozen=True)
class TokenRows:
    """One adapter's trained rows of an embedding or output layer, replacing the base's."""

    ids: torch.Tensor  # [k] token ids
    rows: torch.Tensor  # [k, width]
    slot: torch.Tensor  # [vocabulary]: the position of each token in `ids`, -1 if absent


class MultiTokenRows(nn.Module):
    """An input embedding or output layer plus the token rows of every resident adapter."""

    def __init__(self, base: nn.Embedding | nn.Linear, state: LoraState) -> None:
        super().__init__()
        # The output layer's base becomes a MultiLoraLinear when an adapter targets it too.
        self.base: nn.Embedding | nn.Linear | MultiLoraLinear = base
        self.state = state
        self.factors: dict[str, TokenRows] = {}  # named like MultiLoraLinear's, for the pool

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add(self, key: str, ids: torch.Tensor, rows: torch.Tensor) -> None:
        slot = torch.full((self.base.weight.shape[0],), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)
        self.factors[key] = TokenRows(ids, rows, slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        plan = self.state.plan
        if plan is None:
            return out
        for key in plan.unique:
            tokens = self.factors.get(key)
            if tokens is None:
                continue
            rows = torch.tensor(
                [i for i, k in enumerate(plan.row_keys) if k == key], device=out.device
            )
            if isinstance(self.base, nn.Embedding):
                out.index_copy_(0, rows, self._embedded(x[rows], out[rows], tokens))
            else:  # the output layer: those rows' logits of the adapter's tokens
                out[rows.unsqueeze(-1), :, tokens.ids] = (x[rows] @ tokens.rows.t()).transpose(1, 2)
        return out

    def _embedded(self, ids: torch.Tensor, out: torch.Tensor, tokens: TokenRows) -> torch.Tensor:
        slot = tokens.slot[ids]
        hit = slot >= 0
        # some embeddings scale their output (Gemma); PEFT scales the trained rows alike
        scale = getattr(self.base, "embed_scale", None)
        values = tokens.rows[slot[hit]]
        if scale is not None:
            values = values * torch.as_tensor(scale, dtype=values.dtype, device=values.device)
        out[hit] = values
        return out


def wrap_tokens(model: nn.Module, name: str, state: LoraState) -> MultiTokenRows:
    """The `MultiTokenRows` at `name`, wrapping the embedding or output layer on first use."""
    module = model.get_submodule(name)
    if isinstance(module, MultiTokenRows):
        return module
    if not isinstance(module, nn.Embedding | nn.Linear):  # token_shapes names only these
        raise TypeError(f"{name} is not an embedding or output layer: {type(module).__name__}")
    return _replace(model, name, MultiTokenRows(module, state))


_Wrapper = TypeVar("_Wrapper", bound=nn.Module)


def _replace(model: nn.Module, name: str, wrapped: _Wrapper) -> _Wrapper:
    """Put `wrapped` where the module `name` was (it holds that module as its base)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, wrapped)
    return wrapped


def token_shapes(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """(vocabulary, width) of the input embedding and the output layer, by module name
    (of the model before any wrapping)."""
    # transformers leaves get_output_embeddings unannotated
    output = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    layers = [model.get_input_embeddings(), output]
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if any(module is layer for layer in layers if layer is not None)
    }
