"""Which waiting requests start at the next step: the fair order against the KV budget.

Organizations take turns into the batch's free rows (`fairness.py`). Then each request, in
that order, joins if the cache it can reach fits (`kv.peak_cells`, beside the running slabs
and those planned before it), by three rules:

- An organization's share: while more than one organization has requests running or
  waiting on this scheduler, one may project at most `LORAFORGE_KV_CACHE_ORG_SHARE` of the
  whole budget (`KvBudget.share_cap`) with its own rows (its first row excepted, so a
  request that fits the budget always can run). An organization alone may use it all. A
  request past its organization's share waits for that organization's rows to end; it
  holds up no one else.
- Skip, do not block: a request within its share that does not fit the free cache is passed
  over, and later requests that fit join.
- No starvation: once a request has been passed over `MAX_PASSES` times (admission rounds
  in which a request after it joined), it reserves: nothing after it joins until it fits.
  Running rows only end (nothing new joins past it), so it fits once enough have ended.

`plan` needs no torch and no threads (it only counts passes on the requests); `start`
prefills what it planned (the scheduler's forward) and joins the rows to their slabs.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from app.inference.fairness import choose_fairly
from app.inference.kv import peak_cells
from app.inference.padding import choose_slab
from app.inference.request import Request
from app.inference.slabs import Row, Slab, horizon

logger = logging.getLogger(__name__)

MAX_PASSES = 4  # times a request that does not fit may be passed over before it reserves

_Cells = list[list[tuple[Hashable, int, int]]]  # per slab: (owner, cached, steps left)


@dataclass
class Planned:
    """What joins (each request with its slab) and what waits for cache, and why."""

    joins: list[tuple[Request, Slab]] = field(default_factory=list)
    over_share: list[Request] = field(default_factory=list)  # its organization's share
    no_room: list[Request] = field(default_factory=list)  # the free cache: passed over

    @property
    def held_back(self) -> list[Request]:
        return self.over_share + self.no_room


def plan(
    slabs: list[Slab],
    order: list[Request],
    *,
    rows: int,
    room: int,
    cap: int | None,
    by_length: bool,
    new_slab: Callable[[], Slab],
) -> Planned:
    """Up to `rows` of `order` that fit in `room` cells beside the running `slabs`, by the
    rules above. The slab is fixed here: a row that prefill ends at once joins none, which
    only lowers the projection planned."""
    targets = list(slabs)
    cells: _Cells = [[_cells(row) for row in slab.rows] for slab in slabs]
    result, passed = Planned(), 0
    for request in order:
        if len(result.joins) == rows:
            break
        owner, wanted = request.owner, (len(request.input_ids), request.sampling.max_tokens - 1)
        lengths = [[c for _, c, _ in slab] for slab in cells]
        own = [all(other == owner for other, _, _ in slab) for slab in cells]
        index = choose_slab(lengths, wanted[0], by_length=by_length, steps=wanted[1], own=own)
        trial = [list(slab) for slab in cells] + ([[]] if index is None else [])
        trial[-1 if index is None else index].append((owner, *wanted))
        if cap is not None and _owns(cells, owner) and _peak_of(trial, owner) > cap:
            result.over_share.append(request)
        elif _peak(trial) > room:
            result.no_room.append(request)
            if request.passed_over >= MAX_PASSES:
                break  # it reserves: nothing after it joins until it fits
        else:
            if index is None:
                targets.append(new_slab())
            cells = trial
            result.joins.append((request, targets[-1 if index is None else index]))
            passed = len(result.no_room)  # those so far were passed over this round
    for request in result.no_room[:passed]:
        request.passed_over += 1
    return result


def start(
    planned: list[tuple[Request, Slab]],
    slabs: list[Slab],
    prefill: Callable[[list[Request]], tuple[list[tuple[int, Row]], Any]],
    *,
    name: str,
) -> None:
    """Prefill the planned requests (`prefill`: one group of same-length prompts; its rows
    still running, each with its index in the group, and the group's cache) and join each
    row to its slab, adding new slabs to `slabs`."""
    slab_of = {id(request): slab for request, slab in planned}
    # Same-length prompts prefill together: one forward, no padding, so every row is
    # computed exactly as it would be alone.
    by_length: dict[int, list[Request]] = {}
    for request, _ in planned:
        by_length.setdefault(len(request.input_ids), []).append(request)
    joining: dict[int, tuple[Slab, list[Row], list[tuple[Any, int]]]] = {}
    for group in by_length.values():
        try:
            live, cache = prefill(group)
        except Exception as exc:  # these requests only
            logger.exception("prefill failed on %s", name)
            for request in group:
                request.put(exc)
            continue
        for index, row in live:
            slab = slab_of[id(row.request)]
            _, joined, caches = joining.setdefault(id(slab), (slab, [], []))
            joined.append(row)
            caches.append((cache, index))
    pending = list(joining.values())
    for index, (slab, joined, caches) in enumerate(pending):
        try:
            slab.kv.join(caches, horizon(slab.rows + joined))
        except Exception as exc:  # e.g. out of memory: these rows and those after never start
            for _, never, _ in pending[index:]:
                for row in never:
                    row.request.put(exc)
            raise
        slab.rows.extend(joined)
        if slab not in slabs:
            slabs.append(slab)


def fair_order(
    ready: dict[Hashable, deque[Request]],
    running: list[Row],
    *,
    per_owner: int,
    last_owner: Hashable,
) -> list[Request]:
    """Every startable request in the order organizations take turns (`choose_fairly`),
    none past its share of the batch's rows."""
    everyone = sum(len(requests) for requests in ready.values())
    order, _ = choose_fairly(
        ready,
        Counter(row.request.owner for row in running),
        room=everyone,
        per_owner=per_owner,
        last_owner=last_owner,
    )
    return order


def _cells(row: Row) -> tuple[Hashable, int, int]:
    return row.request.owner, row.cached, row.left


def _owns(cells: _Cells, owner: Hashable) -> bool:
    return any(o == owner for slab in cells for o, _, _ in slab)


def _peak(cells: _Cells) -> int:
    return peak_cells([[(c, n) for _, c, n in slab] for slab in cells])


def _peak_of(cells: _Cells, owner: Hashable) -> int:
    """The projected peak of `owner`'s rows, as if alone in their slabs."""
    return _peak([[row for row in slab if row[0] == owner] for slab in cells])
