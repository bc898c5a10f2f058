"""Training on a quantized (nf4) base: gradient checkpointing as the job asks, and a cancel
between micro-batches stops it with nothing saved, as on a full-precision base."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from app.errors import RunAborted
from app.jobs.hyperparameters import resolve
from app.ml.adapters import ADAPTER_WEIGHTS
from app.ml.loading import load_base_model
from app.schemas.jobs import Hyperparameters
from app.statuses import RunOutcome
from tests.factories import chat_rows
from worker.training.data import encode_dataset
from worker.training.loop import StepReport, train_lora

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def config(**asked):
    hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 3e-3, "quantization": "nf4"}
    return resolve(Hyperparameters(**hp | asked), n_examples=6, seed=2)


def train(tiny_model_dir: Path, tokenizer, out: Path, hp, **callbacks) -> list[StepReport]:
    steps: list[StepReport] = []
    model = load_base_model(tiny_model_dir, device="cpu", quantization="nf4")
    train_lora(
        model=model,
        tokenizer=tokenizer,
        train_examples=encode_dataset(tokenizer, chat_rows(6), max_seq_length=64),
        valid_examples=[],
        hyperparameters=hp,
        out_dir=out,
        on_step=steps.append,
        **callbacks,
    )
    assert model.is_gradient_checkpointing == hp.checkpointing  # as asked, not PEFT's
    return steps


def test_gradient_checkpointing_on_a_quantized_base_recomputes_the_same_steps(
    tiny_model_dir, tokenizer, tmp_path
) -> None:
    plain = train(tiny_model_dir, tokenizer, tmp_path / "plain", config())
    checkpointed = train(
        tiny_model_dir, tokenizer, tmp_path / "ckpt", config(gradient_checkpointing=True)
    )
    assert len(plain) == 3
    for ours, theirs in zip(checkpointed, plain, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, abs=1e-5)


def test_a_cancel_between_micro_batches_stops_a_qlora_run(
    tiny_model_dir, tokenizer, tmp_path
) -> None:
    calls = []

    def on_micro_batch() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RunAborted(RunOutcome.CANCELLED)

    hp = config(gradient_accumulation_steps=2, batch_size=1)
    with pytest.raises(RunAborted):
        train(tiny_model_dir, tokenizer, tmp_path / "out", hp, on_micro_batch=on_micro_batch)
    assert len(calls) == 3  # stopped mid-step, before the third forward pass
    assert not (tmp_path / "out" / ADAPTER_WEIGHTS).exists()
