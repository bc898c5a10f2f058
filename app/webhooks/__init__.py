"""Webhooks: endpoints (`service`), the outbox written when a job ends (`outbox`), signed
delivery with retries (`delivery`, `signing`), the SSRF gate on URLs (`urls`) and the
wake-up message of a delivery (`queue`). docs/design.md 4.12."""
