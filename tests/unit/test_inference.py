"""The inference engine against a tiny local model and untrained (random-B) LoRA adapters.

Every greedy expectation comes from an independent local reference: a freshly loaded
base, `PeftModel.from_pretrained(base, adapter_dir)` and `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app.errors import IntegrityFailure, InvalidRequest, NotFound  # noqa: E402
from app.inference import AdapterRef, Generation, InferenceEngine  # noqa: E402
from app.ml.chat import render_prompt  # noqa: E402
from app.ml.loading import load_base_model, load_tokenizer  # noqa: E402
from app.ml.tiny_model import build_tiny_model  # noqa: E402
from app.storage import file_sha256  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _make_adapter(base_dir: Path, out: Path, *, seed: int, r: int, targets) -> Path:
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        load_base_model(base_dir, device="cpu"),
        peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=targets),
    )
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    """Three adapters: r=4 on attention q/v, r=16 on all linear layers, r=8 on MLP only."""
    specs = {
        "small": (1, 4, ["q_proj", "v_proj"]),
        "big": (2, 16, "all-linear"),
        "mlp": (3, 8, ["gate_proj", "up_proj", "down_proj"]),
    }
    refs = {}
    for key, (seed, r, targets) in specs.items():
        path = _make_adapter(
            base_dir, tmp_path_factory.mktemp(key), seed=seed, r=r, targets=targets
        )
        adapter_id = f"ft:tiny:org-test:{key}:ftjob-{seed:06d}"
        refs[key] = AdapterRef(adapter_id, path, file_sha256(path / "adapter_model.safetensors"))
    return refs


@pytest.fixture
def engine(base_dir: Path) -> InferenceEngine:
    return InferenceEngine(base_models={"tiny": str(base_dir)}, max_loaded_adapters=8, device="cpu")


_REFERENCE: dict[tuple, str] = {}


def reference(
    base_dir: Path, adapter: AdapterRef | None, *, max_tokens: int = 12, chat=False
) -> str:
    """Plain greedy decoding with a fresh base (+ PEFT adapter), independent of the engine."""
    key = (str(base_dir), adapter, max_tokens, chat)
    if key not in _REFERENCE:
        tokenizer = load_tokenizer(base_dir)
        model = load_base_model(base_dir, device="cpu")
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, str(adapter.path))
        if chat:
            ids = tokenizer(render_prompt(tokenizer, MESSAGES), add_special_tokens=False).input_ids
        else:
            ids = tokenizer(PROMPT).input_ids
        inputs = torch.tensor([ids])
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        if out and out[-1] == tokenizer.eos_token_id:
            out = out[:-1]
        _REFERENCE[key] = tokenizer.decode(out, skip_special_tokens=True)
    return _REFERENCE[key]


def greedy(engine: InferenceEngine, adapter: AdapterRef | None, **kwargs) -> Generation:
    kwargs.setdefault("prompt", None if "messages" in kwargs else PROMPT)
    kwargs.setdefault("max_tokens", 12)
    return engine.generate(base_model="tiny", adapter=adapter, temperature=0, **kwargs)


def test_greedy_matches_local_peft_for_base_and_two_adapters(engine, base_dir, adapters):
    small, big = adapters["small"], adapters["big"]
    before = greedy(engine, None).text  # base, before any adapter wraps it
    outputs = {"small": greedy(engine, small).text, "big": greedy(engine, big).text}
    after = greedy(engine, None).text  # base again, adapters loaded but disabled
    assert before == after == reference(base_dir, None)
    assert outputs["small"] == reference(base_dir, small)
    assert outputs["big"] == reference(base_dir, big)
    assert len({before, outputs["small"], outputs["big"]}) == 3, "adapters must change the output"
    assert greedy(engine, small).text == outputs["small"]  # switching back gives the same


def test_chat_messages_match_reference_rendering(engine, base_dir, adapters):
    result = greedy(engine, adapters["big"], messages=MESSAGES)
    assert result.text == reference(base_dir, adapters["big"], chat=True)
    tokenizer = load_tokenizer(base_dir)
    rendered = render_prompt(tokenizer, MESSAGES)
    assert result.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)


def test_two_ranks_and_target_sets_side_by_side(engine, base_dir, adapters):
    small, big, mlp = adapters["small"], adapters["big"], adapters["mlp"]
    for adapter in (small, big, mlp, big, small, mlp):
        assert greedy(engine, adapter).text == reference(base_dir, adapter), adapter.id
    assert engine.loaded_adapters() == [big.id, small.id, mlp.id]


def test_lru_evicts_least_recently_used(base_dir, adapters):
    small, big, mlp = adapters["small"], adapters["big"], adapters["mlp"]
    engine = InferenceEngine(
        base_models={"tiny": str(base_dir)}, max_loaded_adapters=2, device="cpu"
    )
    greedy(engine, small, max_tokens=1)
    greedy(engine, big, max_tokens=1)
    assert engine.loaded_adapters() == [small.id, big.id]
    greedy(engine, small, max_tokens=1)  # small becomes the most recent
    assert engine.loaded_adapters() == [big.id, small.id]
    greedy(engine, mlp, max_tokens=1)  # evicts big, the least recently used
    assert engine.loaded_adapters() == [small.id, mlp.id]
    greedy(engine, None, max_tokens=1)  # the bare base uses no slot
    assert engine.loaded_adapters() == [small.id, mlp.id]


def test_evicted_adapter_reloads_with_same_output(base_dir, adapters):
    small, big = adapters["small"], adapters["big"]
    engine = InferenceEngine(
        base_models={"tiny": str(base_dir)}, max_loaded_adapters=1, device="cpu"
    )
    first = greedy(engine, small).text
    assert greedy(engine, big).text == reference(base_dir, big)
    assert engine.loaded_adapters() == [big.id]
    assert greedy(engine, small).text == first == reference(base_dir, small)
    assert engine.loaded_adapters() == [small.id]


def test_unloaded_adapter_is_freed_and_refused_from_then_on(engine, base_dir, adapters):
    small, big = adapters["small"], adapters["big"]
    greedy(engine, small, max_tokens=1)
    greedy(engine, big, max_tokens=1)
    engine.unload_adapter(small.id)
    assert engine.loaded_adapters() == [big.id]
    engine.unload_adapter("ft:tiny:org-test:never:ftjob-none")  # unknown: no error
    engine.unload_adapter(big.id)
    assert engine.loaded_adapters() == []
    modules = [m for m in engine._bases["tiny"].scheduler.model.modules() if hasattr(m, "factors")]
    assert modules and all(not m.factors for m in modules), "eviction frees every factor"
    assert greedy(engine, None).text == reference(base_dir, None)
    with pytest.raises(NotFound) as info:
        greedy(engine, small)
    assert info.value.param == "model"
    assert engine.loaded_adapters() == []
    assert greedy(engine, adapters["mlp"]).text == reference(base_dir, adapters["mlp"])


def test_sha256_mismatch_is_refused_as_the_servers_fault(engine, base_dir, adapters, tmp_path):
    good = adapters["small"]
    wrong = AdapterRef(good.id, good.path, "0" * 64)
    with pytest.raises(IntegrityFailure, match="sha256"):
        greedy(engine, wrong)
    tampered = tmp_path / "tampered"
    shutil.copytree(good.path, tampered)
    weights = tampered / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # flip bits in the last tensor's data
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityFailure, match="sha256"):
        greedy(engine, AdapterRef("ft:tiny:org-test:tampered:ftjob-x", tampered, good.sha256))
    assert engine.loaded_adapters() == []
    assert greedy(engine, None).text == reference(base_dir, None)


def test_pickled_weights_are_refused(engine, adapters, tmp_path):
    good = adapters["small"]
    folder = tmp_path / "with-pickle"
    shutil.copytree(good.path, folder)
    (folder / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(InvalidRequest, match="pickled"):
        greedy(engine, AdapterRef("ft:tiny:org-test:pickle:ftjob-p", folder, good.sha256))
    missing = tmp_path / "no-weights"
    missing.mkdir()
    shutil.copy(good.path / "adapter_config.json", missing)
    with pytest.raises(InvalidRequest, match=r"adapter_model\.safetensors"):
        greedy(engine, AdapterRef("ft:tiny:org-test:missing:ftjob-m", missing, good.sha256))
    assert engine.loaded_adapters() == []


def test_stop_string_cuts_the_text(engine):
    full = greedy(engine, None, max_tokens=20)
    assert full.finish_reason == "length" and len(full.text) >= 8, full
    stop = full.text[4:6]
    expected = full.text[: full.text.find(stop)]
    result = greedy(engine, None, max_tokens=20, stop=["never-there", stop])
    assert (result.text, result.finish_reason) == (expected, "stop")
    assert result.completion_tokens < 20


def test_max_tokens_ends_with_length_and_counts_tokens(engine):
    result = greedy(engine, None, max_tokens=5)
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (len(PROMPT), 5)


def test_seed_makes_sampling_reproducible(engine, adapters):
    def sample(seed, **kwargs):
        return engine.generate(
            base_model="tiny",
            adapter=adapters["big"],
            prompt=PROMPT,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            **kwargs,
        ).text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    # top_p this small keeps only the most likely token: sampling becomes greedy
    assert sample(7, top_p=1e-6) == greedy(engine, adapters["big"], max_tokens=16).text


def test_context_length_is_enforced(tmp_path):
    short = build_tiny_model(tmp_path / "short", max_positions=32)
    engine = InferenceEngine(base_models={"short": str(short)}, device="cpu")
    assert engine.context_length("short") == 32
    fits = engine.generate(
        base_model="short", adapter=None, prompt="hello", max_tokens=27, temperature=0
    )
    assert fits.prompt_tokens + fits.completion_tokens <= 32
    with pytest.raises(InvalidRequest) as info:
        engine.generate(base_model="short", adapter=None, prompt="hello", max_tokens=28)
    assert info.value.param == "max_tokens"
    assert "32" in info.value.message and "33" in info.value.message


def test_bad_requests(engine):
    """Input the engine itself refuses; sampling bounds are the API schema's alone
    (tests/api/test_inference_api.py)."""
    cases = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"messages": []}, "messages"),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidRequest) as info:
            engine.generate(base_model="tiny", adapter=None, **kwargs)
        assert info.value.param == param, kwargs
    with pytest.raises(NotFound):
        engine.generate(base_model="nope", adapter=None, prompt="x")
    with pytest.raises(NotFound):
        engine.context_length("nope")


def test_concurrent_requests_each_get_their_adapter(engine, base_dir, adapters):
    choices = [adapters["small"], adapters["big"], None] * 4

    def run(adapter):
        return greedy(engine, adapter).text

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, choices))
    assert results == [reference(base_dir, adapter) for adapter in choices]


def test_adapter_for_another_base_is_refused_and_nothing_breaks(
    engine, base_dir, adapters, tmp_path
):
    other_base = build_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    path = _make_adapter(other_base, tmp_path / "foreign", seed=9, r=4, targets="all-linear")
    foreign = AdapterRef(
        "ft:tiny:org-test:foreign:ftjob-f", path, file_sha256(path / "adapter_model.safetensors")
    )
    with pytest.raises(InvalidRequest, match="could not be loaded"):
        greedy(engine, foreign)  # as the first adapter: PeftModel.from_pretrained fails
    assert greedy(engine, None).text == reference(base_dir, None)
    assert greedy(engine, adapters["small"]).text == reference(base_dir, adapters["small"])
    with pytest.raises(InvalidRequest, match="could not be loaded"):
        greedy(engine, foreign)  # next to a loaded adapter: load_adapter fails
    assert engine.loaded_adapters() == [adapters["small"].id]
    assert greedy(engine, adapters["small"]).text == reference(base_dir, adapters["small"])
    assert greedy(engine, None).text == reference(base_dir, None)
