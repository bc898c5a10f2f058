"""Fixtures for the inference unit tests (they also ask for `one_torch_thread`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir: Path) -> Path:
    """The base model the inference tests serve and compare with plain PEFT."""
    return tiny_model_dir
