"""The DPO loss (Rafailov et al. 2023, "Direct Preference Optimization"), sigmoid form.

For a pair with policy log-probabilities (summed over the answer's tokens) `chosen`,
`rejected` and the reference policy's `ref_chosen`, `ref_rejected`:

    reward(answer) = beta * (logp_policy(answer) - logp_reference(answer))
    loss = -log sigmoid(reward(chosen) - reward(rejected))

as TRL's DPOTrainer computes it (`loss_type="sigmoid"`, no label smoothing); the metrics are
its `rewards/margins` and `rewards/accuracies`. Pure tensor code, no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PairScores:
    losses: Any  # [pairs], with the policy's graph
    chosen_rewards: Any  # [pairs], detached
    rejected_rewards: Any

    @property
    def margins(self) -> Any:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def wins(self) -> Any:
        """1.0 where the chosen answer has the higher reward (TRL's accuracy)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def dpo_loss(
    chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float
) -> PairScores:
    """The per-pair DPO loss and rewards (see the module docstring)."""
    import torch.nn.functional as F

    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    return PairScores(
        losses=-F.logsigmoid(beta * (chosen_ratio - rejected_ratio)),
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )
