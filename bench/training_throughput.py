"""Training throughput: our loop (packed / unpacked) vs transformers.Trainer + PEFT.

One process run, variants interleaved round by round, medians and ratios printed last:
- real (non-padding) tokens per second: ours packed, ours unpacked, HF Trainer + PEFT;
- LoRA vs full fine-tuning (our collate, all weights trained): trainable share, tokens/s;
- MFU: training FLOP/s (LoRA 4N per token, full 6N; N = non-embedding params, attention
  FLOPs ignored) as a share of the fp32 matmul rate measured in this same run;
- peak RSS: each of ours-packed, ours-unpacked and HF in a fresh child process
  (peak RSS only grows within a process, so it cannot be interleaved), twice: with glibc's
  default allocator (`--rss-runs` children per variant, interleaved, median: its dynamic
  mmap threshold keeps freed activation buffers in the heap and moves one run's peak by
  +-300 MB), and with MALLOC_MMAP_THRESHOLD_=131072 (large blocks go back to the OS on
  free, so the peak follows live tensors and repeats to the MB; it also makes training
  ~45% slower, so it is a measuring aid, not a setting for the worker).

Model: random-init Llama, hidden 512, 8 layers, 8 heads, MLP 1536 (about 27M params),
fp32 on CPU; data: `text` records of uniformly random length 16-512 tokens. Tokens/s
is measured between the end of the first step and the end of the last (setup excluded).

    python -m bench.training_throughput [--rounds 3] [--examples 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH, LR, SEED, RANK = 4, 1e-4, 0, 16
MODEL_DIR = Path(tempfile.gettempdir()) / "lf-bench-train" / "model"


def build_model() -> Path:
    from app.ml.tiny_model import build_tiny_model

    if not (MODEL_DIR / "config.json").exists():
        build_tiny_model(
            MODEL_DIR, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536
        )
    return MODEL_DIR


def make_examples(n: int) -> list:
    from worker.training.data import Example

    rng = random.Random(SEED)
    examples = []
    for _ in range(n):
        ids = [rng.randrange(7, 100) for _ in range(rng.randint(16, 512))]
        examples.append(Example(input_ids=ids, labels=list(ids)))
    return examples


def rate(stamps: list[tuple[float, int]]) -> float:
    """Tokens per second from (time at step end, tokens of that step), first step excluded."""
    tokens = sum(t for _, t in stamps[1:])
    return tokens / (stamps[-1][0] - stamps[0][0])


def run_ours(examples: list, *, packing: bool) -> float:
    from app.jobs.hyperparameters import resolve
    from app.ml.loading import load_base_model, load_tokenizer
    from app.schemas.jobs import Hyperparameters
    from worker.training.loop import train_lora
    from worker.training.segment_attention import use_segment_attention

    stamps: list[tuple[float, int]] = []
    last = [0]

    def on_step(report) -> None:
        stamps.append((time.perf_counter(), report.trained_tokens - last[0]))
        last[0] = report.trained_tokens

    asked = Hyperparameters(
        n_epochs=1, batch_size=BATCH, learning_rate=LR, lora_r=RANK, lora_alpha=2 * RANK,
        max_seq_length=512, packing=packing,
    )  # fmt: skip
    model = load_base_model(MODEL_DIR, device="cpu")
    if packing:  # as the job runner prepares a packed run (it also checks packing is exact)
        use_segment_attention(model)
    with tempfile.TemporaryDirectory() as out:
        train_lora(
            model=model, tokenizer=load_tokenizer(MODEL_DIR), train_examples=examples,
            valid_examples=[], hyperparameters=resolve(asked, n_examples=len(examples), seed=SEED),
            out_dir=Path(out), on_step=on_step,
        )  # fmt: skip
    return rate(stamps)


def run_hf(examples: list) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from app.ml.loading import load_base_model
    from worker.training.packing import epoch_order

    step_tokens: list[int] = []
    stamps: list[tuple[float, int]] = []

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        step_tokens.append(sum(len(r["input_ids"]) for r in batch))
        return {
            "input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"]))
                                       for r in batch]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"]))
                                    for r in batch]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"])
                                            + [0] * (width - len(r["input_ids"])) for r in batch]),
        }  # fmt: skip

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), step_tokens[state.global_step - 1]))

    torch.manual_seed(SEED)
    model = get_peft_model(
        load_base_model(MODEL_DIR, device="cpu"),
        LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"),
    )
    # our epoch's example order, read sequentially: both sides train on identical batches
    # (same padding, same peak width), so tokens/s and memory compare like for like
    order = epoch_order(len(examples), seed=SEED, epoch=1)
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=1,
            learning_rate=LR, optim="adamw_torch", logging_steps=10_000, save_strategy="no",
            report_to=[], seed=SEED, use_cpu=True, disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0,
            train_sampling_strategy="sequential",
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                callbacks=[Clock()]).train()  # fmt: skip
    return rate(stamps)


def run_full(examples: list) -> tuple[float, float]:
    """Full fine-tuning with our collate and loss; returns (tokens/s, trainable share)."""
    from app.ml.loading import load_base_model
    from worker.training.chunked_loss import causal_lm_loss
    from worker.training.packing import build_sequences, collate, epoch_order

    model = load_base_model(MODEL_DIR, device="cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    rows = build_sequences(examples, packing=False, max_len=512)
    order = epoch_order(len(rows), seed=SEED, epoch=1)
    stamps: list[tuple[float, int]] = []
    for start in range(0, len(order), BATCH):
        batch = collate([rows[i] for i in order[start : start + BATCH]], 0, torch.device("cpu"))
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append((time.perf_counter(), batch["real_tokens"]))
    return rate(stamps), 1.0


def lora_share() -> tuple[float, int]:
    """Trainable share of our LoRA setup, and N (non-embedding parameters of the base)."""
    from peft import LoraConfig, get_peft_model

    from app.ml.loading import load_base_model

    base = load_base_model(MODEL_DIR, device="cpu")
    n = sum(p.numel() for name, p in base.named_parameters()
            if "embed_tokens" not in name and "lm_head" not in name)  # fmt: skip
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                            target_modules="all-linear"))  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable / total, n


def matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul FLOP/s on this machine now (best of 3 timings)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def child(variant: str, n_examples: int) -> None:
    examples = make_examples(n_examples)
    speed = run_hf(examples) if variant == "hf" else run_ours(examples, packing=variant == "packed")
    print(json.dumps({"variant": variant, "peak_rss_mb": peak_rss_mb(), "tok_s": speed}))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space.

    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a child started by
    a big parent reports the parent's RSS (every variant read 2329 MB, the parent's size).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def peak_rss(variant: str, n_examples: int, threads: int, env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "bench.training_throughput", "--child", variant,
               "--examples", str(n_examples), "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def median_peak_rss(
    n_examples: int, threads: int, runs: int, env: dict[str, str], label: str
) -> dict[str, float]:
    peaks: dict[str, list[float]] = {"packed": [], "unpacked": [], "hf": []}
    for _ in range(runs):
        for variant in peaks:
            peaks[variant].append(peak_rss(variant, n_examples, threads, env))
    print(f"peak RSS MB per run ({label}): " + "; ".join(
        f"{k} {', '.join(f'{v:.0f}' for v in vs)}" for k, vs in peaks.items()))  # fmt: skip
    return {k: statistics.median(v) for k, v in peaks.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-runs", type=int, default=3)
    parser.add_argument("--child", choices=["packed", "unpacked", "hf"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build_model()
    if args.child:
        child(args.child, args.examples)
        return
    examples = make_examples(args.examples)
    share, n_params = lora_share()
    results: dict[str, list[float]] = {"packed": [], "unpacked": [], "hf": [], "full": []}
    peaks: list[float] = []
    for round_ in range(args.rounds):
        results["packed"].append(run_ours(examples, packing=True))
        results["unpacked"].append(run_ours(examples, packing=False))
        results["hf"].append(run_hf(examples))
        results["full"].append(run_full(examples)[0])
        peaks.append(matmul_peak())
        line = ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in results.items())
        print(f"round {round_ + 1}: {line}", flush=True)
    rss = median_peak_rss(args.examples, args.threads, args.rss_runs, {}, "glibc default")
    fixed = median_peak_rss(
        args.examples, args.threads, 1, {"MALLOC_MMAP_THRESHOLD_": "131072"}, "fixed mmap threshold"
    )
    med = {k: statistics.median(v) for k, v in results.items()}
    peak = statistics.median(peaks)
    real = sum(len(e.input_ids) for e in examples)
    print(f"\nmodel: {n_params / 1e6:.1f}M non-embedding params; {len(examples)} examples, "
          f"{real} real tokens, lengths 16-512; batch {BATCH}; LoRA r={RANK} all-linear; "
          f"{args.threads} threads; {args.rounds} rounds")  # fmt: skip
    for k, v in med.items():
        print(f"median tokens/s {k:9s} {v:9.1f}")
    print(f"median matmul peak  {peak / 1e9:.1f} GFLOP/s (fp32 1024^3)")
    print(f"median peak RSS MB (glibc default): ours packed {rss['packed']:.0f}, "
          f"ours unpacked {rss['unpacked']:.0f}, HF {rss['hf']:.0f}")  # fmt: skip
    print(f"peak RSS MB (fixed mmap threshold): ours packed {fixed['packed']:.0f}, "
          f"ours unpacked {fixed['unpacked']:.0f}, HF {fixed['hf']:.0f}")  # fmt: skip
    print(f"ratio ours packed / HF tokens/s:    {med['packed'] / med['hf']:.2f}  (target >= 1.5)")
    print(
        f"ratio ours unpacked / HF tokens/s:  {med['unpacked'] / med['hf']:.2f}  (target >= 0.95)"
    )
    for name, peaks in (("glibc default", rss), ("fixed mmap threshold", fixed)):
        for variant in ("packed", "unpacked"):
            print(f"ratio peak RSS ours {variant} / HF ({name}): "
                  f"{peaks[variant] / peaks['hf']:.2f}  (target <= 1.0)")  # fmt: skip
    print(f"MFU ours packed (4N/token):         {4 * n_params * med['packed'] / peak:.1%}")
    print(f"MFU ours unpacked (4N/token):       {4 * n_params * med['unpacked'] / peak:.1%}")
    print(f"MFU HF (4N/token):                  {4 * n_params * med['hf'] / peak:.1%}")
    print(f"MFU full fine-tuning (6N/token):    {6 * n_params * med['full'] / peak:.1%}")
    print(f"LoRA trainable share: {share:.2%} (full fine-tuning: 100%)")
    print(f"ratio LoRA / full fine-tuning tokens/s (both unpacked): "
          f"{med['unpacked'] / med['full']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
