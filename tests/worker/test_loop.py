"""The LoRA training loop (worker/training/loop.py) and adapter IO (app/ml/adapters.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.errors import UnsafeModelError
from app.jobs.hyperparameters import resolve
from app.jobs.spec import SupervisedHyperparameters
from app.ml.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_adapter_dir,
    save_adapter,
)
from app.ml.loading import load_base_model
from app.schemas.jobs import Hyperparameters
from app.storage import file_sha256
from worker.training.checkpoint import MANIFEST, OPTIMIZER, RNG, STATE, verify_checkpoint
from worker.training.data import Example, encode_dataset
from worker.training.loop import CheckpointReport, StepReport, train_lora
from worker.training.packing import count_steps
from worker.training.supervised import mean_loss

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"Code for item {i}?"},
            {"role": "assistant", "content": answer},
        ]
    }
    for i, answer in enumerate(["K7-QX", "B2-LM", "Z9-TR", "H4-PW", "D1-CV"])
]


def hyperparameters(seed: int = 0, **asked) -> SupervisedHyperparameters:
    """What a job asking for `asked` (packing off) trains with."""
    return resolve(Hyperparameters(packing=False, **asked), n_examples=len(RECORDS), seed=seed)


CONFIG = hyperparameters(n_epochs=4, batch_size=2, learning_rate=3e-3, lora_r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    return encode_dataset(tokenizer, RECORDS, max_seq_length=64)


@pytest.fixture
def base(tiny_model_dir: Path):
    """A fresh frozen base: train_lora injects LoRA layers into the model it is given."""
    return load_base_model(tiny_model_dir, device="cpu")


def train(base, tokenizer, examples, out_dir: Path, config=CONFIG, **callbacks):
    return train_lora(
        model=base,
        tokenizer=tokenizer,
        train_examples=examples,
        valid_examples=examples[:2],
        hyperparameters=config,
        out_dir=out_dir,
        **callbacks,
    )


def batch_of(examples: list[Example]) -> torch.Tensor:
    width = min(len(e.input_ids) for e in examples)
    return torch.tensor([e.input_ids[:width] for e in examples])


def test_count_steps_counts_short_last_batches() -> None:
    assert count_steps(5, hyperparameters(n_epochs=3, batch_size=2)) == 9
    assert count_steps(4, hyperparameters(n_epochs=1, batch_size=4)) == 1
    accumulated = hyperparameters(n_epochs=2, batch_size=2, gradient_accumulation_steps=2)
    assert count_steps(5, accumulated) == 4  # 3 micro-batches an epoch: 2 steps


def test_mean_loss_is_the_mean_over_label_tokens(base, tokenizer, examples) -> None:
    """Our loss equals transformers' own causal-LM loss (mean over non-masked labels)."""
    short = Example(input_ids=examples[1].input_ids[:-3], labels=examples[1].labels[:-3])
    pair = [examples[0], short]
    width = max(len(e.input_ids) for e in pair)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in pair])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in pair])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in pair])
    assert len(pair[0].input_ids) != len(pair[1].input_ids)  # padding is exercised
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, labels=labels)
    ours = mean_loss(base, pair, batch_size=2, pad_token_id=pad)
    assert ours == pytest.approx(float(expected.loss), rel=1e-5)


