"""GPU smoke test of the training engine: bf16 autocast and the CUDA paths, end to end.

Run on a machine with a CUDA GPU (it exits 2 without one):

    python -m bench.gpu_smoke [--examples 256]

It builds a random-init Llama (hidden 1024, 8 layers; about 100M parameters) in bf16 on
the GPU, switches it to segment attention and checks that packing is exact there (the
job runner's order: packed vs separate logits), trains LoRA for two epochs with packing,
gradient checkpointing and a checkpoint per epoch, resumes from the first checkpoint and
checks the replayed steps' losses, reloads the adapter with PEFT, trains one epoch without
packing for comparison, and prints real tokens/s, MFU against a matmul peak measured in
the same run, and peak GPU memory. A short untimed run first takes the one-off costs.

`--device cpu --small` rehearses the same path on a CPU (a 2-layer model, fp32) so the
script is known to run before a GPU session is spent on it.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer model (rehearsal)")
    args = parser.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2

    from peft import PeftModel

    from app.jobs.hyperparameters import resolve
    from app.ml.loading import load_base_model, load_tokenizer
    from app.ml.tiny_model import build_tiny_model
    from app.schemas.jobs import Hyperparameters
    from worker.training.data import Example
    from worker.training.loop import train_lora
    from worker.training.packing import packing_is_exact
    from worker.training.segment_attention import use_segment_attention

    work = Path(tempfile.mkdtemp(prefix="lf-gpu-smoke-"))
    size = (
        {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}
        if args.small
        else {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "intermediate_size": 2816}
    )
    model_dir = build_tiny_model(work / "model", **size)
    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(0)
    examples = [
        Example(input_ids=ids, labels=list(ids))
        for ids in ([rng.randrange(7, 100) for _ in range(rng.randint(16, 512))]
                    for _ in range(args.examples))
    ]  # fmt: skip

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    base = load_base_model(model_dir, device=device)
    segments = use_segment_attention(base)  # as the job runner does, before the check
    exact = packing_is_exact(base, atol=5e-2)  # bf16 weights: compare loosely
    name = torch.cuda.get_device_name() if cuda else device
    print(f"device {name}; weights {next(base.parameters()).dtype}; torch {torch.__version__}")
    print(f"segment attention: {segments}; packing exact on this model: {exact}; "
          f"cuDNN attention enabled: {torch.backends.cuda.cudnn_sdp_enabled()}")  # fmt: skip
    asked = Hyperparameters(
        n_epochs=2, batch_size=8, learning_rate=2e-4, lora_r=16, lora_alpha=32,
        max_seq_length=512, packing=exact, gradient_checkpointing=True,
    )  # fmt: skip
    config = resolve(asked, n_examples=len(examples), seed=0)

    def fresh_base():
        model = load_base_model(model_dir, device=device)
        if exact:  # packed rows train with the attention `base` was switched to
            use_segment_attention(model)
        return model

    steps, kept = [], {}

    def keep(report) -> None:
        kept[report.step] = shutil.copytree(report.checkpoint_dir, work / f"ckpt-{report.step}")

    # Untimed: CUDA context, kernel loading and first-use costs land here, not on packing.
    train_lora(
        model=fresh_base(), tokenizer=tokenizer, train_examples=examples[:16],
        valid_examples=[], hyperparameters=config, out_dir=work / "warm",
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_lora(
        model=base, tokenizer=tokenizer, train_examples=examples, valid_examples=examples[:16],
        hyperparameters=config, out_dir=work / "adapter", on_step=steps.append,
        on_checkpoint=keep,
    )  # fmt: skip
    synchronize()
    elapsed = time.perf_counter() - start
    losses = [s.train_loss for s in steps]
    assert all(torch.isfinite(torch.tensor(losses))), "non-finite loss"
    print(f"{result.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"valid {result.valid_loss:.3f}")  # fmt: skip
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    resumed = []
    first = min(kept)
    train_lora(
        model=fresh_base(), tokenizer=tokenizer, train_examples=examples, valid_examples=[],
        hyperparameters=config, out_dir=work / "resumed", on_step=resumed.append,
        resume_from=kept[first],
    )  # fmt: skip
    drift = max(
        abs(a.train_loss - b.train_loss) for a, b in zip(resumed, steps[first:], strict=True)
    )
    replayed = [s.example_ids for s in resumed] == [s.example_ids for s in steps[first:]]
    print(f"resume from step {first}: same examples in the same order: {replayed}; "
          f"max loss difference over replayed steps {drift:.2e}")  # fmt: skip

    loaded = PeftModel.from_pretrained(load_base_model(model_dir, device=device), work / "adapter")
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([examples[0].input_ids], device=device)).logits
    print(f"adapter reloaded with PEFT: logits finite {bool(torch.isfinite(logits).all())}")

    unpacked = resolve(asked.model_copy(update={"n_epochs": 1, "packing": False}),
                       n_examples=len(examples), seed=0)  # fmt: skip
    synchronize()
    start = time.perf_counter()
    plain = train_lora(
        model=load_base_model(model_dir, device=device), tokenizer=tokenizer,
        train_examples=examples, valid_examples=[], hyperparameters=unpacked,
        out_dir=work / "plain",
    )  # fmt: skip
    synchronize()
    plain_tok_s = plain.trained_tokens / (time.perf_counter() - start)

    n = sum(p.numel() for name, p in base.named_parameters()
            if "lora_" not in name and "embed" not in name and "lm_head" not in name)  # fmt: skip
    side, dtype = (4096, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(side, side, device=device, dtype=dtype)
    a @ a
    synchronize()
    t = time.perf_counter()
    for _ in range(50):
        a @ a
    synchronize()
    peak = 2 * side**3 * 50 / (time.perf_counter() - t)
    tok_s = result.trained_tokens / elapsed
    print(f"real tokens/s packed {tok_s:.0f} (2 epochs incl. validation and checkpoints)")
    print(f"real tokens/s unpacked {plain_tok_s:.0f} (1 epoch); "
          f"packed/unpacked {tok_s / plain_tok_s:.2f}")  # fmt: skip
    print(f"{dtype} matmul peak {peak / 1e12:.1f} TFLOP/s; MFU (4N/token) packed "
          f"{4 * n * tok_s / peak:.1%}, unpacked {4 * n * plain_tok_s / peak:.1%}")  # fmt: skip
    print(f"peak GPU memory (packed run) {peak_memory:.2f} GiB")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
