"""Learning check: a LoRA adapter memorises ~30 fixed answers that the base never gives.

Chat examples "What is the code for item N?" → a short distinct code ("K7-QX" style).
After training, greedy decoding of each prompt (rendered with `render_prompt`, tokenized
with `add_special_tokens=False`, exactly as inference does) must reproduce the trained
answer for ≥ 90% of the items with the saved adapter, and for none with it disabled.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from app.jobs.hyperparameters import resolve
from app.jobs.spec import SupervisedHyperparameters
from app.ml.chat import render_prompt
from app.ml.loading import load_base_model, load_tokenizer
from app.ml.tiny_model import build_tiny_model
from app.schemas.jobs import Hyperparameters
from worker.training.data import encode_dataset
from worker.training.loop import train_lora
from worker.training.supervised import mean_loss

N_ITEMS = 30
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
ASKED = Hyperparameters(
    batch_size=4,
    learning_rate=3e-3,
    lora_r=16,
    lora_alpha=32,
    warmup_ratio=0.05,
    max_seq_length=64,
    packing=False,
)
# 60 epochs, past the API's bound on what a user may ask (50), one checkpoint each
CONFIG = SupervisedHyperparameters.model_validate(
    resolve(ASKED, n_examples=N_ITEMS, seed=0).model_dump() | {"n_epochs": 60, "n_checkpoints": 60}
)


def make_records() -> list[dict]:
    rng = random.Random(0)
    answers: list[str] = []
    while len(answers) < N_ITEMS:
        code = (
            f"{rng.choice(LETTERS)}{rng.randint(0, 9)}-{rng.choice(LETTERS)}{rng.choice(LETTERS)}"
        )
        if code not in answers:
            answers.append(code)
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is the code for item {i + 1}?"},
                {"role": "assistant", "content": answer},
            ]
        }
        for i, answer in enumerate(answers)
    ]


def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 12) -> str:
    """Greedy decoding without a cache, stopping at EOS."""
    ids = list(prompt_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids.append(token)
    return tokenizer.decode(new)


def accuracy(model, tokenizer, records: list[dict]) -> float:
    hits = 0
    for record in records:
        prompt = render_prompt(tokenizer, record["messages"][:1])
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        hits += greedy(model, tokenizer, prompt_ids) == record["messages"][1]["content"]
    return hits / len(records)


@pytest.mark.slow
def test_adapter_learns_fixed_answers(tmp_path: Path) -> None:
    from peft import PeftModel

    torch.set_num_threads(2)
    model_dir = build_tiny_model(tmp_path / "base", hidden_size=128, intermediate_size=256)
    tokenizer = load_tokenizer(model_dir)
    records = make_records()
    examples = encode_dataset(tokenizer, records, max_seq_length=CONFIG.max_seq_length)
    model = load_base_model(model_dir, device="cpu")
    pad = tokenizer.pad_token_id

    loss_before = mean_loss(model, examples, batch_size=8, pad_token_id=pad)
    train_lora(
        model=model,
        tokenizer=tokenizer,
        train_examples=examples,
        valid_examples=[],
        hyperparameters=CONFIG,
        out_dir=tmp_path / "adapter",
    )

    # Judge the saved artifact, on a fresh base, as the inference engine would load it.
    trained = PeftModel.from_pretrained(
        load_base_model(model_dir, device="cpu"), tmp_path / "adapter"
    )
    loss_after = mean_loss(trained, examples, batch_size=8, pad_token_id=pad)
    adapter_accuracy = accuracy(trained, tokenizer, records)
    with trained.disable_adapter():
        base_accuracy = accuracy(trained, tokenizer, records)
    print(
        f"\nmean train loss before {loss_before:.3f} after {loss_after:.3f}; "
        f"exact answers: adapter {adapter_accuracy:.0%}, base {base_accuracy:.0%}"
    )
    assert loss_after < loss_before - 1.0
    assert adapter_accuracy >= 0.9
    assert base_accuracy == 0.0