def test_loss_is_finite_and_decreases(base, tokenizer, examples, tmp_path: Path) -> None:
    steps: list[StepReport] = []
    before = mean_loss(base, examples, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    result = train(base, tokenizer, examples, tmp_path / "out", on_step=steps.append)
    after = mean_loss(base, examples, batch_size=2, pad_token_id=tokenizer.pad_token_id)

    losses = [s.train_loss for s in steps]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert after < before - 0.2
    assert [s.step for s in steps] == list(range(1, count_steps(len(examples), CONFIG) + 1))
    assert {s.total_steps for s in steps} == {result.steps} == {len(steps)}
    assert [s.epoch for s in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    n_tokens = sum(len(e.input_ids) for e in examples)
    assert [s.trained_tokens for s in steps][2::3] == [n_tokens * k for k in (1, 2, 3, 4)]
    assert result.trained_tokens == CONFIG.n_epochs * n_tokens
    assert math.isfinite(result.train_loss) and math.isfinite(result.valid_loss)


def test_learning_rate_follows_warmup_then_schedule(
    tiny_model_dir, tokenizer, examples, tmp_path
) -> None:
    rates: dict[str, list[float]] = {}
    for kind in ("linear", "cosine", "constant"):
        config = hyperparameters(
            n_epochs=4, batch_size=2, learning_rate=1e-3, warmup_ratio=0.25, lr_scheduler=kind
        )
        steps: list[StepReport] = []
        fresh = load_base_model(tiny_model_dir, device="cpu")
        train(fresh, tokenizer, examples, tmp_path / kind, config, on_step=steps.append)
        rates[kind] = [s.learning_rate for s in steps]
    for kind, lr in rates.items():
        warmup = lr[:3]  # ceil(0.25 * 12) warmup steps
        assert warmup == sorted(warmup) and warmup[-1] < 1e-3, kind
        assert lr[3] == pytest.approx(1e-3), kind
    assert all(r == pytest.approx(1e-3) for r in rates["constant"][3:])
    for kind in ("linear", "cosine"):
        after = rates[kind][3:]
        assert after == sorted(after, reverse=True) and 0 < after[-1] < 2e-4, kind
    assert rates["cosine"][6] > rates["linear"][6]  # cosine stays higher early on


def test_same_seed_same_adapter_other_seed_other_adapter(
    tiny_model_dir, tokenizer, examples, tmp_path
) -> None:
    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        config = hyperparameters(
            n_epochs=2, batch_size=2, learning_rate=3e-3, lora_dropout=0.1, seed=seed
        )
        base = load_base_model(tiny_model_dir, device="cpu")
        result = train(base, tokenizer, examples, tmp_path / name, config)
        assert result.sha256 == file_sha256(tmp_path / name / ADAPTER_WEIGHTS)
        return load_file(tmp_path / name / ADAPTER_WEIGHTS)

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert file_sha256(tmp_path / "a" / ADAPTER_WEIGHTS) == file_sha256(
        tmp_path / "b" / ADAPTER_WEIGHTS
    )
    assert not all(torch.equal(first[k], other[k]) for k in first)


class Cancelled(Exception):
    pass


def test_on_step_raising_stops_training_and_saves_nothing(
    base, tokenizer, examples, tmp_path
) -> None:
    seen: list[int] = []
    epochs: list[CheckpointReport] = []
    cancel = Cancelled("job cancelled")

    def on_step(report: StepReport) -> None:
        seen.append(report.step)
        if report.step == 2:
            raise cancel

    out = tmp_path / "out"
    with pytest.raises(Cancelled) as caught:
        train(base, tokenizer, examples, out, on_step=on_step, on_checkpoint=epochs.append)
    assert caught.value is cancel
    assert seen == [1, 2]
    assert epochs == []
    assert not (out / ADAPTER_WEIGHTS).exists() and not (out / ADAPTER_CONFIG).exists()


def test_on_checkpoint_gets_a_loadable_snapshot_each_epoch(
    tiny_model_dir, base, tokenizer, examples, tmp_path
) -> None:
    from peft import PeftModel

    reports: list[CheckpointReport] = []
    snapshot_logits: list[torch.Tensor] = []
    ids = batch_of(examples[:2])

    def on_checkpoint(report: CheckpointReport) -> None:
        check_adapter_dir(report.checkpoint_dir)
        assert sorted(p.name for p in report.checkpoint_dir.iterdir()) == sorted(
            [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, OPTIMIZER, RNG, STATE]
        )
        verify_checkpoint(report.checkpoint_dir, manifest_sha256=report.manifest_sha256)
        fresh = load_base_model(tiny_model_dir, device="cpu")
        loaded = PeftModel.from_pretrained(fresh, report.checkpoint_dir)
        with torch.no_grad():
            snapshot_logits.append(loaded(input_ids=ids).logits)
        reports.append(report)

    result = train(base, tokenizer, examples, tmp_path / "out", on_checkpoint=on_checkpoint)

    assert [r.epoch for r in reports] == [1, 2, 3, 4]
    assert [r.step for r in reports] == [3, 6, 9, 12]
    assert all(r.valid_loss is not None and math.isfinite(r.valid_loss) for r in reports)
    assert reports[-1].valid_loss == result.valid_loss
    assert reports[-1].train_loss == result.train_loss
    assert all(not r.checkpoint_dir.exists() for r in reports)  # removed after each callback
    assert not torch.allclose(snapshot_logits[0], snapshot_logits[-1])  # snapshots differ
    with torch.no_grad():  # the last snapshot is the final adapter
        torch.testing.assert_close(snapshot_logits[-1], base(input_ids=ids).logits)


def test_no_valid_examples_means_no_valid_loss(base, tokenizer, examples, tmp_path) -> None:
    reports: list[CheckpointReport] = []
    config = hyperparameters(n_epochs=1, batch_size=4, learning_rate=1e-3)
    result = train_lora(
        model=base,
        tokenizer=tokenizer,
        train_examples=examples,
        valid_examples=[],
        hyperparameters=config,
        out_dir=tmp_path / "out",
        on_checkpoint=reports.append,
    )
    assert result.valid_loss is None and reports[0].valid_loss is None


def test_saved_adapter_reproduces_the_trained_model(
    tiny_model_dir, base, tokenizer, examples, tmp_path
) -> None:
    from peft import PeftModel

    out = tmp_path / "out"
    result = train(base, tokenizer, examples, out)

    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert result.sha256 == file_sha256(out / ADAPTER_WEIGHTS)
    ids = batch_of(examples)
    loaded = PeftModel.from_pretrained(load_base_model(tiny_model_dir, device="cpu"), out)
    untouched = load_base_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        trained_logits = base(input_ids=ids).logits  # `base` now carries the trained LoRA layers
        loaded_logits = loaded(input_ids=ids).logits
        base_logits = untouched(input_ids=ids).logits
    torch.testing.assert_close(loaded_logits, trained_logits, rtol=0, atol=1e-6)
    assert (loaded_logits - base_logits).abs().max() > 1e-2  # the adapter does something


def test_check_adapter_dir_refuses_pickled_or_partial_adapters(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeModelError, match=ADAPTER_WEIGHTS):
        check_adapter_dir(tmp_path)
    (tmp_path / ADAPTER_CONFIG).unlink()
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"x")
    with pytest.raises(UnsafeModelError, match=ADAPTER_CONFIG):
        check_adapter_dir(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    check_adapter_dir(tmp_path)


def test_save_adapter_writes_only_the_adapter_files(base, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")
    )
    digest = save_adapter(peft_model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    ]
    assert digest == file_sha256(tmp_path / "adapter" / ADAPTER_WEIGHTS)


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 10_000  # several read chunks
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
