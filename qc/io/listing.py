"""The regular files of a folder tree, listed without following anything.

Discovery (``daemon.snapshot.tile_folder_files``), the QC job's pre-run check
(``daemon.jobs.member_changes``), the QC archive (:func:`qc.saw_archive.walk`)
and the upload plan (``daemon.upload.plan.list_folder``) all list a tile folder
through :func:`regular_files`, so they agree on what it holds. Symbolic links and
junctions are never followed (a link loop or a link out of the watch root
cannot make a listing fail or reach outside the folder), and FIFOs, sockets
and devices are never opened; both are named in ``skipped`` so callers can
say what they left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FolderFiles", "file_totals", "regular_files"]


@dataclass(frozen=True)
class FolderFiles:
    """What :func:`regular_files` found under one folder.

    ``files`` holds ``(path, stat)`` of every regular file, sorted by path
    relative to the folder; ``skipped`` the paths of links, junctions and
    special files (FIFOs, sockets, devices), sorted, none of them followed or
    opened.
    """

    files: tuple[tuple[str, os.stat_result], ...]
    skipped: tuple[str, ...]

    def totals(self) -> tuple[int, int]:
        """``(total size, newest mtime_ns)`` of the files: how discovery, QC and the upload check
        tell whether a tile folder changed."""
        return file_totals(self.files)


def file_totals(files: Iterable[tuple[object, os.stat_result]]) -> tuple[int, int]:
    """``(total size, newest mtime_ns)`` of ``(path, stat)`` pairs (0, 0 for none)."""
    size = newest = 0
    for _, st in files:
        size += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return size, newest


def _is_junction(entry: os.DirEntry[str]) -> bool:
    check = getattr(entry, "is_junction", None)  # Python 3.12+; junctions exist on Windows only
    return bool(check and check())


def regular_files(folder: str | os.PathLike[str]) -> FolderFiles:
    """Every regular file under ``folder`` and its sub-folders, following no link.

    Entries that vanish while the folder is listed are left out. A folder
    that cannot be listed raises its :class:`OSError` (the caller decides
    whether that is transient), except one that vanished meanwhile.
    """
    top = os.fspath(folder)
    files: list[tuple[str, os.stat_result]] = []
    skipped: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            if d == top:
                raise
            continue
        for e in entries:
            try:
                if e.is_symlink() or _is_junction(e):
                    skipped.append(e.path)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files.append((e.path, e.stat(follow_symlinks=False)))
                else:
                    skipped.append(e.path)
            except FileNotFoundError:
                continue
    cut = len(top.rstrip("/" + os.sep)) + 1
    files.sort(key=lambda f: f[0][cut:].replace(os.sep, "/").split("/"))
    skipped.sort()
    return FolderFiles(tuple(files), tuple(skipped))
