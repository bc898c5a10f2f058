from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from app.schemas.common import Deleted


class ModelRead(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # loraforge extras: what the model is and where it comes from.
    kind: Literal["base", "adapter", "checkpoint"]
    base_model: str | None = None
    job_id: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    lora_config: dict[str, Any] | None = None


class ModelDeleted(Deleted):
    """OpenAI's delete response, plus the checkpoint ids deleted with a fine-tuned model."""

    object: Literal["model"] = "model"
    deleted_checkpoints: list[str] = []
