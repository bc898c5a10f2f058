"""Issue 15 §2: an out-of-memory error in a step, in a real worker (celery, its resident
pool process, a forked child per job): the job fails with `out_of_memory` and advice, it
publishes nothing, and the same worker takes the next job."""

from __future__ import annotations

import pytest

from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]


def test_out_of_memory_fails_the_job_and_the_worker_runs_the_next(make_stack):
    stack = make_stack(LORAFORGE_CHAOS_OOM_AT_STEP="2")
    worker = stack.add_worker("w1")
    file_id = stack.upload(chat_rows(8))
    [first] = stack.submit(file_id, 1, n_epochs=1, batch_size=2)  # 4 steps
    stack.wait_terminal([first], 120)
    [second] = stack.submit(file_id, 1, n_epochs=1, batch_size=2)
    jobs = stack.wait_terminal([first, second], 120)

    assert jobs[first].status == "failed" and jobs[first].error["code"] == "out_of_memory"
    assert jobs[first].error["message"].startswith("Training ran out of cpu memory at step 2")
    assert "Smallest change that fits" in jobs[first].error["message"]
    assert jobs[second].status == "succeeded" and jobs[second].attempt == 1
    assert [a.job_id for a in stack.adapters([first, second])] == [second]
    assert not (stack.tmp / "data" / "artifacts" / "adapters" / first).exists()
    # one step of the first job ran, then the fault; the same pool process ran both jobs
    [oom] = stack.journal("oom")
    assert oom["job"] == first
    steps = [e for e in stack.journal("step") if e["job"] == first]
    assert [e["step"] for e in steps] == [1]
    second_steps = {e["ppid"] for e in stack.journal("step") if e["job"] == second}
    assert second_steps == {oom["ppid"]} and worker.proc.poll() is None
