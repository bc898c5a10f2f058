"""Padding waste of the batch KV cache on a mixed-length workload (issue 15, section 2).

One left-padded slab per batch (the old layout) costs every row the longest row's length;
rows grouped by length into slabs (`app/inference/padding.py`, the default) bound that. Both
layouts serve the same requests through the engine, interleaved round by round in one
process: prompts of 8-512 tokens (log-uniform, so short ones dominate as in chat traffic),
max_tokens 8-128, 16 client threads on a batch of 16, greedy, no EOS (every request runs to
its max_tokens, so both layouts do the same work). Printed per layout, summed over decode
steps: cells allocated (slab rows x capacity: padding and spare columns included), cells
of the padded width (rows x longest row), and real tokens cached; the waste ratios are
allocated / real and padded / real; then the peak allocated, forwards per step and wall
time, and whether every output is the same in both layouts.

Run: python -m bench.inference_kv_padding [--requests 96] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import string
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app.inference import InferenceEngine
from app.inference import engine as engine_module
from app.ml.tiny_model import build_tiny_model

LAYOUTS = {"one slab (old)": False, "by length (new)": True}


def workload(count: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens); the tiny tokenizer spells characters: one token each."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        length = round(2 ** rng.uniform(3, 9))  # 8 .. 512 tokens
        prompt = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(length))
        jobs.append((prompt, rng.randint(8, 128)))
    return jobs


def run(engine: InferenceEngine, jobs: list[tuple[str, int]]) -> tuple[list[str], float]:
    def one(job: tuple[str, int]) -> str:
        prompt, max_tokens = job
        return engine.generate(
            base_model="tiny", adapter=None, prompt=prompt, max_tokens=max_tokens, temperature=0
        ).text

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        texts = list(pool.map(one, jobs))
    return texts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine_module.eos_token_ids = lambda *_: frozenset()  # type: ignore[assignment]
    base = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", max_positions=1024)
    engines = {
        name: InferenceEngine(
            base_models={"tiny": str(base)},
            device="cpu",
            max_batch_size=16,
            kv_group_by_length=by_length,
        )
        for name, by_length in LAYOUTS.items()
    }
    jobs = workload(args.requests, args.seed)
    outputs: dict[str, list[str]] = {}
    walls: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for _ in range(args.rounds):
            for name, engine in engines.items():
                texts, wall = run(engine, jobs)
                outputs.setdefault(name, texts)
                assert texts == outputs[name], f"{name}: a round answered differently"
                walls[name].append(wall)
        infos = {name: engine.stats()["base_models"][0] for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()
    print(f"{args.requests} requests x {args.rounds} rounds, prompts 8-512, max_tokens 8-128")
    for name, info in infos.items():
        cache = info["kv_cache"]
        real = cache["real"]
        print(
            f"{name:>16}: allocated {cache['allocated']:>11,} padded {cache['padded']:>11,} "
            f"real {real:>11,} cells | allocated/real {cache['allocated'] / real:.2f} "
            f"padded/real {cache['padded'] / real:.2f} | peak {cache['peak_allocated']:,} "
            f"| forwards/step {cache['forwards'] / info['steps']:.2f} "
            f"| wall {min(walls[name]):.1f} s"
        )
    old, new = (infos[name]["kv_cache"] for name in LAYOUTS)
    same = outputs["one slab (old)"] == outputs["by length (new)"]
    print(f"outputs identical in both layouts: {same}")
    print(
        f"ratios new/old: allocated {new['allocated'] / old['allocated']:.2f}, "
        f"peak {new['peak_allocated'] / old['peak_allocated']:.2f}, wall "
        f"{min(walls['by length (new)']) / min(walls['one slab (old)']):.2f}"
    )


if __name__ == "__main__":
    main()
