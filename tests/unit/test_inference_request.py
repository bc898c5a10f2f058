"""The event-loop side of a request: deltas that queued up are read as one, and the scheduler
wakes the loop only when the reader waits (a stream costs the loop per turn, not per token)."""

from __future__ import annotations

import asyncio
import threading

from app.inference.request import Request
from app.inference.sampling import Sampling
from app.inference.types import Delta, Generation, TokenLogprob


def new_request() -> Request:
    return Request(None, [1, 2], Sampling(16, 0.0, 1.0, (), None))


def logprob(token: str, offset: int) -> TokenLogprob:
    return TokenLogprob(token, -1.0, {}, offset)


def test_queued_deltas_are_read_as_one_and_the_end_comes_next() -> None:
    async def scenario() -> None:
        request = new_request()
        request.attach()
        for offset, text in enumerate("abc"):
            request.put(Delta(text, [logprob(text, offset)]))
        request.put(Delta("", [], "length"))
        request.put(Generation("abc", "length", 2, 3))
        merged = await request.next_event()
        assert merged is not None and merged.text == "abc" and merged.finish_reason == "length"
        assert [entry.token for entry in merged.logprobs] == ["a", "b", "c"]
        assert await request.next_event() is None
        assert request.generation is not None and request.generation.text == "abc"

    asyncio.run(scenario())


def test_the_scheduler_wakes_the_loop_only_when_the_reader_waits() -> None:
    async def scenario() -> None:
        request = new_request()
        request.attach()
        wakes = []
        wake = request._wake
        assert wake is not None
        request._wake = lambda: (wakes.append(1), wake())
        for _ in range(100):  # the reader is busy: nothing to wake
            request.put(Delta("x"))
        assert wakes == []
        first = await request.next_event()
        assert first is not None and first.text == "x" * 100

        def later() -> None:  # from another thread, as the scheduler does
            request.put(Delta("y"))
            request.put(Generation("x" * 100 + "y", "stop", 2, 101))

        threading.Timer(0.05, later).start()
        second = await request.next_event(timeout=5)
        assert second is not None and second.text.startswith("y")
        assert await request.next_event(timeout=5) is None
        assert len(wakes) <= 2

    asyncio.run(scenario())
