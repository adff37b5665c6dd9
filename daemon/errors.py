"""Errors raised by the service.

One root (:class:`DaemonError`); subclasses carry the fields a person needs and
an exit code for the CLI (1 operational failure, 2 usage or configuration).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ConfigError",
    "ConfigErrors",
    "DaemonError",
    "DatabaseUnavailable",
    "IllegalTransition",
    "JobNotFound",
    "PermanentUploadError",
    "StoreError",
    "TransientUploadError",
    "UploadError",
]


class DaemonError(Exception):
    """Root of all errors raised by :mod:`daemon`."""

    exit_code = 1


class ConfigError(DaemonError):
    """A configuration file is unreadable or a setting is wrong.

    ``str(err)`` is one line: ``FILE:LINE: key.path: problem``.
    """

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        key: str = "",
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else "<embedded default>"
        self.key = key
        self.line = line
        where = self.file if line is None else f"{self.file}:{line}"
        what = f"{key}: {problem}" if key else problem
        super().__init__(f"{where}: {what}")


class ConfigErrors(ConfigError):
    """Several settings of one file are wrong: every one is reported at once, a line each.

    ``errors`` holds them; the attributes of :class:`ConfigError` are the first one's.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.problem, file=first.file, key=first.key, line=first.line)
        self.errors = list(errors)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class StoreError(DaemonError):
    """The job database failed in a way the caller cannot fix by retrying."""


class DatabaseUnavailable(StoreError):
    """The database is locked by another program or is corrupt; the service refuses to run."""


class IllegalTransition(StoreError):
    """A job was asked to move between two states the state machine does not connect."""

    def __init__(self, job_id: int, current: str, target: str) -> None:
        self.job_id = job_id
        self.current = current
        self.target = target
        super().__init__(f"job {job_id}: cannot go from {current!r} to {target!r}")


class JobNotFound(StoreError):
    """No job with that id."""

    exit_code = 2

    def __init__(self, job_id: int | str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}; list jobs with `imageqc jobs`")


class UploadError(DaemonError):
    """An upload failed. ``target`` names the configured target."""

    retryable = False

    def __init__(self, target: str, problem: str, *, hint: str = "") -> None:
        self.target = target
        self.problem = problem
        self.hint = hint
        msg = f"upload target {target!r}: {problem}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class TransientUploadError(UploadError):
    """Network loss, timeouts, 5xx: retried with backoff."""

    retryable = True


class PermanentUploadError(UploadError):
    """Bad credentials, missing bucket, access denied: fails the job at once."""
