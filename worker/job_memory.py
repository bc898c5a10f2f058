"""One job's memory in the worker: planned before the base is loaded, and an out-of-memory
error during training turned into a failed job that says what to change.

The plan (`worker/training/memory_plan.py`) weighs the job's settings against what the
device has free: `torch.cuda.mem_get_info` on CUDA; on CPU the kernel's MemAvailable, and
the cgroup's limit where the worker runs in a container; either capped by
LORAFORGE_TRAINING_MEMORY_BYTES. What it decided for the "auto" knobs is written back into
the job's hyperparameters with an event (one fenced statement), so the job shows it and a
later attempt of the job resumes with the same micro-batches. A job that fits in no
allowed setting fails before loading (`out_of_memory`), naming the smallest change that
fits; so does a step that runs out of memory anyway.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import JobInputError
from app.jobs.hyperparameters import tensor_shapes
from app.jobs.spec import SupervisedHyperparameters
from worker.progress import Progress
from worker.training.memory_estimate import Device, ModelShape, gib
from worker.training.memory_plan import after_out_of_memory, does_not_fit, plan

logger = logging.getLogger(__name__)
OUT_OF_MEMORY = "out_of_memory"
CAP_SETTING = "LORAFORGE_TRAINING_MEMORY_BYTES"
# How CPU allocation failures read: torch's allocator ("DefaultCPUAllocator: can't allocate
# memory"), and a CUDA OOM raised as a plain RuntimeError by some kernels.
_OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "out of memory")


@dataclass(frozen=True)
class Free:
    """What the plan may use: bytes, and what bounded it (for messages)."""

    bytes: int
    limited_by: str  # "free memory", "the container's limit" or CAP_SETTING


def plan_job(
    ref: str, hp: SupervisedHyperparameters, *, settings: Settings, progress: Progress
) -> tuple[SupervisedHyperparameters, ModelShape | None]:
    """The job's hyperparameters with nothing "auto" left, and the model's shape (None when
    its config could not be read: then "auto" means off / no split, as before planning)."""
    device = _device(settings)
    shape = model_shape(ref)
    if shape is None:
        decided = _unplanned(hp)
        if decided != hp:
            _record(progress, decided, "Memory plan: the base model's config could not be read; "
                    "gradient_checkpointing off, no micro-batching", {})  # fmt: skip
        return decided, None
    free = _per_rank(free_memory(device, settings.training_memory_bytes), device, settings)
    chosen = plan(shape, hp, device=device, available=free.bytes)
    if chosen is None:
        message, param = does_not_fit(shape, hp, device=device, available=free.bytes)
        raise JobInputError(_where(message, free), code=OUT_OF_MEMORY, param=param)
    data = {
        "estimate_bytes": chosen.estimate.parts() | {"total": chosen.estimate.total},
        "available_bytes": free.bytes,
        "device": device,
    }
    _record(progress, chosen.hyperparameters, chosen.summary(), data, changed=hp)
    return chosen.hyperparameters, shape


@contextmanager
def out_of_memory_fails_the_job(
    shape: ModelShape | None, hp: SupervisedHyperparameters, *, settings: Settings, steps: Any
) -> Iterator[None]:
    """An out-of-memory error inside fails the job (`out_of_memory`) with advice from the
    estimate; `steps()` says how many optimizer steps had completed."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        logger.warning("out of memory after %s steps", steps(), exc_info=True)
        device = _device(settings)
        if shape is None:
            message = f"Training ran out of {device} memory at step {steps() + 1}."
            raise JobInputError(message, code=OUT_OF_MEMORY) from None
        message, param = after_out_of_memory(shape, hp, device=device, step=steps() + 1)
        # `from None`: the traceback would keep the step's tensors alive with the error
        raise JobInputError(message, code=OUT_OF_MEMORY, param=param) from None


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, a RuntimeError), MemoryError, or an allocator's failure."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def model_shape(ref: str) -> ModelShape | None:
    """The shape of a base model from its config.json (and its safetensors headers when it
    is a local directory); None when unreadable or not a decoder shape we know."""
    try:
        directory = Path(ref)
        if directory.is_dir():
            config = json.loads((directory / "config.json").read_text())
            return ModelShape.of(config, tensor_shapes(directory))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ref, trust_remote_code=False).to_dict()
        return ModelShape.of(config)
    except (OSError, ValueError, TypeError, KeyError, struct.error):
        logger.warning("no memory plan: the config of %s could not be read", ref, exc_info=True)
        return None


def free_memory(device: Device, cap: int) -> Free:
    """Bytes the device has free now, at most `cap` (0: no cap)."""
    if device == "cuda":
        import torch

        found = Free(torch.cuda.mem_get_info()[0], "free memory")
    else:
        found = Free(_meminfo_available(), "free memory")
        container = _cgroup_headroom()
        if container is not None and container < found.bytes:
            found = Free(container, "the container's memory limit")
    if cap and cap < found.bytes:
        return Free(cap, CAP_SETTING)
    return found


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _cgroup_headroom() -> int | None:
    """The cgroup (v2, else v1) memory limit minus its usage; None without a limit."""
    for folder, limit_name, usage_name in (
        ("/sys/fs/cgroup", "memory.max", "memory.current"),
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        try:
            limit = (Path(folder) / limit_name).read_text().strip()
            usage = int((Path(folder) / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 says "no limit" with a huge number
            return max(int(limit) - usage, 0)
        return None
    return None


def _device(settings: Settings) -> Device:
    from app.ml.loading import resolve_device

    return "cuda" if resolve_device(settings.device).startswith("cuda") else "cpu"


def _per_rank(free: Free, device: Device, settings: Settings) -> Free:
    """What one data-parallel rank may use: each holds the whole base (docs/design.md 4.18).
    CPU ranks share the host's memory; GPU ranks have one GPU each, alike (the first seen)."""
    ranks = settings.gpus_per_job
    if ranks == 1:
        return free
    each = f"LORAFORGE_GPUS_PER_JOB={ranks}, each rank holding the whole base"
    if device == "cuda":
        return Free(free.bytes, f"{free.limited_by} of one GPU ({each})")
    return Free(free.bytes // ranks, f"{free.limited_by} shared by CPU ranks ({each})")


def _where(message: str, free: Free) -> str:
    if free.limited_by == "free memory":
        return message
    return f"{message} (The free memory was bounded by {free.limited_by}: {gib(free.bytes)}.)"


def _unplanned(hp: SupervisedHyperparameters) -> SupervisedHyperparameters:
    """The job as it trains without a plan ("auto" read as the spec reads it: off, 1)."""
    update = {
        "gradient_checkpointing": hp.checkpointing,
        "gradient_accumulation_steps": hp.accumulation,
    }
    return hp.model_copy(update=update)


def _record(
    progress: Progress,
    decided: SupervisedHyperparameters,
    message: str,
    data: dict[str, Any],
    changed: SupervisedHyperparameters | None = None,
) -> None:
    """The plan as an event; where it decided "auto" knobs, also written into the job."""
    columns = None
    if changed is None or decided != changed:
        columns = {"hyperparameters": decided.model_dump()}
    progress.event(message, data=data | _knobs(decided), columns=columns)


def _knobs(hp: SupervisedHyperparameters) -> dict[str, Any]:
    return {
        "gradient_checkpointing": hp.gradient_checkpointing,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "batch_size": hp.batch_size,
    }
