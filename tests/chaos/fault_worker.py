"""The Celery app of a chaos worker: the real one, plus a journal of what it did.

`celery -A tests.chaos.fault_worker worker …` imports this in the master, so the
wrappers below are inherited by every forked process (the pool process, and each job's
child of it). Nothing here changes what the worker decides; it records deliveries (and
`skipped` when one claimed nothing), each claimed job's outcome, and optimizer steps
(after the lease renewal succeeded, i.e. while the attempt held the job; `ppid` is the
pool process that claimed it) to an append-only JSONL file, and can
slow steps down (`LORAFORGE_CHAOS_STEP_SLEEP`) so kills land mid-training, and
checkpoint writes (`LORAFORGE_CHAOS_SAVE_SLEEP`: a pause after the loop writes the
files and between the files published: copied, or uploaded) so kills land mid-write, and
make the first job that reaches step `LORAFORGE_CHAOS_OOM_AT_STEP` run out of memory there
(`torch.OutOfMemoryError` before its first micro-batch; once per stack: a marker file).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from types import SimpleNamespace
from typing import Any

import worker.tasks
from app.storage import local, s3
from worker import run_job as run_job_module
from worker import supervisor
from worker.celery_app import celery_app
from worker.training import loop

JOURNAL = os.environ.get("LORAFORGE_CHAOS_JOURNAL")
STEP_SLEEP = float(os.environ.get("LORAFORGE_CHAOS_STEP_SLEEP", "0"))
SAVE_SLEEP = float(os.environ.get("LORAFORGE_CHAOS_SAVE_SLEEP", "0"))
OOM_AT_STEP = int(os.environ.get("LORAFORGE_CHAOS_OOM_AT_STEP", "0"))

__all__ = ["celery_app"]


def record(kind: str, **fields: Any) -> None:
    if not JOURNAL:
        return
    # `host`: the simulated machine the process belongs to (tests/chaos/multihost.py)
    origin = {"pid": os.getpid(), "host": os.environ.get("LORAFORGE_CHAOS_HOST"), "t": time.time()}
    line = json.dumps({"kind": kind, **origin, **fields}) + "\n"
    # One short O_APPEND write per line: lines from several processes never interleave.
    fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


_real_wake = worker.tasks.wake
_real_run_claimed = supervisor.run_claimed
_real_on_step = run_job_module.Progress.on_step


@functools.wraps(_real_wake)
def _journaled_wake(job_id: str) -> list[str]:
    record("delivery", job=job_id)
    ran = _real_wake(job_id)
    if not ran:
        record("result", job=job_id, result="skipped")
    return ran


@functools.wraps(_real_run_claimed)
def _journaled_run_claimed(claim, settings) -> str:
    result = _real_run_claimed(claim, settings)
    record("result", job=claim.job_id, result=result)
    return result


def _journaled_on_step(self, report) -> None:
    _real_on_step(self, report)  # renews the lease: raises if this attempt lost the job
    record(
        "step",
        job=self.claim.job_id,
        attempt=self.claim.attempt,
        step=report.step,
        ppid=os.getppid(),
    )
    if STEP_SLEEP:
        time.sleep(STEP_SLEEP)


def _journaled_save(out_dir, **kwargs):
    """The loop's checkpoint write, journaled, and slowed to a disk's pace when asked."""
    record("save_begin", dir=str(out_dir))
    digest = _real_save(out_dir, **kwargs)
    if SAVE_SLEEP:
        time.sleep(SAVE_SLEEP)
    return digest


def _slow_copytree(src, dst, **kwargs):
    """publish_dir's copy into its staging dir, one file at a time with a pause between."""

    def copy(a, b):
        shutil.copy2(a, b)
        time.sleep(SAVE_SLEEP)

    return shutil.copytree(src, dst, copy_function=copy, **kwargs)


_real_s3_put = s3.S3Store.put


def _slow_s3_put(self, local, path) -> None:
    """The object store's upload of one file of a directory, with a pause after it."""
    _real_s3_put(self, local, path)
    time.sleep(SAVE_SLEEP)


def _journaled_on_checkpoint(self, report) -> None:
    _real_on_checkpoint(self, report)  # publish, then record in the database
    record("save_end", job=self.claim.job_id, attempt=self.claim.attempt, step=report.step)


_real_on_micro_batch = run_job_module.Progress.on_micro_batch


def _out_of_memory_once(self) -> None:
    """The first job at step OOM_AT_STEP runs out of memory (the marker makes it once: each
    job runs in a fresh child, so the flag lives on disk)."""
    if self.steps_done + 1 == OOM_AT_STEP and JOURNAL:
        try:
            os.close(os.open(JOURNAL + ".oom", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            import torch

            record("oom", job=self.claim.job_id, step=OOM_AT_STEP, ppid=os.getppid())
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    _real_on_micro_batch(self)


worker.tasks.wake = _journaled_wake
if OOM_AT_STEP:
    run_job_module.Progress.on_micro_batch = _out_of_memory_once
supervisor.run_claimed = _journaled_run_claimed
run_job_module.Progress.on_step = _journaled_on_step
_real_save = loop.save_checkpoint
loop.save_checkpoint = _journaled_save
_real_on_checkpoint = run_job_module.Progress.on_checkpoint
run_job_module.Progress.on_checkpoint = _journaled_on_checkpoint
if SAVE_SLEEP:
    local.shutil = SimpleNamespace(copytree=_slow_copytree, rmtree=shutil.rmtree)
    s3.S3Store.put = _slow_s3_put

if os.environ.get("LORAFORGE_CHAOS_PRELOAD", "1") == "1":
    # Import the ML stack once in the master, so each forked child starts in a fraction of
    # a second instead of re-importing it (2 cores: ~5 s a job). No tensor op runs here, so
    # no thread pool exists yet at fork time. The production worker imports lazily in the
    # child; the e2e tests cover that path.
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
