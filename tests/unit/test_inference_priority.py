"""The scheduler thread runs nicer than the request threads, so a batch that never empties
cannot take the CPU from `/health`, files, jobs and the admission of other requests."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")

from app.inference import InferenceEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scheduler_niceness(engine: InferenceEngine, base_model: str) -> int:
    thread = engine._bases[base_model].scheduler._thread  # this engine's, not another test's
    assert thread.native_id is not None
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


@pytest.mark.parametrize("nice", [0, 5])
def test_the_scheduler_thread_runs_at_the_configured_niceness(base_dir: Path, nice: int) -> None:
    engine = InferenceEngine(base_models={"tiny": str(base_dir)}, device="cpu", scheduler_nice=nice)
    try:
        engine.generate(base_model="tiny", adapter=None, prompt="hi", max_tokens=1)
        ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert scheduler_niceness(engine, "tiny") == min(19, ours + nice)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours  # only it
    finally:
        engine.close()


@pytest.mark.parametrize("value", ["-1", "20"])
def test_a_niceness_outside_0_to_19_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from pydantic import ValidationError

    from app.config import Settings

    monkeypatch.setenv("LORAFORGE_INFERENCE_THREAD_NICE", value)
    with pytest.raises(ValidationError, match="inference_thread_nice"):
        Settings()
