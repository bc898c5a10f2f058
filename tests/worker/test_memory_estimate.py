"""The memory estimate (worker/training/memory_estimate.py) and the plan built on it
(worker/training/memory_plan.py): counted against autograd, measured against real steps,
and the choices and advice they give."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from app.jobs.hyperparameters import tensor_shapes
from app.jobs.spec import SupervisedHyperparameters
from worker.training.memory_estimate import (
    GIB,
    MIB,
    ModelShape,
    estimate,
    layer_activation_elements,
    lora_parameters,
)
from worker.training.memory_plan import (
    MIN_MICRO_BATCH_TOKENS,
    candidates,
    changes_that_fit,
    does_not_fit,
    leanest,
    plan,
)

# Llama 3.2 1B's shape (issue 15 §4), from its config's sizes alone
LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128_256,
    "tie_word_embeddings": True,
}


def hp(**asked) -> SupervisedHyperparameters:
    values = {
        "n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0, "learning_rate": 1e-4,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "max_seq_length": 2048, "warmup_ratio": 0.0, "weight_decay": 0.0,
        "lr_scheduler": "linear", "seed": 0, "n_checkpoints": 1,
        "gradient_checkpointing": "auto", "gradient_accumulation_steps": "auto",
    }  # fmt: skip
    return SupervisedHyperparameters(**(values | asked))


def test_the_shape_from_weights_matches_the_shape_from_the_config(tiny_model_dir: Path) -> None:
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    from_weights = ModelShape.of(config, tensor_shapes(tiny_model_dir))
    from_config = ModelShape.of(config)
    assert from_weights.n_params == from_config.n_params > 0
    assert sorted(from_weights.linears) == sorted(from_config.linears)
    assert len(from_weights.linears) == 7 * config["num_hidden_layers"]


def test_the_1b_shape_has_about_1_2_billion_parameters() -> None:
    shape = ModelShape.of(LLAMA_1B)
    assert 1.2e9 < shape.n_params < 1.3e9  # Llama 3.2 1B: 1.24 B with tied embeddings
    # LoRA r=16 on every linear: r * (in + out) summed, ~11 M
    assert lora_parameters(shape, 16, "all-linear") == 16 * 16 * (
        (2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3
    )
    assert lora_parameters(shape, 16, ["q_proj", "v_proj"]) == 16 * 16 * (4096 + 2560)


@pytest.mark.parametrize(
    ("hidden", "heads", "kv_heads", "mlp", "dropout"),
    [(256, 4, 4, 512, 0.0), (512, 8, 2, 1536, 0.0), (384, 6, 2, 1024, 0.1)],
)
def test_saved_activations_per_layer_match_what_autograd_saves(
    hidden, heads, kv_heads, mlp, dropout
) -> None:
    """The per-layer count is what `saved_tensors_hooks` sees a LoRA'd Llama layer save
    (parameters excluded, each storage once), within 2%: one layer's worth is the
    difference between a 2-layer and a 1-layer model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = 64

    def saved_bytes(layers: int) -> int:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads,
        )  # fmt: skip
        model = LlamaForCausalLM(config).requires_grad_(False)
        lora = LoraConfig(r=8, target_modules="all-linear", lora_dropout=dropout)
        peft_model = get_peft_model(model, lora).train()
        params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            peft_model(input_ids=torch.randint(0, 64, (1, tokens)), use_cache=False)
        return sum(seen.values())

    measured = (saved_bytes(2) - saved_bytes(1)) / tokens / 4  # fp32 elements per token
    shape = ModelShape.of(
        {"hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": heads,
         "num_key_value_heads": kv_heads, "intermediate_size": mlp, "vocab_size": 64}
    )  # fmt: skip
    counted = layer_activation_elements(shape, hp(lora_r=8, lora_dropout=dropout))
    assert counted == pytest.approx(measured, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny", "vocab128k", "activations", "activations-ckpt"])
def test_the_estimate_bounds_the_measured_peak_of_real_steps(case: str) -> None:
    """Two `train_lora` steps in a fresh process with glibc's mmap threshold fixed as a
    job's process fixes it (bench/memory_calibration.py): the peak RSS they add never
    passes the estimate, and the estimate is at most 25 % above it (an estimate far above
    the truth would refuse jobs that fit)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.memory_calibration import run_child

    result = run_child(case)
    measured, estimated = result["measured"], result["estimate"]["total"]
    assert estimated <= 1.25 * measured, (case, measured / MIB, estimated / MIB)
    assert measured <= estimated, (case, measured / MIB, estimated / MIB)


def test_the_cpu_estimate_grows_smoothly_with_the_micro_batch() -> None:
    """No step in the estimate as tokens grow (a heap-slack rule keyed to a 32 MiB
    tensor once jumped by ~8 GiB at 1B between 1 x 2048 and 2 x 2048 tokens)."""
    shape = ModelShape.of(LLAMA_1B)
    for checkpointing in (True, False):
        totals = [
            estimate(shape, hp(batch_size=1, max_seq_length=n,
                               gradient_checkpointing=checkpointing), device="cpu").total
            for n in range(512, 8193, 256)
        ]  # fmt: skip
        steps = [b - a for a, b in itertools.pairwise(totals)]
        assert all(0 < step <= 1.01 * steps[-1] for step in steps)  # linear in tokens, or less


def test_the_1b_bench_job_fits_in_12_gib_on_cpu() -> None:
    """bench/scale_cpu.py's job (2 examples of ~1000 tokens, max_seq_length 2048,
    checkpointing on) on a 24 GiB machine with ~12 GiB free: planned, not refused. Its
    measured peak was 5.6 GiB above the process before the model (docs/design.md 4.11)."""
    shape = ModelShape.of(LLAMA_1B)
    asked = hp(batch_size=2, gradient_checkpointing=True)
    chosen = plan(shape, asked, device="cpu", available=12 * GIB)
    assert chosen is not None
    assert 5.6 * GIB <= chosen.estimate.total <= 1.25 * 5.6 * GIB


def test_the_logits_phase_is_one_chunk_of_the_loss() -> None:
    """Llama 3.2 1B at 2048 tokens on a GPU: the loss takes 261 tokens' logits at a time
    (worker/training/chunked_loss.py), so the logits phase is 4 x 261 x 128k, not 4 x 2048
    x 128k; a model whose forward soft-caps its logits takes them whole. nf4 cuts the
    weights ~3x."""
    shape = ModelShape.of(LLAMA_1B)
    full = estimate(shape, hp(batch_size=1, gradient_checkpointing=True), device="cuda")
    assert shape.loss_chunk == 261
    assert 261 * 128_256 * 14 < full.transient < 2 * 261 * 128_256 * 14
    capped = ModelShape.of(LLAMA_1B | {"final_logit_softcapping": 30.0})
    whole = estimate(capped, hp(batch_size=1, gradient_checkpointing=True), device="cuda")
    assert capped.loss_chunk is None and whole.transient > 2048 * 128_256 * 14
    nf4 = estimate(
        shape,
        hp(batch_size=1, gradient_checkpointing=True, quantization="nf4"),
        device="cuda",
    )
    # the linears go from 2 bytes to ~0.52, the (tied) embedding stays bf16
    assert nf4.weights < 0.55 * full.weights


def test_the_plan_keeps_the_batch_and_prefers_the_fastest_setting_that_fits() -> None:
    shape = ModelShape.of(LLAMA_1B)
    asked = hp(batch_size=8, max_seq_length=2048)
    settings = candidates(asked)
    assert {(c.batch_size * c.accumulation) for c in settings} == {8}  # the batch asked
    first = settings[0]
    assert (first.checkpointing, first.batch_size) == (False, 8)
    # micro-batches under MIN_MICRO_BATCH_TOKENS come after checkpointing
    busy = [c for c in settings if not c.checkpointing][: len(settings) // 2]
    assert all(c.batch_size * 2048 >= MIN_MICRO_BATCH_TOKENS for c in busy[:3])
    plenty = plan(shape, asked, device="cuda", available=1 << 50)
    assert plenty is not None and plenty.hyperparameters == first
    lean = leanest(asked)
    assert (lean.checkpointing, lean.batch_size, lean.accumulation) == (True, 1, 8)
    need = estimate(shape, lean, device="cuda").total
    assert plan(shape, asked, device="cuda", available=need - 1) is None
    tight = plan(shape, asked, device="cuda", available=40 * GIB)
    assert tight is not None and tight.estimate.total <= 40 * GIB
    better = settings[: settings.index(tight.hyperparameters)]
    assert all(estimate(shape, c, device="cuda").total > 40 * GIB for c in better)


def test_fixed_knobs_are_only_checked() -> None:
    asked = hp(batch_size=4, gradient_checkpointing=False, gradient_accumulation_steps=3)
    [only] = candidates(asked)
    assert (only.checkpointing, only.batch_size, only.accumulation) == (False, 4, 3)


def test_the_advice_is_the_smallest_change_that_fits() -> None:
    shape = ModelShape.of(LLAMA_1B)
    asked = hp(batch_size=1, max_seq_length=8192)
    lean = leanest(asked)
    # a budget where nf4 fits but int8 does not
    int8 = estimate(shape, lean.model_copy(update={"quantization": "int8"}), device="cuda")
    nf4 = estimate(shape, lean.model_copy(update={"quantization": "nf4"}), device="cuda")
    budget = (int8.total + nf4.total) // 2
    changes = changes_that_fit(shape, lean, device="cuda", budget=budget)
    assert changes[0].text == "set quantization=nf4"
    seq = next(c for c in changes if c.param == "max_seq_length")
    longest = int(seq.text.rsplit(" ", 1)[-1])
    assert longest % 64 == 0 and seq.estimate.total <= budget
    longer = lean.model_copy(update={"max_seq_length": longest + 64})
    assert estimate(shape, longer, device="cuda").total > budget
    message, param = does_not_fit(shape, asked, device="cuda", available=budget)
    assert param == "hyperparameters.quantization"
    assert "Smallest change that fits: set quantization=nf4" in message
    assert f"max_seq_length ≤ {longest}" in message


def test_nothing_fits_names_the_weights() -> None:
    shape = ModelShape.of(LLAMA_1B)
    message, param = does_not_fit(shape, hp(), device="cuda", available=256 * MIB)
    assert param == "model" and "No single change fits" in message


def test_a_split_batch_trains_the_same_adapter(tiny_model_dir: Path, tokenizer, tmp_path) -> None:
    """gradient_accumulation_steps "auto" splits batch_size: the same examples per step and
    the loss over all their label tokens, so the adapter equals the unsplit run's."""
    import torch
    from safetensors.torch import load_file

    from app.ml.loading import load_base_model
    from worker.training.data import encode_dataset
    from worker.training.loop import train_lora

    rows = [
        {"messages": [{"role": "user", "content": f"item {i}?"},
                      {"role": "assistant", "content": f"K{i}-{'Q' * i}"}]}
        for i in range(8)
    ]  # fmt: skip
    examples = encode_dataset(tokenizer, rows, max_seq_length=64, train_on_inputs=False)
    weights = []
    for batch, steps in ((4, 1), (2, 2), (1, 4)):
        settings = hp(n_epochs=2, batch_size=batch, gradient_accumulation_steps=steps,
                      gradient_checkpointing=False, max_seq_length=64, learning_rate=1e-2,
                      packing=False, lora_r=4, lora_alpha=8)  # fmt: skip
        out = tmp_path / f"b{batch}"
        train_lora(
            model=load_base_model(tiny_model_dir, device="cpu"),
            tokenizer=tokenizer,
            train_examples=examples,
            valid_examples=[],
            hyperparameters=settings,
            out_dir=out,
        )
        weights.append(load_file(out / "adapter_model.safetensors"))
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for key, value in weights[0].items():
            assert torch.allclose(other[key], value, atol=1e-5), key


def test_free_memory_is_what_the_kernel_says_at_most_the_cap() -> None:
    from worker.job_memory import CAP_SETTING, free_memory

    meminfo = Path("/proc/meminfo").read_text()
    available = int(
        next(x for x in meminfo.splitlines() if x.startswith("MemAvailable")).split()[1]
    )
    free = free_memory("cpu", 0)
    assert 0 < free.bytes <= 2 * available * 1024  # it moves between the two reads
    capped = free_memory("cpu", 1 << 20)
    assert (capped.bytes, capped.limited_by) == (1 << 20, CAP_SETTING)


def test_what_counts_as_out_of_memory() -> None:
    import torch

    from worker.job_memory import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 bytes"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))
