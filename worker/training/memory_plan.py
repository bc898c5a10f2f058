"""Choosing the memory settings a job runs with, and what to change when nothing fits.

Before the base is loaded, the worker plans the job against the memory its device has
free (`worker/job_memory.py`), with the estimate of `memory_estimate.py`:

- `gradient_checkpointing` "auto": off when the job fits without it.
- `gradient_accumulation_steps` "auto": `batch_size` is the batch of each optimizer step,
  split into k micro-batches of batch_size / k examples, k a divisor of batch_size, as
  few as fit. The steps train the same examples and the loss is the mean over all their
  label tokens either way (`loop._train_step`), so the result equals the unsplit run's
  up to float summation order. The plan writes the micro-batch into `batch_size` and k
  into `gradient_accumulation_steps`: their product is the batch that was asked.
- Order: micro-batches of at least MIN_MICRO_BATCH_TOKENS tokens without checkpointing
  first (a GPU stays busy at that size, and checkpointing costs another forward pass, about
  half a LoRA step more), then checkpointing with the fewest micro-batches, then the rest.

Nothing fits even at the leanest settings the job allows: `changes_that_fit` names the
single changes that would, smallest first (checkpointing or a smaller batch where the job
fixed them, then quantization, then max_seq_length, then lora_r), each found by running the
estimate again. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from app.jobs.spec import SupervisedHyperparameters
from worker.training.memory_estimate import (
    FIXED_OVERHEAD,
    Device,
    Estimate,
    ModelShape,
    estimate,
    gib,
)

MIN_MICRO_BATCH_TOKENS = 4096
QUANTIZATION_ORDER = ("none", "int8", "nf4")  # each saves more than the one before
SEQ_LENGTH_STEP = 64  # advice on max_seq_length is a multiple of this (or the minimum, 16)
MIN_SEQ_LENGTH = 16  # the request schema's bound
# After an out-of-memory error the estimate of what ran proved too low: advise changes that
# take at least a fifth off its part that settings change (all but the fixed overhead).
OOM_HEADROOM = 0.8


@dataclass(frozen=True)
class Plan:
    """The settings a job runs with (nothing "auto" left) and their estimate."""

    hyperparameters: SupervisedHyperparameters
    estimate: Estimate
    available: int  # bytes the device had free

    def summary(self) -> str:
        hp = self.hyperparameters
        return (
            f"Memory plan: about {gib(self.estimate.total)} of {gib(self.available)} free, "
            f"with {_describe(hp)}; {hp.accumulation} micro-batch"
            f"{'es' * (hp.accumulation > 1)} per step (gradient_accumulation_steps)"
        )


@dataclass(frozen=True)
class Change:
    """One change to a job's hyperparameters that makes it fit."""

    param: str  # the hyperparameter it changes
    text: str  # what to do, as a user would write it: "set quantization=nf4"
    estimate: Estimate


def plan(
    shape: ModelShape, hp: SupervisedHyperparameters, *, device: Device, available: int
) -> Plan | None:
    """The first of the job's allowed settings (module doc: the order) that fits in
    `available` bytes; None when none does."""
    for candidate in candidates(hp):
        found = estimate(shape, candidate, device=device)
        if found.total <= available:
            return Plan(candidate, found, available)
    return None


def candidates(hp: SupervisedHyperparameters) -> list[SupervisedHyperparameters]:
    """Every setting of the "auto" knobs the job allows, in the order the plan tries them."""
    checkpointing = [False, True] if hp.gradient_checkpointing == "auto" else [hp.checkpointing]
    if hp.gradient_accumulation_steps == "auto":
        splits = [k for k in range(1, hp.batch_size + 1) if hp.batch_size % k == 0]
    else:
        splits = [1]
    accumulation = hp.gradient_accumulation_steps

    def setting(on: bool, k: int) -> SupervisedHyperparameters:
        steps = k if accumulation == "auto" else accumulation
        return hp.model_copy(
            update={
                "gradient_checkpointing": on,
                "batch_size": hp.batch_size // k,
                "gradient_accumulation_steps": steps,
            }
        )

    def busy(k: int) -> bool:
        return k == 1 or hp.batch_size // k * hp.max_seq_length >= MIN_MICRO_BATCH_TOKENS

    order = [(False, k) for k in splits if busy(k)] if False in checkpointing else []
    order += [(True, k) for k in splits] if True in checkpointing else []
    order += [(False, k) for k in splits if not busy(k)] if False in checkpointing else []
    return [setting(on, k) for on, k in order]


def leanest(hp: SupervisedHyperparameters) -> SupervisedHyperparameters:
    """The job's allowed settings that need the least memory: checkpointing where allowed,
    the smallest micro-batch."""
    return min(candidates(hp), key=lambda c: (not c.checkpointing, c.batch_size))


def does_not_fit(
    shape: ModelShape, hp: SupervisedHyperparameters, *, device: Device, available: int
) -> tuple[str, str]:
    """Why a job (its "auto" knobs undecided) fits in no allowed setting, and the smallest
    change that would make it fit: (message, the param that change names)."""
    lean = leanest(hp)
    need = estimate(shape, lean, device=device)
    fixed = frozenset(
        name
        for name in ("gradient_checkpointing", "gradient_accumulation_steps")
        if getattr(hp, name) != "auto"
    )
    changes = changes_that_fit(shape, lean, device=device, budget=available, fixed=fixed)
    message = (
        f"This job needs about {gib(need.total)} of memory even with {_describe(lean)}, "
        f"and the {device} has {gib(available)} free (the worker plans before loading "
        "the base model)."
    )
    return _with_advice(message, changes, need)


