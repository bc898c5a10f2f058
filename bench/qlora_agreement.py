"""QLoRA serving combinations: how often an adapter gives the same answers on a base of
another precision than the one it trained on.

Two adapters learn the same memorisation task (question → short code, chat format) on the
tiny random-init model: one on the full-precision base, one on the nf4 base (QLoRA), same
hyperparameters and seed. Each is then served (PEFT greedy decoding, no cache) on the fp32
base, on the nf4 base as training ran it, and on the nf4 base as the engine serves it
(bitsandbytes' CPU inference kernel on, where the CPU has AVX512-BF16). Printed per
(adapter, served on): memorised answers reproduced of N, and greedy outputs equal to those
of the same adapter on its own training precision, of N memorised + N unseen prompts.

    python -m bench.qlora_agreement [--items 12] [--epochs 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel

from app.jobs.hyperparameters import resolve
from app.ml.loading import load_base_model, load_tokenizer
from app.ml.quantized import set_inference_kernel
from app.ml.tiny_model import build_tiny_model
from app.schemas.jobs import Hyperparameters
from tests.factories import chat_rows
from tests.worker.test_learning import greedy
from worker.training.data import encode_dataset
from worker.training.loop import train_lora

SERVED = {"fp32": ("none", False), "nf4": ("nf4", False), "nf4+kernel": ("nf4", True)}


def served_model(base_dir: Path, adapter: Path, served: str) -> PeftModel:
    quantization, kernel = SERVED[served]
    base = load_base_model(base_dir, device="cpu", quantization=quantization)
    if kernel:
        set_inference_kernel(base, True)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def answers(model: PeftModel, tokenizer, questions: list[str]) -> list[str]:
    from app.ml.chat import render_prompt

    out = []
    for question in questions:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": question}])
        out.append(greedy(model, tokenizer, tokenizer(prompt, add_special_tokens=False).input_ids))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lf-qlora-"))
    base_dir = build_tiny_model(work / "base")  # hidden 64, MLP 128: multiples of 64
    tokenizer = load_tokenizer(base_dir)
    rows = chat_rows(args.items)
    memorised = [row["messages"][0]["content"] for row in rows]
    codes = [row["messages"][1]["content"] for row in rows]
    unseen = [f"code for item {args.items + 100 + i}?" for i in range(args.items)]
    examples = encode_dataset(tokenizer, rows, max_seq_length=64)
    asked = Hyperparameters(n_epochs=args.epochs, batch_size=2, learning_rate=3e-3, lora_r=16)
    trained_on = {"fp32": "none", "nf4": "nf4"}
    adapters = {}
    for name, quantization in trained_on.items():
        hp = resolve(asked, n_examples=len(rows), seed=1).model_copy(
            update={"quantization": quantization, "n_checkpoints": 1}
        )
        start = time.perf_counter()
        train_lora(
            model=load_base_model(base_dir, device="cpu", quantization=quantization),
            tokenizer=tokenizer,
            train_examples=examples,
            valid_examples=[],
            hyperparameters=hp,
            out_dir=work / name,
        )
        adapters[name] = work / name
        print(f"trained on {name}: {time.perf_counter() - start:.1f} s")
    n = args.items
    print(f"\n{'adapter':<14}{'served on':<12}{'memorised':>12}{'same greedy':>14}")
    for name, adapter in adapters.items():
        own = served_model(base_dir, adapter, name)
        reference = answers(own, tokenizer, memorised + unseen)
        for served in SERVED:
            got = answers(served_model(base_dir, adapter, served), tokenizer, memorised + unseen)
            hits = sum(a == c for a, c in zip(got[:n], codes, strict=True))
            same = sum(a == b for a, b in zip(got, reference, strict=True))
            label = f"{name}-trained"
            print(f"{label:<14}{served:<12}{f'{hits}/{n}':>12}{f'{same}/{2 * n}':>14}")


if __name__ == "__main__":
    main()
