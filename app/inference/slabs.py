"""The running batch's rows and the KV slabs they decode in.

A row is one running request; a slab is the rows that share one left-padded KV cache
(`kv.BatchKV`) and one forward per decode step. Which slab a row joins is `padding.py`'s
rule; whether it may join at all is admission's (`admission.py`), against the projected
peak of every slab (`kv.peak_cells`) and the room the KV budget leaves (`kv_budget.py`).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from app.inference.kv import BatchKV, peak_cells
from app.inference.lora import Plan
from app.inference.request import Request
from app.inference.sampling import make_generator
from app.inference.text import TextTracker
from app.inference.types import Generation, TokenLogprob


@dataclass(eq=False)
class Row:
    request: Request
    tracker: TextTracker
    generator: Any
    last: int = -1  # the token the next decode step feeds
    produced: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending: list[TokenLogprob] = field(default_factory=list)  # not yet streamed

    @property
    def cached(self) -> int:
        """Tokens this row caches between two steps (the last one is fed next)."""
        return len(self.request.input_ids) + self.produced - 1

    @property
    def left(self) -> int:
        """Decode steps this row may still run (each caches one more token)."""
        return self.request.sampling.max_tokens - self.produced

    @classmethod
    def begin(cls, request: Request, tokenizer: Any, eos_ids: frozenset[int], device: Any) -> Row:
        sampling = request.sampling
        generator = None if sampling.greedy else make_generator(sampling.seed, device)
        return cls(request, TextTracker(tokenizer, sampling.stop, eos_ids), generator)

    def generation(self) -> Generation:
        """The finished request's answer."""
        logprobs = self.logprobs if self.request.logprobs is not None else None
        reason = self.tracker.finish_reason or "length"
        return Generation(
            self.tracker.text, reason, len(self.request.input_ids), self.produced, logprobs
        )


@dataclass(eq=False)
class Slab:
    """Running rows that share one left-padded KV slab and one forward per step."""

    kv: BatchKV
    rows: list[Row] = field(default_factory=list)
    plan: Plan | None = None
    forwarded_at: int = 0  # the scheduler's forward count when this slab last ran

    def projection(self) -> list[tuple[int, int]]:
        return [(row.cached, row.left) for row in self.rows]


def horizon(rows: list[Row]) -> int:
    """The most decode steps any of `rows` may still run."""
    return max((row.left for row in rows), default=0)


def owners(rows: list[Row]) -> list[Hashable]:
    return [row.request.owner for row in rows]


def projected_peak(slabs: list[Slab]) -> int:
    """The most cache cells these slabs' rows can ever hold at once."""
    return peak_cells([slab.projection() for slab in slabs])


class CellCounts:
    """Cache cells summed over decode steps: allocated (spare columns too), of the padded
    width (rows x longest row), and real tokens; and the most allocated at one step."""

    def __init__(self) -> None:
        self.allocated = self.padded = self.real = self.peak_allocated = 0

    def count(self, slabs: list[Slab]) -> None:
        allocated = sum(slab.kv.rows * slab.kv.capacity() for slab in slabs)
        self.allocated += allocated
        self.padded += sum(slab.kv.rows * slab.kv.length for slab in slabs)
        self.real += sum(row.cached for slab in slabs for row in slab.rows)
        self.peak_allocated = max(self.peak_allocated, allocated)

    def as_dict(self) -> dict[str, int]:
        return {
            "allocated": self.allocated,
            "padded": self.padded,
            "real": self.real,
            "peak_allocated": self.peak_allocated,
        }
