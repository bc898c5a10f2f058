"""One submitted generation: what the scheduler needs, and the channel back to the caller.

The scheduler thread puts `Delta`s on `events`, then the final `Generation` (or the error
that ended the request). The caller's thread reads them: `result()` for a whole
completion, `deltas()` for streaming. `cancel()` (a client that went away) makes the
scheduler drop the row at its next step.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass, field

from app.inference.sampling import SamplingParams
from app.inference.types import AdapterRef, Delta, Generation


@dataclass(eq=False)
class Request:
    adapter: AdapterRef | None
    input_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    generation: Generation | None = None

    @property
    def key(self) -> str | None:
        return None if self.adapter is None else self.adapter.id

    def cancel(self) -> None:
        self.cancelled = True

    def deltas(self) -> Iterator[Delta]:
        """Pieces as they are generated; the final `Generation` is kept in `generation`."""
        while True:
            item = self.events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Generation):
                self.generation = item
                return
            yield item

    def result(self) -> Generation:
        for _ in self.deltas():
            pass
        assert self.generation is not None
        return self.generation
