"""The inference engine: per base model, the base loaded once and one batching scheduler.

Request threads (the API's inference threads) check the input against the model and tokenize
here, then hand the request to the base model's scheduler thread (`scheduler.py`) and wait on
it: `generate` for a whole completion, `submit(...).deltas()` for streaming. Requests on
every adapter of a base, and on the bare base, share that scheduler's forward passes.
Sampling values come validated from the API's schemas (`app/schemas/inference.py`) and are
taken as given. torch/transformers are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from app.errors import InvalidRequest, NotFound, RateLimited, model_not_found
from app.inference import prompt_input
from app.inference.batch_view import load_info
from app.inference.deleted import DeletedAdapters
from app.inference.fallback import Fallbacks
from app.inference.request import Request
from app.inference.sampling import Sampling
from app.inference.types import AdapterRef, Generation
from app.model_config import context_of

DEFAULT_CONTEXT_LENGTH = 2048
DEFAULT_MAX_TOKENS = 256  # when a chat request gives no limit (capped by the context)


class LoadedBase:
    """One base model: its scheduler, and tokenizers for the request threads."""

    def __init__(self, ref: str, quantization: str = "none") -> None:
        self.ref = ref
        self.quantization = quantization  # how its weights are held (app/base_models.py)
        self.load_lock = threading.Lock()
        self.tokenizer: Any = None
        self.max_token_chars = 0  # characters of the longest token: bounds a text's length
        self.scheduler: Any = None
        self.shapes: dict[str, tuple[int, int]] = {}  # linear layers the batch can adapt
        # A fast tokenizer is not safe to share between threads, and one shared under a
        # lock lets one huge prompt stall every request: each request borrows its own,
        # so there are as many as requests ever tokenized at once (the API's inference
        # threads bound that), never one per thread that passed by.
        self._idle_tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @contextmanager
    def borrowed_tokenizer(self) -> Iterator[Any]:
        try:
            tokenizer = self._idle_tokenizers.get_nowait()
        except queue.Empty:
            from app.ml.loading import load_tokenizer

            tokenizer = load_tokenizer(self.ref)
        try:
            yield tokenizer
        finally:
            self._idle_tokenizers.put(tokenizer)


class InferenceEngine:
    def __init__(
        self,
        *,
        base_models: dict[str, str],
        quantized: dict[str, str] | None = None,
        max_loaded_adapters: int = 8,
        device: str = "auto",
        max_batch_size: int = 16,
        max_requests_per_owner: int = 0,
        batch_share_per_owner: float = 1.0,
        scheduler_nice: int = 0,
        kv_cache_fraction: float = 0.5,
        kv_cache_org_share: float = 1.0,
        kv_group_by_length: bool = True,
    ) -> None:
        """`quantized`: {base name: "nf4" | "int8"} for the bases served quantized.
        `max_requests_per_owner`: running + waiting requests of one organization (429
        past it; 0: no limit). `batch_share_per_owner`: the fraction of a batch's rows one
        organization may hold (`fairness.py`). `scheduler_nice`: the OS niceness of the
        scheduler threads (`niceness.run_nicer`). `kv_cache_fraction`: of the memory free
        once a base has loaded, what its KV cache may use (`kv_budget.py`); `kv_cache_org_share`:
        of that, what one organization may hold while another has requests (`admission.py`).
        `kv_group_by_length=False`: one KV slab per batch (`padding.py`; for benchmarks)."""
        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        quantized = quantized or {}
        self._bases = {
            name: LoadedBase(ref, quantized.get(name, "none")) for name, ref in base_models.items()
        }
        self._capacity = max_loaded_adapters
        self._max_batch = max_batch_size
        self._device = device
        self._context: dict[str, int] = {}
        self._deleted = DeletedAdapters()  # the one record, shared with every base's pool
        self._per_owner, self._batch_share = max_requests_per_owner, batch_share_per_owner
        self._nice = scheduler_nice
        self._kv = kv_cache_fraction, kv_cache_org_share, kv_group_by_length
        self._admitted: dict[str, set[object]] = {}  # owner -> its unfinished requests
        self._lock = threading.Lock()  # guards _context and _admitted
        self._fallbacks = Fallbacks(
            capacity=max_loaded_adapters, max_batch=max_batch_size, nice=scheduler_nice
        )

    # -- requests ----------------------------------------------------------------------
    def submit(
        self,
        *,
        base_model: str,
        adapter: AdapterRef | None,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        max_tokens: int | None = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        logprobs: int | None = None,
        owner: str | None = None,
    ) -> Request:
        """Check, tokenize and queue one request; input the model cannot take raises before
        anything runs. Sampling values are the API schema's, validated there.

        `owner` (an organization id) is admitted fairly and counted against its limit.
        `tools` (OpenAI's, with `messages`) go to the chat template as training gave them.
        """
        prompt_input.check_input(prompt, messages)
        base = self._loaded(base_model)
        if adapter is not None and adapter.id in self._deleted:
            raise model_not_found(adapter.id)
        prompt_input.check_length(
            prompt, messages, tools, self.context_length(base_model), base.max_token_chars
        )
        release = self._admit(owner)
        try:
            with base.borrowed_tokenizer() as tokenizer:
                input_ids = prompt_input.tokenize(tokenizer, prompt, messages, tools)
            fitted = self._fitted(base_model, len(input_ids), max_tokens)
            too_big = base.scheduler.budget.refusal(len(input_ids), fitted)
            if too_big is not None:  # it would wait forever: refuse it now
                raise InvalidRequest(too_big, param="max_tokens")
        except BaseException:
            release()
            raise
        sampling = Sampling(fitted, float(temperature), float(top_p), tuple(stop), seed)
        if adapter is not None and self._fallbacks.reason(adapter, base.shapes) is not None:
            # The batch cannot apply this adapter: its own PEFT scheduler runs it, where it is
            # the whole model (so the request names no adapter there).
            request = Request(None, input_ids, sampling, logprobs, owner=owner)
            request.on_done = release
            try:
                self._fallbacks.submit(base_model, base, adapter, request)  # may load, and fail
            except BaseException:
                release()
                raise
            return request
        request = Request(adapter, input_ids, sampling, logprobs, owner=owner)
        request.on_done = release
        base.scheduler.submit(request)
        return request

    def _admit(self, owner: str | None) -> Callable[[], None]:
        """Count a request of `owner` in (429 past its limit); the callable counts it out."""
        if owner is None or self._per_owner <= 0:
            return lambda: None
        token = object()
        with self._lock:
            admitted = self._admitted.setdefault(owner, set())
            if len(admitted) >= self._per_owner:
                raise RateLimited(
                    f"this organization already has {len(admitted)} inference requests "
                    f"running or waiting (the limit is {self._per_owner}); retry when one ends",
                    retry_after=1,
                )
            admitted.add(token)

        def release() -> None:
            with self._lock:
                admitted.discard(token)

        return release

    def generate(self, **kwargs: Any) -> Generation:
        """One whole completion (blocks until the scheduler finishes it)."""
        return self.submit(**kwargs).result()

    # -- adapters ----------------------------------------------------------------------
    def preload(self, base_model: str, adapters: list[AdapterRef]) -> None:
        """Load adapters and pin them (never evicted); returns once each is loaded or failed
        (a failure is logged where the adapter loads, and shows in `stats`: loaded stays
        false)."""
        base = self._loaded(base_model)
        done = []
        for ref in adapters:
            if self._fallbacks.reason(ref, base.shapes) is not None:
                self._preload_fallback(base_model, base, ref)  # warm, though not pinned
                continue
            done.append(base.scheduler.preload(ref))
        for event in done:
            event.wait(timeout=300)

    def _preload_fallback(self, base_model: str, base: LoadedBase, ref: AdapterRef) -> None:
        # Like a batched preload, a failure (logged by the fallback) leaves the adapter
        # unloaded and the others go on.
        with suppress(Exception):
            self._fallbacks.warm(base_model, base, ref)

    def unload_adapter(self, adapter_id: str) -> None:
        """Free a deleted adapter's weights and refuse it from now on. Idempotent.

        Returns once every scheduler has taken it out (rows already running on it finish
        first; queued requests for it are refused)."""
        self._deleted.add(adapter_id)  # from now on every pool refuses and evicts it
        self._fallbacks.unload(adapter_id)
        done = [base.scheduler.unload(adapter_id) for base in self._started()]
        for event in done:
            event.wait(timeout=60)

    def held_adapters(self) -> list[str]:
        """Adapters whose weights are held here (batched, or in a PEFT fallback)."""
        return self.loaded_adapters() + [s["id"] for s in self._fallbacks.snapshot() if s["loaded"]]

    def loaded_adapters(self) -> list[str]:
        """Ids of resident adapters, least recently used first (per base, bases in order)."""
        return [a for base in self._started() for a in base.scheduler.pool.lru_order()]

    def resident_adapters(self) -> dict[str, list[str]]:
        """Per started base model, its resident adapter ids (every organization's: the
        operator's view, `/metrics`)."""
        return {base.scheduler.name: base.scheduler.pool.lru_order() for base in self._started()}

    def stats(self, owner: str | None = None) -> dict[str, Any]:
        """Base models' batch state and per-adapter counters (only `owner`'s adapters)."""
        bases, adapters = [], []
        for base in self._started():  # a tenant sees its own load only
            bases.append(load_info(base.scheduler, owner, everyone=owner is None))
            adapters += [s for s in base.scheduler.pool.snapshot() if s["owner"] == owner]
        adapters += [s for s in self._fallbacks.snapshot() if s["owner"] == owner]
        for info in bases:
            info["loaded"] = [a for a in info["loaded"] if any(s["id"] == a for s in adapters)]
        return {"base_models": bases, "adapters": adapters}

    def close(self) -> None:
        self._fallbacks.close()
        for base in self._started():
            base.scheduler.stop()

    # -- base models -------------------------------------------------------------------
    def context_length(self, base_model: str) -> int:
        """Max prompt + completion tokens; read from the config, without loading weights."""
        ref = self._base(base_model).ref
        with self._lock:
            known = self._context.get(base_model)
        if known is None:
            from transformers import AutoConfig

            from app.base_models import checked_ref

            config = AutoConfig.from_pretrained(checked_ref(ref), trust_remote_code=False)
            known = context_of(config.to_dict()) or DEFAULT_CONTEXT_LENGTH
            with self._lock:
                self._context[base_model] = known
        return known

    def _base(self, base_model: str) -> LoadedBase:
        base = self._bases.get(base_model)
        if base is None:
            raise NotFound(f"base model {base_model!r} is not served here", param="model")
        return base

    def _loaded(self, base_model: str) -> LoadedBase:
        """The base with its scheduler running; loads the weights on first use."""
        base = self._base(base_model)
        with base.load_lock:
            if base.scheduler is None:
                from app.inference.lora import linear_shapes
                from app.inference.scheduler import BaseScheduler
                from app.ml.loading import load_tokenizer

                model = _load_base(base_model, base, self._device)
                base.tokenizer = load_tokenizer(base.ref)
                base.max_token_chars = max(map(len, base.tokenizer.get_vocab()), default=1)
                base.scheduler = BaseScheduler(
                    base_model,
                    model,
                    load_tokenizer(base.ref),
                    eos_ids=eos_token_ids(base.tokenizer, model),
                    capacity=self._capacity,
                    max_batch=self._max_batch,
                    batch_share=self._batch_share,
                    deleted=self._deleted,
                    nice=self._nice,
                    kv_fraction=self._kv[0],
                    kv_org_share=self._kv[1],
                    group_by_length=self._kv[2],
                )
                base.shapes = linear_shapes(model)
        return base

    def _started(self) -> list[LoadedBase]:
        return [base for base in self._bases.values() if base.scheduler is not None]

    def _fitted(self, base_model: str, prompt_tokens: int, max_tokens: int | None) -> int:
        """max_tokens checked against the context (None: as many as fit, up to a default)."""
        limit = self.context_length(base_model)
        room = limit - prompt_tokens
        if max_tokens is None:
            if room < 1:
                raise InvalidRequest(
                    f"this model's context length is {limit} tokens, but the prompt has "
                    f"{prompt_tokens}; shorten it",
                    param="messages",
                )
            return min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise InvalidRequest(
                f"this model's context length is {limit} tokens, but {prompt_tokens} prompt "
                f"tokens + max_tokens {max_tokens} = {prompt_tokens + max_tokens}; "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        return max_tokens


def _load_base(name: str, base: LoadedBase, device: str) -> Any:
    """The base's weights at its serving quantization; one bitsandbytes cannot quantize is
    unavailable (503) with the reason and the setting to fix, like a missing directory."""
    from app.base_models import BaseModelUnavailable, explain
    from app.errors import QuantizationUnavailable
    from app.ml.loading import load_base_model

    if base.quantization == "none":
        return load_base_model(base.ref, device=device)
    from app.ml.quantized import set_inference_kernel

    try:
        model = load_base_model(base.ref, device=device, quantization=base.quantization)
    except QuantizationUnavailable as exc:
        entry = f"{base.ref};quantization={base.quantization}"
        raise BaseModelUnavailable(
            explain(name, entry, exc.message), param="model", code="model_not_available"
        ) from exc
    set_inference_kernel(model, True)  # serving never trains it
    return model


def eos_token_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """The tokenizer's EOS plus any its generation config lists (chat models have several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    return frozenset(ids)
