"""The LoRA training loop: setup → one flat loop over the optimizer steps → save (nanoGPT).

Pure: no DB, no Celery. The caller (the job runner) reports progress in `on_step` and
checks for cancellation there and in `on_micro_batch` (before every forward pass: one
optimizer step may accumulate many micro-batches); an exception raised in either stops
training, propagates unchanged, and nothing is written to `out_dir`.

What it trains is the job's run spec (`app/jobs/spec.py`): its hyperparameters as they are,
with `packing` as it will run — prepare the model with `packing.enable_packing` first, as
the job runner does. Which examples each step trains on, in what rows, comes from
`packing.steps`; setting up the LoRA layers, optimizer and schedule from `setup.py`.

Exact resume: the data order of epoch e is a pure function of (seed, e), and a
checkpoint (worker/training/checkpoint.py) stores adapter, optimizer, scheduler, RNG
and the position in that order; `train_lora(resume_from=dir)` continues from it and
produces the same steps, on the same examples, as the uninterrupted run.

The device is the base model's: load it with `load_base_model(ref, device="cuda")` to
train on a GPU (bf16 autocast there; fp32 on CPU). `train_lora` injects the LoRA layers
into `model` in place (PEFT), so afterwards `model` computes the trained model; load a
fresh base for anything else.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.jobs.spec import DpoHyperparameters, SupervisedHyperparameters
from app.ml.adapters import save_adapter
from worker.training.checkpoint import TrainerState, save_checkpoint
from worker.training.data import IGNORE_INDEX, Example
from worker.training.objective import Evaluation, Objective, StepLoss, autocast
from worker.training.packing import Sequence, Step, build_sequences, collate, steps
from worker.training.setup import Run, start_run

MAX_GRAD_NORM = 1.0  # gradient clipping, as transformers' Trainer does by default


@dataclass
class StepReport:
    step: int  # 1-based optimizer step
    total_steps: int
    epoch: int  # 1-based
    train_loss: float  # mean over the label tokens of this step's batch
    learning_rate: float  # the rate this step was taken with
    trained_tokens: int  # non-padding tokens processed so far
    valid_loss: float | None = None  # on one validation batch, every eval_every_steps
    tokens_per_second: float = 0.0  # non-padding tokens of this step / its wall time
    example_ids: tuple[int, ...] = ()  # the examples this step trained on, in order
    # the method's own (DPO: train_/valid_reward_margin, train_/valid_reward_accuracy)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointReport:
    epoch: int  # 1-based epoch the step belongs to
    step: int
    train_loss: float  # mean over the label tokens of the epoch so far
    valid_loss: float | None  # over the whole validation set (OpenAI's full_valid_loss)
    checkpoint_dir: Path  # adapter + resume state + manifest; removed after the callback
    manifest_sha256: str
    metrics: dict[str, float] = field(default_factory=dict)  # the method's, on all validation


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    train_loss: float  # mean over the label tokens of the last epoch
    valid_loss: float | None  # over the whole validation set, after the last step
    sha256: str  # of out_dir/adapter_model.safetensors
    history: list[dict[str, Any]]  # one row per step: step, train_loss, valid_loss, lr, tokens/s


def _ignore(_report: Any) -> None:
    return None


def _nothing() -> None:
    return None


def train_lora(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[Example],
    valid_examples: list[Example],
    hyperparameters: SupervisedHyperparameters,
    out_dir: Path,
    trainable_token_ids: tuple[int, ...] = (),
    eval_every_steps: int = 0,
    checkpoint_every_steps: int = 0,
    on_step: Callable[[StepReport], None] = _ignore,
    on_checkpoint: Callable[[CheckpointReport], None] = _ignore,
    on_micro_batch: Callable[[], None] = _nothing,
    init_adapter: Path | None = None,
    resume_from: Path | None = None,
    scratch_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `model` (a frozen base) and save it to `out_dir`.

    eval_every_steps: the loss on one validation batch every N steps (0: never);
    checkpoint_every_steps: a checkpoint every N steps too (0: only the `n_checkpoints`
    scheduled ones);
    trainable_token_ids, init_adapter, resume_from: see `setup.start_run`.
    scratch_dir: where checkpoints are written before `on_checkpoint` publishes them
    (the job runner gives the job's own folder in the store; None: the system temp dir).
    """
    hp = hyperparameters
    if not train_examples:
        raise ValueError("no training examples")
    run = start_run(
        model,
        tokenizer,
        hp,
        n_examples=len(train_examples),
        trainable_token_ids=trainable_token_ids,
        checkpoint_every_steps=checkpoint_every_steps,
        init_adapter=init_adapter,
        resume_from=resume_from,
    )
    state = run.state
    objective = _objective(run, hp, train_examples, valid_examples, on_micro_batch)
    full_valid = Evaluation(math.nan)  # of the last checkpoint, which the last step writes
    run.model.train()
    position = {"epoch": state.epoch, "next_batch": state.next_batch}  # a resumed one's too
    for step in steps(train_examples, hp, max_len=run.max_len, **position):
        report = _train_step(run, step, objective, on_micro_batch)
        if valid_examples and eval_every_steps and state.step % eval_every_steps == 0:
            batch = _valid_batch(run, valid_examples, hp, eval_every_steps)
            _add_valid(report, objective.evaluate(run, batch))
        state.history.append(_history_row(report))
        on_step(report)  # may raise: training stops
        epoch_loss = _end_step(state, step)
        if state.step in run.checkpoint_at:
            full_valid = objective.evaluate(run, list(range(len(valid_examples))))
            _checkpoint(run, step.epoch, epoch_loss, full_valid, on_checkpoint, scratch_dir)
    return _save(run, Path(out_dir), None if math.isnan(full_valid.loss) else full_valid.loss)


