from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import RunningNode, make_settings, running_node

pytest_plugins = ["tests.redis_fixtures"]

NAMESPACES = {
    "default": {"subscribe": "token", "publish": "none"},
    "chat": {"subscribe": "any", "publish": "any", "presence": True, "join_leave": True},
    "feed": {"subscribe": "any", "publish": "token", "history_size": 100, "history_ttl": 300},
}


@pytest.fixture
async def node() -> AsyncIterator[RunningNode]:
    """A node with a JWT secret, an API key, and namespaces: default (token-only subscribe,
    API-only publish), chat (open, presence, join/leave), feed (history)."""
    async with running_node(make_settings(namespaces=NAMESPACES)) as running:
        yield running
