"""Benchmarks 1 and 3: the cost of many adapters in one forward pass, and of one adapter.

1. mixed batch: 16 sequences spanning K = 1, 2, 4, 8, 16 distinct adapters vs the same
   batch on one adapter (target T(8)/T(1) <= 1.2); PEFT's `adapter_names` mixed batch is
   measured the same way as the baseline.
3. one adapter vs the bare base (target <= 1.10), prefill (16 x 64 tokens) and decode
   (16 rows, one token each over a 64-token KV cache).

Both at the forward-pass level, on the engine's own model (wrapped LoRA modules + plan +
batch KV cache), variants interleaved round by round. Run: python -m bench.inference_batch
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from app.inference.adapter_files import read_adapter
from app.inference.kv import BatchKV
from app.inference.lora import Factors, LoraState, Plan, linear_shapes, wrap_module
from app.ml.loading import load_base_model
from bench.inference_common import (
    build_adapters,
    build_base,
    interleaved,
    median,
    params_millions,
)

ROWS, PROMPT = 16, 64
KS = (1, 2, 4, 8, 16)


def engine_model(base: Path, refs) -> tuple:
    model = load_base_model(base, device="cpu")
    state, shapes = LoraState(), linear_shapes(model)
    for ref in refs:
        weights = read_adapter(ref, shapes=shapes, dtype=torch.float32, device="cpu")
        for name, (a, b, scale) in weights.modules.items():
            wrap_module(model, name, state).factors[ref.id] = Factors(a, b, scale)
    return model, state


def decode_cache(model, state, ids: torch.Tensor) -> BatchKV:
    """A batch KV cache holding `ids` (one prefill per row, as the engine builds it)."""
    kv = BatchKV(model.config.num_hidden_layers, torch.device("cpu"))
    caches = []
    state.plan = None
    with torch.inference_mode():
        for row in ids:
            out = model(input_ids=row[None], use_cache=True, logits_to_keep=1)
            caches.append((out.cache, 0))
    kv.join(caches)
    return kv


def ours(model, state, kv: BatchKV, ids: torch.Tensor):
    """prefill(keys) and decode(keys) closures over the engine's model."""
    plans: dict[tuple, Plan] = {}
    step = ids[:, :1]

    def plan(keys: tuple) -> Plan:
        return plans.setdefault(keys, Plan(keys))  # one plan per composition, as in decode

    def prefill(keys: tuple) -> None:
        state.plan = plan(keys)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def decode(keys: tuple) -> None:
        state.plan = plan(keys)
        with torch.inference_mode():
            model(
                input_ids=step,
                attention_mask=kv.attention_mask(),
                position_ids=kv.positions(),
                cache=kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )

    return prefill, decode


def peft_prefill(base: Path, refs, ids: torch.Tensor):
    import peft

    model = peft.PeftModel.from_pretrained(
        load_base_model(base, device="cpu"), str(refs[0].path), adapter_name="a0"
    )
    for index, ref in enumerate(refs[1:], start=1):
        model.load_adapter(str(ref.path), adapter_name=f"a{index}")
    model.eval()

    def run(names: list[str]) -> None:
        with torch.inference_mode():
            model(input_ids=ids, adapter_names=names, use_cache=False, logits_to_keep=1)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="", help="comma list of variant prefixes to run")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lf-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.root.mkdir(parents=True, exist_ok=True)
    base = build_base(args.root)
    refs = build_adapters(base, args.root, max(KS))
    print(
        f"model: {params_millions(base):.1f}M parameters, fp32, rank 16, "
        f"{torch.get_num_threads()} threads; batch {ROWS} x {PROMPT} tokens"
    )
    torch.manual_seed(0)
    ids = torch.randint(10, 100, (ROWS, PROMPT))
    model, state = engine_model(base, refs)
    prefill, decode = ours(model, state, decode_cache(model, state, ids), ids)
    peft_run = peft_prefill(base, refs, ids)
    keys = {k: tuple(refs[i % k].id for i in range(ROWS)) for k in KS}
    names = {k: [f"a{i % k}" for i in range(ROWS)] for k in KS}
    variants = {
        "base prefill": lambda: prefill((None,) * ROWS),
        "base decode": lambda: decode((None,) * ROWS),
    }
    for k in KS:
        variants[f"K={k} prefill"] = lambda k=k: prefill(keys[k])
        variants[f"K={k} decode"] = lambda k=k: decode(keys[k])
        variants[f"K={k} PEFT prefill"] = lambda k=k: peft_run(names[k])
    if args.only:
        prefixes = tuple(args.only.split(","))
        variants = {name: run for name, run in variants.items() if name.startswith(prefixes)}
    times = interleaved(variants, rounds=args.rounds, clock=args.clock)
    med = {name: median(values) for name, values in times.items()}
    for name, value in med.items():
        print(f"{name:>18}: {value * 1000:8.1f} ms {args.clock} (median of {args.rounds})")
    print("--- ratios (medians) ---")
    for kind in ("prefill", "decode", "PEFT prefill"):
        if any(f"K={k} {kind}" not in med for k in KS):
            continue
        one = med[f"K=1 {kind}"]
        line = "  ".join(f"T({k})/T(1)={med[f'K={k} {kind}'] / one:.2f}" for k in KS[1:])
        print(f"1. mixed batch, {kind:>12}: {line}")
    for kind in ("prefill", "decode"):
        if f"K=1 {kind}" not in med or f"base {kind}" not in med:
            continue
        print(f"3. one adapter / bare base, {kind}: {med[f'K=1 {kind}'] / med[f'base {kind}']:.3f}")


if __name__ == "__main__":
    main()
