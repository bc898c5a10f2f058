"""The PEFT fallback: adapters the batched engine cannot apply, served all the same.

The batch applies plain LoRA on linear layers (`lora.py`); an adapter with anything else
(DoRA, LoRA on an embedding, trainable tokens, …: `adapter_files.batch_refusal`) gets its
own scheduler over a PEFT-injected view of the base. The view copies the module tree but
shares every weight with the base (no second copy of the model in memory); PEFT computes
the adapter exactly as it did in training. Requests on one such adapter batch with each
other on that scheduler (same sampling, stop strings, logprobs and streaming as the batched
path, since it is the same `BaseScheduler`), not with the base's batch: slower, never wrong.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

from app.errors import NotFound, ServiceUnavailable, model_not_found
from app.inference.adapter_files import batch_refusal, read_peft_adapter, refused
from app.inference.messages import Submit
from app.inference.types import AdapterRef, AdapterStats

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

logger = logging.getLogger(__name__)
_ADAPTER = "default"  # the one adapter of each view
_IDLE_WAIT_SECONDS = 300  # a retired scheduler finishes its rows for at most this long


def shared_view(model: Any) -> Any:
    """`model`'s module tree copied, every parameter and buffer shared (not copied), the
    batch's `MultiLoraLinear` wrappers replaced by the plain layers they wrap."""
    from app.inference.lora import MultiLoraLinear

    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    memo.update({id(m): m.base for m in model.modules() if isinstance(m, MultiLoraLinear)})
    return copy.deepcopy(model, memo)


