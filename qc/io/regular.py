"""Opening image files so that only regular files are ever read.

A FIFO, socket or device can carry an image's name (``A02677B5.tif``):
opening a FIFO for reading blocks until some writer opens it, which may be
never, and a device reads forever. :func:`open_regular` opens without
blocking (``O_NONBLOCK`` where the platform has it), looks at what it got
with ``fstat`` and refuses anything but a regular file, so a reader never
waits on such a name and says what it found instead.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from qc.errors import ReadError

__all__ = ["NotRegularFileError", "file_kind", "open_regular"]

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0) | _NONBLOCK


class NotRegularFileError(ReadError):
    """The path is a FIFO, socket, device or folder where an image file was expected; it is never read."""

    hint = "Only regular files are read; remove or rename it if it is not meant to be a scan image"

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        self.kind = kind
        super().__init__(path, f"a {kind}, not a regular file")


def file_kind(mode: int) -> str:
    """What ``st_mode`` describes, in words (``"regular file"``, ``"FIFO"``, ``"socket"``, ...)."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading; never blocks, refuses anything but a regular file.

    Raises
    ------
    NotRegularFileError
        A FIFO, socket, device or folder: nothing was read from it.
    OSError
        The file cannot be opened (missing, permission denied, ...), as ``open`` raises it.
    """
    try:
        fd = os.open(path, _FLAGS)
    except IsADirectoryError:
        raise NotRegularFileError(path, "folder") from None
    except OSError as exc:
        # ENXIO: a socket, or (O_NONBLOCK writes) nothing at the other end: never a regular file
        if exc.errno == errno.ENXIO:
            raise NotRegularFileError(path, _kind_of(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, file_kind(st.st_mode))
        if _NONBLOCK:
            _clear_nonblock(fd)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind_of(path: str | os.PathLike[str]) -> str:
    try:
        return file_kind(os.stat(path).st_mode)
    except OSError:
        return "special file"


def _clear_nonblock(fd: int) -> None:
    """Reads of the regular file then behave as usual (no effect on Linux; some systems honour it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows has no O_NONBLOCK either
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_NONBLOCK)
