"""Correctness parity: our loop's loss at step 50 equals transformers.Trainer + PEFT's.

Same tiny model, data, hyperparameters and seed, packing off. The Trainer is fed the
examples in our data order (a sequential sampler over our epochs laid end to end), so
the two runs see identical batches and the comparison is about the training step
itself: loss, AdamW, clipping, the linear schedule and LoRA init.
"""

from __future__ import annotations

import pytest
import torch

from app.jobs.hyperparameters import resolve
from app.ml.loading import load_base_model
from app.schemas.jobs import Hyperparameters
from worker.training.data import IGNORE_INDEX, encode_dataset
from worker.training.loop import StepReport, train_lora
from worker.training.packing import epoch_order

N_EXAMPLES, BATCH, EPOCHS, SEED = 40, 4, 5, 11  # 10 steps an epoch, 50 in all
CONFIG = resolve(
    Hyperparameters(
        n_epochs=EPOCHS, batch_size=BATCH, learning_rate=2e-3, lora_r=8, lora_alpha=16,
        packing=False,
    ),
    n_examples=N_EXAMPLES,
    seed=SEED,
)  # fmt: skip
RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"What is item {i}?" + " please" * (i % 4)},
            {"role": "assistant", "content": f"Item {i} is {chr(65 + i % 26)}{i * 37 % 100}."},
        ]
    }
    for i in range(N_EXAMPLES)
]


def hf_trainer_losses(model, examples, pad_id: int, out_dir) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    order = [i for e in range(1, EPOCHS + 1) for i in epoch_order(N_EXAMPLES, seed=SEED, epoch=e)]
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        pad = [width - len(r["input_ids"]) for r in batch]
        return {
            "input_ids": torch.tensor(
                [r["input_ids"] + [pad_id] * p for r, p in zip(batch, pad, strict=True)]
            ),
            "labels": torch.tensor(
                [r["labels"] + [IGNORE_INDEX] * p for r, p in zip(batch, pad, strict=True)]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * p for r, p in zip(batch, pad, strict=True)]
            ),
        }

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    torch.manual_seed(SEED)  # as train_lora does before injecting LoRA: identical init
    peft_model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    )
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=CONFIG.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = InOrderTrainer(model=peft_model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_loss_at_step_50_matches_hf_trainer(tiny_model_dir, tokenizer, tmp_path) -> None:
    examples = encode_dataset(tokenizer, RECORDS, max_seq_length=128)
    ours: list[StepReport] = []
    train_lora(
        model=load_base_model(tiny_model_dir, device="cpu"),
        tokenizer=tokenizer,
        train_examples=examples,
        valid_examples=[],
        hyperparameters=CONFIG,
        out_dir=tmp_path / "ours",
        on_step=ours.append,
    )
    theirs = hf_trainer_losses(
        load_base_model(tiny_model_dir, device="cpu"),
        examples,
        tokenizer.pad_token_id,
        tmp_path / "hf",
    )
    assert len(ours) == len(theirs) == 50
    assert ours[-1].train_loss == pytest.approx(theirs[-1], rel=0.01)
    assert ours[0].train_loss == pytest.approx(theirs[0], rel=0.01)
    assert ours[-1].train_loss < ours[0].train_loss - 0.5  # it trained: a non-trivial check
