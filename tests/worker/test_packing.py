"""Packing: rows hold several examples, each attending only to itself (exact)."""

from __future__ import annotations

import pytest
import torch

from app.ml.loading import load_base_model
from tests.leaky_model import LeakyLM
from worker.training.chunked_loss import token_loss
from worker.training.data import IGNORE_INDEX, Example, encode_dataset
from worker.training.packing import build_sequences, collate, packing_is_exact
from worker.training.supervised import mean_loss

RECORDS = [{"text": "x" * n} for n in (3, 40, 7, 25, 12, 60, 5, 18, 33, 9)]


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    return encode_dataset(tokenizer, RECORDS, max_seq_length=64)


def test_packing_fills_rows_and_keeps_every_example_once(examples) -> None:
    rows = build_sequences(examples, packing=True, max_len=64)
    assert sorted(i for r in rows for i in r.example_ids) == list(range(len(examples)))
    assert all(len(r.input_ids) <= 64 for r in rows)
    assert len(rows) < len(examples)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)
    for row in rows:
        starts = [k for k, p in enumerate(row.position_ids) if p == 0]
        assert len(starts) == len(row.example_ids)  # positions restart per example
        for k in starts[1:]:  # no loss across a boundary
            assert row.labels[k] == IGNORE_INDEX


def test_without_packing_each_example_is_its_own_row(examples) -> None:
    rows = build_sequences(examples, packing=False, max_len=64)
    assert [r.example_ids for r in rows] == [[i] for i in range(len(examples))]
    assert all(r.position_ids == list(range(len(r.input_ids))) for r in rows)


def test_packed_loss_equals_unpacked_loss(tiny_model_dir, examples, tokenizer) -> None:
    """Per-token losses of packed rows are those of the examples run one by one."""
    model = load_base_model(tiny_model_dir, device="cpu")
    assert packing_is_exact(model)
    rows = build_sequences(examples, packing=True, max_len=64)
    assert_packed_loss_is_the_loss_alone(model, rows, examples, tokenizer)


def assert_packed_loss_is_the_loss_alone(model, rows, examples, tokenizer) -> None:
    batch = collate(rows, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    packed_sum, packed_count = token_loss(logits, batch["labels"])
    alone = mean_loss(model, examples, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    assert float(packed_sum) / packed_count == pytest.approx(alone, rel=1e-5)
    assert batch["real_tokens"] == sum(len(e.input_ids) for e in examples)


def test_steps_take_every_example_once_an_epoch_and_resume_where_they_stopped(examples) -> None:
    from app.jobs.hyperparameters import resolve
    from app.schemas.jobs import Hyperparameters
    from worker.training.packing import count_steps, steps

    asked = Hyperparameters(n_epochs=3, batch_size=3, gradient_accumulation_steps=2, packing=True)
    hp = resolve(asked, n_examples=len(examples), seed=4)
    run = list(steps(examples, hp, max_len=64))
    # 10 examples: 4 micro-batches of up to 3, so 2 optimizer steps an epoch
    assert len(run) == count_steps(len(examples), hp) == 6
    assert [s.ends_epoch for s in run] == [False, True] * 3
    for epoch in (1, 2, 3):
        rows = [row for s in run if s.epoch == epoch for micro in s.micro_batches for row in micro]
        assert sorted(i for row in rows for i in row.example_ids) == list(range(len(examples)))
    assert list(steps(examples, hp, max_len=64, epoch=2, next_batch=2)) == run[3:]


def test_a_model_that_leaks_across_examples_is_not_packed() -> None:
    assert not packing_is_exact(LeakyLM())


def test_training_packed_equals_training_unpacked(tiny_model_dir, examples, tokenizer, tmp_path):
    """Packing only removes padding: same steps, same examples, same losses, same adapter."""
    from safetensors.torch import load_file

    from app.jobs.hyperparameters import resolve
    from app.schemas.jobs import Hyperparameters
    from worker.training.loop import train_lora
    from worker.training.packing import enable_packing

    runs = {}
    for packing in (False, True):
        steps: list = []
        asked = Hyperparameters(
            n_epochs=2, batch_size=4, learning_rate=3e-3, max_seq_length=64, packing=packing
        )
        model = load_base_model(tiny_model_dir, device="cpu")
        if packing:  # as the job runner prepares the model
            assert enable_packing(model)
        train_lora(
            model=model, tokenizer=tokenizer, train_examples=examples, valid_examples=[],
            hyperparameters=resolve(asked, n_examples=len(examples), seed=0),
            out_dir=tmp_path / str(packing), on_step=steps.append,
        )  # fmt: skip
        runs[packing] = (steps, load_file(tmp_path / str(packing) / "adapter_model.safetensors"))
    (plain, plain_w), (packed, packed_w) = runs[False], runs[True]
    assert [s.example_ids for s in plain] != [] and len(plain) == len(packed) == 6
    assert [sorted(s.example_ids) for s in plain] == [sorted(s.example_ids) for s in packed]
    for a, b in zip(plain, packed, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
        assert b.trained_tokens == a.trained_tokens  # real tokens only, padding never counted
    # float sums run in another order in packed rows; Adam's normalisation lifts that
    # ~1e-7 gradient noise to ~1e-5 in the weights after 6 steps at lr 3e-3
    assert max(float((plain_w[k] - packed_w[k]).abs().max()) for k in plain_w) < 1e-4


def test_segment_attention_is_exact_and_packs_a_micro_batch_into_one_row(
    tiny_model_dir, examples, tokenizer
) -> None:
    """Causal attention per example: a packed row's losses are those of its examples run
    alone, with the whole batch in one unpadded row."""
    from worker.training.packing import row_length
    from worker.training.segment_attention import NAME, use_segment_attention

    model = load_base_model(tiny_model_dir, device="cpu")
    assert row_length(model, 64) == 64  # stock sdpa: rows bounded by the [W, W] mask
    assert use_segment_attention(model) and model.config._attn_implementation == NAME
    assert packing_is_exact(model) and row_length(model, 64) is None
    [row] = build_sequences(examples, packing=True, max_len=None)
    assert row.example_ids == list(range(len(examples)))
    assert_packed_loss_is_the_loss_alone(model, [row], examples, tokenizer)


def test_segment_attention_leaves_masked_and_cached_calls_to_sdpa(tiny_model_dir) -> None:
    """A padded batch with an attention mask, a batch with no position ids, and generation
    with a KV cache are unchanged."""
    from worker.training.segment_attention import use_segment_attention

    model = load_base_model(tiny_model_dir, device="cpu").eval()
    ids = torch.tensor([[5, 9, 11, 3, 7], [0, 0, 4, 8, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            plain = model(input_ids=ids).logits  # no mask, [1, W] position ids for both rows
            generated = model.generate(
                input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False
            )
        return logits, plain, generated

    before = run()
    assert use_segment_attention(model)
    after = run()
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert torch.allclose(before[1], after[1], atol=1e-6)
    assert torch.equal(before[2], after[2])
