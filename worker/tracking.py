"""Experiment tracking: a job's config and metrics, also logged to W&B or MLflow.

A job's `integrations` (app/schemas/jobs.py, stored in its run spec) name where; the
credentials and servers are the worker's environment's (WANDB_API_KEY, WANDB_MODE,
WANDB_BASE_URL, MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, …), never the request's.
`JobTracking` is what worker/progress.py calls: `start` once training begins, `log` every
optimizer step, `finish` with the job's outcome.

A tracker never fails a job: a tracker that cannot start (its package is missing, its
server is down) or that fails later is reported once, as a `warn` event on the job, and
dropped; training goes on. wandb and mlflow are heavy optional extras (`pip install
loraforge[wandb]` / `[mlflow]`), imported only when a job asks for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.schemas.jobs import MlflowIntegration, MlflowSettings, WandbIntegration, WandbSettings
from app.statuses import RunOutcome

logger = logging.getLogger(__name__)

DEFAULT_MLFLOW_EXPERIMENT = "loraforge"
MAX_TAG_CHARS = 64  # W&B's limit on a tag


@dataclass(frozen=True)
class RunInfo:
    """What every tracker's run starts with."""

    job_id: str
    base_model: str
    config: Mapping[str, Any]  # nested: {"hyperparameters": {...}, ...}

    def default_tags(self) -> list[str]:
        """Like OpenAI's W&B runs ("openai/finetune", "openai/{model}", "openai/{job}")."""
        tags = ["loraforge/finetune", f"loraforge/{self.base_model}", f"loraforge/{self.job_id}"]
        return [tag[:MAX_TAG_CHARS] for tag in tags]


class Tracker(Protocol):
    """One experiment tracker's run."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, outcome: RunOutcome) -> None: ...


Warn = Callable[[str, dict[str, Any]], None]  # a `warn` event on the job: message, data


class JobTracking:
    """All the trackers of one job; a failing one is reported once and dropped."""

    def __init__(self, integrations: Sequence[WandbIntegration | MlflowIntegration], warn: Warn):
        self._integrations, self._warn = tuple(integrations), warn
        # by position in `integrations`: two of one type (two W&B projects) are two runs
        self._running: dict[int, tuple[str, Tracker]] = {}

    def start(self, run: RunInfo) -> None:
        for index, integration in enumerate(self._integrations):
            try:
                self._running[index] = (integration.type, _open(integration, run))
            except Exception as exc:  # a missing package included (ImportError)
                self._failed(integration.type, "could not start", exc)

    def log(self, metrics: Mapping[str, float | int | None], step: int) -> None:
        present = {k: float(v) for k, v in metrics.items() if v is not None}
        for index, (kind, tracker) in list(self._running.items()):
            try:
                tracker.log(present, step)
            except Exception as exc:
                del self._running[index]
                self._failed(kind, f"failed at step {step}", exc)

    def finish(self, outcome: RunOutcome) -> None:
        running, self._running = self._running, {}
        for kind, tracker in running.values():
            try:
                tracker.finish(outcome)
            except Exception as exc:
                self._failed(kind, "could not finish its run", exc)

    def _failed(self, kind: str, what: str, exc: Exception) -> None:
        logger.warning("%s tracking %s", kind, what, exc_info=True)
        reason = f"{type(exc).__name__}: {exc}"[:500]
        self._warn(
            f"Experiment tracking ({kind}) {what}, so it is off for this run; training "
            f"goes on. {reason}",
            {"integration": kind, "error": reason},
        )


def _open(integration: WandbIntegration | MlflowIntegration, run: RunInfo) -> Tracker:
    if isinstance(integration, WandbIntegration):
        return WandbTracker(integration.wandb, run)
    return MlflowTracker(integration.mlflow, run)


class WandbTracker:
    """A W&B run: the config at start, a history row per step, the outcome at the end."""

    def __init__(self, settings: WandbSettings, run: RunInfo):
        import wandb

        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or run.job_id,
            tags=run.default_tags() + list(settings.tags or ()),
            config=dict(run.config),
            reinit="create_new",  # one process may run several jobs, one run each
            # the worker's logs stay its own; no prompt for a key without a terminal
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def finish(self, outcome: RunOutcome) -> None:
        self._run.summary["outcome"] = str(outcome)
        self._run.finish(exit_code=0 if outcome == RunOutcome.SUCCEEDED else 1)


class MlflowTracker:
    """An MLflow run, through `MlflowClient` (no process-global active run)."""

    # cancelled, lease_lost, db_unavailable: stopped from outside, not by the run
    _STATUS = {RunOutcome.SUCCEEDED: "FINISHED", RunOutcome.FAILED: "FAILED"}

    def __init__(self, settings: MlflowSettings, run: RunInfo):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=settings.tracking_uri)  # None: the env's
        experiment_id = self._experiment_id(settings.experiment_name or DEFAULT_MLFLOW_EXPERIMENT)
        tags = {"loraforge.job_id": run.job_id, "loraforge.base_model": run.base_model}
        tags |= dict.fromkeys(settings.tags or (), "")  # MLflow tags are key/value
        created = self._client.create_run(
            experiment_id, run_name=settings.name or run.job_id, tags=tags
        )
        self._run_id = created.info.run_id
        params = [Param(key, str(value)) for key, value in _flat(run.config).items()]
        self._client.log_batch(self._run_id, params=params)

    def _experiment_id(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self._client.create_experiment(name))
        except Exception:  # another worker created it first
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self._client.log_batch(self._run_id, metrics=batch)

    def finish(self, outcome: RunOutcome) -> None:
        self._client.set_tag(self._run_id, "loraforge.outcome", str(outcome))
        self._client.set_terminated(self._run_id, status=self._STATUS.get(outcome, "KILLED"))


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"hyperparameters": {"n_epochs": 2}} → {"hyperparameters.n_epochs": 2} (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
