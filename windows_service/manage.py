"""``imageqc service install|remove|start|stop`` on Windows, through pywin32.

Installing registers ``windows_service.service.ImageQCService`` under
pywin32's ``pythonservice.exe``, stores the absolute config path as the
service parameter ``Config``, and sets the recovery actions: restart after
10 s, 60 s, then every 5 min, the failure count reset after a day, applied
also when the service stops with an error (not only on a crash).

The pywin32 modules are looked up when a function runs (``sys.modules``
first), so tests stand in for them with fakes; these paths need Windows and
an elevated prompt for real.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from daemon.config import load_config
from daemon.hosting import ServiceInstallError, stop_timeout_seconds
from windows_service.host import (
    CONFIG_OPTION,
    DESCRIPTION,
    DISPLAY_NAME,
    SERVICE_NAME,
    mapped_drives,
    resolve_config_path,
    uses_unc,
)

__all__ = ["RESET_AFTER_S", "RESTART_DELAYS_S", "SERVICE_CLASS", "cli_action", "install", "remove", "start", "stop"]

#: The class pythonservice.exe hosts.
SERVICE_CLASS = "windows_service.service.ImageQCService"
#: Recovery: restart after these delays (first, second, every later failure).
RESTART_DELAYS_S = (10, 60, 300)
#: The failure count goes back to zero after a day without failures.
RESET_AFTER_S = 86_400
#: Built-in accounts that need no password.
_BUILTIN_ACCOUNTS = {
    "localsystem",
    "nt authority\\localservice",
    "nt authority\\networkservice",
    "nt authority\\system",
}
_ERROR_ACCESS_DENIED = 5
_ERROR_SERVICE_EXISTS = 1073
_ERROR_SERVICE_DOES_NOT_EXIST = 1060
_ERROR_SERVICE_NOT_ACTIVE = 1062


def _pywin32() -> SimpleNamespace:
    try:
        mods = {name: importlib.import_module(name) for name in ("win32service", "win32serviceutil")}
    except ImportError:
        msg = (
            'pywin32 is missing: pip install "imageqc[windows]", then, from an elevated prompt, '
            "python -m pywin32_postinstall -install (see windows_service/README.md)"
        )
        raise ServiceInstallError(msg) from None
    return SimpleNamespace(**mods)


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one pywin32 call; its errors become one clear line."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        code = getattr(e, "winerror", None)
        if code is None:
            raise
        text = getattr(e, "strerror", None) or str(e)
        hint = {
            _ERROR_ACCESS_DENIED: "run the command from an elevated prompt (Run as administrator)",
            _ERROR_SERVICE_EXISTS: "it is installed already: `imageqc service remove` first, or keep it",
            _ERROR_SERVICE_DOES_NOT_EXIST: "it is not installed: `imageqc service install --config FILE`",
        }.get(code, "see the Windows event log (Application, source imageqc)")
        raise ServiceInstallError(f"cannot {what} the {SERVICE_NAME} service: {text} (error {code}); {hint}") from None


def set_recovery(m: SimpleNamespace) -> None:
    """Restart on failure: after 10 s, 60 s, 5 min; also when the service stops with an error."""
    ws = m.win32service
    scm = _call("open the service manager for", ws.OpenSCManager, None, None, ws.SC_MANAGER_ALL_ACCESS)
    try:
        svc = _call("open", ws.OpenService, scm, SERVICE_NAME, ws.SERVICE_ALL_ACCESS)
        try:
            actions = {
                "ResetPeriod": RESET_AFTER_S,
                "RebootMsg": None,
                "Command": None,
                "Actions": tuple((ws.SC_ACTION_RESTART, delay * 1000) for delay in RESTART_DELAYS_S),
            }
            _call(
                "set the recovery actions of", ws.ChangeServiceConfig2, svc, ws.SERVICE_CONFIG_FAILURE_ACTIONS, actions
            )
            _call(
                "set the recovery actions of",
                ws.ChangeServiceConfig2,
                svc,
                ws.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG,
                True,
            )
        finally:
            ws.CloseServiceHandle(svc)
    finally:
        ws.CloseServiceHandle(scm)


def _drive_type(root: str) -> int:  # pragma: no cover - Windows only
    if sys.platform != "win32":  # ctypes.windll exists only there (and mypy checks the rest only for it)
        raise NotImplementedError("Windows only")
    import ctypes

    return int(ctypes.windll.kernel32.GetDriveTypeW(root))


def install(
    config: str,
    *,
    username: str | None = None,
    password: str | None = None,
    startup: str = "delayed",
    modules: SimpleNamespace | None = None,
    drive_type: Callable[[str], int] = _drive_type,
) -> list[str]:
    """Register the service for ``config``; returns what was done, one line each."""
    m = modules or _pywin32()
    ws, wsu = m.win32service, m.win32serviceutil
    path = resolve_config_path(config)
    cfg = load_config(path)
    mapped = mapped_drives(cfg, drive_type)
    if mapped:
        msg = (
            "a service cannot see drive letters mapped in your session: "
            + "; ".join(mapped)
            + ". Write the UNC path instead (e.g. \\\\server\\share\\export) and run the service as an "
            "account that may read the share (windows_service/README.md)"
        )
        raise ServiceInstallError(msg, exit_code=2)
    if startup not in ("delayed", "auto", "manual"):
        raise ServiceInstallError(f"startup must be delayed, auto or manual (got {startup!r})", exit_code=2)
    start_type = ws.SERVICE_DEMAND_START if startup == "manual" else ws.SERVICE_AUTO_START
    deps = ("LanmanWorkstation",) if uses_unc(cfg) else None
    _call(
        "install",
        wsu.InstallService,
        SERVICE_CLASS,
        SERVICE_NAME,
        DISPLAY_NAME,
        startType=start_type,
        serviceDeps=deps,
        userName=username,
        password=password,
        description=DESCRIPTION,
        delayedstart=startup == "delayed",
    )
    done = [f"installed service {SERVICE_NAME} ({DISPLAY_NAME}) as {username or 'LocalSystem'}, start {startup}"]
    try:
        _call("configure", wsu.SetServiceCustomOption, SERVICE_NAME, CONFIG_OPTION, path)
        set_recovery(m)
    except BaseException:
        _call("roll back", wsu.RemoveService, SERVICE_NAME)
        raise
    done.append(f"config {path}")
    done.append(
        "recovery: restart after " + ", ".join(f"{d} s" for d in RESTART_DELAYS_S) + "; count reset after 1 day"
    )
    if deps:
        done.append("depends on LanmanWorkstation (the SMB client), for the UNC paths in the config")
    return done


def start(*, modules: SimpleNamespace | None = None, wait_s: int = 60) -> list[str]:
    m = modules or _pywin32()
    _call("start", m.win32serviceutil.StartService, SERVICE_NAME)
    _call("start", m.win32serviceutil.WaitForServiceStatus, SERVICE_NAME, m.win32service.SERVICE_RUNNING, wait_s)
    return [f"service {SERVICE_NAME} is running; `imageqc status` shows what it does"]


def stop(*, modules: SimpleNamespace | None = None, wait_s: int | None = None) -> list[str]:
    """Stop and wait; by default as long as the configured stop may take."""
    m = modules or _pywin32()
    wsu, ws = m.win32serviceutil, m.win32service
    if not _call("stop", _send_stop, wsu):
        return [f"service {SERVICE_NAME} was not running"]
    if wait_s is None:
        path = _call("read the configuration of", wsu.GetServiceCustomOption, SERVICE_NAME, CONFIG_OPTION)
        wait_s = stop_timeout_seconds(load_config(path)) + 5 if path else 90
    _call("stop", wsu.WaitForServiceStatus, SERVICE_NAME, ws.SERVICE_STOPPED, wait_s)
    return [f"service {SERVICE_NAME} stopped"]


def _send_stop(wsu: Any) -> bool:
    """Send the stop control; False when the service was not running."""
    try:
        wsu.StopService(SERVICE_NAME)
    except Exception as e:
        if getattr(e, "winerror", None) == _ERROR_SERVICE_NOT_ACTIVE:
            return False
        raise
    return True


def remove(*, modules: SimpleNamespace | None = None) -> list[str]:
    """Stop the service if it runs, then unregister it. State, outputs and logs stay."""
    m = modules or _pywin32()
    done = stop(modules=m)
    _call("remove", m.win32serviceutil.RemoveService, SERVICE_NAME)
    return [*done, f"removed service {SERVICE_NAME}; the state folder, outputs and logs are kept"]


def _password_for(username: str | None, ask: Callable[[str], str] = getpass.getpass) -> str | None:
    if not username or username.lower() in _BUILTIN_ACCOUNTS or username.endswith("$"):
        return None  # LocalSystem, the built-in accounts and gMSAs have no password
    return ask(f"password for {username}: ")


def cli_action(args: argparse.Namespace) -> int:
    """The Windows half of ``imageqc service``."""
    import os

    action = args.service_command
    if action == "install":
        config = args.config or os.environ.get("IMAGEQC_CONFIG")
        if not config:
            raise ServiceInstallError("a service needs a configuration file: pass --config FILE", exit_code=2)
        lines = install(config, username=args.username, password=_password_for(args.username), startup=args.startup)
        if getattr(args, "follow_at_logon", False):
            from windows_service.desktop import install_logon_shortcut

            lines += install_logon_shortcut(os.path.abspath(config))
        lines.append("start it: imageqc service start")
    elif action == "remove":
        from windows_service.desktop import remove_logon_shortcut

        lines = remove() + remove_logon_shortcut()
    elif action == "start":
        lines = start()
    else:
        lines = stop()
    for line in lines:
        print(line)
    return 0
