"""The inference engine: base models loaded once, LoRA adapters hot-swapped per request.

Simple and serial per base model: one lock per base is held around tokenize + adapter
switch + decode, so requests on the same base run one at a time (requests on different
bases run in parallel). The batched engine replaces `decode` and the lock, not the API.
torch/transformers/peft are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from app.errors import InvalidRequest, NotFound
from app.inference.adapter_cache import AdapterCache
from app.inference.decoding import decode, eos_token_ids
from app.inference.sampling import SamplingParams
from app.inference.types import AdapterRef, Generation

DEFAULT_CONTEXT_LENGTH = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class _Slot:
    """One base model; everything but `lock` is only touched with `lock` held."""

    name: str
    ref: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer: Any = None
    cache: AdapterCache | None = None
    eos_ids: frozenset[int] = frozenset()


class InferenceEngine:
    def __init__(
        self, *, base_models: dict[str, str], max_loaded_adapters: int = 8, device: str = "auto"
    ) -> None:
        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        self._refs = dict(base_models)
        self._capacity = max_loaded_adapters
        self._device = device
        self._slots: dict[str, _Slot] = {}
        self._context: dict[str, int] = {}
        self._lock = threading.Lock()  # guards _slots and _context
        self._clock = itertools.count()  # shared LRU clock across base models

    def generate(
        self,
        *,
        base_model: str,
        adapter: AdapterRef | None,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Generation:
        params = SamplingParams.checked(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed
        )
        _check_input(prompt, messages)
        slot = self._slot(base_model)
        with slot.lock:
            cache = self._loaded(slot)
            input_ids = _tokenize(slot.tokenizer, prompt, messages)
            self._check_fits(base_model, len(input_ids), max_tokens)
            try:
                with cache.use(adapter) as model:
                    return decode(model, slot.tokenizer, input_ids, params, eos_ids=slot.eos_ids)
            finally:
                if cache.broken:
                    slot.cache = None  # reload the base on the next request

    def context_length(self, base_model: str) -> int:
        """Max prompt + completion tokens; read from the config, without loading weights."""
        ref = self._ref(base_model)
        with self._lock:
            known = self._context.get(base_model)
        if known is None:
            from transformers import AutoConfig

            known = _context_of(AutoConfig.from_pretrained(ref, trust_remote_code=False))
            with self._lock:
                self._context[base_model] = known
        return known

    def unload_adapter(self, adapter_id: str) -> None:
        """Free an adapter's weights (call after deleting it from the registry). Idempotent."""
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            if slot.cache is not None and slot.cache.holds(adapter_id):
                with slot.lock:
                    if slot.cache is not None:
                        slot.cache.evict(adapter_id)

    def loaded_adapters(self) -> list[str]:
        """Ids of loaded adapters, least recently used first (over all base models)."""
        with self._lock:
            caches = [slot.cache for slot in self._slots.values() if slot.cache is not None]
        entries = sorted(entry for cache in caches for entry in cache.snapshot())
        return [adapter_id for _, adapter_id in entries]

    def _ref(self, base_model: str) -> str:
        ref = self._refs.get(base_model)
        if ref is None:
            raise NotFound(f"base model {base_model!r} is not served here", param="model")
        return ref

    def _slot(self, base_model: str) -> _Slot:
        ref = self._ref(base_model)
        with self._lock:
            slot = self._slots.get(base_model)
            if slot is None:
                slot = self._slots[base_model] = _Slot(base_model, ref)
            return slot

    def _loaded(self, slot: _Slot) -> AdapterCache:
        """The slot's model, loaded on first use (caller holds `slot.lock`)."""
        if slot.cache is None:
            from app.ml.loading import load_base_model, load_tokenizer

            model = load_base_model(slot.ref, device=self._device)
            slot.tokenizer = slot.tokenizer or load_tokenizer(slot.ref)
            slot.eos_ids = eos_token_ids(slot.tokenizer, model)
            with self._lock:
                self._context.setdefault(slot.name, _context_of(model.config))
            slot.cache = AdapterCache(model, capacity=self._capacity, clock=self._clock)
        return slot.cache

    def _check_fits(self, base_model: str, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.context_length(base_model)
        if prompt_tokens + max_tokens > limit:
            raise InvalidRequest(
                f"this model's context length is {limit} tokens, but {prompt_tokens} prompt "
                f"tokens + max_tokens {max_tokens} = {prompt_tokens + max_tokens}; "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
            )


def _check_input(prompt: str | None, messages: list[dict] | None) -> None:
    if prompt is not None and messages is not None:
        raise InvalidRequest("give either prompt or messages, not both", param="messages")
    if messages is not None:
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InvalidRequest("each message needs a string role", param="messages")
    elif not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string", param="prompt")


def _tokenize(tokenizer: Any, prompt: str | None, messages: list[dict] | None) -> list[int]:
    """Token ids exactly as training makes them (chat: rendered text, no special tokens added)."""
    if messages is not None:
        from app.ml.chat import render_prompt

        ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids
        param = "messages"
    else:
        ids = tokenizer(prompt).input_ids
        param = "prompt"
    if not ids:
        raise InvalidRequest(f"the {param} tokenizes to no tokens", param=param)
    return list(ids)


def _context_of(config: Any) -> int:
    for source in (config, getattr(config, "text_config", None)):
        for key in _CONTEXT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT_LENGTH
