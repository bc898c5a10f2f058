"""Fixtures for the worker tests: the tiny model's tokenizer (no hub), a lease clock."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from app.db.base import utcnow
from app.jobs import runs as job_runs


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from app.ml.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


class FakeClock:
    """A clock that moves only when the test says (`advance`).

    It counts its reads, so a test can wait until another thread (a lease keeper) has read
    it: a lease test then depends on the order of events, never on how fast a busy machine
    runs them.
    """

    def __init__(self, now: datetime):
        self.now, self.reads = now, 0
        self._read = threading.Condition()

    def __call__(self) -> datetime:
        with self._read:
            self.reads += 1
            self._read.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._read:
            self.now += timedelta(seconds=seconds)

    def wait_for_reads(self, count: int, timeout: float = 60) -> None:
        """Wait until the clock has been read `count` more times."""
        with self._read:
            target = self.reads + count
            assert self._read.wait_for(lambda: self.reads >= target, timeout), "never read"


@pytest.fixture
def lease_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The clock of leases and the sweep (app/jobs/runs.py), moved by the test alone."""
    clock = FakeClock(utcnow())
    monkeypatch.setattr(job_runs, "clock", clock)
    return clock
