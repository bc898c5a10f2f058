"""Adapters the batched engine cannot apply (DoRA, LoRA on embeddings, …) are served by the
PEFT fallback: same greedy output as plain PEFT, streaming, logprobs, other requests unharmed.

Every adapter the trainer can produce must be callable; these are the shapes issue 14 #10
found trained, succeeded and then answered 400 ("not served").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app.errors import IntegrityFailure, InvalidRequest, NotFound  # noqa: E402
from app.inference import AdapterRef  # noqa: E402
from app.ml.adapters import save_adapter  # noqa: E402
from app.ml.loading import load_base_model  # noqa: E402
from app.storage import file_sha256  # noqa: E402
from tests.unit.greedy_text import greedy, new_engine, reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = {
    "dora": {"use_dora": True},
    "embed": {"target_modules": ["embed_tokens"]},
    "dora-all": {"use_dora": True, "target_modules": "all-linear"},
}


def trained_like(base: Path, out: Path, *, seed: int, **config) -> AdapterRef:
    """Random non-zero weights, saved exactly as the trainer saves them (`save_adapter`)."""
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | config
    model = peft.get_peft_model(
        load_base_model(base, device="cpu"), peft.LoraConfig(init_lora_weights=False, **options)
    )
    sha = save_adapter(model, out)
    return AdapterRef(f"ft:tiny:org:{out.name}:ftjob-{seed}", out, sha)


@pytest.fixture(scope="module")
def fallbacks(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("fallback-adapters")
    return {
        name: trained_like(base_dir, root / name, seed=10 + i, **config)
        for i, (name, config) in enumerate(SHAPES.items())
    }


@pytest.mark.parametrize("shape", list(SHAPES))
def test_adapters_the_batch_cannot_apply_are_served_like_peft(base_dir, fallbacks, shape):
    engine = new_engine(base_dir)
    try:
        ref = fallbacks[shape]
        text = greedy(engine, ref, 8)
        assert text == reference(base_dir, ref, 8)
        assert text != reference(base_dir, None, 8), "the adapter must change the output"
        assert greedy(engine, None, 8) == reference(base_dir, None, 8)  # the base is untouched
    finally:
        engine.close()


def test_fallback_streams_with_logprobs_and_stop(base_dir, fallbacks):
    engine = new_engine(base_dir)
    try:
        ref = fallbacks["dora"]
        whole = greedy(engine, ref, 8)
        request = engine.submit(
            base_model="tiny", adapter=ref, prompt="Once upon a time", max_tokens=8,
            temperature=0, logprobs=2,
        )  # fmt: skip
        pieces = list(request.deltas())
        assert "".join(d.text for d in pieces) == whole
        assert request.generation.finish_reason in ("stop", "length")
        assert request.generation.logprobs and len(request.generation.logprobs[0].top) <= 2
    finally:
        engine.close()


def test_a_deleted_fallback_adapter_is_refused(base_dir, fallbacks):
    engine = new_engine(base_dir)
    try:
        ref = fallbacks["embed"]
        greedy(engine, ref, 2)
        engine.unload_adapter(ref.id)
        with pytest.raises(NotFound):
            greedy(engine, ref, 2)
    finally:
        engine.close()


def test_the_fallback_checks_the_sha256_and_refuses_foreign_tensors(base_dir, fallbacks, tmp_path):
    from safetensors.torch import load_file, save_file

    engine = new_engine(base_dir)
    try:
        good = fallbacks["dora"]
        altered = AdapterRef("ft:tiny:org:alt:ftjob-a", good.path, "0" * 64)
        with pytest.raises(IntegrityFailure, match="sha256"):
            greedy(engine, altered, 2)
        folder = tmp_path / "extra"
        shutil.copytree(good.path, folder)
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
        save_file(tensors, folder / "adapter_model.safetensors")
        sha = file_sha256(folder / "adapter_model.safetensors")
        with pytest.raises(InvalidRequest, match="lm_head"):
            greedy(engine, AdapterRef("ft:tiny:org:x:ftjob-x", folder, sha), 2)
        config = json.loads((good.path / "adapter_config.json").read_text())
        assert config["use_dora"] is True
    finally:
        engine.close()


def test_preloading_a_fallback_adapter_starts_its_scheduler(base_dir, fallbacks, caplog):
    engine = new_engine(base_dir)
    try:
        engine.preload("tiny", [fallbacks["embed"]])
        assert "failed" not in caplog.text
        assert greedy(engine, fallbacks["embed"], 4) == reference(base_dir, fallbacks["embed"], 4)
    finally:
        engine.close()


def test_fallback_schedulers_are_retired_least_recently_used_and_come_back(base_dir, fallbacks):
    engine = new_engine(base_dir, capacity=1)
    try:
        dora, embed = fallbacks["dora"], fallbacks["embed"]
        for ref in (dora, embed, dora):  # each load retires the other's scheduler
            assert greedy(engine, ref, 4) == reference(base_dir, ref, 4), ref.id
    finally:
        engine.close()


def test_a_fallback_adapters_completions_are_counted_under_its_base_and_id(base_dir, fallbacks):
    from app.observability import metrics
    from tests.metrics_text import samples, value

    def requests() -> float:
        scrape = samples(metrics.exposition(url=None, engine=None).decode())
        labels = {"base_model": "tiny", "adapter": fallbacks["dora"].id}
        return value(scrape, "loraforge_inference_requests_total", **labels)

    engine = new_engine(base_dir)
    try:
        before = requests()
        greedy(engine, fallbacks["dora"], 4)
        assert requests() == before + 1
    finally:
        engine.close()


def test_fallback_adapters_are_listed_for_their_owner_only(base_dir, fallbacks):
    engine = new_engine(base_dir)
    try:
        ref = dataclasses.replace(fallbacks["dora"], owner="org-a")
        greedy(engine, ref, 4)
        greedy(engine, ref, 4)
        (listed,) = [a for a in engine.stats(owner=ref.owner)["adapters"] if a["id"] == ref.id]
        assert listed["served_by"] == "peft_fallback" and listed["base_model"] == "tiny"
        assert listed["loaded"] and listed["requests"] == 2 and listed["loads"] == 1
        assert all(a["id"] != ref.id for a in engine.stats(owner="org-b")["adapters"])
        engine.unload_adapter(ref.id)
        assert all(a["id"] != ref.id for a in engine.stats(owner=ref.owner)["adapters"])
    finally:
        engine.close()
