"""The engine's value types: what the API layer passes in and gets back. No torch here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidRequest


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter: its public id, its directory, and its weights' sha256.

    `path` holds `adapter_config.json` + `adapter_model.safetensors`; `sha256` is the
    hex digest of `adapter_model.safetensors` recorded when the adapter was published.
    """

    id: str
    path: Path
    sha256: str


@dataclass
class Generation:
    """One completion.

    `text` excludes the prompt, the EOS token and anything from a matched stop string on.
    `completion_tokens` counts every token the model generated, including a final EOS
    and the tokens that spelled a matched stop string (what the model actually ran).
    """

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class AdapterIntegrityError(InvalidRequest):
    """An adapter on disk is not what the registry recorded, or not a safetensors LoRA."""

    code = "adapter_integrity"
