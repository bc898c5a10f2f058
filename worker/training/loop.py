"""The LoRA training loop: one linear function, setup → train → save (nanoGPT / torchtune).

Pure: no DB, no Celery. The caller (the job runner) reports progress in `on_step` and
checks for cancellation there and in `on_micro_batch` (before every forward pass: one
optimizer step may accumulate many micro-batches); an exception raised in either stops
training, propagates unchanged, and nothing is written to `out_dir`.

Exact resume: the data order of epoch e is a pure function of (seed, e), and a
checkpoint (worker/training/checkpoint.py) stores adapter, optimizer, scheduler, RNG
and the position in that order; `train_lora(resume_from=dir)` continues from it and
produces the same steps, on the same examples, as the uninterrupted run.

The device is the base model's: load it with `load_base_model(ref, device="cuda")` to
train on a GPU (bf16 autocast there; fp32 on CPU). `train_lora` injects the LoRA layers
into `model` in place (PEFT), so afterwards `model` computes the trained model; load a
fresh base for anything else.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ml.adapters import save_adapter
from worker.training.checkpoint import (
    TrainerState,
    checkpoint_steps,
    load_checkpoint,
    save_checkpoint,
)
from worker.training.data import IGNORE_INDEX, Example
from worker.training.packing import Sequence, build_sequences, collate, row_length
from worker.training.segment_attention import use_segment_attention

MAX_GRAD_NORM = 1.0  # gradient clipping, as transformers' Trainer does by default
LR_SCHEDULERS = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    n_epochs: int
    batch_size: int  # examples per micro-batch (packing puts them in fewer rows)
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
    gradient_accumulation_steps: int = 1
    use_rslora: bool = False
    use_dora: bool = False
    gradient_checkpointing: bool = False
    packing: bool = False  # the job runner turns it on where packing_is_exact says so
    eval_every_steps: int = 0  # valid_loss on one validation batch every N steps (0: never)
    checkpoint_every_steps: int = 0  # extra checkpoints every N steps (0: none)
    n_checkpoints: int | None = None  # evenly spaced, the last at the end (None: per epoch)
    # token ids whose input-embedding and output rows train too (PEFT's trainable tokens)
    trainable_token_ids: tuple[int, ...] = ()


@dataclass
class StepReport:
    step: int  # 1-based optimizer step
    total_steps: int
    epoch: int  # 1-based
    train_loss: float  # mean over the label tokens of this step's batch
    learning_rate: float  # the rate this step was taken with
    trained_tokens: int  # non-padding tokens processed so far
    valid_loss: float | None = None  # on one validation batch, every eval_every_steps
    tokens_per_second: float = 0.0  # non-padding tokens of this step / its wall time
    example_ids: tuple[int, ...] = ()  # the examples this step trained on, in order


@dataclass
class CheckpointReport:
    epoch: int  # 1-based epoch the step belongs to
    step: int
    train_loss: float  # mean over the label tokens of the epoch so far
    valid_loss: float | None  # over the whole validation set (OpenAI's full_valid_loss)
    checkpoint_dir: Path  # adapter + resume state + manifest; removed after the callback
    manifest_sha256: str


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    train_loss: float  # mean over the label tokens of the last epoch
    valid_loss: float | None  # after the last step
    sha256: str  # of out_dir/adapter_model.safetensors
    history: list[dict[str, Any]]  # one row per step: step, train_loss, valid_loss, lr, tokens/s


def _ignore(_report: Any) -> None:
    return None


def _nothing() -> None:
    return None


def count_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps `train_lora` takes: packing or not, a step is the same examples."""
    batches = math.ceil(n_examples / config.batch_size)
    return config.n_epochs * math.ceil(batches / config.gradient_accumulation_steps)


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train_lora(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[Example],
    valid_examples: list[Example],
    config: TrainConfig,
    out_dir: Path,
    on_step: Callable[[StepReport], None] = _ignore,
    on_checkpoint: Callable[[CheckpointReport], None] = _ignore,
    on_micro_batch: Callable[[], None] = _nothing,
    init_adapter: Path | None = None,
    resume_from: Path | None = None,
    scratch_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `model` (a frozen base) and save it to `out_dir`.

    init_adapter: a PEFT adapter to continue training (its LoRA shape is kept).
    resume_from: a verified checkpoint directory of this same run to resume from.
    scratch_dir: where checkpoints are written before `on_checkpoint` publishes them
    (the job runner gives the job's own folder in the store; None: the system temp dir).
    """
    import torch

    _check(config, train_examples)

    # --- setup -------------------------------------------------------------------------
    # The global RNG drives LoRA init and dropout; the data order has its own (seed, epoch)
    # generator, so the same seed gives the identical adapter, resumed or not.
    torch.manual_seed(config.seed)
    if config.packing:  # one unpadded row per micro-batch where the model allows it
        use_segment_attention(model)
    packed_len = row_length(model, config.max_seq_length)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    peft_model = _wrap(model, config, init_adapter)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = count_steps(len(train_examples), config)
    scheduled = set(checkpoint_steps(total_steps, config.n_checkpoints or config.n_epochs))
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total_steps, warmup_steps, config.lr_scheduler)
    )
    state = TrainerState()
    if resume_from is not None:  # restores weights, optimizer, scheduler, RNG, position
        state = load_checkpoint(
            resume_from, peft_model=peft_model, optimizer=optimizer, scheduler=scheduler
        )

    def checkpoint(epoch: int, train_loss: float, valid_loss: float | None) -> None:
        with tempfile.TemporaryDirectory(prefix="loraforge-ckpt-", dir=scratch_dir) as folder:
            digest = save_checkpoint(
                Path(folder),
                peft_model=peft_model,
                optimizer=optimizer,
                scheduler=scheduler,
                state=state,
            )
            on_checkpoint(
                CheckpointReport(
                    epoch=epoch,
                    step=state.step,
                    train_loss=train_loss,
                    valid_loss=valid_loss,
                    checkpoint_dir=Path(folder),
                    manifest_sha256=digest,
                )
            )

    # --- train -------------------------------------------------------------------------
    accumulate = config.gradient_accumulation_steps
    valid_loss = None
    peft_model.train()
    while state.epoch <= config.n_epochs:
        order = epoch_order(len(train_examples), seed=config.seed, epoch=state.epoch)
        batches = [
            order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)
        ]
        while state.next_batch < len(batches):
            # one optimizer step = `accumulate` micro-batches; the loss is the mean over all
            # their label tokens (count them first, so each micro-batch is scaled right)
            started = time.perf_counter()
            # packing (when on) packs each micro-batch's examples into as few rows as fit, so
            # a step trains on exactly the examples it would unpacked: same loss, less padding
            group = [
                build_sequences(train_examples, packing=config.packing,
                                max_len=packed_len, indices=b)
                for b in batches[state.next_batch :][:accumulate]
            ]  # fmt: skip
            n_labels = sum(_label_count(r) for micro in group for r in micro)
            loss_sum, real_tokens = 0.0, 0
            for micro in group:
                on_micro_batch()  # may raise: a cancel must not wait for the whole step
                batch = collate(micro, pad_id, device)
                with _autocast(device):
                    logits = peft_model(
                        input_ids=batch["input_ids"],
                        position_ids=batch["position_ids"],
                        use_cache=False,
                    ).logits
                micro_loss, _ = _token_loss(logits, batch["labels"])
                (micro_loss / max(n_labels, 1)).backward()
                loss_sum += micro_loss.item()
                real_tokens += batch["real_tokens"]

            # optimizer step, with clipping and the schedule
            lr = scheduler.get_last_lr()[0]
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # bookkeeping, periodic validation, the per-step report (which may raise)
            state.step += 1
            state.next_batch += len(group)
            state.trained_tokens += real_tokens
            state.epoch_loss_sum += loss_sum
            state.epoch_label_count += n_labels
            elapsed = max(time.perf_counter() - started, 1e-9)
            valid_loss = None
            if (
                valid_examples
                and config.eval_every_steps
                and state.step % config.eval_every_steps == 0
            ):
                valid_loss = _valid_batch_loss(
                    peft_model, valid_examples, config, state.step, pad_id
                )
            report = StepReport(
                step=state.step,
                total_steps=total_steps,
                epoch=state.epoch,
                train_loss=loss_sum / max(n_labels, 1),
                learning_rate=lr,
                trained_tokens=state.trained_tokens,
                valid_loss=valid_loss,
                tokens_per_second=real_tokens / elapsed,
                example_ids=tuple(e for micro in group for r in micro for e in r.example_ids),
            )
            state.history.append(_history_row(report))
            on_step(report)

            # end of epoch: roll the position over; then checkpoint (scheduled, every N)
            epoch, epoch_loss = state.epoch, state.epoch_loss_sum / max(state.epoch_label_count, 1)
            epoch_end = state.next_batch >= len(batches)
            if epoch_end:
                state.last_epoch_loss = epoch_loss
                state.epoch, state.next_batch = state.epoch + 1, 0
                state.epoch_loss_sum, state.epoch_label_count = 0.0, 0
            every = config.checkpoint_every_steps
            if state.step in scheduled or (every and state.step % every == 0):
                valid_loss = _full_valid_loss(peft_model, valid_examples, config, pad_id)
                checkpoint(epoch, epoch_loss, valid_loss)
            if epoch_end:
                break  # on to the next epoch's order

    # --- save --------------------------------------------------------------------------
    peft_model.eval()
    sha256 = save_adapter(peft_model, Path(out_dir))
    return TrainResult(
        steps=state.step,
        trained_tokens=state.trained_tokens,
        train_loss=state.last_epoch_loss,
        valid_loss=valid_loss,
        sha256=sha256,
        history=state.history,
    )


def _check(config: TrainConfig, train_examples: list[Example]) -> None:
    if not train_examples:
        raise ValueError("no training examples")
    if config.n_epochs < 1 or config.batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise ValueError("n_epochs, batch_size and gradient_accumulation_steps must be >= 1")
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")


def _wrap(model: Any, config: TrainConfig, init_adapter: Path | None) -> Any:
    """Inject trainable LoRA layers (fresh, or continuing `init_adapter`) into the frozen base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.gradient_checkpointing:
        # non-reentrant checkpointing needs no input grads, so the frozen base stays frozen
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        trainable_token_indices=_token_rows(model, config.trainable_token_ids),
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


def _label_count(row: Sequence) -> int:
    """Label tokens the shifted loss uses (the first position is never a target)."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def _history_row(report: StepReport) -> dict[str, Any]:
    return {
        "step": report.step,
        "train_loss": report.train_loss,
        "valid_loss": report.valid_loss,
        "learning_rate": report.learning_rate,
        "tokens_per_second": report.tokens_per_second,
    }


def _valid_batch_loss(
    model: Any, examples: list[Example], config: TrainConfig, step: int, pad_id: int
) -> float:
    """Loss on one validation batch, rotating through the set (OpenAI's valid_loss)."""
    n_batches = math.ceil(len(examples) / config.batch_size)
    start = (step // config.eval_every_steps - 1) % n_batches * config.batch_size
    batch = examples[start : start + config.batch_size]
    return mean_loss(model, batch, batch_size=config.batch_size, pad_token_id=pad_id)


def _full_valid_loss(
    model: Any, examples: list[Example], config: TrainConfig, pad_id: int
) -> float | None:
    if not examples:
        return None
    return mean_loss(model, examples, batch_size=config.batch_size, pad_token_id=pad_id)


def mean_loss(model: Any, examples: list[Example], *, batch_size: int, pad_token_id: int) -> float:
    """Mean loss over all label tokens of `examples` (eval mode, no grad, one per row)."""
    import torch

    device = next(model.parameters()).device
    rows = build_sequences(examples, packing=False, max_len=0)
    was_training = model.training
    model.eval()
    loss_sum, label_count = 0.0, 0
    with torch.no_grad(), _autocast(device):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_token_id, device)
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            batch_loss, n_labels = _token_loss(logits, batch["labels"])
            loss_sum += float(batch_loss)
            label_count += n_labels
    model.train(was_training)
    return loss_sum / max(label_count, 1)


def _token_loss(logits: Any, labels: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over label tokens, and how many there are.

    The labels are shifted (padded with IGNORE_INDEX at the end) rather than the logits
    sliced, so the [batch, length, vocab] logits are never copied (transformers' way).
    """
    import torch.nn.functional as F

    shifted_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
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
