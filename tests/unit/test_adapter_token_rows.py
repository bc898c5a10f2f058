"""Reading an adapter's trained token rows (app/inference/adapter_files.py): what fits the
base is read, anything else is refused by name, never served without its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app.inference import AdapterRef  # noqa: E402
from app.inference.adapter_files import read_adapter  # noqa: E402
from app.inference.lora import linear_shapes, token_shapes  # noqa: E402
from app.inference.types import AdapterIntegrityError  # noqa: E402
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, file_sha256, save_adapter  # noqa: E402
from app.ml.loading import load_base_model  # noqa: E402

TOKENS = [3, 5, 6]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_base_model(tiny_model_dir, device="cpu")


@pytest.fixture
def adapter_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    model = peft.get_peft_model(
        load_base_model(tiny_model_dir, device="cpu"),
        peft.LoraConfig(
            r=4,
            target_modules=["q_proj"],
            trainable_token_indices={"model.embed_tokens": TOKENS, "lm_head": TOKENS},
        ),
    )
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def read(base, folder: Path):  # type: ignore[no-untyped-def]
    ref = AdapterRef("ft:tiny:o:s:ftjob-1", folder, file_sha256(folder / ADAPTER_WEIGHTS))
    return read_adapter(
        ref,
        shapes=linear_shapes(base),
        token_shapes=token_shapes(base),
        dtype=torch.float32,
        device="cpu",
    )


def edit_config(folder: Path, **changes) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config | changes))


def test_token_rows_of_both_layers_are_read(base, adapter_dir) -> None:  # type: ignore[no-untyped-def]
    weights = read(base, adapter_dir)
    assert sorted(weights.tokens) == ["lm_head", "model.embed_tokens"]
    for name, layer in (("model.embed_tokens", base.model.embed_tokens), ("lm_head", base.lm_head)):
        ids, rows = weights.tokens[name]
        assert ids.tolist() == TOKENS and torch.equal(rows, layer.weight[TOKENS])


@pytest.mark.parametrize(
    "indices",
    [
        [5, 4000],  # past the vocabulary
        {"model.embed_tokens": TOKENS},  # rows saved for a layer the config does not name
        {"model.embed_tokens": [3, 5], "lm_head": TOKENS},  # fewer ids than rows
        {"model.embed_tokens": [3, 3, 5], "lm_head": TOKENS},  # duplicates
        {"model.norm": TOKENS, "lm_head": TOKENS},  # not the embedding or output layer
        TOKENS,  # PEFT's short form: which layers it covers is implicit
    ],
)
def test_token_rows_that_do_not_fit_are_refused(base, adapter_dir, indices) -> None:  # type: ignore[no-untyped-def]
    if isinstance(indices, list) and indices != TOKENS:
        indices = {"model.embed_tokens": indices, "lm_head": TOKENS}
    edit_config(adapter_dir, trainable_token_indices=indices)
    with pytest.raises(AdapterIntegrityError, match="token"):
        read(base, adapter_dir)
