"""A scan set's input files as QC read them: their identity and content digest.

Size and mtime do not tell a file from its replacement: a copy that keeps
times (``cp -p``, ``rsync -t``, a re-export restoring the acquisition time)
of the same size looks unchanged. So the QC job records the SHA-256 of every
input (:func:`record_inputs`, stored with the QC result as ``inputs``) and
the uploads compare each file's digest with it before sending it
(:func:`changed_content`).

QC reads a file in pieces, in whatever order its reader wants, so the
digest is taken after QC; that the file QC read is the file hashed is made
sure by its identity (size, mtime, ctime and inode; :func:`identity`) taken
before QC and again after the hash. A write, a ``utime`` or a replacement
changes the ctime or the inode even when size and mtime are put back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.upload.plan import DEFAULT_IGNORE, list_folder

__all__ = ["Identity", "InputsChanged", "changed_content", "identity", "input_files", "record_inputs", "sha256_file"]

_CHUNK = 4 << 20


class InputsChanged(Exception):
    """An input changed while QC read it (``path``, ``what``)."""

    def __init__(self, path: Path | str, what: str) -> None:
        self.path = str(path)
        self.what = what
        super().__init__(f"{path}: {what}")


@dataclass(frozen=True)
class Identity:
    """What changes when a file is written, touched or replaced (ctime and inode even if size and mtime are restored)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    def same_size_and_time(self, other: Identity) -> bool:
        return (self.size, self.mtime_ns) == (other.size, other.mtime_ns)


def identity(path: Path) -> Identity:
    st = os.stat(path)
    return Identity(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def input_files(members: Iterable[dict[str, Any]], *, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Path]:
    """Every file of the scan set: file members, and the files of tile folders (as the uploads list them)."""
    out: list[Path] = []
    for m in members:
        path = Path(m["path"])
        if path.is_dir():
            out += [p for p, _ in list_folder(path, ignore)]
        else:
            out.append(path)
    return out


def sha256_file(path: Path, *, check: Callable[[], None] = lambda: None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            check()
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def record_inputs(
    before: dict[Path, Identity],
    *,
    check: Callable[[], None] = lambda: None,
    known: Mapping[Path, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """``path -> {size, mtime_ns, sha256}`` for files whose identity ``before`` QC was taken.

    ``known`` gives SHA-256s already taken of files as they are now (the tile
    digests live QC and the stitching memoised under the file's size and
    modification time); those files are not read again.

    Raises :class:`InputsChanged` when a file is gone or is not the one QC
    started on (its identity differs after the hash).
    """
    out: dict[str, dict[str, Any]] = {}
    known = known or {}
    for path, was in before.items():
        try:
            digest = known.get(path) or sha256_file(path, check=check)
            now = identity(path)
        except FileNotFoundError:
            raise InputsChanged(path, "vanished while QC ran") from None
        if now != was:
            what = "changed while QC ran" + (
                " (same size and time: written or replaced in place)" if now.same_size_and_time(was) else ""
            )
            raise InputsChanged(path, what)
        out[str(path)] = {"size": now.size, "mtime_ns": now.mtime_ns, "sha256": digest}
    return out


def changed_content(recorded: dict[str, Any] | None, path: Path | str, sha256: str) -> bool:
    """Whether ``sha256`` (of ``path`` now) differs from what QC recorded; False when QC recorded nothing for it."""
    entry = (recorded or {}).get(str(path))
    if not entry or not entry.get("sha256"):
        return False
    return bool(entry["sha256"] != sha256)
