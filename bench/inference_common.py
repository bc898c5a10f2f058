"""Shared setup for the inference benchmarks: a few-tens-of-millions-parameter random-init
model, rank-16 adapters with non-zero B, interleaved timing and median ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.inference.types import AdapterRef
from app.ml.loading import load_base_model
from app.ml.tiny_model import build_tiny_model
from app.storage import file_sha256

HIDDEN, LAYERS, HEADS, INTERMEDIATE = 512, 8, 8, 1536
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # attention; see bench/README.md


def build_base(root: Path) -> Path:
    out = root / "base"
    if not (out / "config.json").exists():
        build_tiny_model(
            out,
            hidden_size=HIDDEN,
            num_layers=LAYERS,
            num_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_positions=1024,
        )
    return out


def build_adapters(
    base: Path, root: Path, count: int, *, rank: int = RANK, targets: list[str] | str = TARGETS
) -> list[AdapterRef]:
    """`count` adapters with random (non-zero) A and B, written in PEFT's format."""
    import peft

    refs, model = [], None
    for index in range(count):
        out = root / f"adapter-r{rank}-{index}"
        if not (out / "adapter_model.safetensors").exists():
            if model is None:
                model = load_base_model(base, device="cpu")
            torch.manual_seed(1000 + index)
            wrapped = peft.get_peft_model(
                model,
                peft.LoraConfig(
                    r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=targets
                ),
            )
            wrapped.save_pretrained(str(out), safe_serialization=True)
            model = wrapped.unload()
        sha = file_sha256(out / "adapter_model.safetensors")
        refs.append(AdapterRef(f"ft:bench:org:r{rank}-{index}:ftjob-{index}", out, sha))
    return refs


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, clock: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each variant, the variants alternating round by round.

    clock "cpu": CPU seconds of this process (time.process_time), which a busy shared
    machine distorts far less than wall time; "wall": time.perf_counter.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, run in variants.items():
            start = now()
            run()
            if round_index >= warmup:
                times[name].append(now() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def params_millions(base: Path) -> float:
    model = load_base_model(base, device="cpu")
    return sum(p.numel() for p in model.parameters()) / 1e6
