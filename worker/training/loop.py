"""The LoRA training loop: setup → one flat loop over the optimizer steps → save (nanoGPT).

Pure: no DB, no Celery. The caller (the job runner) reports progress in `on_step` and
checks for cancellation there and in `on_micro_batch` (before every forward pass: one
optimizer step may accumulate many micro-batches); an exception raised in either stops
training, propagates unchanged, and nothing is written to `out_dir`. A pause (`should_pause`,
read after `on_step`) checkpoints the step, then raises `RunAborted(PAUSED)`. Evaluations
(the full validation loss) and early stopping: worker/training/evaluation.py. What a step
computes is the method's objective (`objective.py`): next-token loss (`supervised.py`) or
DPO (`preference.py`); the rest of the loop is the same for both.

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

from app.errors import RunAborted
from app.jobs.spec import DpoHyperparameters, SupervisedHyperparameters
from app.ml.adapters import save_adapter
from app.statuses import RunOutcome
from worker.training.checkpoint import TrainerState, save_checkpoint
from worker.training.data import Example
from worker.training.distributed import Ranks
from worker.training.evaluation import EarlyStop, Verdict, early_stop, evaluation_steps, judge
from worker.training.objective import Evaluation, Objective
from worker.training.packing import Step, steps
from worker.training.setup import Run, start_run
from worker.training.supervised import SupervisedObjective

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
    full_valid_loss: float | None = None  # on the whole validation set, at evaluation steps
    tokens_per_second: float = 0.0  # non-padding tokens of this step / its wall time
    example_ids: tuple[int, ...] = ()  # the examples this step trained on, in order
    # the method's own (DPO: train_/valid_reward_margin, train_/valid_reward_accuracy)
    metrics: dict[str, float] = field(default_factory=dict)
    # the method's own on the whole validation set, at evaluation steps ("valid_…")
    full_valid_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointReport:
    epoch: int  # 1-based epoch the step belongs to
    step: int
    train_loss: float  # mean over the label tokens of the epoch so far
    valid_loss: float | None  # over the whole validation set (OpenAI's full_valid_loss)
    checkpoint_dir: Path  # adapter + resume state + manifest; removed after the callback
    manifest_sha256: str
    keep_step: int | None = None  # early stopping's best step: retention must keep it
    metrics: dict[str, float] = field(default_factory=dict)  # the method's, on all validation


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    train_loss: float  # mean over the label tokens of the last epoch
    valid_loss: float | None  # over the whole validation set, after the last step
    sha256: str  # of out_dir/adapter_model.safetensors
    history: list[dict[str, Any]]  # one row per step: step, train_loss, valid_loss, lr, tokens/s
    early_stop: EarlyStop | None = None  # set when early stopping ended the run


def _ignore(_report: Any) -> None:
    return None


def _nothing() -> None:
    return None


def _never() -> bool:
    return False


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
    should_pause: Callable[[], bool] = _never,
    init_adapter: Path | None = None,
    resume_from: Path | None = None,
    scratch_dir: Path | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `model` (a frozen base) and save it to `out_dir`.

    eval_every_steps / checkpoint_every_steps: a validation batch's loss / a checkpoint every
    N steps (0: never / only the scheduled ones); should_pause: read after `on_step`; True:
    checkpoint the step, raise RunAborted(PAUSED); scratch_dir: where checkpoints are written
    before `on_checkpoint` publishes them (None: the system temp dir); the rest: `start_run`.
    """
    hp = hyperparameters
    run = start_run(
        model,
        tokenizer,
        hp,
        n_examples=len(train_examples),
        trainable_token_ids=trainable_token_ids,
        checkpoint_every_steps=checkpoint_every_steps,
        init_adapter=init_adapter,
        resume_from=resume_from,
        ranks=ranks,
    )
    state = run.state
    objective = _objective(run, hp, train_examples, valid_examples, on_micro_batch)
    evaluate_at = evaluation_steps(run.total_steps, hp.n_evals, run.checkpoint_at)
    n_valid = len(valid_examples)
    run.model.train()
    position = {"epoch": state.epoch, "next_batch": state.next_batch}  # a resumed one's too
    for step in steps(train_examples, hp, max_len=run.max_len, **position, **run.ranks.share):
        report = _train_step(run, step, objective, on_micro_batch)
        verdict = _evaluate(run, report, objective, n_valid, evaluate_at, eval_every_steps, hp)
        state.history.append(_history_row(report))
        on_step(report)  # may raise: training stops
        epoch_loss = _end_step(state, step)
        pausing = not verdict.stop and state.step < run.total_steps and should_pause()
        if (pausing or _checkpoint_due(run, verdict, hp)) and run.ranks.writes:
            checkpoint = _Checkpoint.of(step.epoch, epoch_loss, report)
            _checkpoint(run, checkpoint, hp, on_checkpoint, scratch_dir)
        if pausing:
            raise RunAborted(RunOutcome.PAUSED)
        if verdict.stop:
            return _save(run, Path(out_dir), early_stop(state, hp))
    return _save(run, Path(out_dir))


def _checkpoint_due(run: Run, verdict: Verdict, hp: SupervisedHyperparameters) -> bool:
    """A scheduled checkpoint, or early stopping's new best (its weights must be kept)."""
    keep_best = verdict.improved and hp.early_stopping_patience is not None
    return run.state.step in run.checkpoint_at or keep_best


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


