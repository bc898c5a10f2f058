"""Exact resume: interrupted anywhere, a run resumed from its last complete checkpoint
trains on the same examples in the same order and ends with the same adapter (1e-6).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.jobs.hyperparameters import resolve
from app.jobs.spec import SupervisedHyperparameters
from app.ml.adapters import ADAPTER_WEIGHTS
from app.ml.loading import load_base_model
from app.schemas.jobs import Hyperparameters
from worker.training.checkpoint import (
    MANIFEST,
    OPTIMIZER,
    STATE,
    CheckpointError,
    verify_checkpoint,
)
from worker.training.data import encode_dataset
from worker.training.loop import CheckpointReport, StepReport, train_lora

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"q{i}?" * (1 + i % 3)},
            {"role": "assistant", "content": f"A{i}-{i * 7 % 10}"},
        ]
    }
    for i in range(7)
]
# dropout exercises the RNG restore; 7 examples / batch 2 = 4 steps per epoch, 12 in all
ASKED = {
    "n_epochs": 3,
    "batch_size": 2,
    "learning_rate": 3e-3,
    "lora_dropout": 0.1,
    "warmup_ratio": 0.2,
    "packing": False,
}


def hyperparameters(**changes) -> SupervisedHyperparameters:
    return resolve(Hyperparameters(**ASKED | changes), n_examples=len(RECORDS), seed=5)


FULL_RUNS: dict[tuple[int, int | str], tuple[list[StepReport], Path]] = {}
pytestmark = pytest.mark.slow


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def examples(tokenizer):
    return encode_dataset(tokenizer, RECORDS, max_seq_length=64)


def run(
    tiny_model_dir,
    tokenizer,
    examples,
    out: Path,
    config: SupervisedHyperparameters,
    *,
    every=0,
    stop_at_step=None,
    stop_after_checkpoint=None,
    resume_from=None,
):
    """Train; keep a copy of every checkpoint; return (steps seen, checkpoint copies)."""
    steps: list[StepReport] = []
    kept: dict[int, Path] = {}

    def on_step(report: StepReport) -> None:
        if report.step == stop_at_step:
            raise Interrupted  # the worker died during this step's report
        steps.append(report)

    def on_checkpoint(report: CheckpointReport) -> None:
        kept[report.step] = out.parent / f"{out.name}-ckpt-{report.step}"
        shutil.copytree(report.checkpoint_dir, kept[report.step])
        (kept[report.step] / "sha").write_text(report.manifest_sha256)
        if report.step == stop_after_checkpoint:
            raise Interrupted

    base = load_base_model(tiny_model_dir, device="cpu", quantization=config.quantization)
    try:
        train_lora(
            model=base,
            tokenizer=tokenizer,
            train_examples=examples,
            valid_examples=examples[:2],
            hyperparameters=config,
            out_dir=out,
            checkpoint_every_steps=every,
            on_step=on_step,
            on_checkpoint=on_checkpoint,
            resume_from=resume_from,
        )
    except Interrupted:
        pass
    return steps, kept


@pytest.mark.parametrize(
    ("where", "every", "n_checkpoints", "stop_at_step", "stop_after_checkpoint", "resume_step"),
    [
        ("mid-epoch", 0, "auto", 6, None, 4),
        ("at an epoch boundary", 0, "auto", None, 8, 8),
        ("late", 0, "auto", 11, None, 8),
        ("mid-epoch checkpoint", 3, "auto", 8, None, 6),
        ("n_checkpoints=5: steps 3, 5, 8, 10, 12", 0, 5, 7, None, 5),
    ],
)
def test_resume_replays_the_uninterrupted_run(
    tiny_model_dir,
    tokenizer,
    examples,
    tmp_path,
    tmp_path_factory,
    where,
    every,
    n_checkpoints,
    stop_at_step,
    stop_after_checkpoint,
    resume_step,
) -> None:
    config = hyperparameters(n_checkpoints=n_checkpoints)
    if (every, n_checkpoints) not in FULL_RUNS:  # the uninterrupted run, once per cadence
        out = tmp_path_factory.mktemp(f"full-{every}-{n_checkpoints}") / "full"
        full_run = run(tiny_model_dir, tokenizer, examples, out, config, every=every)
        FULL_RUNS[every, n_checkpoints] = (full_run[0], out)
    full, full_dir = FULL_RUNS[every, n_checkpoints]
    assert len(full) == 12
    _, kept = run(
        tiny_model_dir,
        tokenizer,
        examples,
        tmp_path / "cut",
        config,
        every=every,
        stop_at_step=stop_at_step,
        stop_after_checkpoint=stop_after_checkpoint,
    )
    assert not (tmp_path / "cut" / ADAPTER_WEIGHTS).exists(), where
    if n_checkpoints != "auto":
        assert sorted(kept) == [3, 5], where  # written where the schedule says, no more
    last = kept[max(kept)]
    assert max(kept) == resume_step, where
    verify_checkpoint(last, manifest_sha256=(last / "sha").read_text())
    resumed, _ = run(
        tiny_model_dir,
        tokenizer,
        examples,
        tmp_path / "resumed",
        config,
        every=every,
        resume_from=last,
    )

    expected = full[resume_step:]
    assert [s.step for s in resumed] == [s.step for s in expected], where
    assert [s.example_ids for s in resumed] == [s.example_ids for s in expected], where
    assert [s.learning_rate for s in resumed] == [s.learning_rate for s in expected], where
    for ours, theirs in zip(resumed, expected, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, abs=1e-6), where
    a = load_file(full_dir / ADAPTER_WEIGHTS)
    b = load_file(tmp_path / "resumed" / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, where


def test_resume_on_a_quantized_base_replays_the_uninterrupted_run(
    tiny_model_dir, tokenizer, examples, tmp_path
) -> None:
    """QLoRA (nf4 base), packed: killed mid-epoch, resumed from the step-4 checkpoint, it
    trains the same batches with the same losses and ends with the same adapter."""
    pytest.importorskip("bitsandbytes")
    config = hyperparameters(quantization="nf4", packing=True)
    full, _ = run(tiny_model_dir, tokenizer, examples, tmp_path / "full", config)
    _, kept = run(tiny_model_dir, tokenizer, examples, tmp_path / "cut", config, stop_at_step=6)
    resumed, _ = run(
        tiny_model_dir, tokenizer, examples, tmp_path / "resumed", config, resume_from=kept[4]
    )
    expected = full[4:]
    assert [s.example_ids for s in resumed] == [s.example_ids for s in expected]
    for ours, theirs in zip(resumed, expected, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, abs=1e-6)
    a = load_file(tmp_path / "full" / ADAPTER_WEIGHTS)
    b = load_file(tmp_path / "resumed" / ADAPTER_WEIGHTS)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_checkpoint_verification_refuses_altered_files(
    tiny_model_dir, tokenizer, examples, tmp_path
) -> None:
    config = hyperparameters(n_epochs=1)
    _, kept = run(tiny_model_dir, tokenizer, examples, tmp_path / "run", config)
    folder = kept[4]
    digest = (folder / "sha").read_text()
    verify_checkpoint(folder, manifest_sha256=digest)
    with pytest.raises(CheckpointError, match="manifest"):
        verify_checkpoint(folder, manifest_sha256="0" * 64)
    state = json.loads((folder / STATE).read_text())
    (folder / STATE).write_text(json.dumps(state | {"next_batch": 1}))
    with pytest.raises(CheckpointError, match=STATE):
        verify_checkpoint(folder, manifest_sha256=digest)
    (folder / STATE).write_text(json.dumps(state))
    (folder / OPTIMIZER).unlink()
    with pytest.raises(CheckpointError, match=OPTIMIZER):
        verify_checkpoint(folder, manifest_sha256=digest)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=MANIFEST):
        verify_checkpoint(folder, manifest_sha256=digest)


def test_resume_loads_the_optimizer_file_without_unpickling_code(
    tiny_model_dir, tokenizer, examples, tmp_path
) -> None:
    """optimizer.pt is read with weights_only=True: a pickle that would run code is refused."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    config = hyperparameters(n_epochs=1)
    _, kept = run(tiny_model_dir, tokenizer, examples, tmp_path / "run", config)
    torch.save({"optimizer": Evil(), "scheduler": {}}, kept[4] / OPTIMIZER)
    with pytest.raises(pickle.UnpicklingError):
        run(tiny_model_dir, tokenizer, examples, tmp_path / "again", config, resume_from=kept[4])
