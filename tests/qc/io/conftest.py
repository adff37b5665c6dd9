"""Fixtures for the reader tests: the shared real-data folder, with its CZI files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import require_shared_data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (tests/conftest.py's), which must hold ``czi/`` for these tests."""
    return require_shared_data("czi")
