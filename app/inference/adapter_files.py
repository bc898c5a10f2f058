"""Reading one adapter from the artifact store into LoRA factors, checked on the way.

The weights file is read once: its bytes are hashed (the registry's sha256 must match, else
`errors.adapter_weights_changed`: the server's fault, 500) and parsed from memory with
safetensors, so what is checked is what is loaded. Files that are not a servable adapter are
refused (`refused`, 400). Plain LoRA on linear layers is batched, with PEFT's trainable
tokens (`trainable_token_indices`: trained rows of the input embedding and output layer,
`train_special_tokens`); every other PEFT feature is refused by name rather than being
silently served wrong (`batch_refusal` sends such adapters to the PEFT fallback, which reads
them with `read_peft_adapter`). Runs on the loader thread: no model state is touched here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import AdapterIntegrityError, UnsafeModelError, adapter_weights_changed
from app.inference.types import AdapterRef
from app.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Every weight name PEFT gives an adapter of the LoRA family (what the PEFT fallback loads).
# Nothing else is ever loaded: a base weight's name would overwrite the shared base model.
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A"
    r"|lora_embedding_B|lora_magnitude_vector|trainable_tokens_delta)$"
)
_TOKENS_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.token_adapter\.trainable_tokens_delta$"
)
# Config switches that change the math; served only at their plain-LoRA value.
_PLAIN = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none"}
_ABSENT = (
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
)


@dataclass
class AdapterWeights:
    """Factors per module name (A [r, in], B [out, r], scale), ready to install."""

    ref: AdapterRef
    modules: dict[str, tuple[Any, Any, float]]
    nbytes: int
    tokens: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # module: (ids, rows)

    @property
    def rank(self) -> int:
        return max(int(a.shape[0]) for a, _, _ in self.modules.values())


def read_adapter(
    ref: AdapterRef,
    *,
    shapes: dict[str, tuple[int, int]],
    dtype: Any,
    device: Any,
    token_shapes: dict[str, tuple[int, int]] | None = None,
) -> AdapterWeights:
    """Verify `ref` against the registry and the base model; return its factors.

    `token_shapes`: (vocabulary, width) of the modules whose token rows an adapter may
    train (the base's input embedding and output layer)."""
    folder = Path(ref.path)
    tensors = _checked_tensors(ref, folder)
    config = _config(ref, folder)
    tokens = _token_rows(ref, tensors, config, token_shapes or {})
    modules = _factors(ref, tensors, config, shapes)
    if set(tokens) & set(modules):
        raise refused(ref, f"{sorted(set(tokens) & set(modules))} has LoRA factors and token rows")
    moved = {
        name: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), scale)
        for name, (a, b, scale) in modules.items()
    }
    rows = {
        name: (ids.to(device=device), values.to(device=device, dtype=dtype))
        for name, (ids, values) in tokens.items()
    }
    nbytes = sum(a.nbytes + b.nbytes for a, b, _ in moved.values())
    nbytes += sum(values.nbytes for _, values in rows.values())
    return AdapterWeights(ref, moved, nbytes, rows)


def batch_refusal(ref: AdapterRef, shapes: dict[str, tuple[int, int]]) -> str | None:
    """Why the batched engine cannot apply `ref` (DoRA, LoRA on an embedding, …), or None.

    Reads only the config and the weights file's header; an adapter that cannot even be
    read that far returns None, so the batched load reports what is wrong with it.
    """
    from safetensors import safe_open

    folder = Path(ref.path)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as weights:
            names = list(weights.keys())
    except Exception:  # unreadable: the batched load refuses it, naming the problem
        return None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        return None
    for key, plain in _PLAIN.items():
        if config.get(key, plain) != plain:
            return f"{key}={config[key]!r}"
    for key in _ABSENT:
        if config.get(key):
            return f"{key} is set"
    for name in names:
        if _TOKENS_KEY.match(name):  # trainable token rows: the batch serves them (MultiTokenRows)
            continue
        match = _KEY.match(name)
        if match is None or match["module"] not in shapes:
            return f"tensor {name!r} is not a LoRA factor of a linear layer"
    return None


