"""What the service hosts (systemd, the Windows service) share about a configuration.

Kept apart from :mod:`daemon.install` so that :mod:`windows_service` can use it
without importing the installer, which itself dispatches to
:mod:`windows_service.manage` on Windows (no import cycle either way).
"""

from __future__ import annotations

import math

from daemon.config import Config
from daemon.errors import DaemonError

__all__ = ["ServiceInstallError", "config_folders", "stop_timeout_seconds"]


class ServiceInstallError(DaemonError):
    """The service cannot be installed, removed, started or stopped as asked."""

    def __init__(self, problem: str, *, exit_code: int = 1) -> None:
        self.exit_code = exit_code
        super().__init__(problem)


def stop_timeout_seconds(config: Config) -> int:
    """How long a clean stop may take: the running job's grace period plus 30 s."""
    return math.ceil(config.service.shutdown_timeout_s) + 30


def config_folders(config: Config) -> list[tuple[str, str]]:
    """Every folder setting of a config the service touches, as ``(setting, path as written)``."""
    out = [("state_dir", str(config.state_dir))]
    out += [(f"watch[{i}].path", str(w.path)) for i, w in enumerate(config.watch)]
    if config.output.dir:
        out.append(("output.dir", config.output.dir))
    if config.logging.file:
        out.append(("logging.file", config.logging.file))
    out += [(f"upload[{i}].path", t.path) for i, t in enumerate(config.upload) if t.type == "hpc" and t.path]
    return out
