"""The running batch's rows and the KV slabs they decode in; admission against the budget.

A row is one running request; a slab is the rows that share one left-padded KV cache
(`kv.BatchKV`) and one forward per decode step. Which slab a row joins is `padding.py`'s
rule; whether it may join at all is the KV budget's (`kv_budget.py`): `plan_admission`
takes requests in their fair order while the projected peak of every slab (`kv.peak_cells`)
stays within the room the budget leaves this scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.inference.kv import BatchKV, peak_cells
from app.inference.lora import Plan
from app.inference.padding import choose_slab
from app.inference.request import Request
from app.inference.text import TextTracker
from app.inference.types import TokenLogprob


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


@dataclass(eq=False)
class Slab:
    """Running rows that share one left-padded KV slab and one forward per step."""

    kv: BatchKV
    rows: list[Row] = field(default_factory=list)
    plan: Plan | None = None

    def projection(self) -> list[tuple[int, int]]:
        return [(row.cached, row.left) for row in self.rows]


def horizon(rows: list[Row]) -> int:
    """The most decode steps any of `rows` may still run."""
    return max((row.left for row in rows), default=0)


def projected_peak(slabs: list[Slab]) -> int:
    """The most cache cells these slabs' rows can ever hold at once."""
    return peak_cells([slab.projection() for slab in slabs])


def plan_admission(
    slabs: list[Slab],
    chosen: list[Request],
    *,
    room: int,
    by_length: bool,
    new_slab: Callable[[], Slab],
) -> list[tuple[Request, Slab]]:
    """The longest prefix of `chosen` that fits in `room` cells beside the running `slabs`,
    each with the slab it joins (a new one where it fits none). The slab is fixed here: a
    row that prefill ends at once joins none, which only lowers the projection planned."""
    targets = list(slabs)
    projected = [slab.projection() for slab in slabs]
    planned: list[tuple[Request, Slab]] = []
    for request in chosen:
        row = (len(request.input_ids), request.sampling.max_tokens - 1)
        lengths = [[cached for cached, _ in rows] for rows in projected]
        index = choose_slab(lengths, row[0], by_length=by_length)
        trial = [list(rows) for rows in projected]
        if index is None:
            trial.append([row])
        else:
            trial[index].append(row)
        if peak_cells(trial) > room:
            break
        if index is None:
            targets.append(new_slab())
        projected = trial
        planned.append((request, targets[-1 if index is None else index]))
    return planned


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
