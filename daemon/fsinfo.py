"""Facts about the file systems under a path: network or local, free space, a folder's health.

Used to choose SQLite's journal mode (WAL is unsafe on network file systems)
and the watcher's observer (file events do not arrive from SMB/NFS shares).
psutil knows the mount table on Linux, macOS and Windows, so no platform
calls are needed here.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath

import psutil

__all__ = [
    "FOLDER_MISSING",
    "NETWORK_FSTYPES",
    "MountInfo",
    "folder_problem",
    "free_bytes",
    "is_network_path",
    "mount_of",
]

#: File-system types that are network shares (lower case, as psutil reports them).
NETWORK_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "9p",
        "fuse.sshfs",
        "sshfs",
        "davfs",
        "fuse.davfs2",
        "glusterfs",
        "fuse.glusterfs",
        "ceph",
        "fuse.ceph",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.rclone",
        "webdav",
    }
)


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    fstype: str
    remote: bool


def is_unc(path: str | PurePath) -> bool:
    """Whether ``path`` names a Windows share (``\\\\server\\share`` or ``//server/share``), on any platform."""
    return str(path).startswith(("\\\\", "//"))


def mount_of(path: str | PurePath) -> MountInfo | None:
    """The mount holding ``path`` (longest matching mount point), if known."""
    text = str(path)
    if is_unc(text):
        return MountInfo(mountpoint=text, fstype="smb", remote=True)
    try:
        resolved = Path(text).resolve()
    except OSError:
        resolved = Path(text).absolute()
    best: MountInfo | None = None
    best_len = -1
    try:
        parts = psutil.disk_partitions(all=True)
    except (OSError, RuntimeError):  # pragma: no cover - platform quirk
        return None
    for part in parts:
        mp = Path(part.mountpoint)
        if (resolved == mp or mp in resolved.parents) and len(str(mp)) > best_len:
            remote = part.fstype.lower() in NETWORK_FSTYPES or "remote" in part.opts.split(",")
            best = MountInfo(mountpoint=part.mountpoint, fstype=part.fstype, remote=remote)
            best_len = len(str(mp))
    return best


def is_network_path(path: str | PurePath) -> bool:
    """True for UNC paths and paths on NFS/SMB/CIFS and similar mounts."""
    info = mount_of(path)
    return bool(info and info.remote)


def free_bytes(path: str | PurePath) -> int | None:
    """Free space for the nearest existing folder at or above ``path``."""
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


#: :func:`folder_problem`'s answer for a folder that is not there (renamed, deleted, share unmounted).
FOLDER_MISSING = "folder missing"


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """What keeps ``path`` from being used as a folder now, or None when it can be listed.

    ``"folder missing"``, ``"not a folder"`` (a file took its name),
    ``"permission denied"``, or ``"cannot be read (<reason>)"``. All of them
    may pass (a share comes back, a rename is undone, rights are restored):
    callers wait and look again rather than take its contents for deleted.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FOLDER_MISSING
    except NotADirectoryError:  # a parent of it is a file now
        return FOLDER_MISSING
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    try:
        with os.scandir(path):
            pass
    except PermissionError:
        return "permission denied"
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return FOLDER_MISSING
        return f"cannot be read ({e.strerror or e})"
    return None
