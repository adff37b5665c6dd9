"""Fixtures and hooks shared by every test: where the real reference data lives, the slowdown setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.discovery_service import DiscoveryServices
from tests.helpers import SLOWDOWN, SLOWDOWN_ENV, require_shared_data
from tests.moto_s3 import S3Server, start_s3_server


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


@pytest.fixture
def discovery_service() -> Iterator[DiscoveryServices]:
    """``discovery_service.start(cfg, runner=..., **discovery_kwargs)`` -> (daemon, discovery, cfg); all stopped at teardown."""
    services = DiscoveryServices()
    yield services
    services.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server for the session (the upload and the fault tests share it)."""
    srv = start_s3_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data folder (``../shared/data`` or ``$IMAGEQC_SHARED_DATA``); fails when it is missing."""
    return require_shared_data()
