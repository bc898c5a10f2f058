"""`train_special_tokens` (issue 10, item 11): a chat template's special tokens that the base
never trained get trained rows; the adapter loads with PEFT, and loraforge serves it with
those rows (its greedy output equals PEFT's), never silently without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from app.db.models import Adapter, JobEvent  # noqa: E402
from app.inference import AdapterRef, InferenceEngine  # noqa: E402
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: E402
from app.ml.chat import prompt_ids  # noqa: E402
from app.ml.loading import load_base_model, load_tokenizer  # noqa: E402
from app.storage import LocalStore, file_sha256  # noqa: E402
from tests.factories import load, submit  # noqa: E402
from tests.unit.greedy_text import peft_greedy  # noqa: E402
from worker.run_job import run_job  # noqa: E402

pytestmark = pytest.mark.slow
TEMPLATE_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
MESSAGES = [{"role": "user", "content": "code for item 3?"}]


def greedy(base_dir: Path, adapter_dir: Path | None, max_tokens: int = 12) -> str:
    """Greedy text of the base (+ the adapter, loaded by PEFT), fp32, with generate()."""
    tokenizer, out = peft_greedy(
        base_dir, adapter_dir, lambda tokenizer: prompt_ids(tokenizer, MESSAGES), max_tokens
    )
    return tokenizer.decode(out, skip_special_tokens=True)


def without_token_rows(adapter_dir: Path, out: Path) -> Path:
    """The same adapter with its token rows dropped: what ignoring them would serve."""
    shutil.copytree(adapter_dir, out)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    config["trainable_token_indices"] = None
    (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    tensors = load_file(out / ADAPTER_WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "token_adapter" not in k}, out / ADAPTER_WEIGHTS)
    return out


def test_trained_token_rows_are_saved_loaded_by_peft_and_served(settings, tmp_path) -> None:
    base_dir = Path(settings.base_models["tiny"])
    job_id = submit(settings, train_special_tokens=True, n_epochs=4, learning_rate=1e-2)
    assert run_job(job_id, settings=settings) == "succeeded"
    [adapter] = load(settings, Adapter, job_id=job_id)
    assert adapter.lora_config["train_special_tokens"] == TEMPLATE_TOKENS
    assert any(
        "Training the embeddings of 4 tokens" in e.message
        for e in load(settings, JobEvent, job_id=job_id)
    )
    folder = LocalStore(settings.artifacts_dir).path(adapter.storage_key)

    # the rows of the template's tokens moved away from the base's: every output row, and
    # the input rows of the tokens the data holds (it has no system message)
    tokenizer = load_tokenizer(base_dir)
    ids = tokenizer.convert_tokens_to_ids(TEMPLATE_TOKENS)
    base = load_base_model(base_dir, device="cpu")
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    layers = {
        "model.embed_tokens": (
            base.get_input_embeddings(),
            ["<|end|>", "<|user|>", "<|assistant|>"],
        ),
        "lm_head": (base.get_output_embeddings(), TEMPLATE_TOKENS),
    }
    for module, (layer, used) in layers.items():
        rows = tensors[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
        assert rows.shape == (len(ids), layer.weight.shape[1])
        moved = (rows - layer.weight[ids]).abs().amax(dim=1) > 0
        assert [t for t, m in zip(TEMPLATE_TOKENS, moved, strict=True) if m] == used

    # PEFT loads it; loraforge serves it with the rows: the same greedy text as PEFT's
    expected = greedy(base_dir, folder)
    assert expected != greedy(base_dir, without_token_rows(folder, tmp_path / "bare"))
    engine = InferenceEngine(base_models={"tiny": str(base_dir)}, device="cpu")
    try:
        ref = AdapterRef(adapter.id, folder, file_sha256(folder / ADAPTER_WEIGHTS))
        common = {"base_model": "tiny", "max_tokens": 12, "temperature": 0, "messages": MESSAGES}
        # the adapter's rows and the base's side by side in batches (several pairs, so some
        # forward passes surely hold both)
        engine.preload("tiny", [ref])
        pairs = [
            (engine.submit(adapter=ref, **common), engine.submit(adapter=None, **common))
            for _ in range(6)
        ]
        plain = greedy(base_dir, None)
        assert [(a.result().text, b.result().text) for a, b in pairs] == [(expected, plain)] * 6
        assert engine.stats()["base_models"][0]["mixed_steps"] > 0
        assert engine.generate(adapter=ref, **common).text == expected  # and on its own
    finally:
        engine.close()
