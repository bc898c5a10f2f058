"""Quantized bases (QLoRA): the precisions a base may be loaded at, and whether this
machine can load them.

Torch-free: the API refuses a job that asks for a quantized base when bitsandbytes is not
installed (`importlib.util.find_spec`, which imports nothing), so the API process never
loads bitsandbytes or torch. What only loading can tell (an already-quantized checkpoint,
a layer the kernels cannot take) is checked by `app/ml/quantized.py`.
"""

from __future__ import annotations

import importlib.util
from typing import get_args

from app.errors import QuantizationUnavailable
from app.schemas.jobs import Quantization

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
BACKEND = "bitsandbytes"
PARAM = "hyperparameters.quantization"


def missing_backend(quantization: str) -> str | None:
    """Why `quantization` cannot be loaded on this machine, or None when it can."""
    if quantization == "none" or importlib.util.find_spec(BACKEND) is not None:
        return None
    return (
        f"quantization={quantization!r} needs {BACKEND}, which is not installed on this "
        "server (install loraforge's `quantization` extra), or use quantization='none'"
    )


def require_backend(quantization: str, *, param: str = PARAM) -> None:
    """Raise `QuantizationUnavailable` naming `param` when bitsandbytes is missing."""
    reason = missing_backend(quantization)
    if reason is not None:
        raise QuantizationUnavailable(reason, param=param)


def parse(value: str, *, where: str) -> Quantization:
    """A quantization named in a setting (`where` says which), checked against the known ones."""
    if value not in QUANTIZATIONS:
        raise ValueError(
            f"{where}: quantization {value!r} is not one of {', '.join(QUANTIZATIONS)}"
        )
    return value  # type: ignore[return-value]  # checked against the Literal's values
