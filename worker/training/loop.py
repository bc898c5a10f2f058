"""The LoRA training loop: one linear function, setup → train → save (nanoGPT / torchtune).

Pure: no DB, no Celery. The caller (the job runner) reports progress and checks for
cancellation in `on_step`; an exception raised there stops training, propagates
unchanged, and nothing is written to `out_dir`.

The device is the base model's: load it with `load_base_model(ref, device="cuda")` to
train on a GPU (bf16 autocast there; fp32 on CPU). `train_lora` injects the LoRA layers
into `model` in place (PEFT's `get_peft_model`), so afterwards `model` computes the
trained model; load a fresh base for anything else.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ml.adapters import save_adapter
from worker.training.data import IGNORE_INDEX, Example

MAX_GRAD_NORM = 1.0  # gradient clipping, as transformers' Trainer does by default
LR_SCHEDULERS = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    n_epochs: int
    batch_size: int
    learning_rate: float
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    max_seq_length: int = 1024
    seed: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # linear | cosine | constant (all after a linear warmup)


@dataclass
class StepReport:
    step: int  # 1-based optimizer step
    total_steps: int
    epoch: int  # 1-based
    train_loss: float  # mean over the label tokens of this step's batch
    learning_rate: float  # the rate this step was taken with
    trained_tokens: int  # non-padding tokens processed so far


@dataclass
class EpochReport:
    epoch: int  # 1-based
    step: int
    train_loss: float  # mean over all label tokens of the epoch
    valid_loss: float | None
    adapter_dir: Path  # the adapter at this point; removed after the callback returns


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    train_loss: float  # mean over the label tokens of the last epoch
    valid_loss: float | None  # after the last epoch
    sha256: str  # of out_dir/adapter_model.safetensors


def _ignore(_report: Any) -> None:
    return None


def count_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps `train_lora` takes: one per batch (the last may be short), per epoch."""
    return config.n_epochs * math.ceil(n_examples / config.batch_size)


def train_lora(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[Example],
    valid_examples: list[Example],
    config: TrainConfig,
    out_dir: Path,
    on_step: Callable[[StepReport], None] = _ignore,
    on_epoch: Callable[[EpochReport], None] = _ignore,
) -> TrainResult:
    """Train a LoRA adapter on `model` (a frozen base) and save it to `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model

    if not train_examples:
        raise ValueError("no training examples")
    if config.n_epochs < 1 or config.batch_size < 1:
        raise ValueError("n_epochs and batch_size must be at least 1")
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")

    # --- setup -------------------------------------------------------------------------
    # Seed the global RNG (LoRA init, dropout) and a separate generator for the data
    # order, so the same seed gives the identical adapter.
    torch.manual_seed(config.seed)
    order_rng = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
    )
    peft_model = get_peft_model(model, lora)  # LoRA weights in fp32, base stays frozen
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = count_steps(len(train_examples), config)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total_steps, warmup_steps, config.lr_scheduler)
    )

    # --- train -------------------------------------------------------------------------
    step = 0
    trained_tokens = 0
    epoch_loss = valid_loss = None
    for epoch in range(1, config.n_epochs + 1):
        peft_model.train()
        order = torch.randperm(len(train_examples), generator=order_rng).tolist()
        loss_sum, label_count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch_examples = [train_examples[i] for i in order[start : start + config.batch_size]]
            batch = _collate(batch_examples, pad_id, device)

            # forward + backward: mean loss over this batch's label tokens
            with _autocast(device):
                logits = peft_model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    use_cache=False,
                ).logits
            loss_total, n_labels = _token_loss(logits, batch["labels"])
            loss = loss_total / max(n_labels, 1)
            loss.backward()

            # optimizer step, with clipping and the schedule
            lr = scheduler.get_last_lr()[0]
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # bookkeeping and the per-step report (which may raise to cancel)
            step += 1
            trained_tokens += int(batch["attention_mask"].sum())
            loss_sum += loss_total.item()
            label_count += n_labels
            on_step(
                StepReport(
                    step=step,
                    total_steps=total_steps,
                    epoch=epoch,
                    train_loss=loss.item(),
                    learning_rate=lr,
                    trained_tokens=trained_tokens,
                )
            )

        # end of epoch: validation loss, then hand a snapshot of the adapter to the caller
        epoch_loss = loss_sum / max(label_count, 1)
        valid_loss = None
        if valid_examples:
            valid_loss = mean_loss(
                peft_model, valid_examples, batch_size=config.batch_size, pad_token_id=pad_id
            )
        with tempfile.TemporaryDirectory(prefix="loraforge-epoch-") as snapshot:
            save_adapter(peft_model, Path(snapshot))
            on_epoch(
                EpochReport(
                    epoch=epoch,
                    step=step,
                    train_loss=epoch_loss,
                    valid_loss=valid_loss,
                    adapter_dir=Path(snapshot),
                )
            )

    # --- save --------------------------------------------------------------------------
    peft_model.eval()
    sha256 = save_adapter(peft_model, Path(out_dir))
    return TrainResult(
        steps=step,
        trained_tokens=trained_tokens,
        train_loss=epoch_loss,
        valid_loss=valid_loss,
        sha256=sha256,
    )


def mean_loss(model: Any, examples: list[Example], *, batch_size: int, pad_token_id: int) -> float:
    """Mean loss over all label tokens of `examples` (eval mode, no grad)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, label_count = 0.0, 0
    with torch.no_grad(), _autocast(device):
        for start in range(0, len(examples), batch_size):
            batch = _collate(examples[start : start + batch_size], pad_token_id, device)
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
            batch_loss, n_labels = _token_loss(logits, batch["labels"])
            loss_sum += float(batch_loss)
            label_count += n_labels
    model.train(was_training)
    return loss_sum / max(label_count, 1)


def _collate(examples: list[Example], pad_token_id: int, device: Any) -> dict[str, Any]:
    """Right-pad a batch: pad ids in input_ids, 0 in attention_mask, IGNORE_INDEX in labels."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }


def _token_loss(logits: Any, labels: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over label tokens, and how many there are."""
    import torch.nn.functional as F

    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    total = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shifted_labels != IGNORE_INDEX).sum())


def _lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based): warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _autocast(device: Any) -> Any:
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
