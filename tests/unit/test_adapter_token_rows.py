"""Reading an adapter's trained token rows (app/inference/adapter_files.py): what fits the
base is read, anything else is refused by name, never served without its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app.errors import AdapterIntegrityError  # noqa: E402
from app.inference import AdapterRef  # noqa: E402
from app.inference.adapter_files import read_adapter  # noqa: E402
from app.inference.lora import linear_shapes, token_shapes  # noqa: E402
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter  # noqa: E402
from app.ml.loading import load_base_model  # noqa: E402
from app.storage import file_sha256  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = [3, 5, 6]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
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


def read(base, folder: Path):
    ref = AdapterRef("ft:tiny:o:s:ftjob-1", folder, file_sha256(folder / ADAPTER_WEIGHTS))
    return read_adapter(
        ref,
        shapes=linear_shapes(base),
        token_shapes=token_shapes(base),
        dtype=torch.float32,
        device="cpu",
    )


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config | changes))


def test_token_rows_of_both_layers_are_read(base, adapter_dir) -> None:
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
def test_token_rows_that_do_not_fit_are_refused(base, adapter_dir, indices) -> None:
    if isinstance(indices, list) and indices != TOKENS:
        indices = {"model.embed_tokens": indices, "lm_head": TOKENS}
    edit_config(adapter_dir, trainable_token_indices=indices)
    with pytest.raises(AdapterIntegrityError, match="token"):
        read(base, adapter_dir)


def test_a_tied_output_layer_is_served_with_the_embedding_rows(tmp_path: Path) -> None:
    """With tied embeddings PEFT saves the embedding's rows only; the output layer uses them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.inference import InferenceEngine
    from app.ml.loading import load_tokenizer
    from app.ml.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    tokens = tokenizer.convert_tokens_to_ids(list("helxyz"))  # plain characters: visible text
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        load_base_model(tmp_path / "base", device="cpu"),
        peft.LoraConfig(
            r=4,
            target_modules=["q_proj"],
            trainable_token_indices={"model.embed_tokens": tokens, "lm_head": tokens},
        ),
    )
    with torch.no_grad():  # rows far from the base's, as a trained adapter's could be
        for name, parameter in model.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.copy_(torch.randn_like(parameter))
    save_adapter(model, tmp_path / "adapter")
    saved = [k for k in load_file_keys(tmp_path / "adapter") if "token_adapter" in k]
    assert saved == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]

    ids = torch.tensor([tokenizer("hello").input_ids])

    def generate(m) -> list[int]:
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         do_sample=False, eos_token_id=-1, pad_token_id=0)  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    base = load_base_model(tmp_path / "base", device="cpu")
    expected = generate(peft.PeftModel.from_pretrained(base, tmp_path / "adapter"))
    assert expected != generate(load_base_model(tmp_path / "base", device="cpu"))
    engine = InferenceEngine(base_models={"t": str(tmp_path / "base")}, device="cpu")
    try:
        ref = AdapterRef(
            "ft:t:o:s:ftjob-2",
            tmp_path / "adapter",
            file_sha256(tmp_path / "adapter" / ADAPTER_WEIGHTS),
        )
        got = engine.generate(
            base_model="t", adapter=ref, prompt="hello", max_tokens=10, temperature=0
        )
    finally:
        engine.close()
    assert got.text == load_tokenizer(tmp_path / "base").decode(expected, skip_special_tokens=True)


def load_file_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(folder / ADAPTER_WEIGHTS, "pt") as handle:
        return list(handle.keys())
