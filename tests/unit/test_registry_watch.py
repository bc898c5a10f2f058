"""The registry watch of an inference process (docs/design.md §2.1): the adapters its engine
holds that the registry no longer lists as active are unloaded, by the watch's own thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from app.inference.registry_watch import drop_gone_adapters, start_registry_watch


class HeldAdapters:
    """Stands in for the engine: what it holds, and what it was told to unload."""

    def __init__(self, held: list[str]) -> None:
        self.held, self.unloaded = held, threading.Event()
        self.unloaded_ids: list[str] = []

    def held_adapters(self) -> list[str]:
        return list(self.held)

    def unload_adapter(self, adapter_id: str) -> None:
        self.held.remove(adapter_id)
        self.unloaded_ids.append(adapter_id)
        self.unloaded.set()


def test_nothing_held_reads_nothing() -> None:
    bad_url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # would fail if it were read
    assert drop_gone_adapters(HeldAdapters([]), bad_url) == []  # type: ignore[arg-type]


def test_the_watch_thread_unloads_what_the_registry_no_longer_lists(settings) -> None:
    engine = HeldAdapters(["ft:tiny:acme::ftjob-gone"])
    app = SimpleNamespace(state=SimpleNamespace(engine=engine))
    fast = settings.model_copy(update={"registry_watch_seconds": 0.05})
    stop = start_registry_watch(app, fast)  # type: ignore[arg-type]
    try:
        assert engine.unloaded.wait(timeout=30)  # bounded for a busy CI, not a timing
    finally:
        stop.set()
    assert engine.unloaded_ids == ["ft:tiny:acme::ftjob-gone"] and engine.held == []
