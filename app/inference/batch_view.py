"""What the batch of one base model looks like: the operator's view, or one tenant's.

`GET /v1/engine/adapters` (a tenant: its own running and waiting requests and counters,
never another's load) and the admin and `/metrics` views (everyone's, with the engine's
figures) read it here, from copies: the scheduler thread moves its rows meanwhile.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the API imports this without torch (the scheduler's)
    from app.inference.scheduler import BaseScheduler
    from app.inference.slabs import Row


def load_info(
    scheduler: BaseScheduler, owner: Hashable = None, *, everyone: bool = True
) -> dict[str, Any]:
    """Batch state; `everyone=False`: `owner`'s running and waiting requests only."""
    running = scheduler.rows  # copies: the scheduler moves them
    waiting, held_back = list(scheduler.waiting), list(scheduler.held_back)
    counters = scheduler.counts.everyone() if everyone else scheduler.counts[owner]
    mine = [row for row in running if everyone or row.request.owner == owner]
    cache = {
        **scheduler.budget.describe(),
        **cache_use(mine),
        "waiting_for_cache": sum(everyone or r.owner == owner for r in held_back),
    }
    if everyone:  # the whole engine's figures: never shown to a tenant
        cache |= {
            "held_tokens": scheduler.budget.held(),
            "forwards": scheduler.forwards,
            **scheduler.cells.as_dict(),
        }
    return {
        "name": scheduler.name,
        "running": sum(everyone or r.request.owner == owner for r in running),
        "waiting": sum(everyone or r.owner == owner for r in waiting),
        **counters,
        "max_batch_size": scheduler.max_batch,
        "max_loaded_adapters": scheduler.pool.capacity,
        "loaded": scheduler.pool.lru_order(),
        "kv_cache": cache,
    }


def cache_use(rows: list[Row]) -> dict[str, int]:
    """Tokens `rows` cache now, and the most they may reach (prompt + max_tokens)."""
    return {
        "cached_tokens": sum(row.cached for row in rows),
        "reserved_tokens": sum(
            len(row.request.input_ids) + row.request.sampling.max_tokens for row in rows
        ),
    }
