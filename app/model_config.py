"""What the API needs to know of a base model, read from its config.json (no torch).

The API process checks requests against the base model without loading it: the context
length here, the module names from the safetensors headers in app/jobs/hyperparameters.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Where transformers' configs keep the number of positions (GPT-2: n_positions; most others
# max_position_embeddings), also under `text_config` for multimodal wrappers.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_of(config: Mapping[str, Any]) -> int | None:
    """The context length a config declares; None when it declares none."""
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def context_length(model_ref: str) -> int | None:
    """The context of a local model directory; None for a hub id or an unreadable config
    (the worker checks those when the model is loaded)."""
    path = Path(model_ref) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return context_of(config) if isinstance(config, dict) else None
