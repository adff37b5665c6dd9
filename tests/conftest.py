"""Fixtures and hooks shared by every test: where the real reference data lives, the slowdown setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SLOWDOWN, SLOWDOWN_ENV, require_shared_data


def pytest_report_header(config: pytest.Config) -> str | None:
    return (
        f"{SLOWDOWN_ENV}={SLOWDOWN:g}: every wait and child timeout in the tests is scaled" if SLOWDOWN != 1 else None
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scale each test's pytest-timeout limit (its ``timeout`` mark, else the ini/command-line value) by the slowdown."""
    if SLOWDOWN == 1 or not config.pluginmanager.hasplugin("timeout"):
        return
    default = config.getoption("timeout", None) or config.getini("timeout") or 0
    for item in items:
        mark = item.get_closest_marker("timeout")
        args, kwargs = (list(mark.args), dict(mark.kwargs)) if mark is not None else ([], {})
        base = kwargs.pop("timeout", None) if "timeout" in kwargs else (args.pop(0) if args else default)
        if not base or float(base) <= 0:
            continue  # no limit stays no limit
        item.add_marker(pytest.mark.timeout(float(base) * SLOWDOWN, *args, **kwargs), append=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data folder (``../shared/data`` or ``$IMAGEQC_SHARED_DATA``); fails when it is missing."""
    return require_shared_data()
