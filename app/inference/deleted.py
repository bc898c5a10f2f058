"""The adapters deleted while this process runs: one record, refused and evicted for good.

The engine adds to it (`InferenceEngine.unload_adapter`) and checks it before tokenizing; it
hands the same record to every base model's pool (`pool.py`), which never loads a deleted
adapter again and evicts one as soon as no running row uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class DeletedAdapters:
    """Ids of the adapters deleted while this process runs (thread-safe): refused for good."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, adapter_id: str) -> None:
        with self._lock:
            self._ids.add(adapter_id)

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            return adapter_id in self._ids

    def among(self, adapter_ids: Iterable[str]) -> list[str]:
        """Those of `adapter_ids` that are deleted (one lock for all)."""
        with self._lock:
            return [a for a in adapter_ids if a in self._ids]
