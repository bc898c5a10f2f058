"""Serving a quantized base (`LORAFORGE_BASE_MODELS` entry `;quantization=nf4`): the batched
multi-adapter LoRA runs over bitsandbytes' 4-bit layers and answers as plain PEFT does on
the same 4-bit base, one request at a time.

The tiny model's layer sizes are multiples of 64, as real models' are: bitsandbytes' CPU
inference kernel needs them (`app/ml/quantized.py`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import has_avx512bf16  # noqa: E402
from bitsandbytes.nn.modules import Linear4bit  # noqa: E402

from app.errors import ServiceUnavailable  # noqa: E402
from app.inference import AdapterRef, InferenceEngine  # noqa: E402
from app.inference.lora import MultiLoraLinear  # noqa: E402
from app.ml.loading import load_base_model, load_tokenizer  # noqa: E402
from app.ml.quantized import set_inference_kernel  # noqa: E402
from app.ml.tiny_model import build_tiny_model  # noqa: E402
from app.storage import file_sha256  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Once upon a time", "The quick brown fox"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[AdapterRef]:
    """Two adapters with random, non-zero A and B, of different ranks and targets."""
    refs = []
    for index, (rank, targets) in enumerate([(4, "all-linear"), (8, ["q_proj", "up_proj"])]):
        torch.manual_seed(10 + index)
        model = peft.get_peft_model(
            load_base_model(tiny_model_dir, device="cpu"),
            peft.LoraConfig(
                r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=targets
            ),
        )
        out = tmp_path_factory.mktemp(f"adapter{index}")
        model.save_pretrained(str(out), safe_serialization=True)
        sha = file_sha256(out / "adapter_model.safetensors")
        refs.append(AdapterRef(f"ft:tiny:org:q{index}:ftjob-{index:04d}", out, sha))
    return refs


def peft_text(base_dir: Path, adapter: AdapterRef, prompt: str) -> str:
    """Plain PEFT greedy decoding of one request on the nf4 base, served as the engine
    serves it (bitsandbytes' CPU inference kernel on): the reference."""
    tokenizer = load_tokenizer(base_dir)
    base = load_base_model(base_dir, device="cpu", quantization="nf4")
    set_inference_kernel(base, True)
    model = peft.PeftModel.from_pretrained(base, str(adapter.path)).eval()
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True)


def test_a_quantized_base_serves_two_adapters_in_one_batch(tiny_model_dir, adapters) -> None:
    engine = InferenceEngine(
        base_models={"tiny": str(tiny_model_dir)}, quantized={"tiny": "nf4"}, device="cpu"
    )
    jobs = [(ref, prompt) for ref in adapters for prompt in PROMPTS]
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(
                pool.map(
                    lambda job: (
                        engine.generate(
                            base_model="tiny",
                            adapter=job[0],
                            prompt=job[1],
                            max_tokens=MAX_TOKENS,
                            temperature=0,
                        ).text
                    ),
                    jobs,
                )
            )
        model = engine._loaded("tiny").scheduler.model
        stats = engine.stats()["base_models"][0]
    finally:
        engine.close()
    wrapped = [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
    assert wrapped and all(isinstance(m.base, Linear4bit) for m in wrapped)  # LoRA over 4-bit
    # serving opts into bitsandbytes' CPU inference kernel where the CPU has it
    assert all(m.base.support_avx512bf16_for_cpu == has_avx512bf16() for m in wrapped)
    assert stats["mixed_steps"] > 0, stats  # both adapters in the same forward passes
    expected = [peft_text(tiny_model_dir, ref, prompt) for ref, prompt in jobs]
    assert all(texts), texts
    assert texts == expected


def test_a_base_the_cpu_kernel_cannot_serve_is_unavailable_naming_why(tmp_path) -> None:
    """An MLP of 344 (not a multiple of 32): bitsandbytes' CPU kernel would assert mid-request;
    the engine refuses the base at load (503) with the layer and the setting to fix."""
    odd = build_tiny_model(tmp_path / "odd", intermediate_size=344)
    engine = InferenceEngine(base_models={"odd": str(odd)}, quantized={"odd": "nf4"}, device="cpu")
    try:
        with pytest.raises(ServiceUnavailable) as refused:
            engine.generate(base_model="odd", adapter=None, prompt="hi", max_tokens=2)
    finally:
        engine.close()
    message = refused.value.message
    assert "344 outputs" in message and "LORAFORGE_BASE_MODELS" in message, message
    assert "quantization=nf4" in message
