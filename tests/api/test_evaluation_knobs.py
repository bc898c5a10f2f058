"""Evaluations and early stopping at job creation (docs/design.md 4.17): they need a
validation file, and `model` may be a checkpoint id to continue."""

from __future__ import annotations

import pytest

from tests.factories import create_job, job_count


@pytest.mark.parametrize(
    "knobs", [{"early_stopping_patience": 2}, {"n_evals": 4}], ids=["patience", "n_evals"]
)
def test_evaluations_without_a_validation_file_are_refused_naming_it(
    client, settings, training_file, knobs
):
    response = create_job(client, model="tiny", training_file=training_file, hyperparameters=knobs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "validation_file" and next(iter(knobs)) in error["message"]
    assert job_count(settings) == 0


def test_the_knobs_are_shown_resolved(client, training_file):
    knobs = {"n_evals": 4, "early_stopping_patience": 2, "early_stopping_threshold": 0.01}
    body = {"model": "tiny", "training_file": training_file, "validation_file": training_file}
    job = create_job(client, **body, hyperparameters=knobs).json()
    assert {k: job["hyperparameters"][k] for k in knobs} == knobs and job["best_step"] is None


def test_an_unknown_checkpoint_id_is_refused(client, training_file):
    model = "ft:tiny:acme::ftjob-nope:ckpt-step-2"
    response = create_job(client, model=model, training_file=training_file)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_found"
