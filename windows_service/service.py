"""The imageqc Windows service: a thin pywin32 wrapper around :class:`~windows_service.host.ServiceHost`.

pywin32's ``pythonservice.exe`` hosts :class:`ImageQCService` (registered as
``windows_service.service.ImageQCService`` by ``imageqc service install``).
Everything that can be decided without Windows lives in
:mod:`windows_service.host` and :mod:`daemon.service` and is tested on Linux;
this module only maps the service manager's calls onto it:

- ``SvcDoRun``: report SERVICE_RUNNING at once, then ``host.run()`` (blocks
  until stopped). If it raises, pythonservice.exe reports SERVICE_STOPPED with
  an error code, which triggers the recovery actions (restart after 10 s,
  60 s, 5 min) that ``imageqc service install`` sets.
- ``SvcStop``: report SERVICE_STOP_PENDING with a wait hint covering the
  running job's grace period, then ``host.stop()``.
- ``SvcShutdown`` (the machine is shutting down): the same, urgently.

For a console run with the service's settings, use ``imageqc run --config FILE``;
``python -m windows_service.service debug`` runs this class under pywin32's
debug host.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

try:
    import servicemanager
    import win32service
    import win32serviceutil
except ImportError as e:  # pragma: no cover - only reached off Windows or without pywin32
    msg = (
        'the imageqc Windows service needs pywin32 (Windows only): pip install "imageqc[windows]", then, '
        "from an elevated prompt, python -m pywin32_postinstall -install; see windows_service/README.md"
    )
    raise ImportError(msg) from e

from windows_service.host import (
    CONFIG_OPTION,
    DESCRIPTION,
    DISPLAY_NAME,
    SERVICE_NAME,
    ServiceHost,
    child_python,
    default_daemon_factory,
)

__all__ = ["ImageQCService", "ServiceEventLog"]


class ServiceEventLog:
    """The Windows Application event log, source ``imageqc`` (pywin32's servicemanager)."""

    def info(self, message: str) -> None:
        servicemanager.LogInfoMsg(message)

    def warning(self, message: str) -> None:
        servicemanager.LogWarningMsg(message)

    def error(self, message: str) -> None:
        servicemanager.LogErrorMsg(message)


class ImageQCService(win32serviceutil.ServiceFramework):
    """The imageqc service. The config path is the service parameter ``Config`` (or ``IMAGEQC_CONFIG``)."""

    _svc_name_ = SERVICE_NAME
    _svc_display_name_ = DISPLAY_NAME
    _svc_description_ = DESCRIPTION
    #: ``(config, notify) -> Daemon``; the same wiring as ``imageqc run``.
    daemon_factory = staticmethod(default_daemon_factory)

    def __init__(self, args: list[str]) -> None:
        win32serviceutil.ServiceFramework.__init__(self, args)
        config = win32serviceutil.GetServiceCustomOption(self, CONFIG_OPTION) or os.environ.get("IMAGEQC_CONFIG")
        self.host = ServiceHost(
            config_path=config,
            eventlog=ServiceEventLog(),
            report_stop_pending=self._stop_pending,
            daemon_factory=type(self).daemon_factory,
        )

    def _stop_pending(self, wait_hint_ms: int) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=wait_hint_ms)

    def SvcDoRun(self) -> None:
        # Running as soon as we are alive: starting the daemon (integrity check of the job database,
        # recovery of orphaned jobs) may take longer than the service manager waits for a start.
        self.ReportServiceStatus(win32service.SERVICE_RUNNING)
        python = child_python(sys.executable, sys.exec_prefix, sys.base_exec_prefix)
        if python:  # under pythonservice.exe: QC worker children need a real python.exe
            multiprocessing.set_executable(python)
        self.host.run()

    def SvcStop(self) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=self.host.stop_wait_hint_ms)
        self.host.stop()

    def SvcShutdown(self) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=self.host.stop_wait_hint_ms)
        self.host.stop(urgent=True)


if __name__ == "__main__":  # pragma: no cover - pywin32's command line (debug, install without recovery actions)
    win32serviceutil.HandleCommandLine(ImageQCService)
