"""JobTracking (worker/tracking.py) with stand-in trackers: a tracker that fails is reported
once and dropped, the others go on, and every running tracker learns the outcome."""

from __future__ import annotations

import pytest

from app.schemas.jobs import MlflowIntegration, WandbIntegration
from app.statuses import RunOutcome
from worker import tracking
from worker.tracking import JobTracking, RunInfo

INTEGRATIONS = [
    WandbIntegration(type="wandb", wandb={"project": "p"}),
    MlflowIntegration(type="mlflow", mlflow={}),
]
RUN = RunInfo(job_id="ftjob-1", base_model="tiny", config={"hyperparameters": {"lora_r": 8}})


class StandIn:
    def __init__(self, kind: str, fail_at: int | None):
        self.kind, self.fail_at = kind, fail_at
        self.logged: list[tuple[int, dict]] = []
        self.outcome: RunOutcome | None = None

    def log(self, metrics, step):
        if step == self.fail_at:
            raise ConnectionError(f"{self.kind} server went away")
        self.logged.append((step, dict(metrics)))

    def finish(self, outcome):
        self.outcome = outcome


@pytest.fixture
def stand_ins(monkeypatch) -> dict[str, StandIn]:
    made = {"wandb": StandIn("wandb", fail_at=2), "mlflow": StandIn("mlflow", fail_at=None)}
    monkeypatch.setattr(tracking, "_open", lambda integration, run: made[integration.type])
    return made


def test_a_tracker_failing_mid_run_is_reported_once_and_dropped(stand_ins):
    warnings: list[tuple[str, dict]] = []
    job = JobTracking(INTEGRATIONS, warn=lambda message, data: warnings.append((message, data)))
    job.start(RUN)
    for step in (1, 2, 3):
        job.log({"train_loss": 1.0 / step, "valid_loss": None}, step=step)
    job.finish(RunOutcome.CANCELLED)

    assert [step for step, _ in stand_ins["wandb"].logged] == [1]
    assert stand_ins["mlflow"].logged == [(s, {"train_loss": 1.0 / s}) for s in (1, 2, 3)]
    [(message, data)] = warnings
    assert data["integration"] == "wandb" and "failed at step 2" in message
    assert "server went away" in data["error"]
    assert stand_ins["wandb"].outcome is None  # dropped: it gets nothing more
    assert stand_ins["mlflow"].outcome == RunOutcome.CANCELLED


def test_a_job_without_integrations_tracks_nothing():
    warnings: list = []
    job = JobTracking((), warn=lambda *args: warnings.append(args))
    job.start(RUN)
    job.log({"train_loss": 1.0}, step=1)
    job.finish(RunOutcome.SUCCEEDED)
    assert warnings == []


def test_mlflow_params_are_the_config_flattened():
    assert tracking._flat({"a": 1, "hyperparameters": {"lora_r": 8, "x": {"y": None}}}) == {
        "a": 1,
        "hyperparameters.lora_r": 8,
        "hyperparameters.x.y": None,
    }


def test_two_integrations_of_one_type_are_two_runs(monkeypatch):
    made: list[StandIn] = []

    def open_one(integration, _run):
        made.append(StandIn(integration.type, fail_at=None))
        return made[-1]

    monkeypatch.setattr(tracking, "_open", open_one)
    job = JobTracking([INTEGRATIONS[0], INTEGRATIONS[0]], warn=lambda *args: None)
    job.start(RUN)
    job.log({"train_loss": 2.0}, step=1)
    job.finish(RunOutcome.SUCCEEDED)
    assert [(t.logged, t.outcome) for t in made] == [([(1, {"train_loss": 2.0})], "succeeded")] * 2
