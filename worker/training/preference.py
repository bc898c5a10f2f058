"""Preference tuning (DPO) for the training loop: its step and its validation (`objective.py`).

Data: each preference pair is two consecutive examples, chosen then rejected
(`preference_data.py`), so the loop's batching shuffles, batches and packs pairs whole
(`packing.EXAMPLES_PER_ITEM`), and packing is as exact for pairs as for any examples.

The reference policy costs no copy of the model and no forward pass while training: it is
the policy as the run starts — the frozen base (fresh LoRA layers start as the identity), or
for a job whose `model` is an `ft:` adapter (DPO after SFT) that adapter, which the new one
starts from (TRL's `ref_adapter_name` recipe). So its log-probabilities are computed once,
before the first step, over the training and validation pairs (TRL's
`precompute_ref_log_probs`), and kept in the trainer state: a checkpoint carries them, and a
resumed run scores against exactly the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from app.jobs.spec import DpoHyperparameters
from worker.training.data import IGNORE_INDEX, Example
from worker.training.dpo_loss import PairScores, dpo_loss
from worker.training.objective import Evaluation, StepLoss, autocast
from worker.training.packing import Sequence, Step, build_sequences, collate
from worker.training.setup import Run


@dataclass
class DpoObjective:
    """DPO against reference log-probabilities computed when the run started."""

    hp: DpoHyperparameters
    valid: list[Example]
    reference: dict[str, list[float]]  # "train" / "valid": per example

    @classmethod
    def start(
        cls,
        run: Run,
        hp: DpoHyperparameters,
        train: list[Example],
        valid: list[Example],
        on_micro_batch: Callable[[], None],
    ) -> DpoObjective:
        """The objective; on a fresh run, the reference's log-probabilities first."""
        state = run.state
        if not state.reference_logps:  # resumed runs have them from their checkpoint
            state.reference_logps = {
                name: _reference_logps(run, hp, examples, on_micro_batch)
                for name, examples in (("train", train), ("valid", valid))
            }
        return cls(hp, valid, state.reference_logps)

    def forward_backward(
        self, run: Run, step: Step, on_micro_batch: Callable[[], None]
    ) -> StepLoss:
        """The mean loss over the step's pairs: each micro-batch's summed loss is scaled by
        the step's pair count, so accumulated gradients are those of the whole step."""
        n_pairs = sum(len(row.example_ids) for micro in step.micro_batches for row in micro) // 2
        loss_sum, margin_sum, wins, real_tokens = 0.0, 0.0, 0.0, 0
        for micro in step.micro_batches:
            on_micro_batch()  # may raise: a cancel must not wait for the whole step
            scores = _scores(run, micro, self.reference["train"], self.hp.beta)
            (scores.losses.sum() / n_pairs).backward()
            loss_sum += scores.losses.sum().item()
            margin_sum += scores.margins.sum().item()
            wins += scores.wins.sum().item()
            real_tokens += sum(len(row.input_ids) for row in micro)
        metrics = {
            "train_reward_margin": margin_sum / n_pairs,
            "train_reward_accuracy": wins / n_pairs,
        }
        return StepLoss(loss_sum, n_pairs, real_tokens, metrics)

    def evaluate(self, run: Run, indices: list[int]) -> Evaluation:
        """Mean DPO loss, reward margin and accuracy over these validation pairs."""
        import torch

        if not indices:
            return Evaluation(float("nan"))
        losses, margins, wins = [], [], []
        with _evaluating(run.model), torch.no_grad():
            for rows in _batches(self.valid, self.hp, run, indices):
                scores = _scores(run, rows, self.reference["valid"], self.hp.beta)
                losses.append(scores.losses)
                margins.append(scores.margins)
                wins.append(scores.wins)
        return Evaluation(
            torch.cat(losses).mean().item(),
            {
                "valid_reward_margin": torch.cat(margins).mean().item(),
                "valid_reward_accuracy": torch.cat(wins).mean().item(),
            },
        )


def _scores(run: Run, rows: list[Sequence], reference: list[float], beta: float) -> PairScores:
    """DPO loss and rewards of the pairs in `rows` (each pair's two examples among them)."""
    import torch

    ids, logps = example_logps(run, rows)
    local = {example: k for k, example in enumerate(ids)}
    chosen_ids = sorted(e for e in ids if e % 2 == 0)
    chosen = torch.stack([logps[local[e]] for e in chosen_ids])
    rejected = torch.stack([logps[local[e + 1]] for e in chosen_ids])
    ref = torch.tensor(reference, dtype=torch.float32, device=chosen.device)
    ref_ids = torch.tensor(chosen_ids, device=chosen.device)
    return dpo_loss(chosen, rejected, ref[ref_ids], ref[ref_ids + 1], beta)


def example_logps(run: Run, rows: list[Sequence]) -> tuple[list[int], Any]:
    """Each example's log-probability of its label tokens, summed: (example ids, [n])."""
    import torch
    import torch.nn.functional as F

    batch = collate(rows, run.pad_id, run.device)
    with autocast(run.device):
        logits = run.model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    shifted = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    token_logps = -F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    del logits  # the graph keeps what backward needs
    ids, owners = _owners(rows, shifted.size(1))
    sums = torch.zeros(len(ids) + 1, device=token_logps.device)
    sums = sums.index_add(0, owners.to(token_logps.device), token_logps)
    return ids, sums[: len(ids)]


def _owners(rows: list[Sequence], width: int) -> tuple[list[int], Any]:
    """The examples in `rows`, and for each token position the index of its example among
    them (padding: one past the last). A packed row's examples restart their positions at 0."""
    import torch

    ids: list[int] = []
    owners = torch.full((len(rows), width), -1, dtype=torch.long)
    for n, row in enumerate(rows):
        segment = -1
        for k, position in enumerate(row.position_ids):
            if position == 0:
                segment += 1
                ids.append(row.example_ids[segment])
            owners[n, k] = len(ids) - 1
    owners[owners < 0] = len(ids)
    return ids, owners.reshape(-1)


def _reference_logps(
    run: Run, hp: DpoHyperparameters, examples: list[Example], on_micro_batch: Callable[[], None]
) -> list[float]:
    """The model's log-probability of every example as it stands (the run's first step)."""
    import torch

    logps = [0.0] * len(examples)
    with _evaluating(run.model), torch.no_grad():
        for rows in _batches(examples, hp, run, list(range(len(examples)))):
            on_micro_batch()  # a cancel is seen here too
            ids, values = example_logps(run, rows)
            for example, value in zip(ids, values.tolist(), strict=True):
                logps[example] = value
    return logps


def _batches(
    examples: list[Example], hp: DpoHyperparameters, run: Run, indices: list[int]
) -> Iterator[list[Sequence]]:
    """Rows for `indices` (whole pairs), a micro-batch of `batch_size` pairs at a time."""
    size = 2 * hp.batch_size
    for start in range(0, len(indices), size):
        chunk = indices[start : start + size]
        yield build_sequences(examples, packing=hp.packing, max_len=run.max_len, indices=chunk)


class _evaluating:
    """Eval mode (no dropout) inside, the model's mode as it was after."""

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *_: object) -> None:
        self.model.train(self.was_training)
