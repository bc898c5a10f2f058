"""Scratch of a training attempt: it lives under `tmp/<job>/`, a dead attempt's is swept,
and it goes once the job is terminal (issue 5: nothing a `kill -9` left stays forever).
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.base import utcnow
from app.db.models import Job
from app.db.session import session_scope
from app.jobs import queue
from app.jobs import runs as job_runs
from app.jobs import sweep as sweeper
from app.storage import LocalStore
from tests.factories import chat_rows, submit
from worker import run_job as run_job_module
from worker.run_job import run_job


def claim(settings, job_id: str, worker: str = "w") -> job_runs.Claim:
    with session_scope(settings.sqlalchemy_url) as session:
        return job_runs.claim_job(
            session, job_id=job_id, worker=worker, lease_seconds=60, max_attempts=3
        )


def expire_lease(settings, job_id: str) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)


def status(settings, job_id: str) -> str:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def scratch(folder: Path, *names: str, mtime: float | None = None) -> None:
    """Directories with a half-written file in each, as a killed writer leaves them."""
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "optimizer.pt").write_bytes(b"half")
        if mtime is not None:
            os.utime(folder / name, (mtime, mtime))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_temp_dir_of_an_owner_lives_under_its_folder_and_owners_cannot_escape(tmp_path):
    store = LocalStore(tmp_path)
    with store.temp_dir(owner="ftjob-a") as path:
        assert path.parent == tmp_path / "tmp" / "ftjob-a"
    assert not path.exists() and (tmp_path / "tmp" / "ftjob-a").is_dir()
    with store.temp_dir() as path:
        assert path.parent == tmp_path / "tmp"
    for owner in ("", ".", "..", "a/b", "../x"):
        with pytest.raises(ValueError):
            store.scratch_root(owner)
    store.remove_scratch("ftjob-a")
    store.remove_scratch("ftjob-a")  # already gone: fine
    assert not (tmp_path / "tmp" / "ftjob-a").exists()


def test_the_sweep_removes_a_dead_attempts_scratch_and_touches_nothing_else(settings, monkeypatch):
    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, queue=None: True)
    store = LocalStore(settings.artifacts_dir)
    dead, live = submit(settings), submit(settings)
    claim(settings, dead)
    claim(settings, live)  # its worker is alive: lease held
    mine = store.scratch_root(dead)
    scratch(mine, "loraforge-ckpt-k1", "tmpadapter")  # what the killed attempt left
    scratch(mine, "loraforge-ckpt-new", mtime=time.time() + 60)  # a newer attempt's
    scratch(store.scratch_root(live), "loraforge-ckpt-live")
    scratch(store.root / "tmp", "tmpupload")  # an upload in progress, owned by no job
    scratch(store.root / "adapters", "other")
    expire_lease(settings, dead)
    before = tree(store.root)

    assert sweeper.sweep_once(settings) == [dead]
    assert status(settings, dead) == "queued"
    assert sorted(p.name for p in mine.iterdir()) == ["loraforge-ckpt-new"]
    gone = {f"tmp/{dead}/{name}" for name in ("loraforge-ckpt-k1", "tmpadapter")}
    expected = [p for p in before if not any(p == g or p.startswith(g + "/") for g in gone)]
    assert tree(store.root) == expected


def test_the_sweep_removes_the_scratch_of_a_job_it_ended(settings, monkeypatch):
    """Cancelled while its worker was dead: no worker will ever clean up after it."""
    monkeypatch.setattr(queue, "enqueue_training", lambda job_id, queue=None: True)
    store = LocalStore(settings.artifacts_dir)
    job_id = submit(settings)
    claim(settings, job_id)
    scratch(store.scratch_root(job_id), "loraforge-ckpt-k1")
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).cancel_requested = True
    expire_lease(settings, job_id)

    assert sweeper.sweep_once(settings) == []
    assert status(settings, job_id) == "cancelled"
    sweeper.sweep_once(settings)  # each round first cleans up after the jobs already ended
    assert not store.path(f"tmp/{job_id}").exists()


def test_a_job_ending_on_a_host_removes_every_ended_jobs_scratch_there(settings, monkeypatch):
    """A killed attempt's scratch stays on its host when its retry ends on another one (no
    sweep runs on worker hosts): the next job that ends on this host removes it."""
    monkeypatch.setattr(queue, "enqueue_training", lambda job_id: True)
    store = LocalStore(settings.artifacts_dir)
    retried_elsewhere, running, ending = submit(settings), submit(settings), submit(settings)
    for job_id in (retried_elsewhere, running, ending):
        claim(settings, job_id)
        scratch(store.scratch_root(job_id), "loraforge-ckpt-x")
    with session_scope(settings.sqlalchemy_url) as session:
        for job_id in (retried_elsewhere, ending):
            session.get(Job, job_id).status = "succeeded"

    run_job_module.remove_scratch(settings, ending)
    assert store.scratch_owners() == [running]  # a job still running keeps its scratch


@pytest.mark.slow
def test_checkpoints_are_written_under_the_jobs_scratch_which_goes_when_it_ends(
    settings, monkeypatch
):
    store = LocalStore(settings.artifacts_dir)
    job_id = submit(settings)
    scratch(store.scratch_root(job_id), "loraforge-ckpt-dead")  # left by a killed attempt
    written: list[Path] = []
    real = run_job_module.Progress.on_checkpoint

    def on_checkpoint(self, report):
        written.append(report.checkpoint_dir)
        real(self, report)

    monkeypatch.setattr(run_job_module.Progress, "on_checkpoint", on_checkpoint)
    assert run_job(job_id, settings=settings) == "succeeded"
    assert len(written) == 2  # one per epoch
    assert all(p.parent == store.path(f"tmp/{job_id}") for p in written)
    assert all(p.name.startswith("loraforge-ckpt-") for p in written)
    assert not store.path(f"tmp/{job_id}").exists()


@pytest.mark.slow
def test_a_failed_job_loses_its_scratch_but_one_taken_over_keeps_the_new_attempts(
    settings, monkeypatch
):
    store = LocalStore(settings.artifacts_dir)
    failed = submit(settings)
    scratch(store.scratch_root(failed), "tmpleft")
    no_model = settings.model_copy(update={"base_models": {}})
    assert run_job(failed, settings=no_model) == "failed"
    assert not store.path(f"tmp/{failed}").exists()

    taken = submit(settings)

    def taken_over_at_step_one(_self, _report):
        """The lease lapsed (a long pause), another worker claimed the job, then an error."""
        expire_lease(settings, taken)
        claim(settings, taken, worker="newer")
        scratch(store.scratch_root(taken), "tmpnewer")
        raise RuntimeError("boom")

    monkeypatch.setattr(run_job_module.Progress, "on_step", taken_over_at_step_one)
    assert run_job(taken, settings=settings) == "failed"  # its conditional end changed nothing
    assert status(settings, taken) == "running"
    assert [p.name for p in store.path(f"tmp/{taken}").iterdir()] == ["tmpnewer"]


@pytest.mark.slow
def test_the_loop_writes_checkpoints_in_the_scratch_dir_it_is_given(tmp_path, tiny_model_dir):
    from app.jobs.hyperparameters import resolve
    from app.ml.loading import load_base_model, load_tokenizer
    from app.schemas.jobs import Hyperparameters
    from worker.training.data import encode_dataset
    from worker.training.loop import train_lora

    tokenizer = load_tokenizer(tiny_model_dir)
    examples = encode_dataset(tokenizer, chat_rows(2), max_seq_length=64)
    asked = Hyperparameters(n_epochs=1, batch_size=2, learning_rate=1e-3, packing=False)
    config = resolve(asked, n_examples=len(examples), seed=0)
    for scratch_dir, parent in ((tmp_path / "scratch", None), (None, tempfile.gettempdir())):
        if scratch_dir is not None:
            scratch_dir.mkdir()
        seen: list[Path] = []
        train_lora(
            model=load_base_model(tiny_model_dir, device="cpu"),
            tokenizer=tokenizer,
            train_examples=examples,
            valid_examples=[],
            hyperparameters=config,
            out_dir=tmp_path / f"out-{parent is None}",
            on_checkpoint=lambda report, seen=seen: seen.append(report.checkpoint_dir),
            scratch_dir=scratch_dir,
        )
        assert [p.parent for p in seen] == [scratch_dir or Path(parent)]
        assert not seen[0].exists()  # removed after the callback


@pytest.mark.slow
def test_an_attempt_taking_over_an_expired_lease_first_removes_the_dead_attempts_scratch(
    settings, monkeypatch
):
    """A redelivered message may claim the job before the sweep re-queues it."""
    store = LocalStore(settings.artifacts_dir)
    job_id = submit(settings)
    claim(settings, job_id)  # attempt 1, then killed: its lease lapses, no sweep runs
    scratch(store.scratch_root(job_id), "loraforge-ckpt-dead", "tmpdeadout")
    scratch(store.path(f"checkpoints/{job_id}"), ".staging-dead")  # a half-copied publish
    expire_lease(settings, job_id)
    seen: list[list[str]] = []
    real = run_job_module.Progress.on_checkpoint

    def on_checkpoint(self, report):
        seen.append(tree(store.path(f"tmp/{job_id}")) + tree(store.path("checkpoints")))
        real(self, report)

    monkeypatch.setattr(run_job_module.Progress, "on_checkpoint", on_checkpoint)
    assert run_job(job_id, settings=settings) == "succeeded"
    assert status(settings, job_id) == "succeeded" and seen
    dead = {"loraforge-ckpt-dead", "tmpdeadout", ".staging-dead"}
    assert not dead & {part for entries in seen for entry in entries for part in Path(entry).parts}
