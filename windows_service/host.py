"""Run the imageqc Daemon for a service manager: the logic of the Windows service.

Nothing here imports pywin32, so all of it is tested on Linux; the pywin32
class in :mod:`windows_service.service` only forwards the service manager's
calls to a :class:`ServiceHost`:

- ``run()`` (from ``SvcDoRun``, after it reported "running"): load the config,
  log to our JSON log and, for errors and lifecycle events, to the event log;
  run the same :class:`~daemon.service.Daemon` as ``imageqc run``
  (``run_forever`` in a thread) and wait. Returns when a requested stop is
  done; raises :class:`ServiceFailed` when the daemon could not start,
  stopped on its own (its database became unusable) or did not stop in time,
  so the service manager records an error and its recovery actions restart
  the service.
- ``stop()`` (from ``SvcStop``/``SvcShutdown``): ask the daemon to stop; on
  system shutdown urgently (the running QC job is abandoned to lease recovery).
  While it stops, ``run()`` keeps telling the service manager "stop pending"
  with a wait hint, so it is not taken for hung.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from typing import Any, Protocol

from daemon.config import Config, load_config
from daemon.errors import DaemonError
from daemon.fsinfo import is_unc
from daemon.hosting import config_folders, stop_timeout_seconds
from daemon.logging import configure_logging, get_logger, redact

__all__ = [
    "CONFIG_OPTION",
    "DESCRIPTION",
    "DISPLAY_NAME",
    "SERVICE_NAME",
    "EventLog",
    "EventLogHandler",
    "ServiceFailed",
    "ServiceHost",
    "child_python",
    "default_daemon_factory",
]

#: The Windows service's name (``sc query imageqc``).
SERVICE_NAME = "imageqc"
#: What services.msc shows.
DISPLAY_NAME = "imageqc image QC"
DESCRIPTION = (
    "Watches the microscope's export folders, runs Stereo-seq image QC on finished scans and uploads "
    "the results. `imageqc status` shows what it is doing."
)
#: The value under HKLM\SYSTEM\CurrentControlSet\Services\imageqc\Parameters holding the config path.
CONFIG_OPTION = "Config"

log = get_logger("imageqc.winservice")

#: Before the config is read, how long a stop may take (ms), for the wait hint.
_DEFAULT_STOP_MS = 60_000
#: How often the stop-pending status is renewed while the daemon stops.
_PENDING_EVERY_S = 2.0
#: The same event-log message is written at most once in this many seconds.
_EVENTLOG_REPEAT_S = 300.0


class ServiceFailed(DaemonError):
    """The service could not run or stopped with an error; the service manager should record a failure."""


class EventLog(Protocol):
    """Where lifecycle events and errors go (the Windows event log through pywin32's servicemanager)."""

    def info(self, message: str) -> None: ...

    def warning(self, message: str) -> None: ...

    def error(self, message: str) -> None: ...


def _render(record: logging.LogRecord) -> str:
    """One line for the event log: the event, then its fields (secrets masked)."""
    msg = record.msg
    if isinstance(msg, dict):
        fields = {
            k: v
            for k, v in msg.items()
            if k not in ("event", "timestamp", "level", "logger", "exc_info") and not k.startswith("_")
        }
        text = str(redact(str(msg.get("event", ""))))
        if fields:
            text += " (" + ", ".join(f"{k}={redact(v, k)}" for k, v in fields.items()) + ")"
        exc_info = msg.get("exc_info")
    else:
        text = str(redact(record.getMessage()))
        exc_info = record.exc_info
    if exc_info:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc_info, tuple):
            exc = exc_info[1]
        if exc_info is True:
            import sys

            exc = sys.exc_info()[1]
        if exc is not None:
            text += ": " + str(redact("".join(traceback.format_exception_only(type(exc), exc)).strip()))
    return text[:8000]


