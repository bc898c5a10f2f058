"""The `n_checkpoints` hyperparameter (Together's name): resolved, shown, validated."""

from __future__ import annotations

import pytest

from tests.factories import create_job, job_count


@pytest.mark.parametrize(("given", "resolved"), [({}, 5), ({"n_checkpoints": 2}, 2)])
def test_the_job_shows_how_many_checkpoints_it_writes(client, training_file, given, resolved):
    """Default: one per epoch, as before the setting existed."""
    hp = {"n_epochs": 5} | given
    response = create_job(client, model="tiny", training_file=training_file, hyperparameters=hp)
    assert response.status_code == 200, response.text
    assert response.json()["hyperparameters"]["n_checkpoints"] == resolved


@pytest.mark.parametrize("value", [0, -1, 101, "many", 2.5, None])
def test_a_bad_n_checkpoints_is_refused_naming_it(client, settings, training_file, value):
    hp = {"n_checkpoints": value}
    response = create_job(client, model="tiny", training_file=training_file, hyperparameters=hp)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "hyperparameters.n_checkpoints", error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert job_count(settings) == 0
