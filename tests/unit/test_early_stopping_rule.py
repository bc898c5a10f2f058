"""Early stopping's rule (worker/training/evaluation.py) on a sequence of evaluations."""

from __future__ import annotations

from app.jobs.hyperparameters import resolve
from app.schemas.jobs import Hyperparameters
from worker.training.checkpoint import TrainerState
from worker.training.evaluation import evaluation_steps, judge


def verdicts(losses, **knobs):
    hp = resolve(Hyperparameters(**knobs), n_examples=10, seed=1)
    state, seen = TrainerState(), []
    for step, loss in enumerate(losses, start=1):
        state.step = step
        verdict = judge(state, loss, hp)
        seen.append((verdict.improved, verdict.stop))
    return seen, state.best_step


def test_patience_counts_evaluations_without_an_improvement_beyond_the_threshold():
    # 1.99 improves on 2.0 by less than the threshold: it does not count as better
    seen, best = verdicts(
        [3.0, 2.0, 2.05, 1.99, 2.5], early_stopping_patience=3, early_stopping_threshold=0.02
    )
    assert seen == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert best == 2


def test_without_patience_the_best_is_recorded_but_nothing_stops():
    seen, best = verdicts([2.0, 3.0, 4.0, 5.0])
    assert [stop for _, stop in seen] == [False] * 4 and best == 1


def test_evaluations_are_the_checkpoints_and_n_evals_evenly_spaced():
    assert evaluation_steps(10, 0, {5, 10}) == {5, 10}
    assert evaluation_steps(10, 4, {5, 10}) == {3, 5, 8, 10}
