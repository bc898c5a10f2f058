"""The adapters resident over one base model: loading, LRU eviction, pinning, counters.

Owned by the base model's scheduler thread: only that thread installs or evicts, between
forward passes, so a forward never sees an adapter half there. Reading files, checking the
sha256 and parsing the weights happen on a separate loader thread, so loading one adapter
never stalls the requests already running on others; a read that fails is logged there and
reported to the scheduler, which fails the requests waiting for it. What is deleted is the
engine's one record (`deleted.py`): never loaded again, evicted once no running row uses
it. `snapshot` and `lru_order` may be called from any thread (they copy under a lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from app.errors import model_not_found
from app.inference.adapter_files import AdapterWeights, read_adapter
from app.inference.deleted import DeletedAdapters
from app.inference.lora import Factors, LoraState, TokenRows, wrap_module, wrap_tokens
from app.inference.messages import Loaded
from app.inference.types import AdapterRef, AdapterStats
from app.observability import metrics

logger = logging.getLogger(__name__)


_Holder = dict[str, Factors] | dict[str, TokenRows]


@dataclass
class _Resident:
    sha256: str
    holders: list[_Holder]  # the `factors` dicts of the wrapped modules that hold its weights
    pinned: bool


class AdapterPool:
    def __init__(
        self,
        model: Any,
        state: LoraState,
        *,
        base_model: str,
        capacity: int,
        shapes: dict[str, tuple[int, int]],
        token_shapes: dict[str, tuple[int, int]],
        dtype: Any,
        device: Any,
        notify: Callable[[Loaded], None],
        deleted: DeletedAdapters,
    ) -> None:
        self.model, self.state, self.base_model = model, state, base_model
        self.capacity = capacity
        self._read = {
            "shapes": shapes,
            "token_shapes": token_shapes,
            "dtype": dtype,
            "device": device,
        }
        self._notify, self._deleted = notify, deleted
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # least recent first
        self._loading: dict[str, bool] = {}  # id -> pin when loaded
        self._stats: dict[str, AdapterStats] = {}
        self._order: tuple[str, ...] = ()  # `resident` keys, published for other threads
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix=f"lora-load-{base_model}")

    def ready(self, ref: AdapterRef) -> bool:
        found = self.resident.get(ref.id)
        return found is not None and found.sha256 == _sha(ref)

    def is_deleted(self, adapter_id: str) -> bool:
        return adapter_id in self._deleted

    def load(self, ref: AdapterRef, *, pin: bool = False) -> None:
        """Start loading `ref` on the loader thread (once; never a deleted one); the result
        comes back as a `Loaded` message, for `finish_load`."""
        if ref.id in self._loading:
            self._loading[ref.id] = self._loading[ref.id] or pin
            return
        if ref.id in self._deleted:
            return  # its waiting requests are refused by the scheduler's `Unload`
        self._loading[ref.id] = pin
        self._loader.submit(self._read_one, ref)

    def _read_one(self, ref: AdapterRef) -> None:
        started = time.perf_counter()
        try:
            result: AdapterWeights | Exception = read_adapter(ref, **self._read)
        except Exception as exc:  # logged here; the scheduler fails the requests waiting
            logger.warning("loading adapter %s on %s failed", ref.id, self.base_model, exc_info=exc)
            result = exc
        self._notify(Loaded(ref, result, time.perf_counter() - started))

    def finish_load(self, message: Loaded) -> Exception | None:
        """Install what the loader read; the error for its waiting requests if it failed, or
        if the adapter was deleted meanwhile (then it is not installed)."""
        ref, result = message.ref, message.result
        if isinstance(result, Exception) or ref.id in self._deleted:
            self._loading.pop(ref.id, None)
            return result if isinstance(result, Exception) else model_not_found(ref.id)
        self._install(result, message.seconds)
        return None

    def _install(self, weights: AdapterWeights, seconds: float) -> None:
        """Make a read adapter usable by the next forward (scheduler thread, between steps)."""
        ref = weights.ref
        pin = self._loading.pop(ref.id, False)
        if ref.id in self.resident:
            pin = pin or self.resident[ref.id].pinned
            self._evict(ref.id)
        holders: list[_Holder] = []
        for name, (a, b, scale) in weights.modules.items():
            factors = wrap_module(self.model, name, self.state).factors
            factors[ref.id] = Factors(a, b, scale)
            holders.append(factors)
        for name, (ids, rows) in weights.tokens.items():
            holder = wrap_tokens(self.model, name, self.state)
            holder.add(ref.id, ids, rows)
            holders.append(holder.factors)
        self.resident[ref.id] = _Resident(_sha(ref), holders, pin)
        with self._lock:
            self._order = tuple(self.resident)
            stats = self._stats_for(ref)
            stats.loaded, stats.pinned, stats.rank, stats.bytes = (
                True,
                pin,
                weights.rank,
                weights.nbytes,
            )
            stats.loads += 1
            stats.last_load_seconds = seconds
        metrics.adapter_loaded(self.base_model, ref.id)

    def _evict(self, adapter_id: str) -> None:
        """Drop an adapter's factors from every module (their memory is freed with them)."""
        found = self.resident.pop(adapter_id, None)
        if found is None:
            return
        for holder in found.holders:
            holder.pop(adapter_id, None)
        with self._lock:
            self._order = tuple(self.resident)
            stats = self._stats.get(adapter_id)
            if stats is not None:
                stats.loaded, stats.pinned = False, False
                stats.evictions += 1
        metrics.adapter_evicted(self.base_model, adapter_id)

    def trim(self, busy: set[str | None], wanted: set[str | None]) -> None:
        """Evict deleted adapters and least recently used ones past capacity.

        Never evicts an adapter a running row uses (`busy`), nor a pinned one unless it was
        deleted; prefers the ones no waiting request asks for (`wanted`). May stay over
        capacity until rows end.
        """
        for adapter_id in self._deleted.among(a for a in self.resident if a not in busy):
            self._evict(adapter_id)
        if len(self.resident) <= self.capacity:
            return  # the common case, checked every scheduler iteration
        excess = sum(not r.pinned for r in self.resident.values()) - self.capacity
        candidates = [a for a, r in self.resident.items() if not r.pinned and a not in busy]
        candidates.sort(key=lambda a: a in wanted)  # stable: LRU order within each group
        for adapter_id in candidates[: max(0, excess)]:
            self._evict(adapter_id)

    def touch(self, ref: AdapterRef, *, hit: bool) -> None:
        """A request arrived for `ref`: count a hit or a miss."""
        with self._lock:
            stats = self._stats_for(ref)
            stats.hits += hit
            stats.misses += not hit
        metrics.adapter_requested(self.base_model, ref.id, hit=hit)

    def used(self, ref: AdapterRef) -> None:
        """A request starts running on `ref`: it becomes the most recently used."""
        if ref.id in self.resident:
            self.resident.move_to_end(ref.id)
        with self._lock:
            self._order = tuple(self.resident)
            self._stats_for(ref).last_used = time.time()

    def finished(self, ref: AdapterRef, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            stats = self._stats_for(ref)
            stats.requests += 1
            stats.prompt_tokens += prompt_tokens
            stats.completion_tokens += completion_tokens

    def pin(self, adapter_id: str) -> None:
        found = self.resident.get(adapter_id)
        if found is not None:
            found.pinned = True
            with self._lock:
                self._stats[adapter_id].pinned = True

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(stats) for stats in self._stats.values()]

    def lru_order(self) -> list[str]:
        """Resident adapter ids, least recently used first (safe from any thread)."""
        with self._lock:
            return list(self._order)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _stats_for(self, ref: AdapterRef) -> AdapterStats:
        stats = self._stats.get(ref.id)
        if stats is None:
            stats = self._stats[ref.id] = AdapterStats(ref.id, self.base_model, ref.owner)
        return stats


def _sha(ref: AdapterRef) -> str:
    return ref.sha256.strip().lower()
