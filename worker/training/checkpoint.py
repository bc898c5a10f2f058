"""Checkpoints: an adapter you can call, plus everything needed to resume exactly.

A checkpoint directory holds
- `adapter_config.json`, `adapter_model.safetensors`: the PEFT adapter (served as
  `ft:…:ckpt-step-N`, downloadable like any adapter);
- `optimizer.pt`: the optimizer and LR-scheduler state dicts (tensors, numbers and
  lists only: loaded with `torch.load(weights_only=True)`, never unpickled freely);
- `rng.safetensors`: the torch RNG states (CPU, and CUDA when used);
- `trainer_state.json`: the data position (epoch, micro-batch), step, running sums,
  the metrics history;
- `manifest.json`: the sha256 of each file above. The job runner records the
  manifest's own sha256 in the database, so resume verifies DB → manifest → files
  before it loads a byte.

The directory is written to a scratch dir and published atomically by the caller
(`ArtifactStore.publish_dir`), so a checkpoint is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.errors import CheckpointError
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from app.storage import file_sha256

MANIFEST = "manifest.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
STATE = "trainer_state.json"
FORMAT_VERSION = 1


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """The steps that end with a checkpoint: `n_checkpoints` evenly spaced, the last at the
    end, at most one per step. n_epochs of them fall exactly on the epoch ends (every
    epoch has the same number of steps): the default, one per epoch."""
    n = min(n_checkpoints, total_steps)
    return [-(-k * total_steps // n) for k in range(1, n + 1)]  # ceil(k * total / n)


@dataclass
class TrainerState:
    """Where training stands after `step` optimizer steps (JSON-serialisable)."""

    step: int = 0
    epoch: int = 1  # 1-based epoch the next micro-batch belongs to
    next_batch: int = 0  # index of the next micro-batch inside that epoch's order
    trained_tokens: int = 0
    epoch_loss_sum: float = 0.0  # summed token loss and label count of the epoch so far
    epoch_label_count: int = 0
    last_epoch_loss: float = 0.0  # mean token loss of the last finished epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step
    # The evaluations' record (worker/training/evaluation.py); absent in older checkpoints.
    best_step: int = 0
    best_full_valid_loss: float | None = None
    evals_since_best: int = 0
    # DPO: the reference policy's log-probability of each example, computed once when the
    # run starts ("train", "valid"), so a resumed run scores against the very same values
    reference_logps: dict[str, list[float]] = field(default_factory=dict)


def save_checkpoint(
    out_dir: Path, *, peft_model: Any, optimizer: Any, scheduler: Any, state: TrainerState
) -> str:
    """Write a complete checkpoint into `out_dir`; return the manifest's sha256."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_adapter(peft_model, out)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, out / OPTIMIZER
    )
    rng = {"cpu": torch.get_rng_state()}
    # torch leaves cuda.is_initialized unannotated
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(out / RNG))
    (out / STATE).write_text(json.dumps(asdict(state)))
    files = {
        name: file_sha256(out / name)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER, RNG, STATE)
    }
    manifest = json.dumps({"format": FORMAT_VERSION, "files": files}, sort_keys=True).encode()
    (out / MANIFEST).write_bytes(manifest)
    return hashlib.sha256(manifest).hexdigest()


def verify_checkpoint(folder: Path, *, manifest_sha256: str) -> None:
    """Check the manifest against the recorded sha256, then every file against the manifest."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {folder.name} has no {MANIFEST}")
    raw = (folder / MANIFEST).read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise CheckpointError(f"checkpoint {folder.name}: manifest does not match its sha256")
    for name, digest in json.loads(raw)["files"].items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise CheckpointError(f"checkpoint {folder.name}: {name} is missing or altered")


def load_checkpoint(
    folder: Path, *, peft_model: Any, optimizer: Any, scheduler: Any
) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG from a verified checkpoint."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    device = next(peft_model.parameters()).device
    weights = load_file(str(folder / ADAPTER_WEIGHTS), device=str(device))
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint {folder.name} does not fit this model's adapter")
    saved = torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = load_file(str(folder / RNG))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return TrainerState(**json.loads((folder / STATE).read_text()))
