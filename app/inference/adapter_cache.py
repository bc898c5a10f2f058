"""LoRA adapters hot-swapped over one frozen base model, in a bounded LRU.

One `AdapterCache` per base model. The first adapter wraps the base with
`PeftModel.from_pretrained` (LoRA layers are injected in place, the base weights are
never copied or reloaded); later ones are added with `load_adapter`, switched with
`set_adapter` and dropped with `delete_adapter`. When the last adapter leaves, the
wrapper is `unload()`ed so the base model is plain again (PEFT cannot hold zero adapters).

Every method that touches the model must be called with the base model's lock held
(the engine does this); `snapshot`/`holds` only read bookkeeping and are safe anytime.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.inference.types import AdapterIntegrityError, AdapterRef
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir, file_sha256
from app.ml.loading import UnsafeModelError

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def peft_adapter_name(adapter_id: str) -> str:
    """A PEFT-safe module name for an adapter id (ids contain ':' and maybe '.')."""
    return "a" + hashlib.sha1(adapter_id.encode()).hexdigest()[:16]


def verify_adapter(ref: AdapterRef) -> None:
    """Refuse an adapter that is not a safetensors LoRA or whose weights changed since publish."""
    folder = Path(ref.path)
    try:
        check_adapter_dir(folder)
    except UnsafeModelError as exc:
        raise AdapterIntegrityError(f"adapter {ref.id}: {exc}", param="model") from exc
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterIntegrityError(
            f"adapter {ref.id} contains pickled weights ({', '.join(pickled)}); "
            "only safetensors adapters are served",
            param="model",
        )
    actual = file_sha256(folder / ADAPTER_WEIGHTS)
    if actual != ref.sha256.strip().lower():
        raise AdapterIntegrityError(
            f"adapter {ref.id}: sha256 of {ADAPTER_WEIGHTS} is {actual} but the registry "
            f"recorded {ref.sha256}; the file changed after publishing, refusing to serve it",
            param="model",
        )
    try:
        peft_type = json.loads((folder / ADAPTER_CONFIG).read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterIntegrityError(
            f"adapter {ref.id}: {ADAPTER_CONFIG} is not a JSON object", param="model"
        ) from exc
    if peft_type != "LORA":
        raise AdapterIntegrityError(
            f"adapter {ref.id} is a {peft_type!r} adapter; only LORA is served", param="model"
        )


@dataclass
class _Entry:
    name: str  # PEFT adapter name
    sha256: str
    last_used: int


class AdapterCache:
    """The adapters loaded over one base model, least recently used first."""

    def __init__(self, base_model: Any, *, capacity: int, clock: itertools.count) -> None:
        self.base_model = base_model
        self.peft_model: Any = None  # the PeftModel wrapper while >= 1 adapter is loaded
        self.broken = False  # a failed first load may have left LoRA layers in the base
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._meta = threading.Lock()  # guards _entries against concurrent readers

    @contextmanager
    def use(self, adapter: AdapterRef | None) -> Iterator[Any]:
        """Yield the model to run with `adapter` active (or with adapters disabled for None)."""
        if adapter is None:
            if self.peft_model is None:
                yield self.base_model
            else:
                with self.peft_model.disable_adapter():
                    yield self.peft_model
            return
        self._ensure(adapter)
        yield self.peft_model

    def evict(self, adapter_id: str) -> bool:
        """Drop one adapter's weights; True if it was loaded."""
        with self._meta:
            entry = self._entries.pop(adapter_id, None)
            left = len(self._entries)
        if entry is None:
            return False
        if left == 0:
            self.base_model = self.peft_model.unload()
            self.peft_model = None
        else:
            self.peft_model.delete_adapter(entry.name)
        return True

    def holds(self, adapter_id: str) -> bool:
        with self._meta:
            return adapter_id in self._entries

    def snapshot(self) -> list[tuple[int, str]]:
        """(last_used, adapter_id) for every loaded adapter."""
        with self._meta:
            return [(entry.last_used, adapter_id) for adapter_id, entry in self._entries.items()]

    def _ensure(self, ref: AdapterRef) -> _Entry:
        """Load `ref` if needed, make it the active adapter, and mark it most recently used."""
        sha = ref.sha256.strip().lower()
        with self._meta:
            entry = self._entries.get(ref.id)
            fresh = entry is not None and entry.sha256 == sha
            if fresh:
                entry.last_used = next(self._clock)
                self._entries.move_to_end(ref.id)
        if fresh:
            _set_active(self.peft_model, entry.name)
            return entry
        if entry is not None:  # same id, other weights: never serve the stale ones
            self.evict(ref.id)
        verify_adapter(ref)
        name = peft_adapter_name(ref.id)
        self._load(ref, name)
        entry = _Entry(name, sha, next(self._clock))
        with self._meta:
            self._entries[ref.id] = entry
            victims = list(self._entries)[: max(0, len(self._entries) - self._capacity)]
        _set_active(self.peft_model, name)  # before evicting, so no active adapter is deleted
        for victim in victims:  # load first, then evict: never unwrap/rewrap at capacity 1
            self.evict(victim)
        return entry

    def _load(self, ref: AdapterRef, name: str) -> None:
        from peft import PeftModel

        device = str(next(self.base_model.parameters()).device)
        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(
                    self.base_model,
                    str(ref.path),
                    adapter_name=name,
                    is_trainable=False,
                    torch_device=device,
                )
            else:
                self.peft_model.load_adapter(
                    str(ref.path), adapter_name=name, is_trainable=False, torch_device=device
                )
        except Exception as exc:
            self._clean_failed_load(name)
            raise AdapterIntegrityError(
                f"adapter {ref.id} could not be loaded onto this base model: {exc}", param="model"
            ) from exc
        self.peft_model.eval()

    def _clean_failed_load(self, name: str) -> None:
        if self.peft_model is None:
            self.broken = True  # from_pretrained failed mid-way; the engine reloads the base
            return
        if name in self.peft_model.peft_config:
            try:
                self.peft_model.delete_adapter(name)
            except Exception:
                self.broken = True


def _set_active(peft_model: Any, name: str) -> None:
    if "inference_mode" in inspect.signature(peft_model.set_adapter).parameters:
        peft_model.set_adapter(name, inference_mode=True)  # keep adapter weights frozen
    else:
        peft_model.set_adapter(name)
