"""The chunked loss (worker/training/chunked_loss.py) equals the loss over whole logits,
in value and in every trainable gradient, and never keeps [tokens x vocab] for backward."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model

from app.ml.loading import load_base_model
from worker.training.chunked_loss import causal_lm_loss, token_loss
from worker.training.data import encode_dataset
from worker.training.packing import build_sequences, collate

# chat records: the prompt tokens are not labels, so the label positions are scattered
RECORDS = [
    {"messages": [{"role": "user", "content": f"Item {i}?" + "x" * (i * 7 % 23)},
                  {"role": "assistant", "content": "A" * (3 + i % 5) + str(i)}]}
    for i in range(6)
]  # fmt: skip


def lora_model(tiny_model_dir, targets):
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    model = get_peft_model(load_base_model(tiny_model_dir, device="cpu"), config)
    for param in model.parameters():  # B starts at zero: make every LoRA layer count
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(1))
    return model.train()


def batch_of(tokenizer, *, packing: bool):
    examples = encode_dataset(tokenizer, RECORDS, max_seq_length=64)
    rows = build_sequences(examples, packing=packing, max_len=64)
    return collate(rows, tokenizer.pad_token_id, torch.device("cpu"))


def loss_and_grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss, count = loss_of()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), count, grads


def whole_logits(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    return token_loss(model(**inputs, use_cache=False).logits, batch["labels"])


@pytest.mark.parametrize(
    ("targets", "packing"),
    [("all-linear", True), ("all-linear", False), (["q_proj", "down_proj", "lm_head"], True)],
)
def test_chunked_loss_and_gradients_equal_the_whole_logits_ones(
    tiny_model_dir, tokenizer, targets, packing
) -> None:
    model = lora_model(tiny_model_dir, targets)
    batch = batch_of(tokenizer, packing=packing)
    want, want_count, want_grads = loss_and_grads(model, lambda: whole_logits(model, batch))
    assert want_count > 7  # chunks of 3 tokens: several, the last one partial
    for chunk in (3, 7, 10_000):  # many chunks (recomputed in backward), and one
        chunked = partial(causal_lm_loss, model, batch, chunk=chunk)
        got, count, grads = loss_and_grads(model, chunked)
        assert count == want_count
        assert got == pytest.approx(want, rel=1e-5)
        assert grads.keys() == want_grads.keys()
        if "lm_head" in targets:
            assert any("lm_head" in name for name in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_tensor_of_vocabulary_width_is_kept_for_backward(tiny_model_dir, tokenizer) -> None:
    """What autograd saves from the forward (checkpointed chunks save only their inputs):
    with whole logits the log-softmax ([tokens, vocab]) is among it, chunked nothing is."""
    model = lora_model(tiny_model_dir, "all-linear")
    batch = batch_of(tokenizer, packing=True)
    vocab = model.config.vocab_size

    def widths_saved(loss_of) -> set[int]:
        shapes: list[tuple[int, ...]] = []

        def pack(tensor):
            shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of()
        return {s[-1] for s in shapes if len(s) >= 2 and s[-2] > 1}

    assert vocab in widths_saved(lambda: whole_logits(model, batch))
    assert vocab not in widths_saved(lambda: causal_lm_loss(model, batch, chunk=3))


def test_a_model_without_a_separate_decoder_gets_the_whole_logits_loss(tokenizer) -> None:
    from tests.leaky_model import LeakyLM

    model = LeakyLM()
    batch = batch_of(tokenizer, packing=False)
    batch["input_ids"] = batch["input_ids"] % 50
    want = whole_logits(model, batch)
    got = causal_lm_loss(model, batch, chunk=3)
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6) and got[1] == want[1]
