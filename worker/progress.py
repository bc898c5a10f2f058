"""The training loop's callbacks, wired to the database and the artifact store.

Every step renews the lease and checks for cancellation (one conditional UPDATE,
`job_runs.renew_lease`, which raises `RunAborted`) and, in that same statement, writes the
job's progress: trained tokens, steps done and planned, and `estimated_finish` from the
step rate observed since `start()`. Every micro-batch checks cancel and lease with a read
(`job_runs.check_run`), so a long gradient accumulation stops at the next micro-batch, not
at the end of its step; every `metrics_every_steps` a `metrics` event, and every step the
same metrics to the job's experiment trackers (worker/tracking.py: started in `start`,
ended in `finish` with the run's outcome). Every checkpoint is
published atomically to `checkpoints/{job_id}/step-N`, recorded (callable as
`ft:…:ckpt-step-N`), and the oldest beyond `checkpoint_retention` are pruned (their rows say
so; files go after commit).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from datetime import timedelta
from typing import Any

from app.config import Settings
from app.db.base import utcnow
from app.db.session import read_session_scope, session_scope
from app.jobs import publishing
from app.jobs import runs as job_runs
from app.jobs.runs import Claim
from app.jobs.service import add_event
from app.jobs.spec import RunSpec, SupervisedHyperparameters
from app.ml.adapters import ADAPTER_WEIGHTS
from app.statuses import RunOutcome
from app.storage import ArtifactStore, file_sha256
from worker.tracking import JobTracking, RunInfo
from worker.training.checkpoint import checkpoint_steps

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "step",
    "train_loss",
    "valid_loss",
    "learning_rate",
    "tokens_per_second",
    "full_valid_loss",  # at evaluation steps (docs/design.md 4.17); empty elsewhere
)


class Progress:
    """Callbacks for `train_lora`: lease + cancel check every step, metrics, checkpoints."""

    def __init__(self, claim: Claim, settings: Settings, store: ArtifactStore):
        self.claim, self.settings, self.store = claim, settings, store
        self._started = time.monotonic()
        self._first_step: int | None = None  # the step this attempt started from (resume)
        self.steps_done = 0  # optimizer steps completed (what an out-of-memory error reports)
        self.pause_requested = False  # read by the last step's lease renewal
        self.tracking = JobTracking((), warn=self._warn)

    def start(
        self, spec: RunSpec, hyperparameters: SupervisedHyperparameters, total_steps: int
    ) -> None:
        """Training begins now (the model is loaded): the step rate is measured from here,
        and the job's experiment trackers start, with the hyperparameters as they run."""
        self._started = time.monotonic()
        self.tracking = JobTracking(spec.integrations, warn=self._warn)
        config = {
            "job_id": self.claim.job_id,
            "attempt": self.claim.attempt,
            "base_model": spec.base_model,
            "parent_model": spec.parent_model,
            "training_file": spec.training_file,
            "validation_file": spec.validation_file,
            "total_steps": total_steps,
            "hyperparameters": hyperparameters.model_dump(mode="json"),
        }
        self.tracking.start(
            RunInfo(job_id=self.claim.job_id, base_model=spec.base_model, config=config)
        )

    def finish(self, outcome: RunOutcome) -> None:
        """The run ended so: the experiment trackers end their runs."""
        self.tracking.finish(outcome)

    def _warn(self, message: str, data: dict[str, Any]) -> None:
        """A `warn` event that renews no lease and raises nothing: trackers report through
        it at any point, after the job ended included, and must never stop a run."""
        try:
            with session_scope(self.settings.sqlalchemy_url) as session:
                add_event(
                    session, job_id=self.claim.job_id, message=message, level="warn", data=data
                )
        except Exception:
            logger.warning("job %s: could not record %r", self.claim.job_id, message, exc_info=True)

    def event(
        self,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        columns: dict[str, Any] | None = None,
    ) -> None:
        """An event in its own transaction, renewing the lease (raises when the run must stop);
        `columns`: job columns the same fenced statement writes (the memory plan's choice)."""
        with session_scope(self.settings.sqlalchemy_url) as session:
            job_runs.renew_lease(
                session,
                claim=self.claim,
                lease_seconds=self.settings.lease_seconds,
                progress=columns,
            )
            add_event(session, job_id=self.claim.job_id, message=message, level=level, data=data)

    def announce_checkpoints(self, total_steps: int, n_checkpoints: int) -> None:
        """An event: at which steps checkpoints will be written, and how many are kept."""
        steps = checkpoint_steps(total_steps, n_checkpoints)
        keep = self.settings.checkpoint_retention
        kept = "all are kept" if keep <= 0 or keep >= len(steps) else f"the newest {keep} are kept"
        shown = steps if len(steps) <= 6 else [*steps[:3], "…", steps[-1]]
        self.event(
            f"{len(steps)} checkpoint{'s' * (len(steps) > 1)} planned, at step "
            f"{', '.join(map(str, shown))}; {kept} (LORAFORGE_CHECKPOINT_RETENTION)",
            data={"checkpoint_steps": steps, "checkpoint_retention": keep},
        )
        if n_checkpoints > total_steps:
            self.event(
                f"n_checkpoints={n_checkpoints} is more than the {total_steps} optimizer "
                "steps; writing one checkpoint per step",
                level="warn",
                data={"n_checkpoints": n_checkpoints, "total_steps": total_steps},
            )

    def on_micro_batch(self) -> None:
        with read_session_scope(self.settings.sqlalchemy_url) as session:
            job_runs.check_run(session, claim=self.claim)

    def should_pause(self) -> bool:
        """Whether a pause was asked: the loop checkpoints this step and stops (4.16)."""
        return self.pause_requested

    def on_step(self, report: Any) -> None:
        with session_scope(self.settings.sqlalchemy_url) as session:
            self.pause_requested = job_runs.renew_lease(
                session,
                claim=self.claim,
                lease_seconds=self.settings.lease_seconds,
                progress=self._progress(report),
            )
            metrics = {
                "step": report.step,
                "total_steps": report.total_steps,
                "epoch": report.epoch,
                "train_loss": report.train_loss,
                "valid_loss": report.valid_loss,
                "full_valid_loss": report.full_valid_loss,
                "learning_rate": report.learning_rate,
                "trained_tokens": report.trained_tokens,
                "tokens_per_second": report.tokens_per_second,
            } | report.metrics  # the method's own: DPO's reward margin and accuracy
            every = self.settings.metrics_every_steps
            evaluated = report.full_valid_loss is not None
            if report.step % every == 0 or report.step == report.total_steps or evaluated:
                add_event(
                    session,
                    job_id=self.claim.job_id,
                    type="metrics",
                    message=_step_message(report),
                    data=metrics,
                )
        self.steps_done = report.step
        # every step, once the database has it; the step is the trackers' x axis
        self.tracking.log(
            {k: v for k, v in metrics.items() if k not in ("step", "total_steps")},
            step=report.step,
        )

    def _progress(self, report: Any) -> dict[str, Any]:
        """The job's progress columns after this step."""
        if self._first_step is None:
            self._first_step = report.step - 1
        done = report.step - self._first_step
        seconds_per_step = (time.monotonic() - self._started) / done
        return {
            "trained_tokens": report.trained_tokens,
            "steps_completed": report.step,
            "steps_planned": report.total_steps,
            "estimated_finish": utcnow()
            + timedelta(seconds=seconds_per_step * (report.total_steps - report.step)),
        }

    def on_checkpoint(self, report: Any) -> None:
        key = f"checkpoints/{self.claim.job_id}/step-{report.step}"
        self.store.publish_dir(report.checkpoint_dir, key)
        metrics = {
            "step": report.step,
            "train_loss": report.train_loss,
            "valid_loss": report.valid_loss,
            "full_valid_loss": report.valid_loss,
        } | {f"full_{name}": value for name, value in report.metrics.items()}
        with session_scope(self.settings.sqlalchemy_url) as session:
            job_runs.renew_lease(
                session, claim=self.claim, lease_seconds=self.settings.lease_seconds
            )
            pruned = publishing.record_checkpoint(
                session,
                claim=self.claim,
                step=report.step,
                metrics=metrics,
                storage_key=key,
                sha256=file_sha256(report.checkpoint_dir / ADAPTER_WEIGHTS),
                state_sha256=report.manifest_sha256,
                keep=self.settings.checkpoint_retention,
                keep_step=report.keep_step,
            )
        for old in pruned:  # their rows say pruned (committed): now the files may go
            self.store.delete(old)


def _step_message(report: Any) -> str:
    message = f"Step {report.step}/{report.total_steps}: training loss={report.train_loss:.4f}"
    if report.valid_loss is not None:
        message += f", validation loss={report.valid_loss:.4f}"
    if report.full_valid_loss is not None:
        message += f", full validation loss={report.full_valid_loss:.4f}"
    return message


def metrics_csv(history: list[dict[str, Any]]) -> bytes:
    """The result file: one row per optimizer step (OpenAI-style `step,train_loss,…`)."""
    buffer = io.StringIO()
    # then the method's own columns, in the order they first appear (DPO: reward metrics)
    columns = list(dict.fromkeys([*CSV_COLUMNS, *(k for row in history for k in row)]))
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue().encode()
