"""The memory plan's estimate against the measured peak of real training steps, on CPU.

Each case runs in a fresh child process (a peak only grows within a process): it builds a
random-init Llama of the case's shape in memory, resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`), trains `train_lora` (the worker's loop: PEFT LoRA on every
linear, AdamW, the loss as the loop computes it) for two optimizer steps of full-length
rows, and reports the peak RSS above what the process held before the model existed:
weights, LoRA state, activations, the allocator's slack and the kernels' first-use
buffers. The estimate is `worker/training/memory_estimate.estimate` for the same shape and
settings (fp32, CPU); the ratio measured / estimate must stay below 1 (the plan must not
under-estimate) and should not sink far below it (it would refuse jobs that fit).

Each child fixes glibc's mmap threshold as the worker's job process does
(`worker/heap.py`), so the peak follows live tensors; `--live` runs each child with
MALLOC_MMAP_THRESHOLD_=131072 too (glibc's smallest threshold: the live tensors alone).

    python -m bench.memory_calibration [--cases tiny,vocab128k,...] [--live]
    python -m bench.memory_calibration --child CASE     (one measurement, JSON on stdout)

tests/worker/test_memory_estimate.py runs the small cases through `--child`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# name: (hidden, layers, heads, kv heads, MLP, vocab, micro-batch, max_seq_length, checkpointing)
CASES: dict[str, tuple[int, int, int, int, int, int, int, int, bool]] = {
    "tiny": (64, 2, 4, 4, 128, 104, 4, 256, False),
    "vocab128k": (256, 2, 4, 4, 688, 128_256, 1, 256, False),
    "activations": (512, 4, 8, 2, 1536, 1024, 4, 512, False),
    "activations-ckpt": (512, 4, 8, 2, 1536, 1024, 4, 512, True),
    "wide": (1024, 4, 16, 4, 2816, 32_000, 2, 512, False),
    "wide-ckpt": (1024, 4, 16, 4, 2816, 32_000, 2, 512, True),
}
SMALL_CASES = ("tiny", "vocab128k", "activations", "activations-ckpt")
LORA_R = 16
STEPS = 2


def hyperparameters(case: str) -> Any:
    from app.jobs.spec import SupervisedHyperparameters

    *_, micro_batch, seq, checkpointing = CASES[case]
    return SupervisedHyperparameters(
        n_epochs=1,
        batch_size=micro_batch,
        learning_rate_multiplier=1.0,
        learning_rate=1e-4,
        lora_r=LORA_R,
        lora_alpha=2 * LORA_R,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
        max_seq_length=seq,
        warmup_ratio=0.0,
        weight_decay=0.0,
        lr_scheduler="linear",
        gradient_accumulation_steps=1,
        gradient_checkpointing=checkpointing,
        packing=False,
        seed=0,
        n_checkpoints=1,
    )


def config(case: str) -> dict[str, Any]:
    hidden, layers, heads, kv_heads, mlp, vocab, *_ = CASES[case]
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": mlp,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


def estimated(case: str) -> dict[str, int]:
    from worker.training.memory_estimate import ModelShape, estimate

    shape = ModelShape.of(config(case))
    found = estimate(shape, hyperparameters(case), device="cpu")
    return found.parts() | {"total": found.total}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(case: str) -> int:
    """Peak RSS bytes of STEPS training steps above the process before the model."""
    import random
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.heap import fix_mmap_threshold
    from worker.training.data import Example
    from worker.training.loop import train_lora

    torch.set_num_threads(1)
    fix_mmap_threshold()  # as a job's process runs
    hp = hyperparameters(case)
    rng = random.Random(0)
    vocab = CASES[case][5]
    examples = []
    for _ in range(hp.batch_size * STEPS):
        ids = [rng.randrange(vocab) for _ in range(hp.max_seq_length)]
        examples.append(Example(input_ids=ids, labels=ids))
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark starts from here
    before = _status_kib("VmRSS")
    model = LlamaForCausalLM(LlamaConfig(**config(case)))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with tempfile.TemporaryDirectory() as out:
        train_lora(
            model=model,
            tokenizer=SimpleNamespace(pad_token_id=0),
            train_examples=examples,
            valid_examples=[],
            hyperparameters=hp,
            out_dir=Path(out),
        )
    return (_status_kib("VmHWM") - before) * 1024


def run_child(case: str, *, live: bool = False) -> dict[str, Any]:
    """One measurement in a fresh process; measured and estimated bytes."""
    env = dict(os.environ)
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory_calibration", "--child", case],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--live", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"case": args.child, "measured": measure(args.child),
                          "estimate": estimated(args.child)}))  # fmt: skip
        return
    mib = 1 << 20
    rows = []
    for case in args.cases.split(","):
        result = run_child(case)
        live = run_child(case, live=True)["measured"] if args.live else None
        rows.append((case, result, live))
    print(f"{'case':18} {'estimate':>9} {'measured':>9} {'ratio':>6} {'live':>7}  parts (MiB)")
    for case, result, live in rows:
        est = result["estimate"]
        parts = " ".join(f"{k}={v / mib:.0f}" for k, v in est.items() if k != "total")
        shown_live = f"{live / mib:7.0f}" if live is not None else "      -"
        print(f"{case:18} {est['total'] / mib:9.0f} {result['measured'] / mib:9.0f} "
              f"{result['measured'] / est['total']:6.2f} {shown_live}  {parts}")  # fmt: skip


if __name__ == "__main__":
    main()