def _objective(
    run: Run,
    hp: SupervisedHyperparameters,
    train: list[Example],
    valid: list[Example],
    on_micro_batch: Callable[[], None],
) -> Objective:
    """What the job's method trains for (`objective.py`)."""
    if isinstance(hp, DpoHyperparameters):
        from worker.training.preference import DpoObjective

        return DpoObjective.start(run, hp, train, valid, on_micro_batch)
    return SupervisedObjective(valid, hp.batch_size)


@dataclass
class SupervisedObjective:
    """Next-token cross-entropy, the mean over the label tokens."""

    valid_examples: list[Example]
    batch_size: int

    def forward_backward(
        self, run: Run, step: Step, on_micro_batch: Callable[[], None]
    ) -> StepLoss:
        """The mean is over all the step's label tokens, so they are counted first and each
        micro-batch is scaled by the total."""
        rows = [row for micro in step.micro_batches for row in micro]
        n_labels = sum(_label_count(row) for row in rows)
        loss_sum, real_tokens = 0.0, 0
        for micro in step.micro_batches:
            on_micro_batch()  # may raise: a cancel must not wait for the whole step
            batch = collate(micro, run.pad_id, run.device)
            with autocast(run.device):
                logits = run.model(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    use_cache=False,
                ).logits
            micro_loss, _ = _token_loss(logits, batch["labels"])
            # The loss's graph keeps what backward needs; our reference to the logits (tokens
            # x vocab: ~1 GB per 2048 tokens at a 128k vocab) would only keep it alive.
            del logits
            (micro_loss / max(n_labels, 1)).backward()
            loss_sum += micro_loss.item()
            real_tokens += batch["real_tokens"]
        return StepLoss(loss_sum, n_labels, real_tokens)

    def evaluate(self, run: Run, indices: list[int]) -> Evaluation:
        examples = [self.valid_examples[i] for i in indices]
        if not examples:
            return Evaluation(math.nan)
        return Evaluation(
            mean_loss(run.model, examples, batch_size=self.batch_size, pad_token_id=run.pad_id)
        )


def _train_step(
    run: Run, step: Step, objective: Objective, on_micro_batch: Callable[[], None]
) -> StepReport:
    """One optimizer step: the objective's forward and backward passes over its
    micro-batches (gradients accumulate), then clip, step and schedule."""
    import torch

    started = time.perf_counter()
    loss = objective.forward_backward(run, step, on_micro_batch)
    lr = run.scheduler.get_last_lr()[0]
    torch.nn.utils.clip_grad_norm_(run.params, MAX_GRAD_NORM)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    state = run.state
    state.step += 1
    state.next_batch += len(step.micro_batches)
    state.trained_tokens += loss.real_tokens
    state.epoch_loss_sum += loss.loss_sum
    state.epoch_label_count += loss.units
    rows = [row for micro in step.micro_batches for row in micro]
    return StepReport(
        step=state.step,
        total_steps=run.total_steps,
        epoch=step.epoch,
        train_loss=loss.loss_sum / max(loss.units, 1),
        learning_rate=lr,
        trained_tokens=state.trained_tokens,
        tokens_per_second=loss.real_tokens / max(time.perf_counter() - started, 1e-9),
        example_ids=tuple(e for row in rows for e in row.example_ids),
        metrics=dict(loss.metrics),
    )


