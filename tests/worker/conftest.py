"""Fixtures for the training core: a tiny local model (no hub) and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.ml.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from app.ml.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)
