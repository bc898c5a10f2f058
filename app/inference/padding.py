"""Which slab a new row joins, so that padding stays a bounded share of the KV cache.

A slab (`kv.BatchKV`) is left-padded: every row costs as many columns as its longest row.
One slab for the whole batch lets a 512-token prompt make every 8-token row cost 512. So the
running batch is split into slabs (each decoded by its own forward, all every step), and a
row joins a slab only if afterwards no row of it pads more than `PAD_FREE_COLUMNS` columns
or `PAD_SHARE` of the slab's width, whichever is more. Rows grow one column per step
together, so a row's padding never grows, and trimming (the longest row leaving) lowers
padding and width alike: the bound holds for the slab's whole life. Rows of close lengths
still share one forward; the price of the bound is one more forward per extra slab.

Pure: no torch, so the scheduler and the benchmarks plan with it.
"""

from __future__ import annotations

from collections.abc import Sequence

PAD_FREE_COLUMNS = 64  # short rows share a slab whatever their ratio (a forward costs more)
PAD_SHARE = 0.5  # past that, a row pads at most half its slab's width


def fits(lengths: Sequence[int], cached: int) -> bool:
    """Whether a row caching `cached` tokens may join a slab whose rows cache `lengths`."""
    width = max(cached, *lengths) if lengths else cached
    shortest = min(cached, *lengths) if lengths else cached
    return width - shortest <= max(PAD_FREE_COLUMNS, PAD_SHARE * width)


def choose_slab(slabs: Sequence[Sequence[int]], cached: int, *, by_length: bool) -> int | None:
    """The slab (index into `slabs`, each its rows' cached lengths) a new row joins: the one
    it adds the fewest cells to among those it `fits`; None: a new slab. `by_length=False`
    is the single-slab layout (every row in slab 0), kept for the benchmark's comparison."""
    if not by_length:
        return 0 if slabs else None
    best, best_cost = None, 0
    for index, lengths in enumerate(slabs):
        if not fits(lengths, cached):
            continue
        width = max(lengths, default=0)
        cost = (len(lengths) + 1) * max(width, cached) - len(lengths) * width
        if best is None or cost < best_cost:
            best, best_cost = index, cost
    return best
