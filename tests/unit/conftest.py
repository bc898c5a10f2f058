"""Fixtures for the inference unit tests (they also ask for `one_torch_thread`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def no_eos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generations run to max_tokens (a random-init model may pick EOS at any step)."""
    from app.inference import engine

    monkeypatch.setattr(engine, "eos_token_ids", lambda *_: frozenset())


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir: Path) -> Path:
    """The base model the inference tests serve and compare with plain PEFT."""
    return tiny_model_dir
