"""What a test needs of the machine (redis-server, redis-cli, Node, Chromium): without it
the test is skipped, but in CI (HUB_REQUIRE_REDIS=1, where .ci/run installs all of them)
it fails."""

from __future__ import annotations

import os

import pytest


def need(found: object, what: str) -> None:
    """`what` says what is missing and how to get it."""
    if found:
        return
    if os.environ.get("HUB_REQUIRE_REDIS") == "1":
        pytest.fail(f"{what} is missing (HUB_REQUIRE_REDIS=1)")
    pytest.skip(f"{what} is missing")
