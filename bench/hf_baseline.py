"""The comparison's other side: `transformers.Trainer` + PEFT LoRA on our examples.

It reads our epoch's example order sequentially (`worker.training.packing.epoch_order`), so
both sides train on the same examples in the same steps; each batch is padded to its
longest row (HF's usual collate, no packing). Returns, per optimizer step, the time it
ended and the real (non-padding) tokens it trained.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any


def train_hf_peft(
    model: Any,
    examples: list[Any],
    *,
    batch_size: int,
    learning_rate: float,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float = 0.0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    max_steps: int = -1,
    pad_id: int = 0,
) -> list[tuple[float, int]]:
    """Train one epoch (or `max_steps`) of LoRA r=`lora_r` on all linear layers of `model`
    (on its device; bf16 autocast when the model is on CUDA, as our loop does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from worker.training.packing import epoch_order

    cuda = next(model.parameters()).device.type == "cuda"
    step_tokens: list[int] = []
    stamps: list[tuple[float, int]] = []

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        step_tokens.append(sum(len(r["input_ids"]) for r in batch))
        pad = [width - len(r["input_ids"]) for r in batch]
        rows = list(zip(batch, pad, strict=True))
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad_id] * n for r, n in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * n for r, n in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * n
                                            for r, n in rows]),
        }  # fmt: skip

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), step_tokens[state.global_step - 1]))

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, target_modules="all-linear"),
    )  # fmt: skip
    order = epoch_order(len(examples), seed=seed, epoch=1)
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1,
            max_steps=max_steps, learning_rate=learning_rate, optim="adamw_torch",
            logging_steps=10_000, save_strategy="no", report_to=[], seed=seed,
            use_cpu=not cuda, bf16=cuda, disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=0, train_sampling_strategy="sequential",
            gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )  # fmt: skip
        Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collate,
                callbacks=[Clock()]).train()  # fmt: skip
    return stamps


def tokens_per_second(stamps: list[tuple[float, int]]) -> float:
    """Real tokens/s between the end of the first step and the end of the last (the first
    step carries the one-off costs on both sides)."""
    if len(stamps) < 2:
        return float("nan")
    return sum(t for _, t in stamps[1:]) / (stamps[-1][0] - stamps[0][0])
