"""Shapes shared by every response."""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict

from app.ids import check_id, check_text

T = TypeVar("T")

# Every id a client sends (path and query parameters, body fields) and every piece of user
# text goes through one of these two gates (app/ids.py): bad ones answer 400 naming the field.
Id = Annotated[str, AfterValidator(check_id)]
Text = Annotated[str, AfterValidator(check_text)]


class Strict(BaseModel):
    """Request models forbid unknown fields (docs/design.md §3); the error names the field."""

    model_config = ConfigDict(extra="forbid")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
