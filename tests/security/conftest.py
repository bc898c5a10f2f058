"""Security tests reuse the API fixtures (in-process app over SQLite, recording queue)."""

import pytest

from tests.api.conftest import app, client, enqueued, other_client  # noqa: F401
from tests.security.tenant_matrix import TenantA, create_tenant_a


@pytest.fixture
def tenant_a(client, settings) -> TenantA:  # noqa: F811
    return create_tenant_a(client, settings)
