"""Which slab a new row joins, so that padding stays a bounded share of the KV cache.

A slab (`kv.BatchKV`) is left-padded: every row costs as many columns as its longest row.
One slab for the whole batch lets a 512-token prompt make every 8-token row cost 512. So the
running batch is split into slabs (each decoded by its own forward, all every step), and a
row joins a slab only if afterwards no row of it pads more than `PAD_FREE_COLUMNS` columns
or `PAD_SHARE` of the slab's width, whichever is more. Rows grow one column per step
together, so a row's padding never grows, and trimming (the longest row leaving) lowers
padding and width alike: the bound holds for the slab's whole life. Rows of close lengths
still share one forward; the price of the bound is one more forward per extra slab.

Except a short-lived row: one that decodes at most `SHORT_ROW_STEPS` steps (a 5-token
completion beside its organization's long streams) joins the slab of its organization it
adds the fewest cells to even past the bound. In a slab of its own it would cost every
decode step of its organization's batch one more forward for its whole life; joined, its
padding (or the others', where it is the longest: trimmed when it leaves) lasts those few
steps, and the KV budget counts it (`kv.peak_cells`). Beside another organization's rows it
keeps to the bound: while organizations share a base a step forwards one organization's
slabs (`turns.py`), so in a slab of its own it costs no other tenant a forward, and its steps
forward its few rows, not another tenant's.

Pure: no torch, so the scheduler and the benchmarks plan with it.
"""

from __future__ import annotations

from collections.abc import Sequence

PAD_FREE_COLUMNS = 64  # short rows share a slab whatever their ratio (a forward costs more)
PAD_SHARE = 0.5  # past that, a row pads at most half its slab's width
SHORT_ROW_STEPS = 16  # a row that decodes at most this many steps may join any slab


def fits(lengths: Sequence[int], cached: int) -> bool:
    """Whether a row caching `cached` tokens may join a slab whose rows cache `lengths`."""
    width = max(cached, *lengths) if lengths else cached
    shortest = min(cached, *lengths) if lengths else cached
    return width - shortest <= max(PAD_FREE_COLUMNS, PAD_SHARE * width)


def choose_slab(
    slabs: Sequence[Sequence[int]],
    cached: int,
    *,
    by_length: bool,
    steps: int | None = None,
    own: Sequence[bool] | None = None,
) -> int | None:
    """The slab (index into `slabs`, each its rows' cached lengths) a new row joins: the one
    it adds the fewest cells to among those it `fits`, or when it decodes at most
    `SHORT_ROW_STEPS` `steps`, among those whose rows are all its organization's (`own`,
    per slab; None: all are); None: a new slab. `by_length=False` is the single-slab layout
    (every row in slab 0), kept for the benchmark's comparison."""
    if not by_length:
        return 0 if slabs else None
    fitting = [index for index, lengths in enumerate(slabs) if fits(lengths, cached)]
    if not fitting and steps is not None and steps <= SHORT_ROW_STEPS:
        fitting = [index for index in range(len(slabs)) if own is None or own[index]]
    return min(fitting, key=lambda index: _added_cells(slabs[index], cached), default=None)


def _added_cells(lengths: Sequence[int], cached: int) -> int:
    width = max(lengths, default=0)
    return (len(lengths) + 1) * max(width, cached) - len(lengths) * width
