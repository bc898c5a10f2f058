"""Quantized bases (QLoRA): the allowlist's `;quantization=` option, bases bitsandbytes cannot
quantize (refused at load with the reason, no server path), a worker or API without
bitsandbytes, and the 4-bit layers keeping a trainable layout through a validation pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.errors import QuantizationUnavailable
from app.quantization import require_backend
from tests.factories import without_bitsandbytes


def test_an_allowlist_entry_may_serve_its_base_quantized() -> None:
    settings = Settings(
        base_models="tiny=/models/tiny;quantization=nf4, big=org/big , c=./c;quantization=none"
    )
    assert settings.base_models == {"tiny": "/models/tiny", "big": "org/big", "c": "./c"}
    assert settings.serving_quantization == {"tiny": "nf4"}


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("t=/m;quantisation=nf4", "unknown option 'quantisation=nf4'"),
        ("t=/m;quantization=fp8", "'fp8'"),
    ],
)
def test_a_bad_allowlist_option_names_the_entry(entry: str, named: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(base_models=entry)
    assert "LORAFORGE_BASE_MODELS entry t" in str(refused.value) and named in str(refused.value)


def test_without_bitsandbytes_a_quantization_is_refused_naming_the_param(monkeypatch) -> None:
    require_backend("nf4")  # installed here
    without_bitsandbytes(monkeypatch)
    require_backend("none")  # a full-precision base needs nothing
    with pytest.raises(QuantizationUnavailable) as refused:
        require_backend("int8")
    assert refused.value.param == "hyperparameters.quantization"
    assert "bitsandbytes" in refused.value.message and "quantization" in refused.value.message


torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from app.ml.loading import load_base_model  # noqa: E402
from app.ml.tiny_model import build_tiny_model  # noqa: E402


def test_an_already_quantized_checkpoint_is_refused_without_its_path(tmp_path: Path) -> None:
    base = build_tiny_model(tmp_path / "gptq")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationUnavailable) as refused:
        load_base_model(base, device="cpu", quantization="nf4")
    message = refused.value.message
    assert "already quantized (gptq)" in message and str(tmp_path) not in message


def test_a_layer_the_cpu_kernel_cannot_take_is_refused_at_load(tmp_path: Path) -> None:
    base = build_tiny_model(tmp_path / "odd", intermediate_size=344)
    with pytest.raises(QuantizationUnavailable) as refused:
        load_base_model(base, device="cpu", quantization="nf4")
    assert "has 344 outputs" in refused.value.message
    assert str(tmp_path) not in refused.value.message
    assert load_base_model(base, device="cpu", quantization="int8") is not None  # no such rule


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_the_base_loads_quantized_and_frozen(tiny_model_dir: Path, quantization: str) -> None:
    from app.ml.quantized import quantized_layers

    model = load_base_model(tiny_model_dir, device="cpu", quantization=quantization)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7  # every linear layer of both decoder layers; lm_head stays
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_a_validation_pass_does_not_change_the_next_gradients(tiny_model_dir: Path) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel
    at the first eval-mode forward without grad, and that kernel has no backward; a base
    loads with that kernel off, so gradients are the same with or without a validation pass
    before the step (on a CPU without AVX512-BF16 the kernel never runs)."""
    from peft import LoraConfig, get_peft_model

    from worker.training.kbit import prepare_for_training

    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])

    def first_layer_grad(validate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        base = load_base_model(tiny_model_dir, device="cpu", quantization="nf4")
        base = prepare_for_training(base, gradient_checkpointing=False)
        model = get_peft_model(
            base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        )
        if validate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return next(
            p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n
        )

    assert torch.equal(first_layer_grad(False), first_layer_grad(True))


def test_training_refuses_a_base_repacked_for_inference(tiny_model_dir: Path) -> None:
    from app.ml.quantized import set_inference_kernel
    from worker.training.kbit import prepare_for_training

    base = load_base_model(tiny_model_dir, device="cpu", quantization="nf4")
    set_inference_kernel(base, True)
    with torch.no_grad():
        base(input_ids=torch.tensor([[1, 2, 3]]))
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks")
    with pytest.raises(RuntimeError, match="repacked for inference"):
        prepare_for_training(base, gradient_checkpointing=False)
