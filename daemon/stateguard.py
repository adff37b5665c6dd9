"""Guard the state folder while the service runs: one service, on the database it opened.

Two things hold the service's state together: the job database and the lock
file that keeps a second service out (``service.lock``). Deleting either
while the service runs went unnoticed: SQLite kept writing to the deleted
file while QC children made a new, empty one beside it, and a second service
took the new lock and the first one's jobs (issue #20 cases 5 and 6).

- :class:`StateGuard` remembers the identity (device and inode, or on Windows
  the volume serial and file index that :func:`os.stat` gives) of the state
  folder, the database and the lock file at start; the service checks them
  every round and stops when one is gone or has been replaced. The service
  holds the database and the lock file open, so their inode numbers cannot be
  given to a new file at the same path while it runs.
- :func:`live_service` reads the heartbeat another service writes, so a
  second service refuses to start beside a live one even when the lock file
  is missing.
- :func:`saved_copy_name` and :func:`restore_saved_copy`: the service still
  holds its connection to a deleted database, so it saves what it held (with
  SQLite's backup API) before it stops; the next start resumes from that copy
  when no database is there.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from daemon.errors import DaemonError
from daemon.fsinfo import is_network_path
from daemon.logging import get_logger

__all__ = [
    "SAVED_MARK",
    "DatabaseLost",
    "FileId",
    "LockLost",
    "StateGuard",
    "StateLost",
    "copy_failed",
    "file_id",
    "live_service",
    "read_heartbeat",
    "restore_saved_copy",
    "saved_copies",
    "saved_copy_name",
]

log = get_logger("imageqc.stateguard")

#: What follows the database's name in the name of a copy saved when it was deleted under the service.
SAVED_MARK = ".saved-"


class StateLost(DaemonError):
    """A file the running service relies on was deleted or replaced."""

    def __init__(self, path: Path, how: str) -> None:
        self.path = path
        self.how = how  # "deleted" or "replaced"
        super().__init__(f"{path} was {how} while the service ran")

    def explain(self, database: Path, saved: Path | None) -> str:
        """The service's reason to stop: what happened, what it did, what to do."""
        raise NotImplementedError


class DatabaseLost(StateLost):
    """The job database (or its folder) was deleted or replaced."""

    def explain(self, database: Path, saved: Path | None) -> str:
        what = (
            f"the job database {database}"
            if self.path == database
            else f"the state folder {self.path} holding the job database"
        )
        if self.how == "deleted":
            return (
                f"{what} was deleted while the service ran; a copy of what it held was saved as {saved}; "
                "the next start resumes from it"
            )
        return (
            f"{what} was replaced while the service ran; a copy of what the service held was saved as {saved}. "
            f"The next start resumes from that copy if no job database is at {database}: move the new one aside for that"
        )


class LockLost(StateLost):
    """The lock file was deleted or replaced."""

    def explain(self, database: Path, saved: Path | None) -> str:
        return (
            f"the lock file {self.path} was {self.how} while the service ran; another service could start beside "
            "this one, so this one stops. Start it again: it makes a new lock file and resumes"
        )


def copy_failed(database: Path, dest: Path, error: BaseException) -> str:
    """The reason to stop when even the copy of a database deleted under the service could not be saved."""
    return (
        f"the job database {database} was deleted or replaced while the service ran, and saving a copy of what it "
        f"held as {dest} failed ({error}); free space or fix permissions in {dest.parent}. The next start "
        "rediscovers the scan sets that are still in the watch folders"
    )


@dataclass(frozen=True)
class FileId:
    """Which file a path names: ``st_dev`` and ``st_ino`` (volume serial and file index on Windows)."""

    dev: int
    ino: int


