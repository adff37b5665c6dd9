"""Is this scan set finished? Settle time, writers, structure, or a marker file.

A scan set is complete when

1. nothing in it changed (member sizes, mtimes, file counts, new or removed
   members) for the root's ``settle_seconds``;
2. for sets that may still receive IF images, the discovery
   ``grouping_window_s`` has passed since its newest member appeared;
3. no member file is open for writing: on Windows opening a file while
   denying others write access fails with a sharing violation when a writer
   holds it; on Linux ``/proc/*/fd`` of the processes we may see is searched
   (a writer on another machine of a network share is invisible: the settle
   time and the structural check cover that); elsewhere the check is skipped;
4. every member is structurally whole: a TIFF's IFDs and strips/tiles lie
   inside the file, a CZI's subblock directory reads, a tile folder's grid is
   complete (:func:`qc.io.inspect_tile_folder`) and its newest TIFF tiles are
   whole, an archive reads to its end;

or, when the root configures a ``marker`` (``"{chip}.done"``), when the
marker file exists in the set's folder: then the marker alone decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from daemon.naming import IF, NUCLEAR, MarkerTemplate
from daemon.snapshot import MemberStat, WalkPolicy, is_under, tile_folder_files
from qc.errors import QCError
from qc.io import (
    check_archive_whole,
    check_czi_whole,
    check_tiff_whole,
    inspect_tile_folder,
)

__all__ = [
    "Judge",
    "MemberState",
    "SetView",
    "Verdict",
    "check_member_whole",
    "fingerprint",
    "member_files",
    "open_for_writing",
]

#: How many of a tile folder's newest TIFF tiles get the structural check.
NEWEST_TILES_CHECKED = 8
_O_ACCMODE, _O_WRONLY, _O_RDWR = 3, 1, 2


@dataclass(frozen=True)
class MemberState:
    """A member as discovery knows it (times are the service clock's, in seconds)."""

    path: str
    name: str
    chip: str
    format: str
    role: str
    stain: str | None
    stat: MemberStat
    first_seen: float
    last_change: float

    def job_member(self) -> dict[str, object]:
        """The dict stored in ``scan_sets.members`` for the QC job."""
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "role": self.role,
            "stain": self.stain,
            "size": self.stat.size,
            "mtime_ns": self.stat.mtime_ns,
            "files": self.stat.files,
        }


@dataclass(frozen=True)
class SetView:
    """One scan set at one moment: its members and the times that matter."""

    chip: str
    folder: str
    members: tuple[MemberState, ...]
    last_change: float  #: last time anything in the set changed (incl. members leaving)

    @property
    def newest_arrival(self) -> float:
        return max((m.first_seen for m in self.members), default=self.last_change)


@dataclass(frozen=True)
class Verdict:
    """What the judge decided.

    ``stage`` is ``settling``, ``grouping``, ``marker`` (waiting for it),
    ``open`` (a writer holds a file), ``incomplete`` (structure or grid),
    ``ambiguous`` (two members with one name) or ``complete``. ``recheck_at``
    is when the answer may change without any file changing (None: only a
    change can).
    """

    complete: bool
    stage: str
    reason: str = ""
    recheck_at: float | None = None


def fingerprint(members: Iterable[MemberState], root: str | None = None) -> str:
    """SHA-256 of the members' names, formats, sizes, mtimes and file counts (tile folders: every tile).

    With ``root``, each member's path under it counts too: the same files
    renamed or moved to another folder are another scan set. Without it: the
    identity of jobs queued before paths counted (discovery still finds them).
    """
    rows = sorted(
        (m.name, m.format, m.stat.size, m.stat.mtime_ns, m.stat.files, m.stat.sig)
        + (() if root is None else (os.path.relpath(m.path, root).replace(os.sep, "/"),))
        for m in members
    )
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def member_files(policy: WalkPolicy, member: MemberState) -> list[str]:
    """The files a member consists of (a tile folder's tiles, or the file itself)."""
    if member.format != "tiles":
        return [member.path]
    try:
        return [p for p, _ in tile_folder_files(policy, member.path)]
    except OSError:
        return []


