"""Fixtures shared by every test: where the real reference data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout (CI), or $IMAGEQC_SHARED_DATA."""
    env = os.environ.get("IMAGEQC_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(
            f"the real reference data is missing at {path}: check out `shared/` beside the repository "
            "or set IMAGEQC_SHARED_DATA"
        )
    return path
