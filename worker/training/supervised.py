"""Supervised fine-tuning's objective: next-token cross-entropy, the mean over the label
tokens (the loop, `loop.py`, drives it as it drives DPO's, `preference.py`).

The loss is computed with the output layer applied in chunks (`chunked_loss.py`), so the
[tokens x vocab] logits are never all in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.training.chunked_loss import causal_lm_loss
from worker.training.data import Example
from worker.training.objective import Evaluation, StepLoss, autocast
from worker.training.packing import Step, build_sequences, collate
from worker.training.setup import Run


@dataclass
class SupervisedObjective:
    valid_examples: list[Example]
    batch_size: int

    def forward_backward(
        self, run: Run, step: Step, on_micro_batch: Callable[[], None]
    ) -> StepLoss:
        """The mean is over all the step's label tokens (of the whole step, whatever share
        this rank trains), so each micro-batch's sum is scaled by that total."""
        n_labels = step.label_count
        loss_sum = 0.0
        for micro in step.micro_batches:
            on_micro_batch()  # may raise: a cancel must not wait for the whole step
            batch = collate(micro, run.pad_id, run.device)
            with autocast(run.device):  # the logits in chunks, never all at once
                micro_loss, _ = causal_lm_loss(run.model, batch)
            (micro_loss / max(n_labels, 1)).backward()
            loss_sum += micro_loss.item()
        return StepLoss(loss_sum, n_labels, step.token_count)

    def evaluate(self, run: Run, indices: list[int]) -> Evaluation:
        examples = [self.valid_examples[i] for i in indices]
        if not examples:
            return Evaluation(math.nan)
        return Evaluation(
            mean_loss(run.model, examples, batch_size=self.batch_size, pad_token_id=run.pad_id)
        )


def mean_loss(model: Any, examples: list[Example], *, batch_size: int, pad_token_id: int) -> float:
    """Mean loss over all label tokens of `examples` (eval mode, no grad, one per row)."""
    import torch

    device = next(model.parameters()).device
    rows = build_sequences(examples, packing=False, max_len=0)
    was_training = model.training
    model.eval()
    loss_sum, label_count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_token_id, device)
            batch_loss, n_labels = causal_lm_loss(model, batch)
            loss_sum += float(batch_loss)
            label_count += n_labels
    model.train(was_training)
    return loss_sum / max(label_count, 1)
