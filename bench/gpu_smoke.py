"""GPU smoke test of the training engine: bf16 autocast and the CUDA paths, end to end.

Run on a machine with a CUDA GPU (it exits 2 without one):

    python -m bench.gpu_smoke [--examples 256]

It builds a random-init Llama (hidden 1024, 8 layers; about 100M parameters) in bf16 on
the GPU, checks that packing is exact there (packed vs separate logits), trains LoRA for
a couple of epochs with packing, gradient checkpointing and a checkpoint per epoch,
resumes from the first checkpoint and checks the replayed steps' losses, reloads the
adapter with PEFT, and prints real tokens/s, MFU against a bf16 matmul peak measured in
the same run, and peak GPU memory.
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2

    from peft import PeftModel

    from app.ml.loading import load_base_model, load_tokenizer
    from app.ml.tiny_model import build_tiny_model
    from worker.training.data import Example
    from worker.training.loop import TrainConfig, train_lora
    from worker.training.packing import packing_is_exact

    work = Path(tempfile.mkdtemp(prefix="lf-gpu-smoke-"))
    model_dir = build_tiny_model(
        work / "model", hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816
    )
    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(0)
    examples = [
        Example(input_ids=ids, labels=list(ids))
        for ids in ([rng.randrange(7, 100) for _ in range(rng.randint(16, 512))]
                    for _ in range(args.examples))
    ]  # fmt: skip
    base = load_base_model(model_dir, device="cuda")
    exact = packing_is_exact(base, atol=5e-2)  # bf16 weights: compare loosely
    print(f"device {torch.cuda.get_device_name()}; packing exact on this model: {exact}")
    config = TrainConfig(
        n_epochs=2, batch_size=8, learning_rate=2e-4, lora_r=16, lora_alpha=32,
        max_seq_length=512, packing=exact, gradient_checkpointing=True, seed=0,
    )  # fmt: skip
    steps, kept = [], {}

    def keep(report) -> None:  # type: ignore[no-untyped-def]
        kept[report.step] = shutil.copytree(report.checkpoint_dir, work / f"ckpt-{report.step}")

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_lora(
        model=base, tokenizer=tokenizer, train_examples=examples, valid_examples=examples[:16],
        config=config, out_dir=work / "adapter", on_step=steps.append, on_checkpoint=keep,
    )  # fmt: skip
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    losses = [s.train_loss for s in steps]
    assert all(torch.isfinite(torch.tensor(losses))), "non-finite loss"
    print(f"{result.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"valid {result.valid_loss:.3f}")  # fmt: skip

    resumed = []
    first = min(kept)
    train_lora(
        model=load_base_model(model_dir, device="cuda"), tokenizer=tokenizer,
        train_examples=examples, valid_examples=[], config=config, out_dir=work / "resumed",
        on_step=resumed.append, resume_from=kept[first],
    )  # fmt: skip
    drift = max(
        abs(a.train_loss - b.train_loss) for a, b in zip(resumed, steps[first:], strict=True)
    )
    print(f"resume from step {first}: max loss difference over replayed steps {drift:.2e}")

    loaded = PeftModel.from_pretrained(load_base_model(model_dir, device="cuda"), work / "adapter")
    with torch.no_grad():
        loaded(input_ids=torch.tensor([examples[0].input_ids], device="cuda"))
    n = sum(p.numel() for name, p in base.named_parameters()
            if "lora_" not in name and "embed" not in name and "lm_head" not in name)  # fmt: skip
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        a @ a
    torch.cuda.synchronize()
    peak = 2 * 4096**3 * 50 / (time.perf_counter() - t)
    tok_s = result.trained_tokens / elapsed
    print(f"real tokens/s {tok_s:.0f} (whole run incl. validation and checkpoints)")
    print(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; MFU (4N/token) {4 * n * tok_s / peak:.1%}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
