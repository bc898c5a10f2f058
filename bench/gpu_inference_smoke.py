"""GPU smoke test of the inference engine: the batched multi-adapter path on CUDA.

Run on a machine with a CUDA GPU (it exits 2 without one):

    python -m bench.gpu_inference_smoke [--requests 512]

The bench model (bench.inference_common: ~30M parameters, bf16 on the GPU) with 8 rank-16
adapters (random, non-zero B). For every (adapter or base, prompt) it takes two references:
the engine with that request alone, and PEFT (`set_adapter` + greedy `generate`). Then
`--requests` greedy requests from 16 threads, spread over the 8 adapters and the base, go
through the engine at once; each output is compared with its own references. A mismatch
is reported with the length of the prefix it shares with its own reference and with the
closest other (adapter, prompt)'s: a mix-up would match another reference better than its
own, bf16 rounding only shortens the shared prefix. Prints throughput alone vs batched.

`--device cpu` rehearses the same path on a CPU (fp32).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Dear team,"]
MAX_TOKENS = 32


def shared_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def peft_references(base: Path, refs, device: str) -> dict:
    import peft

    from app.ml.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = peft.PeftModel.from_pretrained(
        load_base_model(base, device=device), str(refs[0].path), adapter_name=refs[0].id
    )
    for ref in refs[1:]:
        model.load_adapter(str(ref.path), adapter_name=ref.id)
    model.eval()
    out = {}
    for ref in [None, *refs]:
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
            greedy = {"input_ids": ids, "max_new_tokens": MAX_TOKENS, "do_sample": False}
            with torch.inference_mode():
                if ref is None:
                    with model.disable_adapter():
                        gen = model.generate(**greedy)
                else:
                    model.set_adapter(ref.id)
                    gen = model.generate(**greedy)
            out[(ref.id if ref else None, prompt)] = tokenizer.decode(
                gen[0, ids.shape[1] :], skip_special_tokens=True
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lf-gpu-inf")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2

    from app.inference import InferenceEngine
    from bench.inference_common import build_adapters, build_base

    args.root.mkdir(parents=True, exist_ok=True)
    base = build_base(args.root)
    refs = build_adapters(base, args.root, 8)
    engine = InferenceEngine(
        base_models={"bench": str(base)},
        max_loaded_adapters=8,
        max_batch_size=16,
        device=args.device,
    )
    choices = [None, *refs]

    def run(job):
        adapter, prompt = job
        return engine.generate(
            base_model="bench", adapter=adapter, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )

    try:
        run((None, PROMPTS[0]))  # load the base, warm the kernels
        engine.preload("bench", refs)
        pairs = [(ref, prompt) for ref in choices for prompt in PROMPTS]
        start = time.perf_counter()
        alone = {(r.id if r else None, p): run((r, p)) for r, p in pairs}
        alone_s = time.perf_counter() - start
        alone_tokens = sum(g.completion_tokens for g in alone.values())
        rng = random.Random(0)
        jobs = [(rng.choice(choices), rng.choice(PROMPTS)) for _ in range(args.requests)]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=16) as pool:
            batched = list(pool.map(run, jobs))
        batched_s = time.perf_counter() - start
        info = engine.stats()["base_models"][0]
    finally:
        engine.close()
    reference = {key: g.text for key, g in alone.items()}
    via_peft = peft_references(base, refs, args.device)

    same_as_peft = sum(reference[k] == via_peft[k] for k in reference)
    print(f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}; "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"engine alone == PEFT generate: {same_as_peft}/{len(reference)} (adapter, prompt) pairs")
    mismatches, closer_to_other = 0, 0
    for (adapter, prompt), got in zip(jobs, batched, strict=True):
        key = (adapter.id if adapter else None, prompt)
        if got.text == reference[key]:
            continue
        mismatches += 1
        own = shared_prefix(got.text, reference[key])
        other = max(shared_prefix(got.text, text) for k, text in reference.items() if k != key)
        closer_to_other += other > own
    print(f"batched == engine alone: {len(jobs) - mismatches}/{len(jobs)}; mismatches sharing "
          f"more with another request's reference than their own: {closer_to_other}")  # fmt: skip
    batched_tokens = sum(g.completion_tokens for g in batched)
    print(f"peak batch {info['peak_batch']}, mixed-adapter steps {info['mixed_steps']}")
    print(f"alone: {alone_tokens / alone_s:.0f} tokens/s; 16 clients over 8 adapters + base: "
          f"{batched_tokens / batched_s:.0f} tokens/s; ratio "
          f"{(batched_tokens / batched_s) / (alone_tokens / alone_s):.2f}")  # fmt: skip
    return 0 if closer_to_other == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
