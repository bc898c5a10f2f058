"""Resolving "auto" hyperparameters from the dataset size.

The resolved values are stored on the job (and shown by the API) and copied into
the adapter's registry row, so a result always says exactly how it was trained.
"""

from __future__ import annotations

import math
from typing import Any

from app.schemas.jobs import Hyperparameters

BASE_LEARNING_RATE = 2e-4  # a common LoRA default (PEFT / Axolotl examples)


def resolve(requested: Hyperparameters, *, n_examples: int) -> dict[str, Any]:
    """Concrete values for every knob; "auto" replaced by a size-based choice.

    n_epochs: about 100 passes over the examples in total, between 3 and 10 epochs.
    batch_size: a tenth of the dataset, between 1 and 8.
    learning_rate: BASE_LEARNING_RATE * multiplier unless given directly.
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
    return {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": learning_rate,
        "lora_r": requested.lora_r,
        "lora_alpha": requested.lora_alpha or 2 * requested.lora_r,
        "lora_dropout": requested.lora_dropout,
        "lora_target_modules": requested.lora_target_modules,
        "max_seq_length": requested.max_seq_length,
        "warmup_ratio": requested.warmup_ratio,
        "weight_decay": requested.weight_decay,
        "lr_scheduler": requested.lr_scheduler,
    }
