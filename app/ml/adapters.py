"""Adapter IO: a LoRA adapter on disk is PEFT's format, safetensors only.

An adapter directory holds exactly `adapter_config.json` and `adapter_model.safetensors`,
so it loads with `PeftModel.from_pretrained(base, path)`. Pickled weights
(`adapter_model.bin`) are never written and never accepted. torch/peft are imported
lazily, so importing this module stays light for the API process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import UnsafeModelError
from app.storage import file_sha256

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def save_adapter(peft_model: Any, out_dir: Path) -> str:
    """Write the adapter files of `peft_model` to `out_dir`; return the weights' sha256.

    Only the adapter config and safetensors weights are written (PEFT's model card is
    removed). The full embedding matrix is never saved: we never resize vocabularies,
    and PEFT's "auto" check would otherwise ask the model hub about the base model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)
    check_adapter_dir(out)
    return file_sha256(out / ADAPTER_WEIGHTS)


def check_adapter_dir(path: Path) -> None:
    """Refuse a directory that is not a safetensors PEFT adapter."""
    folder = Path(path)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise UnsafeModelError(
            f"adapter at {folder} lacks {', '.join(missing)}; only PEFT safetensors adapters load"
        )
