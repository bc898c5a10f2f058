"""When a run writes its checkpoints: `n_checkpoints` evenly spaced, the last at the end."""

from __future__ import annotations

import pytest

from worker.training.checkpoint import checkpoint_steps


@pytest.mark.parametrize(
    ("total", "n", "steps"),
    [
        (12, 3, [4, 8, 12]),  # 3 epochs of 4 steps: the epoch ends (the default)
        (12, 5, [3, 5, 8, 10, 12]),
        (6, 4, [2, 3, 5, 6]),
        (7, 1, [7]),
        (3, 10, [1, 2, 3]),  # at most one per step
    ],
)
def test_checkpoint_steps(total, n, steps) -> None:  # type: ignore[no-untyped-def]
    assert checkpoint_steps(total, n) == steps


def test_one_per_epoch_falls_on_every_epoch_end() -> None:
    for epochs in range(1, 8):
        for per_epoch in range(1, 9):
            total = epochs * per_epoch
            ends = [per_epoch * e for e in range(1, epochs + 1)]
            assert checkpoint_steps(total, epochs) == ends