def _train_step(
    run: Run, step: Step, objective: Objective, on_micro_batch: Callable[[], None]
) -> StepReport:
    """One optimizer step: the objective's forward and backward passes over its
    micro-batches (gradients accumulate; with several ranks, summed over them), then clip,
    step and schedule."""
    import torch

    started = time.perf_counter()
    run.ranks.begin_step(run.state.step)
    loss = objective.forward_backward(run, step, on_micro_batch)
    loss_sum = run.ranks.reduce(run.params, loss.loss_sum)  # alone: as it is
    lr = run.scheduler.get_last_lr()[0]
    torch.nn.utils.clip_grad_norm_(run.params, MAX_GRAD_NORM)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    state = run.state
    state.step += 1
    state.next_batch += step.batch_count
    state.trained_tokens += step.token_count
    state.epoch_loss_sum += loss_sum
    state.epoch_label_count += loss.units
    return StepReport(
        step=state.step,
        total_steps=run.total_steps,
        epoch=step.epoch,
        train_loss=loss_sum / max(loss.units, 1),
        learning_rate=lr,
        trained_tokens=state.trained_tokens,
        tokens_per_second=step.token_count / max(time.perf_counter() - started, 1e-9),
        example_ids=step.example_ids,
        metrics=dict(loss.metrics),
    )


def _end_step(state: TrainerState, step: Step) -> float:
    """The mean loss of the epoch so far; at the epoch's end, roll the position over."""
    epoch_loss = state.epoch_loss_sum / max(state.epoch_label_count, 1)
    if step.ends_epoch:
        state.last_epoch_loss = epoch_loss
        state.epoch, state.next_batch = state.epoch + 1, 0
        state.epoch_loss_sum, state.epoch_label_count = 0.0, 0
    return epoch_loss


def _save(run: Run, out_dir: Path, stopped: EarlyStop | None = None) -> TrainResult:
    """Save the trained adapter (the last step's) to `out_dir`; what the run did. An early
    stopped run's model is its best checkpoint's: the job runner publishes that one."""
    run.model.eval()
    evaluated = [row.get("full_valid_loss") for row in run.state.history]
    valid_loss = next((loss for loss in reversed(evaluated) if loss is not None), None)
    return TrainResult(
        steps=run.state.step,
        trained_tokens=run.state.trained_tokens,
        train_loss=run.state.last_epoch_loss,
        valid_loss=valid_loss,
        sha256=save_adapter(run.model, out_dir) if run.ranks.writes else "",
        history=run.state.history,
        early_stop=stopped,
    )


@dataclass(frozen=True)
class _Checkpoint:
    epoch: int  # 1-based epoch the step belongs to
    train_loss: float  # of the epoch so far
    valid_loss: float | None  # the step's full validation loss, if it evaluated
    metrics: dict[str, float]  # the method's own on it

    @classmethod
    def of(cls, epoch: int, train_loss: float, report: StepReport) -> _Checkpoint:
        return cls(epoch, train_loss, report.full_valid_loss, report.full_valid_metrics)


def _checkpoint(
    run: Run,
    checkpoint: _Checkpoint,
    hp: SupervisedHyperparameters,
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
                epoch=checkpoint.epoch,
                step=run.state.step,
                train_loss=checkpoint.train_loss,
                valid_loss=checkpoint.valid_loss,
                checkpoint_dir=Path(folder),
                manifest_sha256=digest,
                keep_step=run.state.best_step if hp.early_stopping_patience else None,
                metrics=checkpoint.metrics,
            )
        )


def _evaluate(
    run: Run,
    report: StepReport,
    objective: Objective,
    n_valid: int,
    evaluate_at: set[int],
    every: int,
    hp: SupervisedHyperparameters,
) -> Verdict:
    """The step's validation losses into `report`: one batch every `every` steps, the
    whole set at evaluation steps (judged for early stopping)."""
    if not n_valid:
        return Verdict(improved=False, stop=False)
    if every and report.step % every == 0:
        batch = _valid_batch(run, n_valid, hp, every)
        _add_valid(report, objective.evaluate(run, batch))
    if report.step not in evaluate_at:
        return Verdict(improved=False, stop=False)
    full = objective.evaluate(run, list(range(n_valid)))
    report.full_valid_loss, report.full_valid_metrics = full.loss, full.metrics
    return judge(run.state, full.loss, hp)


def _valid_batch(run: Run, n_valid: int, hp: SupervisedHyperparameters, every: int) -> list[int]:
    """One validation batch, rotating through the set (OpenAI's valid_loss): its indices."""
    size = hp.batch_size * hp.EXAMPLES_PER_ITEM  # whole items (DPO: pairs)
    n_batches = math.ceil(n_valid / size)
    start = (run.state.step // every - 1) % n_batches * size
    return list(range(start, min(start + size, n_valid)))


def _add_valid(report: StepReport, evaluation: Evaluation) -> None:
    report.valid_loss = evaluation.loss
    report.metrics.update(evaluation.metrics)


def _history_row(report: StepReport) -> dict[str, Any]:
    return {
        "step": report.step,
        "train_loss": report.train_loss,
        "valid_loss": report.valid_loss,
        "full_valid_loss": report.full_valid_loss,
        "learning_rate": report.learning_rate,
        "tokens_per_second": report.tokens_per_second,
    } | report.metrics
