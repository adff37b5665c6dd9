"""The user's desktop on Windows: which session this process runs in, and a logon shortcut.

A Windows service runs in session 0, which has no desktop (session 0
isolation), so it cannot show notifications itself. ``imageqc follow --notify``
runs in each user's session instead; installing with ``--follow-at-logon``
puts a shortcut to it in the Startup folder of all users, so it starts at every
logon without a console window (``pythonw.exe``).

Windows only: the calls are made when a function runs (``ctypes.windll``, and
pywin32's ``win32com.client`` looked up in ``sys.modules`` first, so tests can
stand in for it).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["SHORTCUT_NAME", "common_startup_folder", "install_logon_shortcut", "remove_logon_shortcut", "session_id"]

#: The shortcut's file name in the Startup folder.
SHORTCUT_NAME = "imageqc verdicts.lnk"


def session_id() -> int:
    """The Windows session of this process (0: a service's session, without a desktop)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    sid = wintypes.DWORD()
    if not kernel32.ProcessIdToSessionId(kernel32.GetCurrentProcessId(), ctypes.byref(sid)):
        return -1  # unknown: let the notification library try
    return int(sid.value)


def common_startup_folder(env: dict[str, str] | None = None) -> Path:
    """The Startup folder of all users (``%ProgramData%\\Microsoft\\Windows\\Start Menu\\Programs\\StartUp``)."""
    env = dict(os.environ) if env is None else env
    base = env.get("ProgramData") or env.get("PROGRAMDATA") or r"C:\ProgramData"
    return Path(base) / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "StartUp"


def _pythonw(executable: str = sys.executable) -> str:
    """pythonw.exe beside the Python running imageqc (no console window), else that Python."""
    candidate = Path(executable).with_name("pythonw.exe")
    return str(candidate) if candidate.exists() else executable


def install_logon_shortcut(config: str, *, folder: Path | None = None, executable: str = sys.executable) -> list[str]:
    """Create the Startup-folder shortcut running ``imageqc follow --notify --config CONFIG``; returns what was done."""
    folder = common_startup_folder() if folder is None else folder
    client: Any = sys.modules.get("win32com.client") or importlib.import_module("win32com.client")
    shell = client.Dispatch("WScript.Shell")
    target = folder / SHORTCUT_NAME
    link = shell.CreateShortcut(str(target))
    link.TargetPath = _pythonw(executable)
    link.Arguments = f'-m daemon.cli follow --notify --config "{config}"'
    link.WorkingDirectory = str(Path(config).parent)
    link.Description = "Shows each new image QC verdict of the imageqc service as a desktop notification"
    link.Save()
    return [f"wrote {target}: every user who logs on sees new QC verdicts as notifications"]


def remove_logon_shortcut(*, folder: Path | None = None) -> list[str]:
    """Delete the Startup-folder shortcut, if there is one."""
    target = (common_startup_folder() if folder is None else folder) / SHORTCUT_NAME
    if target.exists():
        target.unlink()
        return [f"removed {target}"]
    return []
