"""One base model's scheduler: a thread that batches every request on that base.

Continuous batching: between two decode steps the thread takes in messages (`messages.py`:
new requests, finished adapter loads, preloads, deletions), prefills the requests that can
start (their adapter is resident, the batch has room, the KV budget holds what they can
reach: `kv_budget.py`), and appends them to the running batch; rows leave as soon as they
finish. The running rows live in one or more KV slabs (`kv.BatchKV`), rows of close lengths
together (`padding.py`); each decode step is one forward pass per slab over its rows,
whatever adapter each uses (`lora.Plan`): every slab, or while organizations share the
base, the slabs of the one whose turn it is (`turns.py`). A request whose adapter is still
loading, or that the KV budget cannot take yet, waits without holding up the others.

Everything here runs on the scheduler thread, except `submit`, `preload`, `unload` and
`stop`, which only enqueue a message, and `batch_view.load_info`, which reads copies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Any

import torch

from app.errors import model_not_found
from app.inference.admission import fair_order, plan, start
from app.inference.deleted import DeletedAdapters
from app.inference.fairness import OwnerCounters, share_of
from app.inference.kv import BatchKV, forward_options
from app.inference.kv_budget import KvBudget
from app.inference.lora import LoraState, Plan, linear_shapes, token_shapes
from app.inference.messages import Loaded, Message, Preload, Stop, Submit, Unload
from app.inference.niceness import run_nicer
from app.inference.pool import AdapterPool
from app.inference.request import Request
from app.inference.sampling import choose_tokens, token_logprob
from app.inference.slabs import CellCounts, Row, Slab, horizon, owners, projected_peak
from app.inference.turns import Turns
from app.inference.types import AdapterRef, Delta
from app.observability import metrics

logger = logging.getLogger(__name__)
_CACHE_RETRY_SECONDS = 0.05  # idle, held back by cache another scheduler of the base holds


class _Stop(Exception):
    pass


class BaseScheduler:
    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        *,
        eos_ids: frozenset[int],
        capacity: int,
        max_batch: int,
        batch_share: float = 1.0,
        deleted: DeletedAdapters | None = None,
        nice: int = 0,
        kv_budget: KvBudget | None = None,
        kv_fraction: float = 0.5,
        kv_org_share: float = 1.0,
        group_by_length: bool = True,
        fallback_for: tuple[str, str] | None = None,
    ) -> None:
        """`deleted`: the engine's record of deleted adapters (a fresh one if not given).
        `nice`: the OS niceness of this scheduler's thread (`run_nicer`). `kv_budget`: one
        shared with the base's other schedulers, else `kv_fraction` of the free memory, of
        which one organization may hold `kv_org_share` while others have requests too.
        `group_by_length=False`: one KV slab for every row (the benchmark's old layout).
        `fallback_for`: (base model, adapter id) when this scheduler runs that one adapter
        on a PEFT view of the base (`fallback.py`): what its metrics are labelled with."""
        self.name, self.model, self.tokenizer, self.eos_ids = name, model, tokenizer, eos_ids
        self.nice, self.group_by_length = nice, group_by_length
        base_and_adapter: tuple[str, str | None] = fallback_for or (name, None)
        self._metric_base, self._metric_adapter = base_and_adapter
        self.max_batch, self.rows_per_owner = max_batch, share_of(max_batch, batch_share)
        self._last_owner: Hashable = None  # admission resumes after the owner served last
        self.device = next(model.parameters()).device
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.state = LoraState()
        self.pool = AdapterPool(
            model,
            self.state,
            base_model=name,
            capacity=capacity,
            shapes=linear_shapes(model),
            token_shapes=token_shapes(model),
            dtype=next(model.parameters()).dtype,
            device=self.device,
            notify=self.inbox.put,
            deleted=deleted if deleted is not None else DeletedAdapters(),
        )
        config = getattr(model.config, "text_config", None) or model.config
        self.num_layers = config.num_hidden_layers
        self.budget = kv_budget or KvBudget.measure(model, kv_fraction, kv_org_share)
        self.waiting: deque[Request] = deque()
        self.slabs: list[Slab] = []
        self.held_back: list[Request] = []  # their turn came, waiting for KV cache
        self._preloads: dict[str, list[threading.Event]] = {}  # id -> preload() callers
        self.counts = OwnerCounters()  # decode steps, mixed steps, peak batch: all, per owner
        self.turns = Turns()  # whose slabs a step forwards while organizations share
        self.forwards = 0  # decode forwards (one per slab per step)
        self.cells = CellCounts()  # per step, summed: cells allocated, padded width, real
        self._cache_arg, self._extra = forward_options(model)
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- called from other threads: enqueue only --------------------------------------
    def submit(self, request: Request) -> None:
        self.inbox.put(Submit(request))

    def preload(self, ref: AdapterRef) -> threading.Event:
        """Load `ref` pinned; the event is set once it is resident or has failed."""
        done = threading.Event()
        self.inbox.put(Preload(ref, done))
        return done

    def unload(self, adapter_id: str) -> threading.Event:
        """Act on a deletion (already in the engine's `DeletedAdapters`); the event is set
        once waiting requests for it are refused and it is evicted or will be as rows end."""
        done = threading.Event()
        self.inbox.put(Unload(adapter_id, done))
        return done

    def stop(self) -> None:
        self.inbox.put(Stop())
        self._thread.join(timeout=30)
        self.pool.close()

    @property
    def rows(self) -> list[Row]:
        """Every running row, slab by slab (a new list: the scheduler moves them)."""
        return [row for slab in list(self.slabs) for row in list(slab.rows)]

    # -- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        run_nicer(self.nice)
        while True:
            try:
                idle = not self.slabs
                self._drain(
                    block=idle and (bool(self.held_back) or not self._startable()),
                    timeout=_CACHE_RETRY_SECONDS if self.held_back else None,
                )
                self._admit()
                if self.slabs:
                    self._step()
                self._trim()
            except _Stop:
                self.budget.hold(self, 0)
                return
            except Exception as exc:  # never let the thread die: fail what was running
                logger.exception("inference step failed on %s", self.name)
                for row in self.rows:
                    row.request.put(exc)
                self.slabs = []
                self.budget.hold(self, 0)

    def _startable(self) -> bool:
        return len(self.rows) < self.max_batch and any(
            r.adapter is None or self.pool.ready(r.adapter) for r in self.waiting
        )

    def _drain(self, *, block: bool, timeout: float | None = None) -> None:
        try:
            message = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
            while True:
                self._handle(message)
                message = self.inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, message: Message) -> None:
        match message:
            case Submit(request):
                self._accept(request)
            case Loaded():
                self._loaded(message)
            case Preload(ref, done):
                self._preload(ref, done)
            case Unload(adapter_id, done):
                self._fail_waiting(adapter_id, model_not_found(adapter_id))
                self._trim()  # evicted now unless a running row still uses it
                done.set()
            case Stop():
                raise _Stop

    def _accept(self, request: Request) -> None:
        ref = request.adapter
        if ref is not None:
            if self.pool.is_deleted(ref.id):
                request.put(model_not_found(ref.id))
                return
            hit = self.pool.ready(ref)
            self.pool.touch(ref, hit=hit)
            if not hit:
                self.pool.load(ref)
        self.waiting.append(request)

    def _preload(self, ref: AdapterRef, done: threading.Event) -> None:
        if self.pool.ready(ref):
            self.pool.pin(ref.id)
        elif not self.pool.is_deleted(ref.id):
            self.pool.load(ref, pin=True)
            self._preloads.setdefault(ref.id, []).append(done)
            return
        done.set()

    def _loaded(self, message: Loaded) -> None:
        error = self.pool.finish_load(message)  # a failed read was logged by the pool
        if error is not None:
            self._fail_waiting(message.ref.id, error)
        else:
            self._trim()  # make room now, so the cache never holds more than it must
        for done in self._preloads.pop(message.ref.id, []):
            done.set()

    def _trim(self) -> None:
        busy = {row.request.key for row in self.rows}
        self.pool.trim(busy, {request.key for request in self.waiting})

    def _fail_waiting(self, adapter_id: str, error: Exception) -> None:
        for request in [r for r in self.waiting if r.key == adapter_id]:
            self.waiting.remove(request)
            request.put(error)

    # -- admission: prefill new requests, then join the batch --------------------------
    def _admit(self) -> None:
        # Organizations take turns into the batch's room, none past its share of the rows
        # or of the cache; what does not fit the free cache is passed over (admission.py).
        rows, ready = self.rows, self._startable_by_owner()
        planned = plan(
            self.slabs,
            fair_order(ready, rows, per_owner=self.rows_per_owner, last_owner=self._last_owner),
            rows=self.max_batch - len(rows),
            room=self.budget.room_for(self),
            cap=self.budget.share_cap([r.owner for r in self.waiting] + owners(rows)),
            by_length=self.group_by_length,
            new_slab=lambda: Slab(BatchKV(self.num_layers, self.device)),
        )
        self.held_back = planned.held_back
        if not planned.joins:
            return
        self._last_owner = planned.joins[-1][0].owner
        for request, _ in planned.joins:
            self.waiting.remove(request)
        start(planned.joins, self.slabs, self._prefill, name=self.name)
        self._hold()

    def _hold(self) -> None:
        """Tell the budget the most cache this scheduler's running rows can reach."""
        self.budget.hold(self, projected_peak(self.slabs))

    def _startable_by_owner(self) -> dict[Hashable, deque[Request]]:
        """Waiting requests that can start now, per owner, in arrival order."""
        ready: dict[Hashable, deque[Request]] = {}
        for request in list(self.waiting):
            if request.cancelled:
                self.waiting.remove(request)
            elif request.adapter is None or self.pool.ready(request.adapter):
                ready.setdefault(request.owner, deque()).append(request)
            else:  # evicted while it waited: load it again (a no-op while it loads)
                self.pool.load(request.adapter)
        return ready

    def _prefill(self, group: list[Request]) -> tuple[list[tuple[int, Row]], Any]:
        """Prefill same-length prompts; (index in the group, row) of those not yet done."""
        for request in group:
            if request.adapter is not None:
                self.pool.used(request.adapter)
        self.state.plan = Plan(tuple(request.key for request in group))
        ids = torch.tensor([r.input_ids for r in group], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **self._extra)
        rows = [Row.begin(r, self.tokenizer, self.eos_ids, self.device) for r in group]
        logits = out.logits[:, -1]
        tokens = choose_tokens(logits, [(row.request.sampling, row.generator) for row in rows])
        live = [
            (index, row)
            for index, (row, token) in enumerate(zip(rows, tokens, strict=True))
            if not self._advance(row, token, logits[index])
        ]
        return live, getattr(out, self._cache_arg)

    # -- one decode step over the whole batch -------------------------------------------
    def _step(self) -> None:
        before, slab_owners = len(self.rows), [owners(slab.rows) for slab in self.slabs]
        waited = [self.forwards - slab.forwarded_at for slab in self.slabs]
        chosen = self.turns.choose(slab_owners, waited)  # every slab unless tenants share
        rows = [row for index in chosen for row in self.slabs[index].rows]
        metrics.decode_step(self._metric_base, len(rows))
        self.counts.record((row.request.owner, row.request.key) for row in rows)
        self.cells.count(self.slabs)
        for done, index in enumerate(chosen):
            if done and not self.inbox.empty():  # a new request waits one forward, not a step
                chosen = chosen[:done]  # the rest run next step (counted again: a figure)
                break
            self._step_slab(self.slabs[index])
        self.turns.charge(slab_owners[index] for index in chosen)
        self.slabs = [slab for slab in self.slabs if slab.rows]
        if len(self.rows) != before:  # rows that run as projected keep the same peak
            self._hold()

    def _step_slab(self, slab: Slab) -> None:
        rows, kv = slab.rows, slab.kv
        keys = tuple(row.request.key for row in rows)
        if slab.plan is None or slab.plan.row_keys != keys:
            slab.plan = Plan(keys)
        self.state.plan = slab.plan
        ids = torch.tensor([[row.last] for row in rows], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=kv.attention_mask(),
                position_ids=kv.positions(),
                use_cache=True,
                **{self._cache_arg: kv.cache},
                **self._extra,
            )
        kv.advance(horizon(rows) - 1)  # each row is about to produce one more token
        self.forwards += 1
        slab.forwarded_at = self.forwards
        logits = out.logits[:, -1]
        tokens = choose_tokens(logits, [(row.request.sampling, row.generator) for row in rows])
        keep = [
            index
            for index, (row, token) in enumerate(zip(rows, tokens, strict=True))
            if not row.request.cancelled and not self._advance(row, token, logits[index])
        ]
        if len(keep) != len(rows):
            slab.rows = [rows[index] for index in keep]
            kv.keep(keep, horizon(slab.rows))

    def _advance(self, row: Row, token: int, logits: torch.Tensor) -> bool:
        """Record one generated token for `row`; stream what became visible. True = done."""
        request, tracker = row.request, row.tracker
        row.produced += 1
        row.last = token
        if row.produced == 1:
            request.first_token_at = time.monotonic()
        if request.logprobs is not None and token not in self.eos_ids:
            entry = token_logprob(
                self.tokenizer, logits, token, len(tracker.text), request.logprobs
            )
            row.logprobs.append(entry)
            row.pending.append(entry)
        piece = tracker.push(token)
        if tracker.finish_reason is None and row.produced >= request.sampling.max_tokens:
            piece += tracker.finish("length")
        done = tracker.finish_reason is not None
        if piece or done:  # the last delta always carries the finish reason
            request.put(Delta(piece, row.pending, tracker.finish_reason if done else None))
            row.pending = []
        if done:
            self._complete(row)
        return done

    def _complete(self, row: Row) -> None:
        request = row.request
        prompt = len(request.input_ids)
        if request.adapter is not None:
            self.pool.finished(request.adapter, prompt, row.produced)
        metrics.completion_finished(
            self._metric_base,
            request.key or self._metric_adapter,
            prompt_tokens=prompt,
            completion_tokens=row.produced,
            submitted_at=request.submitted_at,
            first_token_at=request.first_token_at,
            fallback=self._metric_adapter is not None,
        )
        request.put(row.generation())
