"""Fixtures every test folder shares."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`pytest.mark.anyio`) run on asyncio, the loop linkcrm runs on."""
    return "asyncio"
