"""Early stopping's result (docs/design.md 4.17): the job's model is its best checkpoint.

When early stopping ends a run, the weights the loop holds are the last step's, some
evaluations past the best. The fine-tuned model is the best step's checkpoint instead (the
loop always checkpoints a new best, and retention keeps it): its adapter files replace the
last step's in the output folder before it is published, checked against the sha256 its row
recorded, and an event says where training stopped and which step the model is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from app.db.models import Checkpoint
from app.db.session import session_scope
from app.errors import CheckpointError
from app.jobs.runs import Claim
from app.ml.adapters import ADAPTER_FILES, ADAPTER_WEIGHTS
from app.statuses import CheckpointStatus
from app.storage import ArtifactStore, file_sha256
from worker.progress import Progress
from worker.training.evaluation import EarlyStop


def use_best_checkpoint(
    claim: Claim,
    store: ArtifactStore,
    progress: Progress,
    stop: EarlyStop,
    out: Path,
    scratch: Path,
) -> str:
    """Put the best checkpoint's adapter into `out` (fetched via `scratch`, this host's
    folder of the job); its weights' sha256."""
    with session_scope(progress.settings.sqlalchemy_url) as session:
        row = session.scalar(
            select(Checkpoint).where(
                Checkpoint.job_id == claim.job_id,
                Checkpoint.step_number == stop.best_step,
                Checkpoint.status == CheckpointStatus.ACTIVE,
            )
        )
        if row is None:
            raise CheckpointError(f"the best checkpoint (step {stop.best_step}) is not recorded")
        key, sha256 = row.storage_key, row.sha256
    folder = store.local_dir(key, scratch / f"best-step-{stop.best_step}", ADAPTER_FILES)
    if file_sha256(folder / ADAPTER_WEIGHTS) != sha256:
        raise CheckpointError(f"the best checkpoint (step {stop.best_step}) was altered")
    for name in ADAPTER_FILES:
        shutil.copyfile(folder / name, out / name)
    progress.event(
        f"Early stopping at step {stop.stopped_at_step}: the full validation loss did not "
        f"improve by more than {stop.threshold:g} in {stop.patience} evaluations; the "
        f"fine-tuned model is the checkpoint at step {stop.best_step} (full validation "
        f"loss {stop.best_full_valid_loss:.4f})",
        data={
            "stopped_at_step": stop.stopped_at_step,
            "best_step": stop.best_step,
            "best_full_valid_loss": stop.best_full_valid_loss,
            "early_stopping_patience": stop.patience,
            "early_stopping_threshold": stop.threshold,
        },
    )
    return sha256
