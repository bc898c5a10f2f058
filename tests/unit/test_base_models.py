"""Checking allowlist entries: paths stay paths, hub ids are judged by cache, network, token."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app import base_models
from app.base_models import BaseModelUnavailable, looks_like_path, problem


@pytest.fixture(autouse=True)
def fresh_hub_answers() -> None:
    base_models._hub_problem.cache_clear()


@pytest.mark.parametrize(
    ("ref", "is_path"),
    [
        ("/models/tiny", True),
        ("./models/tiny", True),
        ("../tiny", True),
        ("~/models/tiny", True),
        ("data/models/tiny", True),  # more separators than org/name
        ("C:\\models\\tiny", True),
        ("gpt2", False),
        ("Qwen/Qwen2.5-0.5B-Instruct", False),
        ("models/tinyy", False),  # org/name: a local directory if there is one, else the hub
    ],
)
def test_what_looks_like_a_path(ref: str, is_path: bool) -> None:
    assert looks_like_path(ref) is is_path


def test_loading_a_missing_path_never_asks_the_hub(monkeypatch, tmp_path: Path) -> None:
    import transformers

    from app.ml.loading import load_base_model, load_tokenizer

    def hub(ref, **_):
        raise AssertionError(f"from_pretrained was called with {ref}, a path that does not exist")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(BaseModelUnavailable, match="is not a directory"):
            load(str(tmp_path / "tinyy"))


def test_a_directory_without_config_is_named(tmp_path: Path) -> None:
    assert "has no config.json" in problem(str(tmp_path))


def test_a_local_model_directory_is_fine(tiny_model_dir: Path) -> None:
    assert problem(str(tiny_model_dir)) is None


def fake_cache(root: Path, repo: str) -> None:
    """The hub cache's layout for one repo holding config.json at revision main."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")


@pytest.fixture
def hub(monkeypatch, tmp_path: Path):
    """An empty hub cache, online; `answer` sets what the hub says to model_info."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    answers: list[Exception | None] = [None]

    def model_info(repo_id, timeout=None):  # noqa: ARG001
        assert timeout is not None  # never the default, long retry
        if answers[0] is not None:
            raise answers[0]
        return object()

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    return answers


def test_a_cached_hub_id_loads_offline(hub, monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    fake_cache(tmp_path / "hub", "acme/cached")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub[0] = AssertionError("a cached model needs no network")
    assert problem("acme/cached") is None


def test_an_uncached_hub_id_offline(hub, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub[0] = AssertionError("offline: the hub is never asked")
    assert "HF_HUB_OFFLINE" in problem("acme/model")


def test_an_uncached_hub_id_without_network(hub) -> None:
    hub[0] = httpx.ConnectError("no route to host")
    reason = problem("acme/model")
    assert "cannot be reached" in reason and "ConnectError" in reason


def test_a_gated_hub_id_without_a_token(hub) -> None:
    from huggingface_hub.errors import GatedRepoError

    response = httpx.Response(401, request=httpx.Request("GET", "x"))
    hub[0] = GatedRepoError("gated", response=response)
    assert "HF_TOKEN" in problem("meta-llama/Llama-3.2-1B")


def test_an_unknown_hub_id_names_both_places_it_looked(hub) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    hub[0] = RepositoryNotFoundError(
        "nope", response=httpx.Response(404, request=httpx.Request("GET", "x"))
    )
    reason = problem("models/tinyy")
    assert "no local directory" in reason and "no hub repository 'models/tinyy'" in reason


def test_a_reachable_hub_id_is_fine(hub) -> None:  # noqa: ARG001
    assert problem("acme/model") is None