def after_out_of_memory(
    shape: ModelShape, ran: SupervisedHyperparameters, *, device: Device, step: int
) -> tuple[str, str]:
    """What to change after a step ran out of memory with the settings `ran`: changes
    whose estimate is OOM_HEADROOM below the estimate of what ran (which proved too low)."""
    need = estimate(shape, ran, device=device)
    fixed = FIXED_OVERHEAD[device]  # no setting changes it
    budget = fixed + int((need.total - fixed) * OOM_HEADROOM)
    changes = changes_that_fit(shape, ran, device=device, budget=budget)
    message = (
        f"Training ran out of {device} memory at step {step} with {_describe(ran)} "
        f"(planned at about {gib(need.total)})."
    )
    return _with_advice(message, changes, need)


def _with_advice(message: str, changes: list[Change], need: Estimate) -> tuple[str, str]:
    if not changes:
        return (
            f"{message} No single change fits: the base model's weights alone take "
            f"{gib(need.weights)}; use a smaller base model or a device with more memory.",
            "model",
        )
    first, *others = changes
    message += f" Smallest change that fits: {first.text} (about {gib(first.estimate.total)})."
    if others:
        message += " Others that fit: " + "; ".join(c.text for c in others[:3]) + "."
    return message, f"hyperparameters.{first.param}"


def _describe(hp: SupervisedHyperparameters) -> str:
    micro = f"{hp.batch_size} example{'s' * (hp.batch_size > 1)}"
    checkpointing = "on" if hp.checkpointing else "off"
    return (
        f"gradient_checkpointing {checkpointing}, micro-batches of {micro} x "
        f"max_seq_length {hp.max_seq_length}, lora_r {hp.lora_r}, quantization "
        f"{hp.quantization}"
    )


def changes_that_fit(
    shape: ModelShape,
    hp: SupervisedHyperparameters,
    *,
    device: Device,
    budget: int,
    fixed: frozenset[str] = frozenset(),
) -> list[Change]:
    """Single changes to `hp` (decided settings) whose estimate fits `budget`, smallest
    first. `fixed`: the knobs the user set (not "auto"), which are worth naming too."""

    def fits(changed: SupervisedHyperparameters) -> Estimate | None:
        found = estimate(shape, changed, device=device)
        return found if found.total <= budget else None

    found: list[Change] = []
    for param, text, changed in _options(hp, fits, fixed):
        result = fits(changed)
        if result is not None:
            found.append(Change(param, text, result))
    return found


def _options(
    hp: SupervisedHyperparameters,
    fits: Callable[[SupervisedHyperparameters], Estimate | None],
    fixed: frozenset[str],
) -> Iterator[tuple[str, str, SupervisedHyperparameters]]:
    """Candidate changes, smallest first: (param, advice, hyperparameters with it)."""
    if not hp.checkpointing:
        yield (
            "gradient_checkpointing",
            "set gradient_checkpointing=true",
            hp.model_copy(update={"gradient_checkpointing": True}),
        )
    if hp.batch_size > 1 and "gradient_accumulation_steps" in fixed:
        best = _largest(
            1, hp.batch_size - 1, lambda b: hp.model_copy(update={"batch_size": b}), fits
        )
        if best is not None:
            yield "batch_size", f"batch_size ≤ {best}", hp.model_copy(update={"batch_size": best})
    for lighter in QUANTIZATION_ORDER[QUANTIZATION_ORDER.index(hp.quantization) + 1 :]:
        yield (
            "quantization",
            f"set quantization={lighter}",
            hp.model_copy(update={"quantization": lighter}),
        )
    seq = _largest_seq_length(hp, fits)
    if seq is not None:
        yield (
            "max_seq_length",
            f"max_seq_length ≤ {seq}",
            hp.model_copy(update={"max_seq_length": seq}),
        )
    r = _largest(1, hp.lora_r - 1, lambda v: hp.model_copy(update={"lora_r": v}), fits)
    if r is not None:
        yield "lora_r", f"lora_r ≤ {r}", hp.model_copy(update={"lora_r": r})


def _largest_seq_length(
    hp: SupervisedHyperparameters, fits: Callable[[SupervisedHyperparameters], Estimate | None]
) -> int | None:
    """The longest max_seq_length below the job's that fits, a multiple of SEQ_LENGTH_STEP."""
    steps = _largest(
        1,
        (hp.max_seq_length - 1) // SEQ_LENGTH_STEP,
        lambda n: hp.model_copy(update={"max_seq_length": n * SEQ_LENGTH_STEP}),
        fits,
    )
    if steps is not None:
        return steps * SEQ_LENGTH_STEP
    shortest = hp.model_copy(update={"max_seq_length": MIN_SEQ_LENGTH})
    return MIN_SEQ_LENGTH if hp.max_seq_length > MIN_SEQ_LENGTH and fits(shortest) else None


def _largest(
    low: int,
    high: int,
    with_value: Callable[[int], SupervisedHyperparameters],
    fits: Callable[[SupervisedHyperparameters], Estimate | None],
) -> int | None:
    """The largest value in [low, high] whose settings fit (memory grows with the value:
    a binary search); None when not even `low` fits."""
    if high < low or fits(with_value(low)) is None:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(with_value(middle)) is not None:
            low = middle
        else:
            high = middle - 1
    return low
