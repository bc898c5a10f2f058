"""Issue 5, faults 1 and 3: `kill -9` of the worker mid-training and mid-checkpoint.

Fault 1: each job is killed once at a random step between 25 % and 75 % of its run,
alternately the pool child (Celery re-queues the message at once; the fresh child finds
the lease still held and leaves the job to the sweep) and the master (its child dies with
it; the message stays unacked in Redis for `visibility_timeout`, 6 h here, so only the
sweep can recover the job). Every job must resume from its last recorded checkpoint,
losing at most one checkpoint interval, with one attempt running at a time.

Fault 3: the kill lands while a checkpoint is being written (the files into scratch,
the copy into the store's staging dir and the rename, or on an object store the uploads
and the manifest last; the database row), alternately the
first and the second write of the run. A checkpoint the database does not record with a
matching manifest is never resumed from; a kill inside the second write resumes from the
first. Nothing the dead attempts left (scratch under `tmp/<job>/`, staging dirs,
unrecorded checkpoints) outlives the run.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.models import Checkpoint, JobEvent
from app.db.session import session_scope
from tests.chaos.harness import FULL, assert_never_two_attempts_at_once, wait_until
from tests.factories import chat_rows

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.postgres]

JOB = {"n_epochs": 2, "batch_size": 2}  # 16 examples: 16 steps, checkpoints at 8 and 16
STEPS, INTERVAL = 16, 8
# alternately a child and a master (CI: one child)
N_KILLS = int(os.environ.get("LORAFORGE_CHAOS_KILLS", 20 if FULL else 1))


def steps_of(stack, job_id: str) -> list[dict]:
    return sorted((e for e in stack.journal("step") if e["job"] == job_id), key=lambda e: e["t"])


def resumed_from(stack, job_id: str) -> list[int]:
    with session_scope(stack.db_url) as session:
        events = session.scalars(
            select(JobEvent).where(
                JobEvent.job_id == job_id, JobEvent.message.like("Resuming from the checkpoint%")
            )
        ).all()
        return [event.data["step"] for event in events]


def recorded_steps(stack, job_id: str) -> list[int]:
    with session_scope(stack.db_url) as session:
        return sorted(
            session.scalars(select(Checkpoint.step_number).where(Checkpoint.job_id == job_id))
        )


# Each runs with the artifacts on the local disk and in an S3 server (published manifest-last).
BACKENDS = pytest.mark.parametrize("storage_env", ["local", "s3"], indirect=True)


@BACKENDS
def test_killed_workers_lose_no_job_and_resume_from_the_last_checkpoint(make_stack):
    stack = make_stack(LORAFORGE_CHAOS_STEP_SLEEP="0.15")
    worker = stack.add_worker("w1")
    file_id = stack.upload(chat_rows(16))
    rng = random.Random(5)
    ids, lost_steps, recovery = [], [], {"child": [], "master": []}
    for trial in range(N_KILLS):
        [job_id] = stack.submit(file_id, 1, **JOB)
        ids.append(job_id)
        target = rng.randint(STEPS // 4, 3 * STEPS // 4)
        wait_until(
            lambda j=job_id, t=target: stack.last_step(j) >= t, 120, f"step {target}", stack.logs
        )
        kind = "child" if trial % 2 == 0 else "master"
        killed_at = time.time()
        if kind == "child":
            worker.kill_child()
        else:
            worker.kill_master()
            worker.start()
        done = steps_of(stack, job_id)[-1]["step"]  # the last step the dead attempt took
        # the newest checkpoint in the database when it died (no attempt runs yet: the
        # lease has not lapsed)
        checkpoint = max(recorded_steps(stack, job_id), default=0)
        stack.wait_terminal([job_id], 120)
        second = [e for e in steps_of(stack, job_id) if e["attempt"] > 1]
        recovery[kind].append(second[0]["t"] - killed_at)
        assert second[0]["step"] == checkpoint + 1  # resumed right after the last checkpoint
        assert resumed_from(stack, job_id) == ([checkpoint] if checkpoint else [])
        lost_steps.append(done - checkpoint)
        print(
            f"kill {trial} ({kind}) at step {done}: resumed at {second[0]['step']}, "
            f"recovered in {recovery[kind][-1]:.1f}s",
            flush=True,
        )

    jobs = stack.jobs(ids)
    print(
        f"\nworker kills: {len(ids)} jobs, {sum(j.status == 'succeeded' for j in jobs.values())} "
        f"succeeded, 0 lost; attempts {sorted(j.attempt for j in jobs.values())}; steps lost "
        f"per kill max {max(lost_steps)} (interval {INTERVAL}), mean "
        f"{statistics.mean(lost_steps):.1f}; recovery (kill → first resumed step) child "
        f"{_seconds(recovery['child'])}, master {_seconds(recovery['master'])}"
    )
    assert all(job.status == "succeeded" and job.attempt == 2 for job in jobs.values())
    assert max(lost_steps) <= INTERVAL
    assert sorted(a.job_id for a in stack.adapters(ids)) == sorted(ids)
    for job_id in ids:  # the resumed attempt took exactly the steps that were missing
        assert sorted({e["step"] for e in steps_of(stack, job_id)}) == list(range(1, STEPS + 1))
        assert recorded_steps(stack, job_id) == [INTERVAL, STEPS]
    assert_never_two_attempts_at_once(stack)


def _seconds(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.1f}s, max {max(values):.1f}s"


# 8 examples, batch 2: 4 steps an epoch, 12 steps; run_job sets no checkpoint_every_steps,
# so checkpoints come at the epoch ends 4, 8, 12: the second write is not the final one
SMALL = {"n_epochs": 3, "batch_size": 2}
SMALL_STEPS, CHECKPOINTS = 12, [4, 8, 12]
# alternately inside the first and the second write (CI: one of each)
N_SAVE_KILLS = int(os.environ.get("LORAFORGE_CHAOS_SAVE_KILLS", 50 if FULL else 2))
SAVE_SLEEP = 0.25  # after the loop's write, and between the files copied into the store


@BACKENDS
def test_a_kill_while_a_checkpoint_is_written_never_resumes_from_half_a_checkpoint(make_stack):
    stack = make_stack(
        LORAFORGE_CHAOS_SAVE_SLEEP=str(SAVE_SLEEP), LORAFORGE_CHAOS_STEP_SLEEP="0.05"
    )
    worker = stack.add_worker("w1")
    file_id = stack.upload(chat_rows(8))
    rng = random.Random(11)
    ids, inside, resumed = [], 0, []
    for trial in range(N_SAVE_KILLS):
        nth = 1 + trial % 2  # the first or the second checkpoint write of the attempt
        master = (trial % 2) != (trial // 2 % 2)  # each write is hit by both kinds of kill
        [job_id] = stack.submit(file_id, 1, **SMALL)
        ids.append(job_id)
        pid = wait_until(lambda j=job_id: _training_pid(stack, j), 120, "training", stack.logs)
        began = wait_until(
            lambda p=pid, n=nth: _save_began(stack, p, n), 120, f"checkpoint write {nth}"
        )
        # The write: the loop's files into scratch and a pause, then 6 files copied into the
        # store's staging dir with a pause after each, the rename, the row. A kill aimed at
        # the first write may land anywhere in it (or just after); one aimed at the second
        # lands before its copy ends, so the run must go back to the first checkpoint.
        window = (7 if nth == 1 else 5.5) * SAVE_SLEEP
        time.sleep(max(0.0, began + rng.uniform(0, window) - time.time()))
        # listed just before the kill as well: the lease (3 s) may lapse and the sweep clean
        # up before the listing after the kill runs
        scratch = _scratch(stack, job_id)
        if master:
            worker.kill_master()
            worker.start()
        else:
            worker.kill_child()
        target = CHECKPOINTS[nth - 1]
        finished = any(
            e["job"] == job_id and e["step"] == target for e in stack.journal("save_end")
        )
        inside += not finished
        recorded = recorded_steps(stack, job_id)  # what the database held when it died
        checkpoint = max(recorded, default=0)
        scratch = sorted({*scratch, *_scratch(stack, job_id)})  # what the dead attempt left
        wait_until(
            lambda j=job_id: any(e["attempt"] > 1 for e in steps_of(stack, j)),
            120,
            "the resumed attempt's first step",
            stack.logs,
        )
        # the sweep re-queued the job and removed the dead attempt's scratch before any
        # new attempt could claim it
        assert scratch and not any(path.exists() for path in scratch)
        stack.wait_terminal([job_id], 120)
        resumed.append(resumed_from(stack, job_id))
        assert resumed[-1] == ([checkpoint] if checkpoint else [])
        if nth == 2:  # the first checkpoint was complete: never from scratch or half of 8
            assert CHECKPOINTS[0] in recorded and resumed[-1] in ([4], [8])
        print(
            f"save kill {trial} ({'master' if master else 'child'}, write {nth}): inside the "
            f"write {not finished}, recorded {recorded}, resumed from {resumed[-1]}, "
            f"dead attempt's scratch swept: {[p.name for p in scratch]}",
            flush=True,
        )

    jobs = stack.jobs(ids)
    leftovers = _settled_leftovers(stack, ids, timeout=30)
    from_4, from_8 = sum(r == [4] for r in resumed), sum(r == [8] for r in resumed)
    print(
        f"\ncheckpoint kills: {len(ids)} trials, {inside} killed inside the write; "
        f"{sum(j.status == 'succeeded' for j in jobs.values())} succeeded with no manual step; "
        f"resumed from step 4: {from_4}, from step 8: {from_8}, from scratch: "
        f"{sum(r == [] for r in resumed)}; leftovers (checkpoints/, tmp/, $TMPDIR): {leftovers}"
    )
    assert all(job.status == "succeeded" for job in jobs.values())
    assert sorted(a.job_id for a in stack.adapters(ids)) == sorted(ids)
    for job_id in ids:  # the resumed attempt rewrote what the dead one lost
        assert recorded_steps(stack, job_id) == CHECKPOINTS
        assert sorted({e["step"] for e in steps_of(stack, job_id)}) == list(
            range(1, SMALL_STEPS + 1)
        )
    if len(ids) >= 2:  # a kill inside the second write resumes from the first checkpoint
        assert from_4 >= 1
    # the sweep removed staging dirs, unrecorded checkpoints and the dead attempts' scratch;
    # the worker removed its job's scratch when the job ended
    assert leftovers == []
    assert_never_two_attempts_at_once(stack)


def _training_pid(stack, job_id: str) -> int | None:
    steps = [e["pid"] for e in stack.journal("step") if e["job"] == job_id]
    return steps[0] if steps else None


def _save_began(stack, pid: int, nth: int = 1) -> float | None:
    """When the process `pid` began its `nth` checkpoint write (None: not yet)."""
    began = [e["t"] for e in stack.journal("save_begin") if e["pid"] == pid]
    return began[nth - 1] if len(began) >= nth else None


def _artifacts(stack) -> Path:
    return stack.tmp / "data" / "artifacts"


def _store(stack):
    """The stack's artifact store (a local dir, or the S3 prefix it was given)."""
    from app.config import Settings
    from app.storage import open_store

    url = stack.env.get("LORAFORGE_STORAGE_URL")
    return open_store(Settings(data_dir=stack.tmp / "data", storage_url=url))


def _scratch(stack, job_id: str) -> list[Path]:
    folder = _artifacts(stack) / "tmp" / job_id
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _leftovers(stack, ids: list[str]) -> list[str]:
    """What nobody would clean up: entries under checkpoints/<job>/ that no checkpoint row
    points at, anything under tmp/<job>/, and checkpoint scratch in the system temp dir."""
    with session_scope(stack.db_url) as session:
        recorded = set(
            session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id.in_(ids)))
        )
    root = _artifacts(stack)
    store = _store(stack)
    found = [
        key
        for job_id in ids
        for key, _ in store.entries(f"checkpoints/{job_id}")
        if key not in recorded
    ]
    found += [str(entry.relative_to(root)) for job_id in ids for entry in _scratch(stack, job_id)]
    found += [f"$TMPDIR/{p.name}" for p in stack.system_tmp.glob("loraforge-ckpt-*")]
    return found


def _settled_leftovers(stack, ids: list[str], *, timeout: float) -> list[str]:
    """The leftovers once cleanup had `timeout` seconds (a job's scratch goes just after
    its terminal state is committed)."""
    deadline = time.monotonic() + timeout
    while (found := _leftovers(stack, ids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found
