"""Fixtures for the Windows service tests: pywin32 and the service manager faked, the rest real."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from daemon.logging import configure_logging
from tests.daemon.conftest import make_config, no_leaked_threads  # noqa: F401 - fixtures shared with the service tests
from tests.helpers import scaled
from tests.windows_service.fake_pywin32 import FakeServiceManager


@pytest.fixture(autouse=True)
def reset_logging() -> Iterator[None]:
    """The service host configures process-wide logging; put it back after each test."""
    yield
    configure_logging(console="off")
    logging.getLogger().handlers.clear()


@pytest.fixture
def fake_scm(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A fake service manager with fake pywin32 modules in sys.modules, and windows_service.service imported against them."""
    mgr = FakeServiceManager()
    mods = mgr.modules()
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules.pop("windows_service.service", None)
    service = importlib.import_module("windows_service.service")
    try:
        yield SimpleNamespace(manager=mgr, service=service, modules=SimpleNamespace(**mods), **mods)
    finally:
        for rec in mgr.services.values():  # never leave a service thread behind
            if rec.thread is not None and rec.thread.is_alive() and rec.instance is not None:
                rec.instance.host.stop(urgent=True)
                rec.thread.join(scaled(30))
        sys.modules.pop("windows_service.service", None)
        import windows_service

        windows_service.__dict__.pop("service", None)
