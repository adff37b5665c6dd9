"""Fixtures for the reader tests: the shared real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def shared_data_dir() -> Path:
    """``$IMAGEQC_SHARED_DATA`` when set, else ``<repo>/../shared/data``."""
    env = os.environ.get("IMAGEQC_SHARED_DATA")
    return Path(env) if env else REPO / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "czi").is_dir():
        pytest.fail(f"shared test data not found at {path}; set IMAGEQC_SHARED_DATA or put shared/ beside the repo")
    return path
