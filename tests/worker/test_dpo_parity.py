"""Correctness parity for DPO: our loop's loss at step 20 equals TRL's DPOTrainer's.

TRL (a test dependency only) is the reference implementation. Same tiny model, pairs,
hyperparameters, LoRA init and seed; every step is the whole dataset (8 pairs), so both
trainers see identical batches whatever their shuffles, and the comparison is about DPO
itself: the sequence log-probabilities, the reference (TRL: the base with the adapter
disabled at every step; ours: the same, computed once before the first step), the loss,
AdamW, clipping and the linear schedule. Our examples are TRL's own tokenization of the
pairs, so the two sum log-probabilities over the very same tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.jobs.hyperparameters import resolve
from app.ml.loading import load_base_model
from app.schemas.jobs import DpoHyperparameters
from worker.training.data import IGNORE_INDEX, Example
from worker.training.dpo_loss import dpo_loss
from worker.training.loop import StepReport, train_lora

N_PAIRS, STEPS, SEED, BETA, LR = 8, 20, 5, 0.1, 2e-3
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Name a colour for item {i}."}],
        "chosen": [{"role": "assistant", "content": f"Item {i} is blue."}],
        "rejected": [{"role": "assistant", "content": f"Item {i} is red{' ish' * (i % 3)}."}],
    }
    for i in range(N_PAIRS)
]


def hyperparameters(packing: bool):
    requested = DpoHyperparameters(
        n_epochs=STEPS, batch_size=N_PAIRS, learning_rate=LR, lora_r=8, lora_alpha=16,
        beta=BETA, packing=packing,
    )  # fmt: skip
    return resolve(requested, n_examples=N_PAIRS, seed=SEED)


def trl_run(model, tokenizer, out_dir) -> tuple[list[float], list[Example]]:
    """TRL's losses per step, and its tokenized pairs as our examples (chosen, rejected)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)  # as train_lora does before injecting LoRA: identical init
    peft_model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    )
    args = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=N_PAIRS, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", beta=BETA, logging_steps=1, save_strategy="no",
        report_to=[], seed=SEED, use_cpu=True, disable_tqdm=True, max_length=None,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=peft_model,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    examples = [
        Example(row["prompt_ids"] + row[key], [IGNORE_INDEX] * len(row["prompt_ids"]) + row[key])
        for row in trainer.train_dataset
        for key in ("chosen_ids", "rejected_ids")
    ]
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], examples


def test_dpo_loss_is_the_sigmoid_loss_of_the_reward_margin() -> None:
    """On random log-probabilities: TRL's `loss_type="sigmoid"` formula (DPOTrainer's
    `_compute_loss` writes it inline, so it is restated here), and log 2 at no margin."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (
        -torch.rand(16, generator=generator) * 30 for _ in range(4)
    )
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, BETA)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    torch.testing.assert_close(ours.losses, -F.logsigmoid(BETA * delta))
    torch.testing.assert_close(ours.margins, BETA * delta)
    torch.testing.assert_close(ours.wins, (delta > 0).float())
    even = dpo_loss(chosen, rejected, chosen, rejected, BETA).losses
    torch.testing.assert_close(even, torch.full((16,), math.log(2)))


@pytest.fixture(scope="module")
def trl_losses(tiny_model_dir, tokenizer, tmp_path_factory) -> tuple[list[float], list[Example]]:
    """One TRL run (minutes on a CPU) for both of our variants."""
    model = load_base_model(tiny_model_dir, device="cpu")
    return trl_run(model, tokenizer, tmp_path_factory.mktemp("trl"))


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_loss_at_step_20_matches_trl_dpo_trainer(
    tiny_model_dir, tokenizer, tmp_path, packing, trl_losses
):
    theirs, examples = trl_losses
    ours: list[StepReport] = []
    train_lora(
        model=load_base_model(tiny_model_dir, device="cpu"),
        tokenizer=tokenizer,
        train_examples=examples,
        valid_examples=[],
        hyperparameters=hyperparameters(packing),
        out_dir=tmp_path / "ours",
        on_step=ours.append,
    )
    print(f"packing={packing} step 1: ours {ours[0].train_loss:.6f} TRL {theirs[0]:.6f}")
    print(f"packing={packing} step 20: ours {ours[-1].train_loss:.6f} TRL {theirs[-1]:.6f}")
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1].train_loss == pytest.approx(theirs[-1], rel=0.01)
    assert ours[0].train_loss == pytest.approx(theirs[0], rel=0.01)
    assert ours[-1].train_loss < ours[0].train_loss - 0.2  # it trained: a non-trivial check