def _add_valid(report: StepReport, evaluation: Evaluation) -> None:
    report.valid_loss = evaluation.loss
    report.metrics.update(evaluation.metrics)


def _end_step(state: TrainerState, step: Step) -> float:
    """The mean loss of the epoch so far; at the epoch's end, roll the position over."""
    epoch_loss = state.epoch_loss_sum / max(state.epoch_label_count, 1)
    if step.ends_epoch:
        state.last_epoch_loss = epoch_loss
        state.epoch, state.next_batch = state.epoch + 1, 0
        state.epoch_loss_sum, state.epoch_label_count = 0.0, 0
    return epoch_loss


def _save(run: Run, out_dir: Path, valid_loss: float | None) -> TrainResult:
    """Save the trained adapter to `out_dir`; what the run did."""
    run.model.eval()
    return TrainResult(
        steps=run.state.step,
        trained_tokens=run.state.trained_tokens,
        train_loss=run.state.last_epoch_loss,
        valid_loss=valid_loss,
        sha256=save_adapter(run.model, out_dir),
        history=run.state.history,
    )


def _checkpoint(
    run: Run,
    epoch: int,
    train_loss: float,
    valid: Evaluation,
    on_checkpoint: Callable[[CheckpointReport], None],
    scratch_dir: Path | None,
) -> None:
    """Write a checkpoint of the run as it stands to scratch and hand it to `on_checkpoint`
    (which publishes it); the scratch copy is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="loraforge-ckpt-", dir=scratch_dir) as folder:
        digest = save_checkpoint(
            Path(folder),
            peft_model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state=run.state,
        )
        on_checkpoint(
            CheckpointReport(
                epoch=epoch,
                step=run.state.step,
                train_loss=train_loss,
                valid_loss=None if math.isnan(valid.loss) else valid.loss,
                checkpoint_dir=Path(folder),
                manifest_sha256=digest,
                metrics=valid.metrics,
            )
        )


def _valid_batch(
    run: Run, examples: list[Example], hp: SupervisedHyperparameters, every: int
) -> list[int]:
    """One validation batch, rotating through the set (OpenAI's valid_loss): its indices."""
    size = hp.batch_size * hp.EXAMPLES_PER_ITEM  # whole items (DPO: pairs)
    n_batches = math.ceil(len(examples) / size)
    start = (run.state.step // every - 1) % n_batches * size
    return list(range(start, min(start + size, len(examples))))


def _label_count(row: Sequence) -> int:
    """Label tokens the shifted loss uses (the first position is never a target)."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def _history_row(report: StepReport) -> dict[str, Any]:
    return {
        "step": report.step,
        "train_loss": report.train_loss,
        "valid_loss": report.valid_loss,
        "learning_rate": report.learning_rate,
        "tokens_per_second": report.tokens_per_second,
    } | report.metrics


def mean_loss(model: Any, examples: list[Example], *, batch_size: int, pad_token_id: int) -> float:
    """Mean loss over all label tokens of `examples` (eval mode, no grad, one per row)."""
    import torch

    device = next(model.parameters()).device
    rows = build_sequences(examples, packing=False, max_len=0)
    was_training = model.training
    model.eval()
    loss_sum, label_count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_token_id, device)
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            batch_loss, n_labels = _token_loss(logits, batch["labels"])
            loss_sum += float(batch_loss)
            label_count += n_labels
    model.train(was_training)
    return loss_sum / max(label_count, 1)


def _token_loss(logits: Any, labels: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over label tokens, and how many there are.

    The labels are shifted (padded with IGNORE_INDEX at the end) rather than the logits
    sliced, so the [batch, length, vocab] logits are never copied (transformers' way).
    """
    import torch.nn.functional as F

    shifted_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shifted_labels != IGNORE_INDEX).sum())
