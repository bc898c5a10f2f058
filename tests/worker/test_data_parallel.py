"""Data-parallel training (worker/training/distributed.py), on CPU with gloo: 2 ranks train
the adapter 1 process trains (same global batch, same example order), and a killed rank
ends the attempt (no hang) so that the retry resumes from the last checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from app.db.models import Job
from app.errors import JobInputError
from app.jobs.hyperparameters import resolve
from app.ml.adapters import ADAPTER_WEIGHTS
from app.ml.loading import load_base_model
from app.schemas.jobs import Hyperparameters
from tests.conftest import make_settings
from tests.factories import chat_rows, expire_lease, load, messages, submit, weights
from worker import run_job as run_job_module
from worker import supervisor
from worker.job_memory import model_shape, plan_job
from worker.run_job import run_job
from worker.training.data import encode_dataset
from worker.training.distributed import data_parallel, peer_job
from worker.training.loop import StepReport, train_lora
from worker.training.memory_estimate import estimate
from worker.training.memory_plan import leanest
from worker.training.packing import steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# fp32 sums of the same gradients in another order: measured max |diff| 2e-7 here
TOLERANCE = 1e-6


def hyperparameters(**changes):
    asked = {"n_epochs": 2, "batch_size": 3, "gradient_accumulation_steps": 2}
    asked |= {"learning_rate": 3e-3, "lora_dropout": 0.0, "packing": False} | changes
    return resolve(Hyperparameters(**asked), n_examples=10, seed=7)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return encode_dataset(tokenizer, chat_rows(10), max_seq_length=64)


@pytest.mark.parametrize("packing", [False, True])
def test_the_ranks_share_each_step_exactly(examples, packing):
    hp = hyperparameters(packing=packing)
    alone = list(steps(examples, hp, max_len=64))
    shares = [list(steps(examples, hp, max_len=64, rank=r, world=3)) for r in range(3)]
    for n, step in enumerate(alone):
        parts = [share[n] for share in shares]
        trained = [
            e for part in parts for m in part.micro_batches for r in m for e in r.example_ids
        ]
        assert sorted(trained) == sorted(step.example_ids)  # each example once, on one rank
        assert all(len(m) <= hp.batch_size for p in parts for m in p.micro_batches)
        # every rank divides by the whole step's labels and moves the position alike
        assert {(p.label_count, p.batch_count, p.example_ids) for p in parts} == {
            (step.label_count, step.batch_count, step.example_ids)
        }


def train(
    tiny_model_dir, tokenizer, examples, out: Path, world: int, valid=(), **changes
) -> list[StepReport]:
    hp, reports = hyperparameters(**changes), []
    model = load_base_model(tiny_model_dir, device="cpu")
    job = peer_job(
        world=world,
        base_model_ref=str(tiny_model_dir),
        quantization="none",
        model=model,
        hyperparameters=hp,
        examples=examples,
        trainable_token_ids=(),
        init_adapter=None,
        resume_from=None,
    )
    with data_parallel(job, out.parent) as ranks:
        train_lora(
            model=model,
            tokenizer=tokenizer,
            train_examples=examples,
            valid_examples=list(valid),
            hyperparameters=hp,
            out_dir=out,
            on_step=reports.append,
            ranks=ranks,
        )
    return reports


@pytest.mark.slow
def test_two_ranks_train_the_adapter_one_process_trains(
    tiny_model_dir, tokenizer, examples, tmp_path
):
    alone = train(tiny_model_dir, tokenizer, examples, tmp_path / "one", world=1)
    together = train(tiny_model_dir, tokenizer, examples, tmp_path / "two", world=2)
    assert [r.example_ids for r in together] == [r.example_ids for r in alone]
    assert [r.train_loss for r in together] == pytest.approx([r.train_loss for r in alone])
    one = load_file(tmp_path / "one" / ADAPTER_WEIGHTS)
    two = load_file(tmp_path / "two" / ADAPTER_WEIGHTS)
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"\nadapter weights, 1 rank vs 2 ranks: max |diff| {diff:.2e}")
    assert one.keys() == two.keys() and 0 < max(float(v.abs().max()) for v in two.values())
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_rank_0_stops_early_alone_and_its_peer_goes(tiny_model_dir, tokenizer, examples, tmp_path):
    # every evaluation after the first fails to improve by 100: stop at the second
    stopping = {"n_evals": 4, "early_stopping_patience": 1, "early_stopping_threshold": 100}
    inputs = (tiny_model_dir, tokenizer, examples)
    runs = {w: train(*inputs, tmp_path / str(w), w, examples[:4], **stopping) for w in (1, 2)}
    assert [r.step for r in runs[2]] == [r.step for r in runs[1]]
    assert len(runs[1]) < runs[1][0].total_steps  # it did stop early
    one, two = (load_file(tmp_path / str(w) / ADAPTER_WEIGHTS) for w in (1, 2))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= TOLERANCE


def peer_ranks(processes, under: str = "") -> list[psutil.Process]:
    """The peer ranks among `processes`; with `under`, only those whose job file is there."""
    found = []
    for process in processes:
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:  # gone, or not ours to read
            continue
        if "worker.training.peer" in command and under in command:
            found.append(process)
    return found


def kill_a_peer_at(monkeypatch, step: int) -> None:
    """SIGKILL rank 1 once rank 0 has reported `step` (the checkpoint before it is complete)."""
    real = run_job_module.Progress.on_step

    def on_step(self, report):
        real(self, report)
        if report.step == step:
            peers = peer_ranks(psutil.Process().children())
            assert peers
            for peer in peers:
                peer.send_signal(signal.SIGKILL)
                peer.wait(30)

    monkeypatch.setattr(run_job_module.Progress, "on_step", on_step)


@pytest.mark.slow
def test_a_killed_rank_ends_the_attempt_and_the_retry_resumes(settings, monkeypatch):
    hp = {"n_epochs": 3, "batch_size": 4, "lora_dropout": 0.0}  # 8 examples: checkpoints 2, 4, 6
    reference = submit(settings, rows=chat_rows(8), **hp)
    assert run_job(reference, settings=settings) == "succeeded"
    two_ranks = make_settings(settings.data_dir, Path(settings.base_models["tiny"]), gpus_per_job=2)
    job_id = submit(two_ranks, rows=chat_rows(8), **hp)
    kill_a_peer_at(monkeypatch, 3)
    assert run_job(job_id, settings=two_ranks) == "worker_lost"  # not failed: retried
    monkeypatch.undo()
    [job] = load(two_ranks, Job, id=job_id)
    assert job.status == "running" and job.error is None  # left to the sweep
    expire_lease(two_ranks, job_id)
    assert run_job(job_id, settings=two_ranks) == "succeeded"

    events = [e.message for e in messages(two_ranks, job_id)]
    assert "Resuming from the checkpoint at step 2" in events
    started = "Training data-parallel on 2 ranks (gloo, CPU processes)"
    assert sum(message.startswith(started) for message in events) == 2  # both attempts
    steps_reported = [e.data["step"] for e in messages(two_ranks, job_id) if e.type == "metrics"]
    assert steps_reported == [1, 2, 3, 3, 4, 5, 6]  # attempt 2 redid step 3
    a, b = weights(settings, reference), weights(two_ranks, job_id)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE


class Events:
    def event(self, *_args, **_kwargs) -> None:
        return None


def test_cpu_ranks_share_the_memory_each_holding_the_whole_base(settings, tiny_model_dir):
    hp = hyperparameters(batch_size=1, max_seq_length=64, gradient_accumulation_steps="auto")
    need = estimate(model_shape(str(tiny_model_dir)), leanest(hp), device="cpu").total
    cap = {"training_memory_bytes": need}  # room for one rank, not for two

    def plan(ranks: int):
        ranked = make_settings(settings.data_dir, tiny_model_dir, gpus_per_job=ranks, **cap)
        return plan_job(str(tiny_model_dir), hp, settings=ranked, progress=Events())

    assert plan(1)[0].batch_size == 1
    with pytest.raises(JobInputError) as refused:
        plan(2)
    assert refused.value.error["code"] == "out_of_memory"
    assert "shared by CPU ranks (LORAFORGE_GPUS_PER_JOB=2" in refused.value.error["message"]


@pytest.mark.slow
def test_the_supervisors_child_runs_the_ranks_and_leaves_none_behind(settings):
    """As the worker runs a job: in a forked child (rank 0) that starts its peer, while the
    supervisor holds the lease."""
    two_ranks = make_settings(settings.data_dir, Path(settings.base_models["tiny"]), gpus_per_job=2)
    job_id = submit(two_ranks)
    assert supervisor.wake(job_id, settings=two_ranks) == [f"{job_id}: succeeded"]
    # none of its peers outlived it (one left orphaned would no longer be our descendant)
    assert not peer_ranks(psutil.process_iter(), str(two_ranks.data_dir))
