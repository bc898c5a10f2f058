"""Evaluations during training and early stopping (docs/design.md 4.17).

An evaluation is the loss over the whole validation set (OpenAI's `full_valid_loss`). It
runs at every checkpoint step and at `n_evals` more steps spread evenly over the run (the
schedule of `checkpoint_steps`), so a long epoch is measured while it trains. With
`early_stopping_patience`, each evaluation that improves on the best loss by more than
`early_stopping_threshold` becomes the best (and gets a checkpoint, so its weights are kept
and callable); `patience` evaluations in a row without one end the run early.

The record lives in `TrainerState` (best step, best loss, evaluations since), so it is saved
with every checkpoint and a resumed or paused run stops exactly where an uninterrupted one
would.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.jobs.spec import SupervisedHyperparameters
from worker.training.checkpoint import TrainerState, checkpoint_steps


@dataclass(frozen=True)
class Verdict:
    improved: bool  # this evaluation is the new best
    stop: bool  # patience ran out: end the run now


@dataclass(frozen=True)
class EarlyStop:
    """How an early-stopped run ended: its model is `best_step`'s checkpoint."""

    stopped_at_step: int
    best_step: int
    best_full_valid_loss: float
    patience: int
    threshold: float


def evaluation_steps(total_steps: int, n_evals: int, checkpoint_at: set[int]) -> set[int]:
    """Every checkpoint step and `n_evals` evenly spaced ones (the last at the end)."""
    extra = checkpoint_steps(total_steps, n_evals) if n_evals else []
    return set(checkpoint_at) | set(extra)


def judge(state: TrainerState, loss: float, hp: SupervisedHyperparameters) -> Verdict:
    """Record the evaluation at `state.step` in `state`; whether it improved and whether
    early stopping ends the run (never without `early_stopping_patience`)."""
    best = state.best_full_valid_loss
    improved = best is None or loss < best - hp.early_stopping_threshold
    if improved:
        state.best_step, state.best_full_valid_loss = state.step, loss
        state.evals_since_best = 0
    else:
        state.evals_since_best += 1
    patience = hp.early_stopping_patience
    return Verdict(improved, patience is not None and state.evals_since_best >= patience)


def early_stop(state: TrainerState, hp: SupervisedHyperparameters) -> EarlyStop:
    assert hp.early_stopping_patience is not None and state.best_full_valid_loss is not None
    return EarlyStop(
        stopped_at_step=state.step,
        best_step=state.best_step,
        best_full_valid_loss=state.best_full_valid_loss,
        patience=hp.early_stopping_patience,
        threshold=hp.early_stopping_threshold,
    )