# -- open for writing ------------------------------------------------------------


def open_for_writing(paths: Iterable[str]) -> set[str] | None:
    """The paths some process holds open for writing; None when this OS offers no check.

    Windows: each file is opened with read access, sharing read only; a
    sharing violation means a writer holds it. Linux: the ``/proc/*/fd`` links
    of the processes this user may inspect. Best effort everywhere: a writer
    on another computer (network share) is never seen.
    """
    wanted = {os.path.normcase(os.path.abspath(p)) for p in paths}
    if not wanted:
        return set()
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows
        return {p for p in wanted if _windows_locked(p)}
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd"):
        return _linux_writers(wanted)
    return None


def _linux_writers(wanted: set[str], *, budget_s: float = 1.0) -> set[str]:
    found: set[str] = set()
    deadline = time.monotonic() + budget_s
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in pids:
        if time.monotonic() > deadline:  # best effort: never stall the service
            break
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target in wanted and _fd_writable(pid, fd):
                found.add(target)
    return found


def _fd_writable(pid: str, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & _O_ACCMODE in (_O_WRONLY, _O_RDWR)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: assume it writes (it is re-checked soon)


def _windows_locked(path: str) -> bool:  # pragma: no cover - Windows only
    if sys.platform != "win32":  # ctypes.WinDLL exists only there (and mypy checks the rest only for it)
        raise NotImplementedError("Windows only")
    import ctypes
    from ctypes import wintypes

    generic_read, file_share_read, open_existing = 0x80000000, 0x1, 3
    error_sharing_violation, error_lock_violation = 32, 33
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateFileW.restype = wintypes.HANDLE
    kernel32.CreateFileW.argtypes = [
        wintypes.LPCWSTR,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.LPVOID,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.HANDLE,
    ]
    handle = kernel32.CreateFileW(path, generic_read, file_share_read, None, open_existing, 0x80, None)
    if handle == wintypes.HANDLE(-1).value:
        return ctypes.get_last_error() in (error_sharing_violation, error_lock_violation)
    kernel32.CloseHandle(handle)
    return False


# -- structure -----------------------------------------------------------------


def check_member_whole(policy: WalkPolicy, member: MemberState) -> str | None:
    """None when the member is structurally whole, else the reason (one line)."""
    try:
        if member.format == "tiff":
            check_tiff_whole(member.path)
        elif member.format == "czi":
            check_czi_whole(member.path)
        elif member.format == "tar.gz":
            check_archive_whole(member.path)  # headers and trailer only: the service loop never decompresses it
        elif member.format == "tiles":
            return _check_tiles(policy, member)
    except (QCError, ValueError) as e:
        return str(e)
    except OSError as e:
        return f"{member.path}: cannot be read ({e.strerror or e})"
    return None


def _check_tiles(policy: WalkPolicy, member: MemberState) -> str | None:
    info = inspect_tile_folder(member.path, pattern=policy.tile_pattern or None)
    name = os.path.basename(member.path)
    if info.convention is None:
        return (
            f"tile folder {name}: no tile naming convention matched its {member.stat.files} files; "
            "name tiles *_RRRR_CCCC_*, set the root's tile_pattern or put a TileConfiguration.txt with their positions beside them"
        )
    if info.missing_files:
        listed = info.tile_configuration.name if info.tile_configuration is not None else "TileConfiguration.txt"
        return (
            f"tile folder {name}: {len(info.missing_files)} of {info.cols} tiles that {listed} lists are missing "
            f"(first: {info.missing_files[0]})"
        )
    if info.missing:
        r, c = info.missing[0]
        total = info.rows * info.cols
        return f"tile folder {name}: {len(info.missing)} of {total} tiles missing (first: row {r}, column {c})"
    if info.duplicates:
        r, c = info.duplicates[0]
        return f"tile folder {name}: {len(info.duplicates)} grid cells have two tiles (first: row {r}, column {c})"
    tiffs = [
        (p, st.st_mtime_ns) for p, st in tile_folder_files(policy, member.path) if p.lower().endswith((".tif", ".tiff"))
    ]
    for path, _ in sorted(tiffs, key=lambda t: t[1], reverse=True)[:NEWEST_TILES_CHECKED]:
        check_tiff_whole(path)
    return None


# -- the judge -----------------------------------------------------------------


class Judge:
    """Decides completion for the sets of one root; remembers structural checks per member signature.

    Parameters
    ----------
    policy : WalkPolicy
    settle_s : float
        The root's settle time.
    grouping_s : float
        Grouping window (0 for stains that never have IF images).
    marker : str
        Marker-file template, '' for none.
    recheck_s : float
        How soon to look again at a set held by a writer or waiting for its marker.
    whole : callable
        ``whole(policy, member) -> reason | None`` (the structural check).
    """

    def __init__(
        self,
        policy: WalkPolicy,
        *,
        settle_s: float,
        grouping_s: float = 0.0,
        marker: str = "",
        recheck_s: float = 5.0,
        whole: Callable[[WalkPolicy, MemberState], str | None] = check_member_whole,
    ) -> None:
        self.policy = policy
        self.settle_s = settle_s
        self.grouping_s = grouping_s
        self.marker = MarkerTemplate(marker)
        self.recheck_s = recheck_s
        self._whole = whole
        self._whole_cache: dict[str, tuple[str, str | None]] = {}

    def timing(self, view: SetView, now: float) -> Verdict | None:
        """The settle and grouping waits; None when both have passed (run :meth:`checks`)."""
        if self.marker:
            return None
        due = view.last_change + self.settle_s
        if now < due:
            return Verdict(
                False,
                "settling",
                f"still changing (last change {now - view.last_change:.0f} s ago, settle time {self.settle_s:g} s)",
                due,
            )
        due = view.newest_arrival + self.grouping_s
        if now < due:
            return Verdict(False, "grouping", f"waiting {due - now:.0f} s more for late IF images", due)
        return None

    def checks(self, view: SetView, now: float, open_paths: set[str] | None) -> Verdict:
        """Marker, names, writers and structure, for a set whose waits have passed."""
        if self.marker:
            name = self.marker.name_for(view.chip)
            if os.path.isfile(os.path.join(view.folder, name)):
                return Verdict(True, "complete", f"marker {name} present")
            return Verdict(False, "marker", f"waiting for the marker file {name}", now + self.recheck_s)
        names = [m.name for m in view.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            paths = ", ".join(os.path.basename(m.path) for m in view.members if m.name == dupes[0])
            return Verdict(False, "ambiguous", f"{paths} name the same image; keep one of them")
        roles = {m.role for m in view.members}
        if IF in roles and NUCLEAR not in roles:
            return Verdict(
                False, "incomplete", f"IF images but no nuclear image {view.chip} (.tif, .czi or tile folder) yet"
            )
        if open_paths:
            held = sorted(p for p in open_paths if any(is_under(p, m.path) for m in view.members))
            if held:
                return Verdict(False, "open", f"{held[0]} is still open for writing", now + self.recheck_s)
        for m in view.members:
            reason = self.whole_reason(m)
            if reason:
                return Verdict(False, "incomplete", reason)
        return Verdict(True, "complete")

    def whole_reason(self, member: MemberState) -> str | None:
        cached = self._whole_cache.get(member.path)
        if cached is not None and cached[0] == member.stat.sig:
            return cached[1]
        reason = self._whole(self.policy, member)
        self._whole_cache[member.path] = (member.stat.sig, reason)
        return reason

    def forget(self, paths: Sequence[str]) -> None:
        for p in paths:
            self._whole_cache.pop(p, None)
