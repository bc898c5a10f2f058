"""Security tests reuse the API fixtures (in-process app over SQLite, recording queue)."""

from tests.api.conftest import app, client, enqueued, other_client  # noqa: F401
