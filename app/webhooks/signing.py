"""Standard Webhooks signatures (https://www.standardwebhooks.com): the spec's own package
signs, so the receivers' verifiers (standardwebhooks, the openai SDK) accept ours."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """32 random bytes, base64 with padding (the openai SDK decodes it strictly)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(*, secret: str, webhook_id: str, body: str, at: datetime) -> dict[str, str]:
    """The three headers of one attempt; `at` is the wall-clock send time (receivers refuse
    a timestamp more than five minutes off theirs), the id the same on every attempt."""
    try:
        from standardwebhooks import Webhook
    except ImportError as exc:  # an optional extra: say which one
        raise RuntimeError(
            "signing webhooks needs the standardwebhooks package: pip install loraforge[webhooks]"
        ) from exc
    signature = Webhook(secret).sign(msg_id=webhook_id, timestamp=at, data=body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }
