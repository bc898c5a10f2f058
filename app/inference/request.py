"""One submitted generation: what the scheduler needs, and the channel back to the caller.

The scheduler thread `put`s `Delta`s, then the final `Generation` (or the error that ended
the request). The caller reads them from a thread (`result()`, `deltas()`) or, without
holding a thread, from the event loop (`attach()` then `next_event()`, `aresult()`).

On the event loop, the work per stream follows the reader's pace, not the model's: a wake-up
is sent only when the reader waits, and `next_event` returns every delta that arrived
meanwhile as one. Under load (many streams, one core) a stream then costs the loop one chunk
per turn instead of one per token, and the loop keeps time for other requests.
`cancel()` (a client that went away) makes the scheduler drop the row at its next step.
`on_done` runs when the request ends or is cancelled: it frees the organization's
admission slot (`engine.py`); it may run more than once, so it must be idempotent.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from app.inference.sampling import Sampling
from app.inference.types import AdapterRef, Delta, Generation

Event = Delta | Generation | BaseException


@dataclass(eq=False)
class Request:
    adapter: AdapterRef | None
    input_ids: list[int]
    sampling: Sampling
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    owner: str | None = None  # the organization: fair admission across organizations
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    generation: Generation | None = None
    on_done: Callable[[], None] = lambda: None
    passed_over: int = 0  # admission rounds that started later requests past it (admission.py)
    # time.monotonic() when it reached the engine and when its first token was generated:
    # the latency metrics (app/observability/metrics.py)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    _ready: asyncio.Event | None = None
    _wake: Callable[[], object] | None = None
    _waiting: bool = False  # the reader is (about to be) asleep: the next put wakes it
    _held: Event | None = None  # the end, read while merging the deltas before it

    @property
    def key(self) -> str | None:
        return None if self.adapter is None else self.adapter.id

    # -- the scheduler's side ----------------------------------------------------------
    def put(self, item: Event) -> None:
        self.events.put(item)
        if isinstance(item, Generation | BaseException):
            self.on_done()
        wake = self._wake
        if wake is not None and self._waiting:
            self._waiting = False
            wake()

    def cancel(self) -> None:
        self.cancelled = True
        self.on_done()

    # -- a caller's thread -------------------------------------------------------------
    def deltas(self) -> Iterator[Delta]:
        """Pieces as they are generated; the final `Generation` is kept in `generation`."""
        while True:
            item = self._taken(self.events.get())
            if item is None:
                return
            yield item

    def result(self) -> Generation:
        for _ in self.deltas():
            pass
        assert self.generation is not None
        return self.generation

    # -- the event loop: waits without holding a thread --------------------------------
    def attach(self) -> None:
        """Wake this event loop on each event (call on the loop, before `next_event`)."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        self._ready = ready
        self._wake = lambda: loop.call_soon_threadsafe(ready.set)

    async def next_event(self, timeout: float | None = None) -> Delta | None:
        """The deltas that arrived since the last call, as one; None at the end
        (`generation` is set) or after `timeout` seconds with nothing new (`generation`
        still None). Raises the error that ended it."""
        assert self._ready is not None, "attach() first"
        while True:
            arrived = self._arrived()
            if arrived is not None:
                return self._taken(arrived)
            self._ready.clear()
            self._waiting = True  # before the check: a put after it sees the flag and wakes
            if not self.events.empty():
                continue
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None

    def _arrived(self) -> Event | None:
        """What arrived, consecutive deltas merged; None when nothing did."""
        first, self._held = self._held or _get_nowait(self.events), None
        if not isinstance(first, Delta):
            return first
        merged = first
        while (later := _get_nowait(self.events)) is not None:
            if not isinstance(later, Delta):
                self._held = later  # the end: returned by the next call
                break
            merged = merged.followed_by(later)
        return merged

    async def aresult(self) -> Generation:
        while self.generation is None:
            await self.next_event()
        return self.generation

    def _taken(self, item: Event) -> Delta | None:
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Generation):
            self.generation = item
            return None
        return item


def _get_nowait(events: queue.SimpleQueue[Event]) -> Event | None:
    try:
        return events.get_nowait()
    except queue.Empty:
        return None
