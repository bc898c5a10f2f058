"""Setting up a training run: LoRA layers on the frozen base, AdamW, the learning-rate
schedule, and where training stands (fresh, or restored from a checkpoint).

The order is part of exact resume: the global RNG is seeded before the LoRA layers are
initialised (the same seed gives the identical adapter), and a checkpoint's RNG state is
restored last, after everything that draws from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.jobs.spec import SupervisedHyperparameters
from worker.training.checkpoint import TrainerState, checkpoint_steps, load_checkpoint
from worker.training.distributed import Ranks
from worker.training.packing import count_steps, row_length


@dataclass
class Run:
    """A run ready to train: the PEFT model and its optimizer, and where training stands."""

    model: Any  # the PEFT model: the frozen base with trainable LoRA layers
    params: list[Any]  # the trainable parameters
    optimizer: Any
    scheduler: Any
    state: TrainerState
    total_steps: int
    checkpoint_at: set[int]  # the steps that end with a checkpoint
    max_len: int | None  # the longest packed row (`packing.row_length`)
    device: Any
    pad_id: int
    ranks: Ranks  # this process's rank of a data-parallel run (alone: rank 0 of 1)


def start_run(
    model: Any,
    tokenizer: Any,
    hp: SupervisedHyperparameters,
    *,
    n_examples: int,
    trainable_token_ids: tuple[int, ...],
    checkpoint_every_steps: int,
    init_adapter: Path | None,
    resume_from: Path | None,
    ranks: Ranks | None = None,
) -> Run:
    """Wrap `model` in trainable LoRA layers and build the optimizer and schedule.

    trainable_token_ids: tokens whose input-embedding and output rows train too (PEFT's
    trainable tokens). init_adapter: a PEFT adapter to continue training (its LoRA shape is
    kept). resume_from: a verified checkpoint of this same run: weights, optimizer,
    scheduler, RNG and data position are restored from it. ranks: this process's rank of a
    data-parallel run (`distributed.py`; None: training alone).
    """
    import torch

    if not n_examples:
        raise ValueError("no training examples")
    # The global RNG drives LoRA init and dropout; the data order has its own (seed, epoch)
    # generator, so the same seed gives the identical adapter, resumed or not.
    torch.manual_seed(hp.seed)
    max_len = row_length(model, hp.max_seq_length)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    peft_model = _wrap(model, hp, trainable_token_ids, init_adapter)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    total_steps = count_steps(n_examples, hp)
    warmup_steps = math.ceil(hp.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total_steps, warmup_steps, hp.lr_scheduler)
    )
    state = TrainerState()
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, peft_model=peft_model, optimizer=optimizer, scheduler=scheduler
        )
    return Run(
        model=peft_model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        total_steps=total_steps,
        checkpoint_at=_checkpoint_at(total_steps, hp.n_checkpoints, checkpoint_every_steps),
        max_len=max_len,
        device=device,
        pad_id=pad_id,
        ranks=ranks or Ranks(),
    )


def _checkpoint_at(total_steps: int, n_checkpoints: int, every: int) -> set[int]:
    """The `n_checkpoints` scheduled steps, and every `every`-th step (0: none)."""
    extra = range(every, total_steps + 1, every) if every else ()
    return set(checkpoint_steps(total_steps, n_checkpoints)) | set(extra)


def _wrap(
    model: Any,
    hp: SupervisedHyperparameters,
    trainable_token_ids: tuple[int, ...],
    init_adapter: Path | None,
) -> Any:
    """Inject trainable LoRA layers (fresh, or continuing `init_adapter`) into the frozen base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from worker.training.kbit import prepare_for_training

    model = prepare_for_training(model, gradient_checkpointing=hp.checkpointing)
    if hp.checkpointing:
        # non-reentrant checkpointing needs no input grads, so the frozen base stays frozen
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.lora_target_modules,
        use_rslora=hp.use_rslora,
        use_dora=hp.use_dora,
        trainable_token_indices=_token_rows(model, trainable_token_ids),
    )
    return get_peft_model(model, lora)  # LoRA weights in fp32, base stays frozen


def _token_rows(model: Any, token_ids: tuple[int, ...]) -> dict[str, list[int]] | None:
    """PEFT's trainable_token_indices: the rows of the input embedding and of the output
    layer (a model that ties them shares one set of rows), or None when no token trains."""
    if not token_ids:
        return None
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = [n for m in wanted if m is not None for n, x in model.named_modules() if x is m]
    return {name: list(token_ids) for name in dict.fromkeys(names)}


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
