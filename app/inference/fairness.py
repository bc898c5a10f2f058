"""Fair admission into a batch across organizations, so one tenant cannot stall the others.

Requests wait per base model; when the batch has room, organizations take turns (round
robin, starting after the one served last) and none holds more than its share of the
batch's rows. One organization's backlog therefore delays another's request by at most a
turn, and its long generations can never fill the whole batch. Pure: no torch, no threads.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Hashable, Iterable
from typing import TypeVar

T = TypeVar("T")


def share_of(max_batch: int, share: float) -> int:
    """Rows of a batch one organization may hold (at least one); the rest stays free."""
    return max(1, math.ceil(max_batch * share))


def choose_fairly(
    ready: dict[Hashable, deque[T]],
    running: Counter[Hashable],
    *,
    room: int,
    per_owner: int,
    last_owner: Hashable = None,
) -> tuple[list[T], Hashable]:
    """Up to `room` items taken from `ready` (per owner, arrival order), one owner at a
    time, none past `per_owner` running; returns them and the owner served last."""
    owners = list(ready)
    if last_owner in owners:
        start = owners.index(last_owner) + 1
        owners = owners[start:] + owners[:start]
    running, chosen = Counter(running), []
    while room > 0 and owners:
        for owner in list(owners):
            if room == 0:
                break
            if not ready[owner] or running[owner] >= per_owner:
                owners.remove(owner)
                continue
            chosen.append(ready[owner].popleft())
            running[owner] += 1
            room -= 1
            last_owner = owner
    return chosen, last_owner


class OwnerCounters:
    """Decode steps with rows, those whose rows were on more than one model, and the most
    rows in one step: for the whole batch (the operator's view) and per organization (what
    a tenant sees, never the engine's), recorded by one rule."""

    _EVERYONE = object()

    def __init__(self) -> None:
        self._counts: dict[Hashable, list[int]] = {}

    def record(self, rows: Iterable[tuple[Hashable, Hashable]]) -> None:
        """One decode step's rows as (owner, model key)."""
        keys: dict[Hashable, list[Hashable]] = {self._EVERYONE: []}
        for owner, key in rows:
            keys.setdefault(owner, []).append(key)
            keys[self._EVERYONE].append(key)
        for owner, mine in keys.items():
            counts = self._counts.setdefault(owner, [0, 0, 0])
            counts[0] += 1
            counts[1] += len(set(mine)) > 1
            counts[2] = max(counts[2], len(mine))

    def __getitem__(self, owner: Hashable) -> dict[str, int]:
        steps, mixed, peak = self._counts.get(owner, (0, 0, 0))
        return {"steps": steps, "mixed_steps": mixed, "peak_batch": peak}

    def everyone(self) -> dict[str, int]:
        return self[self._EVERYONE]
