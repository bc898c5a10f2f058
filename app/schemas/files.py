from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class FileRead(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