def peft_view(model: Any, ref: AdapterRef) -> Any:
    """A view of the base `model` with `ref` injected by PEFT, its weights verified."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    config, tensors = read_peft_adapter(ref)
    try:
        # peft leaves from_peft_type unannotated
        peft_config = PeftConfig.from_peft_type(**config)  # type: ignore[no-untyped-call]
    except (TypeError, ValueError) as exc:
        raise refused(ref, f"its adapter_config.json does not load in PEFT ({exc})") from exc
    try:
        wrapped = get_peft_model(shared_view(model), peft_config, adapter_name=_ADAPTER)
        # peft annotates a bare `namedtuple`; it returns torch's load_state_dict result
        result = cast(
            "_IncompatibleKeys",
            set_peft_model_state_dict(wrapped, tensors, adapter_name=_ADAPTER),
        )
    except Exception as exc:  # PEFT's own refusal of this config on this base
        raise refused(ref, f"PEFT cannot load it onto this base ({type(exc).__name__})") from exc
    missing = [key for key in result.missing_keys if f".{_ADAPTER}" in key]
    if result.unexpected_keys or missing:
        first = (result.unexpected_keys or missing)[0]
        raise refused(ref, f"its weights do not fit this base model ({first})")
    return wrapped.base_model.model.eval()  # the base's modules, PEFT's layers injected


class Fallbacks:
    """Per engine: one scheduler per fallback adapter, least recently used retired first."""

    def __init__(self, *, capacity: int, max_batch: int, nice: int = 0) -> None:
        self.capacity, self.max_batch, self.nice = capacity, max_batch, nice
        self._schedulers: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._reasons: dict[tuple[str, str], str | None] = {}
        # What the visibility route lists: each adapter ever served here, by id
        self._stats: dict[str, AdapterStats] = {}
        self._lock = threading.Lock()  # held while a view loads: fallback requests only wait
        # every adapter request routes through this one; the listing reads under it too
        self._reasons_lock = threading.Lock()

    def reason(self, ref: AdapterRef, shapes: dict[str, tuple[int, int]]) -> str | None:
        """Why `ref` needs the fallback (None: the batch serves it); cached per sha256."""
        key = (ref.id, ref.sha256)
        with self._reasons_lock:
            if key in self._reasons:
                return self._reasons[key]
        found = batch_refusal(ref, shapes)
        with self._reasons_lock:
            self._reasons[key] = found
        return found

    def submit(self, base_name: str, base: Any, ref: AdapterRef, request: Any) -> None:
        """Hand `request` to `ref`'s scheduler (started on first use: loads on this thread).

        Sent under the lock, so a scheduler is never retired between being chosen and
        receiving the request: retiring waits for what it has received.
        """
        with self._lock:
            self._scheduler(base_name, base, ref).submit(request)
        with self._reasons_lock:
            stats = self._stats[ref.id]
            stats.requests += 1
            stats.last_used = time.time()

    def snapshot(self) -> list[dict[str, Any]]:
        """The adapters served here (resident or retired), as the batch's pool lists its
        own, marked `served_by` the PEFT fallback."""
        with self._reasons_lock:
            listed = [asdict(stats) for stats in self._stats.values()]
        return [stats | {"served_by": "peft_fallback"} for stats in listed]

    def _listed(self, base_name: str, ref: AdapterRef, *, loaded: bool) -> None:
        with self._reasons_lock:
            stats = self._stats.get(ref.id)
            if stats is None:
                stats = self._stats[ref.id] = AdapterStats(ref.id, base_name, ref.owner)
            if loaded and not stats.loaded:
                stats.loads += 1
            stats.loaded = loaded

    def warm(self, base_name: str, base: Any, ref: AdapterRef) -> None:
        with self._lock:
            self._scheduler(base_name, base, ref)

    def _scheduler(self, base_name: str, base: Any, ref: AdapterRef) -> Any:
        from app.inference.scheduler import BaseScheduler
        from app.ml.loading import load_tokenizer

        key = (ref.id, ref.sha256)
        found = self._schedulers.get(key)
        if found is not None:
            self._schedulers.move_to_end(key)
            return found
        model = base.scheduler.model
        try:
            started = BaseScheduler(
                f"{base_name}+{ref.id}",
                peft_view(model, ref),
                load_tokenizer(base.ref),
                eos_ids=base.scheduler.eos_ids,
                capacity=1,
                max_batch=self.max_batch,
                nice=self.nice,
                kv_budget=base.scheduler.budget,  # same device, same weights: one budget
                group_by_length=base.scheduler.group_by_length,
                fallback_for=(base_name, ref.id),
            )
        except Exception:  # the caller gets the error; the log keeps it too
            logger.warning("loading adapter %s on the PEFT fallback failed", ref.id, exc_info=True)
            raise
        logger.info("serving %s with the PEFT fallback", ref.id)
        self._schedulers[key] = started
        self._listed(base_name, ref, loaded=True)
        while len(self._schedulers) > self.capacity:
            (old_id, _), oldest = self._schedulers.popitem(last=False)
            self._unlisted(old_id, evicted=True)
            _retire(oldest, ServiceUnavailable("the adapter was unloaded for another; retry"))
        return started

    def _unlisted(self, adapter_id: str, *, evicted: bool) -> None:
        with self._reasons_lock:
            stats = self._stats.get(adapter_id)
            if stats is not None and stats.loaded:
                stats.loaded = False
                stats.evictions += evicted

    def unload(self, adapter_id: str) -> None:
        with self._lock:
            keys = [key for key in self._schedulers if key[0] == adapter_id]
            gone = [self._schedulers.pop(key) for key in keys]
        with self._reasons_lock:  # deleted: no longer listed
            self._stats.pop(adapter_id, None)
        for scheduler in gone:
            _retire(scheduler, model_not_found(adapter_id))

    def close(self) -> None:
        with self._lock:
            gone, self._schedulers = list(self._schedulers.values()), OrderedDict()
        for scheduler in gone:
            _stop(scheduler, NotFound("the inference engine stopped", param="model"))


def _retire(scheduler: Any, error: Exception) -> None:
    """Stop `scheduler` once the requests it holds are done (in the background)."""

    def wait_then_stop() -> None:
        for _ in range(_IDLE_WAIT_SECONDS * 10):
            if not scheduler.rows and not scheduler.waiting and scheduler.inbox.empty():
                break
            threading.Event().wait(0.1)
        _stop(scheduler, error)

    threading.Thread(target=wait_then_stop, name="retire-fallback", daemon=True).start()


def _stop(scheduler: Any, error: Exception) -> None:
    """Stop the thread, then fail whatever it still held, so that no caller waits forever."""
    scheduler.stop()
    held = [row.request for row in scheduler.rows] + list(scheduler.waiting)
    while not scheduler.inbox.empty():
        message = scheduler.inbox.get_nowait()
        if isinstance(message, Submit):
            held.append(message.request)
    for request in held:
        request.put(error)  # wakes a caller waiting on the event loop, frees its admission
