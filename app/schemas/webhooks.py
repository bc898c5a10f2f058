from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from app.schemas.common import Strict, Text


class WebhookCreate(Strict):
    url: Annotated[Text, Field(min_length=1, max_length=2048)]
    event_types: Annotated[
        list[Annotated[str, Field(max_length=64)]],
        Field(
            min_length=1,
            max_length=16,
            description="fine_tuning.job.succeeded, fine_tuning.job.failed, "
            "fine_tuning.job.cancelled",
        ),
    ]


class WebhookRead(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    event_types: list[str]
    created_at: int


class WebhookCreated(WebhookRead):
    """The creation's answer: the only one that shows the signing secret."""

    secret: str


class AttemptRead(BaseModel):
    attempted_at: int
    status_code: int | None
    error: str | None


class DeliveryRead(BaseModel):
    id: str = Field(description="the webhook-id header of every attempt (deduplicate by it)")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event_id: str
    event_type: str
    status: str
    created_at: int
    delivered_at: int | None
    next_attempt_at: int | None
    attempts: list[AttemptRead]
