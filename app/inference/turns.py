"""Whose rows a decode step runs while more than one organization has rows on a base.

Admission (`fairness.py`, `admission.py`) bounds what one organization holds of the batch;
this bounds what it takes of the forwards. Rows of close lengths share a KV slab, and a
step is one forward per slab (`padding.py`), so a tenant with many long streams holds
several slabs, and a step over all of them made another tenant's 5-token completion wait
for every one of those forwards at each of its tokens (4x its quiet latency on one core).

So a step forwards the slabs that hold a row of one organization: the one whose rows took
part in the fewest forwards lately (each forward counts once for every organization with a
row in it; the counts halve every `HALF_LIFE_FORWARDS` forwards). Alone, an organization's
turn is every slab: the batch runs as before. A newcomer beside a busy tenant has the
smaller count, so its few rows decode step after step as if alone, while the busy tenant's
other slabs wait those steps. When both stay busy, each takes part in at least about half of
the forwards, however many rows or slabs the other holds. This is fair share by decayed
usage, as in Slurm's fair-share factor and the Virtual Token Counter of Sheng et al.,
"Fairness in Serving Large Language Models" (OSDI 2024); the decay, rather than VTC's lift
to the least active count, gives a tenant back a short burst once it has been idle, and no
more: at most about 1.44 x `HALF_LIFE_FORWARDS` forwards ahead.

Pure: no torch, no threads.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence

HALF_LIFE_FORWARDS = 32
_FORGOTTEN = 1e-3  # a count this small is an idle organization's: dropped


class Turns:
    def __init__(self, half_life: float = HALF_LIFE_FORWARDS) -> None:
        self._decay = 0.5 ** (1 / half_life)
        self._used: dict[Hashable, float] = {}  # organization -> decayed forwards
        self._chosen_at: dict[Hashable, int] = {}  # organization -> the turn it last had
        self._turn = 0

    def choose(
        self, slab_owners: Sequence[Collection[Hashable]], waited: Sequence[int]
    ) -> list[int]:
        """The slabs (indices) the next step forwards, the longest waiting first, given each
        slab's rows' owners and how many forwards ago it last ran."""
        present = list(dict.fromkeys(owner for owners in slab_owners for owner in owners))
        chosen = list(range(len(slab_owners)))
        if len(present) > 1:  # the least count; on a tie the one that waited longest
            owner = min(present, key=lambda o: (self._used.get(o, 0.0), self._chosen_at.get(o, -1)))
            self._turn += 1
            self._chosen_at[owner] = self._turn
            chosen = [index for index in chosen if owner in slab_owners[index]]
        return sorted(chosen, key=lambda index: -waited[index])

    def charge(self, slab_owners: Iterable[Collection[Hashable]]) -> None:
        """Count the forwards of the slabs a step ran (each slab's rows' owners)."""
        for owners in slab_owners:
            for owner in list(self._used):
                self._used[owner] *= self._decay
                if self._used[owner] < _FORGOTTEN:
                    del self._used[owner]
                    self._chosen_at.pop(owner, None)
            for owner in set(owners):
                self._used[owner] = self._used.get(owner, 0.0) + 1.0

    def used(self, owner: Hashable) -> float:
        """`owner`'s decayed count of forwards (for tests and the engine's figures)."""
        return self._used.get(owner, 0.0)
