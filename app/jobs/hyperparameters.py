"""Resolving "auto" hyperparameters from the dataset size, and checking them against the model.

The resolved values are the run spec's (`app/jobs/spec.py`): stored on the job (and shown by
the API) and copied into the adapter's registry row, so a result always says exactly how it
was trained. Torch-free: the API process validates `lora_target_modules` by reading the base
model's safetensors headers (plain JSON), never by loading the model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from app.errors import InvalidRequest
from app.jobs.spec import DpoHyperparameters, SupervisedHyperparameters
from app.schemas.jobs import DpoHyperparameters as DpoRequest
from app.schemas.jobs import Hyperparameters

BASE_LEARNING_RATE = 2e-4  # a common LoRA default (PEFT / Axolotl examples)
# DPO's "auto" beta: the DPO paper's and TRL's default (OpenAI does not document its own).
DPO_BETA = 0.1
# Keys a continued job takes from the adapter it continues: the LoRA shape must match.
LORA_SHAPE_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "use_rslora",
    "use_dora",
    "train_special_tokens",
)


def resolve(
    requested: Hyperparameters, *, n_examples: int, seed: int, dataset_format: str | None = None
) -> SupervisedHyperparameters:
    """Concrete values for every knob; "auto" replaced by a size-based choice.

    n_epochs: about 100 passes over the examples in total, between 3 and 10 epochs.
    batch_size: a tenth of the dataset, between 1 and 8.
    learning_rate: BASE_LEARNING_RATE * multiplier unless given directly.
    train_on_inputs: loss on everything for `text` files, on assistant / completion
    tokens otherwise. packing: on; the worker turns it off (with a warning event) for a
    model that does not isolate packed examples, where packing would not be exact.
    n_checkpoints: one per epoch.
    A DPO request (its examples are preference pairs) resolves the same way, plus beta:
    "auto" is DPO_BETA.
    """
    n_epochs = requested.n_epochs
    if n_epochs == "auto":
        n_epochs = min(10, max(3, math.ceil(100 / max(n_examples, 1))))
    batch_size = requested.batch_size
    if batch_size == "auto":
        batch_size = min(8, max(1, n_examples // 10))
    if requested.learning_rate is not None:
        learning_rate = requested.learning_rate
        multiplier = learning_rate / BASE_LEARNING_RATE
    else:
        multiplier = (
            1.0
            if requested.learning_rate_multiplier == "auto"
            else requested.learning_rate_multiplier
        )
        learning_rate = BASE_LEARNING_RATE * multiplier
    resolved_type: type[SupervisedHyperparameters] = SupervisedHyperparameters
    method_values: dict[str, Any] = {}
    if isinstance(requested, DpoRequest):
        resolved_type = DpoHyperparameters
        method_values = {"beta": DPO_BETA if requested.beta == "auto" else requested.beta}
    return resolved_type.model_validate(
        requested.model_dump()
        | method_values
        | {
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": multiplier,
            "learning_rate": learning_rate,
            "lora_alpha": requested.lora_alpha or 2 * requested.lora_r,
            "train_on_inputs": (
                dataset_format == "text"
                if requested.train_on_inputs == "auto"
                else requested.train_on_inputs
            ),
            "packing": True if requested.packing == "auto" else requested.packing,
            "n_checkpoints": (
                n_epochs if requested.n_checkpoints == "auto" else requested.n_checkpoints
            ),
            "seed": seed,
        }
    )


def continue_from(
    resolved: SupervisedHyperparameters, parent_lora_config: dict[str, Any]
) -> SupervisedHyperparameters:
    """A continued job keeps the LoRA shape of the adapter it starts from."""
    shape = {key: parent_lora_config[key] for key in LORA_SHAPE_KEYS if key in parent_lora_config}
    shape.setdefault("train_special_tokens", False)  # an adapter from before it had no rows
    return type(resolved).model_validate(resolved.model_dump() | shape)


def unmatched_modules(targets: list[str], module_names: Iterable[str]) -> list[str]:
    """The targets that name no module, by PEFT's rule: a module matches when its full name,
    or its last dotted components, equal the target. The API and the worker both use it."""
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_target_modules(model_ref: str, target_modules: Literal["all-linear"] | list[str]) -> None:
    """Refuse module names the base model does not have (InvalidRequest naming the param).

    Only a local directory with safetensors weights can be checked here; a hub id is
    checked by the worker when the job starts (the job then fails naming the param).
    """
    if target_modules == "all-linear":
        return
    names = linear_module_names(Path(model_ref))
    if names is None:
        return
    unknown = unmatched_modules(target_modules, names)
    if unknown:
        sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:12])
        raise InvalidRequest(
            f"lora_target_modules {unknown} are not linear modules of the base model "
            f"(it has: {sample})",
            param="hyperparameters.lora_target_modules",
            code="invalid_lora_target_modules",
        )


def check_special_tokens(model_ref: str, tokens: bool | list[str]) -> None:
    """Refuse listed `train_special_tokens` that are not one token of the base's vocabulary.

    Read from a local model's `tokenizer.json`; otherwise the worker checks when the job
    starts (the job then fails naming the param)."""
    if not isinstance(tokens, list):
        return
    vocab = _tokenizer_vocab(Path(model_ref) / "tokenizer.json")
    unknown = [t for t in tokens if vocab is not None and t not in vocab]
    if unknown:
        raise InvalidRequest(
            f"train_special_tokens {unknown} are not tokens of the base model's vocabulary",
            param="hyperparameters.train_special_tokens",
            code="invalid_train_special_tokens",
        )


def _tokenizer_vocab(path: Path) -> set[str] | None:
    """Token strings of a `tokenizers` file: the model's vocabulary and the added tokens."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    # BPE / WordPiece / WordLevel map token -> id; Unigram lists [token, score] pairs
    names = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}
    return names | {added["content"] for added in data.get("added_tokens") or []}


def linear_module_names(model_dir: Path) -> set[str] | None:
    """Names of modules with a 2-D `.weight` (linear layers, embeddings); None if unknown."""
    shapes = tensor_shapes(model_dir)
    if shapes is None:
        return None
    return {
        key[: -len(".weight")]
        for key, shape in shapes.items()
        if key.endswith(".weight") and len(shape) == 2
    }


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape in a local model's safetensors files; None if unknown. (The
    memory plan counts parameters and LoRA sizes from these, worker/training/memory_estimate.py.)"""
    if not model_dir.is_dir():
        return None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    return {
        key: tuple(info.get("shape", ()))
        for path in files
        for key, info in _safetensors_header(path).items()
    }


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then JSON."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def check_evaluations(resolved: SupervisedHyperparameters, *, has_validation_file: bool) -> None:
    """Evaluations and early stopping measure the validation loss: refuse them without a
    validation_file, naming the knob (a job must never silently ignore them)."""
    if has_validation_file:
        return
    for knob in ("early_stopping_patience", "n_evals"):
        if getattr(resolved, knob):
            raise InvalidRequest(
                f"hyperparameters.{knob} evaluates the validation loss: give a validation_file too",
                param="validation_file",
            )