def read_peft_adapter(ref: AdapterRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config and weights of `ref` for the PEFT fallback, checked like `read_adapter`:
    the registry's sha256 on the very bytes parsed, and LoRA-family weight names only."""
    folder = Path(ref.path)
    tensors = _checked_tensors(ref, folder)
    config = _lora_config(ref, folder)
    foreign = sorted(name for name in tensors if not _PEFT_KEY.match(name))
    if foreign:
        raise refused(ref, f"tensor {foreign[0]!r} is not an adapter weight")
    if not tensors:
        raise refused(ref, "it holds no adapter weights")
    return config, tensors


def refused(ref: AdapterRef, why: str) -> AdapterIntegrityError:
    """Why the files of `ref` are not served (they also feed the PEFT fallback's refusals)."""
    return AdapterIntegrityError(f"adapter {ref.id}: {why}", param="model")


def _checked_tensors(ref: AdapterRef, folder: Path) -> dict[str, Any]:
    """The weights, parsed from the very bytes whose sha256 was checked."""
    from safetensors.torch import load as load_safetensors

    data = _checked_bytes(ref, folder)
    try:
        return load_safetensors(data)
    except Exception as exc:  # a corrupt file that still matched its hash at publish time
        raise refused(ref, f"{ADAPTER_WEIGHTS} is not a safetensors file ({exc})") from exc


def _checked_bytes(ref: AdapterRef, folder: Path) -> bytes:
    try:
        check_adapter_dir(folder)
    except UnsafeModelError as exc:
        raise refused(ref, str(exc)) from exc
    # Only what PEFT could load as the adapter's weights counts; a training checkpoint's
    # `optimizer.pt` next to them is never read here, so it does not make the folder unsafe.
    pickled = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix.lower() in PICKLE_SUFFIXES and p.name.startswith("adapter_model")
    )
    if pickled:
        raise refused(
            ref, f"contains pickled weights ({', '.join(pickled)}); only safetensors are served"
        )
    data = (folder / ADAPTER_WEIGHTS).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != ref.sha256.strip().lower():
        raise adapter_weights_changed(ref.id)
    return data


def _lora_config(ref: AdapterRef, folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise refused(ref, f"{ADAPTER_CONFIG} is not valid JSON") from exc
    if not isinstance(config, dict):
        raise refused(ref, f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise refused(ref, f"it is a {config.get('peft_type')!r} adapter; only LORA is served")
    return config


def _config(ref: AdapterRef, folder: Path) -> dict[str, Any]:
    """The config of a plain LoRA (what the batch applies); others go to the fallback."""
    config = _lora_config(ref, folder)
    for key, plain in _PLAIN.items():
        if config.get(key, plain) != plain:
            raise refused(ref, f"{key}={config[key]!r} is not served (only plain LoRA)")
    for key in _ABSENT:
        if config.get(key):
            raise refused(ref, f"{key} is not served (only plain LoRA on linear layers)")
    return config


def _token_rows(
    ref: AdapterRef,
    tensors: dict[str, Any],
    config: dict[str, Any],
    token_shapes: dict[str, tuple[int, int]],
) -> dict[str, tuple[Any, Any]]:
    """PEFT's trainable tokens: per module, the token ids and the rows that replace the
    base's rows for them (taken out of `tensors`). A module tied to the input embedding
    saves no rows of its own: it uses the embedding's (PEFT's weight tying)."""
    import torch

    wanted = config.get("trainable_token_indices") or {}
    saved = {}
    for key in list(tensors):
        if found := _TOKENS_KEY.match(key):
            saved[found["module"]] = tensors.pop(key)
    if not isinstance(wanted, dict) or not set(saved) <= set(wanted):
        # PEFT's short form (a list) leaves the layers tied to the embedding implicit;
        # the trainer writes every module by name (worker/training/loop.py `_token_rows`)
        raise refused(ref, "trainable_token_indices must name each module with token rows")
    rows = {}
    for name, indices in wanted.items():
        values = saved.get(name, next(iter(saved.values())) if len(saved) == 1 else None)
        if not _rows_fit(indices, values, token_shapes.get(name)):
            raise refused(
                ref,
                f"could not be loaded onto this base model: its trained token rows of {name!r} "
                "do not fit the base's embedding or output layer",
            )
        rows[name] = (torch.tensor(indices, dtype=torch.long), values)
    return rows


def _rows_fit(indices: Any, values: Any, shape: tuple[int, int] | None) -> bool:
    """Distinct token ids inside the vocabulary, one row of the layer's width for each."""
    return (
        shape is not None
        and values is not None
        and isinstance(indices, list)
        and 0 < len(indices) == len(set(indices))
        and all(type(i) is int and 0 <= i < shape[0] for i in indices)
        and tuple(values.shape) == (len(indices), shape[1])
    )


def _factors(
    ref: AdapterRef,
    tensors: dict[str, Any],
    config: dict[str, Any],
    shapes: dict[str, tuple[int, int]],
) -> dict[str, tuple[Any, Any, float]]:
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise refused(ref, f"tensor {key!r} is not a LoRA factor of a linear layer")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise refused(ref, "it holds no LoRA factors")
    modules = {}
    for name, pair in parts.items():
        a, b = pair.get("A"), pair.get("B")
        expected = shapes.get(name)
        if a is None or b is None or expected is None:
            raise refused(
                ref,
                f"could not be loaded onto this base model: module {name!r} "
                + (
                    "has no linear layer in the base"
                    if expected is None
                    else "lacks lora_A or lora_B"
                ),
            )
        rank = int(a.shape[0])
        if (
            a.dim() != 2
            or b.dim() != 2
            or tuple(a.shape) != (rank, expected[0])
            or tuple(b.shape) != (expected[1], rank)
        ):
            raise refused(
                ref,
                f"could not be loaded onto this base model: {name} has factors "
                f"{tuple(a.shape)}, {tuple(b.shape)} for a {expected} linear layer",
            )
        modules[name] = (a, b, _scale(config, name, rank))
    return modules


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) with rsLoRA); alpha_pattern by suffix."""
    alpha: float = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
