"""When a run writes its checkpoints: `n_checkpoints` evenly spaced, the last at the end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker.progress import Progress
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
def test_checkpoint_steps(total, n, steps) -> None:
    assert checkpoint_steps(total, n) == steps


def test_one_per_epoch_falls_on_every_epoch_end() -> None:
    for epochs in range(1, 8):
        for per_epoch in range(1, 9):
            total = epochs * per_epoch
            ends = [per_epoch * e for e in range(1, epochs + 1)]
            assert checkpoint_steps(total, epochs) == ends


class Recorded(Progress):
    """Progress whose events are only recorded (no database, no lease)."""

    def __init__(self, retention: int) -> None:  # no super().__init__: no claim, no store
        self.settings = SimpleNamespace(checkpoint_retention=retention)
        self.events: list[tuple[str, str, dict]] = []

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((level, message, data or {}))


def test_the_job_announces_its_checkpoints_and_retention() -> None:
    progress = Recorded(retention=3)
    progress.announce_checkpoints(200, 50)
    [(level, message, data)] = progress.events
    assert level == "info" and data["checkpoint_steps"] == checkpoint_steps(200, 50)
    assert message == (
        "50 checkpoints planned, at step 4, 8, 12, …, 200; "
        "the newest 3 are kept (LORAFORGE_CHECKPOINT_RETENTION)"
    )


def test_more_checkpoints_than_steps_is_said() -> None:
    progress = Recorded(retention=0)
    progress.announce_checkpoints(3, 10)
    (_, first, _), (level, warning, data) = progress.events
    assert first.startswith("3 checkpoints planned, at step 1, 2, 3; all are kept")
    assert level == "warn" and "n_checkpoints=10" in warning and data["total_steps"] == 3
