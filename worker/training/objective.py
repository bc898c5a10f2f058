"""What a training method computes, for the loop (`loop.py`) to drive: a step's gradients
and its loss, and the loss on validation examples. Supervised fine-tuning's is in
`loop.py`, DPO's in `preference.py`; the loop, its optimizer, schedule, checkpoints and
data order are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.training.packing import Step
from worker.training.setup import Run


@dataclass
class StepLoss:
    """What one step's forward and backward passes measured."""

    loss_sum: float  # the loss summed over the step's loss units
    units: int  # label tokens (supervised) or preference pairs (DPO): the mean's divisor
    real_tokens: int  # non-padding tokens processed
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own, e.g. DPO's


@dataclass
class Evaluation:
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)  # named "valid_…"


class Objective(Protocol):
    def forward_backward(
        self, run: Run, step: Step, on_micro_batch: Callable[[], None]
    ) -> StepLoss:
        """Forward and backward over the step's micro-batches (gradients accumulate, scaled
        so they are those of the step's mean loss); `on_micro_batch` before each."""
        ...

    def evaluate(self, run: Run, indices: list[int]) -> Evaluation:
        """The loss on these validation examples (eval mode, no gradients)."""
        ...


def autocast(device: Any) -> Any:
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