class EventLogHandler(logging.Handler):
    """Forward log records at ``level`` and above to an :class:`EventLog`, without flooding it.

    A message identical to one written in the last ``repeat_s`` seconds is
    dropped (a tick failing every two seconds leaves one entry, not thousands);
    the JSON log keeps every line.
    """

    def __init__(
        self,
        eventlog: EventLog,
        level: int = logging.ERROR,
        *,
        repeat_s: float = _EVENTLOG_REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(level)
        self.eventlog = eventlog
        self.repeat_s = repeat_s
        self.clock = clock
        self._last: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = _render(record)
            now = self.clock()
            last = self._last.get(text)
            if last is not None and now - last < self.repeat_s:
                return
            self._last[text] = now
            if len(self._last) > 256:
                self._last = {k: t for k, t in self._last.items() if now - t < self.repeat_s}
            write = (
                self.eventlog.error
                if record.levelno >= logging.ERROR
                else (self.eventlog.warning if record.levelno >= logging.WARNING else self.eventlog.info)
            )
            write(text)
        except Exception:  # logging must never break the service
            self.handleError(record)


def child_python(
    executable: str, exec_prefix: str, base_exec_prefix: str, *, isfile: Callable[[str], bool] = os.path.isfile
) -> str | None:
    """The python.exe QC worker children should run, when this process is not one.

    Under pywin32's ``pythonservice.exe`` ``sys.executable`` is that host,
    which cannot run a multiprocessing child; the standard library then
    guesses ``<exec_prefix>\\python.exe``, which does not exist in a venv.
    Returns None when ``executable`` is already a Python interpreter.
    """
    name = PureWindowsPath(executable).name.lower()
    if name.startswith("python") and not name.startswith("pythonservice"):
        return None
    for candidate in (
        PureWindowsPath(exec_prefix, "Scripts", "python.exe"),  # a venv
        PureWindowsPath(exec_prefix, "python.exe"),  # a plain installation
        PureWindowsPath(base_exec_prefix, "python.exe"),
    ):
        if isfile(str(candidate)):
            return str(candidate)
    return None


def default_daemon_factory(config: Config, notify: Callable[[str], None]) -> Any:
    """The same Daemon ``imageqc run`` builds, with the same components."""
    from daemon.service import (
        Daemon,
        default_components,  # the wiring of `imageqc run`, kept in one place
    )

    return Daemon(config, components=default_components(config), notify=notify)


class ServiceHost:
    """One Daemon run on behalf of a service manager.

    Parameters
    ----------
    config_path : str or None
        The config file (from the service's registry parameters or
        ``IMAGEQC_CONFIG``). A service without one does not start.
    eventlog : EventLog
        Lifecycle messages and errors go here as well as to the JSON log.
    report_stop_pending : callable
        Called with a wait hint in milliseconds while the daemon stops.
    daemon_factory : callable
        ``(config, notify) -> Daemon``; tests pass components through it.
    configure : bool
        Set up logging (JSON file, no console, event log for errors).
    stop_budget_s : float, optional
        Give up waiting for a stop after this long; default
        ``shutdown_timeout_s + 30`` (:func:`daemon.hosting.stop_timeout_seconds`).
    """

    def __init__(
        self,
        *,
        config_path: str | None,
        eventlog: EventLog,
        report_stop_pending: Callable[[int], None],
        daemon_factory: Callable[[Config, Callable[[str], None]], Any] = default_daemon_factory,
        configure: bool = True,
        stop_budget_s: float | None = None,
    ) -> None:
        self.config_path = config_path
        self.eventlog = eventlog
        self.report_stop_pending = report_stop_pending
        self.daemon_factory = daemon_factory
        self.configure = configure
        self.stop_budget_s = stop_budget_s
        self.daemon: Any = None
        self.config: Config | None = None
        self._lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._urgent = False
        self._handler: EventLogHandler | None = None

    @property
    def stop_wait_hint_ms(self) -> int:
        """How long the service manager should expect a stop to take."""
        return stop_timeout_seconds(self.config) * 1000 if self.config is not None else _DEFAULT_STOP_MS

    # -- called from the service manager's control thread ------------------------

    def stop(self, *, urgent: bool = False) -> None:
        """Ask the daemon to stop (urgently on system shutdown); returns at once."""
        with self._lock:
            self._urgent = self._urgent or urgent
            self._stop_requested.set()
            if self.daemon is not None:
                self.daemon.request_stop(urgent=self._urgent)

    # -- called from SvcDoRun -------------------------------------------------------

    def run(self) -> None:
        """Run until stopped; raise :class:`ServiceFailed` on any failure (see the module docstring)."""
        try:
            self._run()
        finally:
            if self._handler is not None:
                logging.getLogger().removeHandler(self._handler)
                self._handler = None

    def _fail(self, message: str, cause: BaseException | None = None) -> ServiceFailed:
        log.error(message)  # the JSON log, and the event log through the handler once it is installed
        if self._handler is None:
            self.eventlog.error(message)
        err = ServiceFailed(message)
        err.__cause__ = cause
        return err

    def _load(self) -> Config:
        if not self.config_path:
            msg = (
                "imageqc service has no configuration: reinstall it with `imageqc service install --config "
                "C:\\ProgramData\\imageqc\\imageqc.toml` (or set IMAGEQC_CONFIG for the service)"
            )
            raise self._fail(msg)
        try:
            return load_config(self.config_path)
        except DaemonError as e:
            raise self._fail(f"imageqc service cannot read its configuration: {e}", e) from None

    def _run(self) -> None:
        cfg = self._load()
        self.config = cfg
        if self.configure:
            lg = cfg.logging
            configure_logging(
                level=lg.level, file=cfg.log_file, max_bytes=lg.max_bytes, backups=lg.backups, console="off"
            )
            self._handler = EventLogHandler(self.eventlog)
            logging.getLogger().addHandler(self._handler)

        def notify(message: str) -> None:
            if message == "READY=1":
                roots = "; ".join(str(w.path) for w in cfg.watch)
                self.eventlog.info(
                    f"imageqc is running: watching {roots}; state in {cfg.state_dir}; config {cfg.source}"
                )

        with self._lock:
            daemon = self.daemon = self.daemon_factory(cfg, notify)
            if self._stop_requested.is_set():  # stopped while we were reading the config
                daemon.request_stop(urgent=self._urgent)
        failure: list[BaseException] = []

        def target() -> None:
            try:
                daemon.run_forever(install_signals=False)
            except BaseException as e:  # reported by run() below
                failure.append(e)

        log.info("windows service starting", config=cfg.source)
        thread = threading.Thread(target=target, name="imageqc-daemon", daemon=True)
        thread.start()
        stop_started: float | None = None
        last_pending = 0.0
        budget_s = self.stop_budget_s if self.stop_budget_s is not None else stop_timeout_seconds(cfg)
        while thread.is_alive():
            thread.join(0.25)
            if self._stop_requested.is_set() and thread.is_alive():
                now = time.monotonic()
                stop_started = stop_started or now
                if now - last_pending >= _PENDING_EVERY_S:
                    self.report_stop_pending(self.stop_wait_hint_ms)
                    last_pending = now
                if now - stop_started > budget_s:
                    raise self._fail(
                        f"imageqc did not stop within {budget_s:g} s; the service ends anyway (a running job returns to the queue when its lease expires)"
                    )
        if failure:
            e = failure[0]
            if getattr(daemon, "store", None) is not None:  # failed after opening the store: release it
                try:
                    daemon.stop()
                except Exception:
                    log.exception("cleanup after a failed start failed")
            what = "could not start" if getattr(daemon, "started_at", None) is None else "failed"
            raise self._fail(f"imageqc {what}: {type(e).__name__}: {e}", e)
        if not self._stop_requested.is_set():
            last = getattr(daemon, "last_tick_error", None)
            why = f": {last}" if last else ""
            raise self._fail(f"imageqc stopped on its own{why}; see the log {cfg.log_file}")
        self.eventlog.info("imageqc stopped")


def uses_unc(config: Config) -> bool:
    """Whether any folder is a UNC share (the service then needs the SMB client, LanmanWorkstation)."""
    return any(is_unc(p) for _k, p in config_folders(config))


def mapped_drives(config: Config, drive_type: Callable[[str], int]) -> list[str]:
    """Settings whose path is on a drive letter ``drive_type`` says is remote (a mapped drive).

    ``drive_type(root)`` is ``GetDriveType``: 4 (DRIVE_REMOTE) is a network drive.
    """
    bad = []
    for key, raw in config_folders(config):
        drive = PureWindowsPath(raw).drive
        if drive and len(drive) == 2 and drive[1] == ":" and drive_type(drive + "\\") == 4:
            bad.append(f"{key} = {raw}")
    return bad


def resolve_config_path(path: str | os.PathLike[str]) -> str:
    """The absolute path of a config file, which must exist and load."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    load_config(p)  # raises ConfigError with the file, line and key
    return str(p)
