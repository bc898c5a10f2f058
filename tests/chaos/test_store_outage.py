"""Issue 13: the object store unreachable for 20 s mid-training loses no job.

The S3 server (moto, in memory, so it is paused with SIGSTOP rather than stopped) freezes
just before a checkpoint is uploaded: the upload waits (the connection is accepted by the
kernel and answered once the server runs again), the parent keeps the lease in the
database meanwhile, and the job ends `succeeded` with every checkpoint recorded.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from app.db.models import Checkpoint
from app.db.session import session_scope
from tests.chaos.harness import wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

OUTAGE_SECONDS = 20
JOB = {"n_epochs": 2, "batch_size": 2}  # 16 examples: 16 steps, checkpoints at 8 and 16


def recorded_steps(stack, job_id: str) -> list[int]:
    with session_scope(stack.db_url) as session:
        query = select(Checkpoint.step_number).where(Checkpoint.job_id == job_id)
        return sorted(session.scalars(query))


@pytest.mark.parametrize("storage_env", ["s3"], indirect=True)
def test_an_object_store_outage_mid_training_loses_no_job(make_stack, s3_server):
    stack = make_stack(LORAFORGE_CHAOS_STEP_SLEEP="0.3")
    stack.add_worker("w1")
    file_id = stack.upload(chat_rows(16))
    [job_id] = stack.submit(file_id, 1, **JOB)
    wait_until(lambda: stack.last_step(job_id) >= 6, 120, "step 6", stack.logs)
    paused_at = stack.last_step(job_id)
    s3_server.pause()
    try:
        time.sleep(OUTAGE_SECONDS)
        during = recorded_steps(stack, job_id)  # the step-8 checkpoint cannot be uploaded
    finally:
        s3_server.resume()
    back = time.time()
    jobs = stack.wait_terminal([job_id], 240)
    saved = [e for e in stack.journal("save_end") if e["job"] == job_id]
    print(
        f"\nstore outage {OUTAGE_SECONDS}s from step {paused_at}: checkpoints "
        f"recorded during it {during}; job {jobs[job_id].status} after attempt "
        f"{jobs[job_id].attempt}; first checkpoint published {saved[0]['t'] - back:+.1f}s "
        "after the store came back"
    )
    assert during == []  # the outage really held the checkpoint upload up
    assert jobs[job_id].status == "succeeded"
    assert recorded_steps(stack, job_id) == [8, 16]
    assert [a.job_id for a in stack.adapters([job_id])] == [job_id]