def file_id(path: Path) -> FileId | None:
    """The identity of the file at ``path``; None when nothing is there.

    Raises
    ------
    OSError
        When it cannot be told (a network share not answering): not a sign of deletion.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return FileId(st.st_dev, st.st_ino)


class StateGuard:
    """The state folder, the job database and the lock file as the service found them at start.

    Parameters
    ----------
    database, lock : Path
        The job database and the lock file; the state folder is the database's folder.
    by_presence_only : bool
        Compare presence only, not identity: on network file systems inode numbers may be made up by
        the client and change while the file stays the same. Default: when the folder is on one.
    """

    def __init__(self, database: Path, lock: Path, *, by_presence_only: bool | None = None) -> None:
        self.database = database
        self.lock = lock
        self.folder = database.parent
        if by_presence_only is None:
            by_presence_only = is_network_path(self.folder)
        self.by_presence_only = by_presence_only
        self._ids = {p: file_id(p) for p in (self.folder, self.database, self.lock)}

    def check(self) -> None:
        """Raise :class:`DatabaseLost` or :class:`LockLost` when a file is gone or not the same file.

        A path that cannot be looked at just now (an I/O error) is passed over until the next check.
        """
        for path, lost in ((self.folder, DatabaseLost), (self.database, DatabaseLost), (self.lock, LockLost)):
            try:
                now = file_id(path)
            except OSError as e:
                log.debug("cannot check a state file now", path=str(path), error=str(e))
                continue
            was = self._ids[path]
            if now is None:
                raise lost(path, "deleted")
            if was is not None and not self.by_presence_only and now != was:
                raise lost(path, "replaced")


# -- the heartbeat of another service ------------------------------------------------


def read_heartbeat(database: Path) -> tuple[dict[str, Any], float] | None:
    """The service heartbeat stored in ``database`` and when it was written; None when there is none
    or it cannot be read (no database, an older schema: the checks that follow say why)."""
    if not database.exists():
        return None
    try:
        conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value, updated_at FROM service_status WHERE key = 'service'").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if row is None:
        return None
    try:
        return json.loads(row[0]), float(row[1])
    except (TypeError, ValueError):
        return None


def live_service(heartbeat: dict[str, Any], at: float, *, now: float, age_limit: float) -> bool:
    """Whether the service that wrote ``heartbeat`` at ``at`` runs: it says it runs, its heartbeat is
    at most ``age_limit`` seconds old and, on this host, its process is alive."""
    if heartbeat.get("state") != "running" or now - at > age_limit:
        return False
    if heartbeat.get("host") != socket.gethostname():
        return True  # another PC sharing the state folder: the heartbeat is all there is
    try:
        proc = psutil.Process(int(heartbeat.get("pid", -1)))
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, TypeError):
        return False


# -- the copy saved when the database was deleted -----------------------------------


def saved_copy_name(database: Path, when: float | None = None) -> Path:
    """Where the copy of a deleted ``database`` goes: beside it, named after the (local) time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if when is None else when))
    path = database.with_name(f"{database.name}{SAVED_MARK}{stamp}")
    n = 1
    while path.exists():
        n += 1
        path = database.with_name(f"{database.name}{SAVED_MARK}{stamp}-{n}")
    return path


_STAMP = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")


def saved_copies(database: Path) -> list[Path]:
    """The copies of ``database`` saved by a service that saw it deleted or replaced, oldest first."""
    prefix = f"{database.name}{SAVED_MARK}"
    found = []
    try:
        for p in database.parent.glob(f"{prefix}*"):
            m = _STAMP.fullmatch(p.name[len(prefix) :])
            if m and p.is_file():
                found.append((m.group(1), int(m.group(2) or 1), p))
    except OSError:
        return []
    return [p for *_key, p in sorted(found)]


def restore_saved_copy(database: Path) -> Path | None:
    """With no ``database`` there, put the newest copy saved by a service that saw it deleted in its
    place; returns that copy's former path (None when there was nothing to do).

    SQLite files left beside the missing database (``-wal``, ``-journal``, ``-shm``) belong to the
    deleted file: they are moved aside (``<copy>-wal.stale``) so SQLite does not apply them to the copy.
    """
    if database.exists():
        return None
    copies = saved_copies(database)
    if not copies:
        return None
    newest = copies[-1]
    for suffix in ("-wal", "-journal", "-shm"):
        left = database.with_name(database.name + suffix)
        if left.exists():
            left.replace(left.with_name(f"{newest.name}{suffix}.stale"))
    newest.replace(database)
    return newest
