"""Turns in the decode forwards (`app/inference/turns.py`) against every slab every step.

Two busy tenants (org-a, org-b), each with long generations of three very different prompt
lengths (so each holds three KV slabs of its own), while a third (org-c) sends 5-token completions
one after another. Both rules serve the same requests in one process, interleaved round by
round, on one torch thread. Printed per rule: the busy tenants' generated tokens per second
(throughput), org-c's median 5-token latency, and the share of the forwards each busy
tenant's rows took part in; then the ratios turns / every slab. Greedy and no EOS, so both
rules do the same work, and the outputs are checked equal.

Run: python -m bench.inference_turns [--rounds 2] [--long-tokens 200] [--probes 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.inference import InferenceEngine, turns
from app.inference import engine as engine_module
from app.inference import scheduler as scheduler_module
from app.ml.tiny_model import build_tiny_model
from tests.factories import ask_tiny

# characters = tokens with the tiny tokenizer: each length its own KV slab, each tenant its own
PROMPTS = {"org-a": (20, 150, 400), "org-b": (70, 260, 600)}


class EverySlab(turns.Turns):
    """The rule before turns: every slab, every step (still longest waiting first)."""

    def choose(self, slab_owners: Sequence[Collection[Hashable]], waited: Sequence[int]):
        return sorted(range(len(slab_owners)), key=lambda index: -waited[index])


RULES = {"every slab": EverySlab, "turns": turns.Turns}


def serve(base: Path, rule: type[turns.Turns], long_tokens: int, probes: int) -> dict:
    scheduler_module.Turns = rule  # type: ignore[misc]
    engine = InferenceEngine(base_models={"tiny": str(base)}, device="cpu", max_batch_size=16)

    def ask(owner: str, prompt: str, max_tokens: int) -> str:
        return ask_tiny(engine, owner=owner, prompt=prompt, max_tokens=max_tokens).result().text

    jobs = [(org, "x" * n) for org, lengths in PROMPTS.items() for n in lengths for _ in range(2)]
    try:
        ask("org-c", "warm", 2)
        done = threading.Event()
        latencies: list[float] = []

        def victim() -> None:
            for _ in range(probes):
                if done.is_set():
                    return
                start = time.perf_counter()
                ask("org-c", "Once upon a time", 5)
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

        start = time.perf_counter()
        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            probe = pool.submit(victim)
            texts = list(pool.map(lambda job: ask(job[0], job[1], long_tokens), jobs))
            wall = time.perf_counter() - start
            done.set()
            probe.result()
        info = engine.stats("org-a")["base_models"][0], engine.stats("org-b")["base_models"][0]
        forwards = engine.stats()["base_models"][0]["kv_cache"]["forwards"]
    finally:
        engine.close()
    return {
        "texts": texts,
        "tokens_per_s": len(jobs) * long_tokens / wall,
        "victim_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "steps_a": info[0]["steps"],
        "steps_b": info[1]["steps"],
        "forwards": forwards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--probes", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine_module.eos_token_ids = lambda *_: frozenset()  # type: ignore[assignment]
    base = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", max_positions=1024)
    runs: dict[str, list[dict]] = {name: [] for name in RULES}
    for _ in range(args.rounds):
        for name, rule in RULES.items():
            runs[name].append(serve(base, rule, args.long_tokens, args.probes))
    texts = {name: results[0]["texts"] for name, results in runs.items()}
    print(
        f"2 busy tenants x 6 generations of {args.long_tokens} tokens (prompt lengths "
        f"{PROMPTS}), a third sending 5-token completions; {args.rounds} rounds"
    )
    best: dict[str, dict] = {}
    for name, results in runs.items():
        best[name] = {
            "tokens_per_s": max(r["tokens_per_s"] for r in results),
            "victim_ms": min(r["victim_ms"] for r in results),
        }
        last = results[-1]
        print(
            f"{name:>11}: {best[name]['tokens_per_s']:7.0f} tok/s (busy tenants) | "
            f"5-token median {best[name]['victim_ms']:6.1f} ms | decode steps org-a "
            f"{last['steps_a']}, org-b {last['steps_b']}, forwards {last['forwards']}"
        )
    same = texts["turns"] == texts["every slab"]
    print(f"outputs identical under both rules: {same}")
    old, new = best["every slab"], best["turns"]
    print(
        f"ratios turns / every slab: throughput {new['tokens_per_s'] / old['tokens_per_s']:.2f}, "
        f"5-token latency {new['victim_ms'] / old['victim_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
