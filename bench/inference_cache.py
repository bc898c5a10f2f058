"""Benchmarks 2 and 4: resident adapters, cold loads, and a working set past the cache.

2. resident adapters: 100 loaded vs 1 loaded, the same traffic (16 concurrent requests on
   one adapter) — throughput ratio (target >= 0.95).
4. cold load of an adapter from the store (sha256 + safetensors parse + install into the
   model) vs one forward pass of the batch (target <= 1.0); a working set twice the cache
   (16 adapters, cache of 8) vs one that fits (8 adapters) — throughput ratio (>= 0.5).

End to end through `InferenceEngine` (its scheduler thread, batching, LRU), variants
interleaved round by round. Run: python -m bench.inference_cache
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from app.inference import InferenceEngine
from app.inference.adapter_files import read_adapter
from app.inference.lora import Factors, wrap_module
from bench.inference_batch import ROWS, decode_cache, engine_model, ours
from bench.inference_common import build_adapters, build_base, interleaved, median

MAX_TOKENS = 16
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "SELECT * FROM"]


def burst(engine: InferenceEngine, adapters: list) -> int:
    """Submit one request per entry at once (greedy); wait for all; tokens generated."""
    requests = [
        engine.submit(
            base_model="bench",
            adapter=ref,
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        for i, ref in enumerate(adapters)
    ]
    return sum(request.result().completion_tokens for request in requests)


def throughput(engine: InferenceEngine, waves: list[list]) -> float:
    """Generated tokens per CPU second of this process (all its threads; see README)."""
    start = time.process_time()
    tokens = sum(burst(engine, wave) for wave in waves)
    return tokens / (time.process_time() - start)


def resident(base: Path, refs: list, rounds: int) -> dict[str, float]:
    many = InferenceEngine(base_models={"bench": str(base)}, max_loaded_adapters=128)
    one = InferenceEngine(base_models={"bench": str(base)}, max_loaded_adapters=1)
    many.preload("bench", refs[:100])
    one.preload("bench", refs[:1])
    assert len(many.loaded_adapters()) == 100 and len(one.loaded_adapters()) == 1
    traffic = [[refs[0]] * ROWS] * 2
    rates: dict[str, list[float]] = {"100 loaded": [], "1 loaded": []}
    for _ in range(rounds + 1):  # the first round warms up
        for name, engine in (("100 loaded", many), ("1 loaded", one)):
            rates[name].append(throughput(engine, traffic))
    many.close()
    one.close()
    return {name: median(values[1:]) for name, values in rates.items()}


def working_set(base: Path, refs: list, rounds: int) -> dict[str, float]:
    """Waves of 8 requests on 8 distinct adapters; the cache holds 8."""
    fits = InferenceEngine(base_models={"bench": str(base)}, max_loaded_adapters=8)
    spills = InferenceEngine(base_models={"bench": str(base)}, max_loaded_adapters=8)
    fitting = [refs[:8]] * 4
    twice = [refs[:8], refs[8:16]] * 2  # every wave misses all 8
    rates: dict[str, list[float]] = {"fits (8)": [], "2x cache (16)": []}
    for _ in range(rounds + 1):
        rates["fits (8)"].append(throughput(fits, fitting))
        rates["2x cache (16)"].append(throughput(spills, twice))
    loads = sum(a["loads"] for a in spills.stats()["adapters"])
    fits.close()
    spills.close()
    print(f"   (2x cache variant loaded adapters {loads} times)")
    return {name: median(values[1:]) for name, values in rates.items()}


def cold_load(base: Path, refs: list, rounds: int) -> dict[str, float]:
    """Read + verify + install one adapter, against a decode step and a prefill of the batch."""
    from app.inference.lora import linear_shapes

    model, state = engine_model(base, refs[:1])
    shapes = linear_shapes(model)
    ids = torch.randint(10, 100, (ROWS, 64))
    prefill, decode = ours(model, state, decode_cache(model, state, ids), ids)
    ref = refs[1]
    keys = (refs[0].id,) * ROWS

    def load() -> None:
        weights = read_adapter(ref, shapes=shapes, dtype=torch.float32, device="cpu")
        for name, (a, b, scale) in weights.modules.items():
            wrap_module(model, name, state).factors[ref.id] = Factors(a, b, scale)
        for name in weights.modules:  # evict again, so every round is a cold install
            model.get_submodule(name).factors.pop(ref.id)

    times = interleaved(
        {
            "cold load": load,
            "decode step (16 rows)": lambda: decode(keys),
            "prefill (16 x 64)": lambda: prefill(keys),
        },
        rounds=rounds,
    )
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lf-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.root.mkdir(parents=True, exist_ok=True)
    base = build_base(args.root)
    refs = build_adapters(base, args.root, 100)
    print(f"{torch.get_num_threads()} threads, {MAX_TOKENS} tokens per request")
    load = cold_load(base, refs, args.rounds)
    for name, value in load.items():
        print(f"   {name}: {value * 1000:.1f} ms")
    res = resident(base, refs, args.rounds)
    for name, value in res.items():
        print(f"   {name}: {value:.1f} tokens per CPU second")
    ws = working_set(base, refs, args.rounds)
    for name, value in ws.items():
        print(f"   {name}: {value:.1f} tokens per CPU second")
    print("--- ratios (medians) ---")
    print(f"2. 100 resident / 1 resident throughput: {res['100 loaded'] / res['1 loaded']:.3f}")
    print(
        f"4. cold load / decode step: {load['cold load'] / load['decode step (16 rows)']:.2f}"
        f"   cold load / prefill: {load['cold load'] / load['prefill (16 x 64)']:.3f}"
    )
    print(f"4. working set 2x cache / fits, throughput: {ws['2x cache (16)'] / ws['fits (8)']:.3f}")


if __name__ == "__main__":
    main()
