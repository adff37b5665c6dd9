"""The tree walk that finds scan-set members, and the diff of two snapshots.

A snapshot maps each member's absolute path to a :class:`MemberStat`; a
member is a file (``.tif``, ``.czi``, ``.tar.gz``) or a tile folder. The
reconciliation rescan is :func:`scan_tree` followed by :func:`diff_snapshots`
against what discovery already knows: a pure comparison, so nothing depends
on file-system events arriving.

The walk never follows symbolic links or junctions, never enters the
service's own folders (``exclude``), skips ignored and temporary names, and
does not look for members inside a tile folder (its files are tiles). A
folder that cannot be listed is reported in ``unreadable`` so that members
under it are not taken for deleted while a share hiccups.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat as stat_mod
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.config import WatchRoot
from daemon.naming import (
    TEMP_PATTERNS,
    MarkerTemplate,
    MemberName,
    NameInfo,
    NameStatus,
    glob_regex,
    looks_like_tile,
    parse_name,
)
from qc.io.listing import file_totals, regular_files
from qc.io.regular import file_kind
from qc.io.tilenames import TILE_SUFFIXES

__all__ = [
    "NOT_REGULAR",
    "NOT_SERIAL",
    "Found",
    "MemberStat",
    "Rejected",
    "RoleCache",
    "ScanResult",
    "SnapshotDiff",
    "WalkPolicy",
    "cached_folder_role",
    "deepest_root",
    "diff_snapshots",
    "folder_role",
    "is_under",
    "norm",
    "probe",
    "scan_tree",
    "stat_tile_folder",
    "tile_folder_files",
]

#: Files that make a folder a tile folder whatever its tiles are called.
TILE_METADATA = ("info.json", "info.ini", "1.ini", "tileconfiguration.txt")
_MAX_IGNORED = 1000


def norm(path: str | os.PathLike[str]) -> str:
    """An absolute, real path string (symbolic links in the root itself are resolved once)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_under(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (string test, case-folded as the OS does)."""
    p, f = os.path.normcase(path), os.path.normcase(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def deepest_root(path: str, roots: Iterable[str]) -> str | None:
    """The deepest of ``roots`` that holds ``path`` (nested watch roots: the inner one), or None."""
    best: str | None = None
    for root in roots:
        if is_under(path, root) and (best is None or len(root) > len(best)):
            best = root
    return best


@dataclass(frozen=True)
class WalkPolicy:
    """How one watch root is walked.

    Attributes
    ----------
    root : str
        The root folder (absolute, real path).
    recursive : bool
        Look in sub-folders.
    ignore : tuple of str
        Glob patterns matched against each path part (case-insensitive).
    naming : {"strict", "lenient"}
        Whether names that are not chip serials are taken (lenient) or reported and ignored.
    exclude : tuple of str
        Folders never entered: the service's output and state folders.
    tile_pattern : str
        Regex with ``row``/``col`` groups for tiles that follow no known convention.
    """

    root: str
    recursive: bool = True
    ignore: tuple[str, ...] = ()
    naming: str = "strict"
    exclude: tuple[str, ...] = ()
    tile_pattern: str = ""
    marker: str = ""
    _tile_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, watch: WatchRoot, *, exclude: Iterable[str | os.PathLike[str]] = ()) -> WalkPolicy:
        return cls(
            root=norm(watch.path),
            recursive=watch.recursive,
            ignore=tuple(watch.ignore),
            naming=watch.naming,
            exclude=tuple(norm(p) for p in exclude),
            tile_pattern=watch.tile_pattern,
            marker=watch.marker,
            _tile_re=re.compile(watch.tile_pattern) if watch.tile_pattern else None,
        )

    def skips(self, name: str) -> bool:
        """True for names never looked at (temporary, hidden or matching ``ignore``)."""
        return glob_regex(TEMP_PATTERNS + self.ignore).match(name) is not None

    def excluded(self, path: str) -> bool:
        return any(is_under(path, x) for x in self.exclude)

    def is_marker(self, name: str) -> bool:
        """True for a marker file name (``marker = "{chip}.done"``)."""
        return MarkerTemplate(self.marker).chip_of(name) is not None if self.marker else False

    def is_tile_name(self, name: str) -> bool:
        stem = name.rsplit(".", 1)[0]
        if self._tile_re is not None and self._tile_re.search(name):
            return True
        return looks_like_tile(stem)


@dataclass(frozen=True)
class MemberStat:
    """What decides whether a member changed.

    ``size`` is in bytes (a folder: the sum of its files), ``mtime_ns`` the
    newest modification time, ``files`` the number of files (1 for a file)
    and ``sig`` a digest that changes when any file's name, size or mtime does.
    """

    size: int
    mtime_ns: int
    files: int
    sig: str


@dataclass(frozen=True)
class Found:
    """A member found on disk."""

    path: str
    member: MemberName
    stat: MemberStat
    serial: bool  #: the chip part is a chip serial (False: taken under lenient naming)


#: :attr:`Rejected.kind` values: a name that is not a chip serial (strict naming), a name
#: on something that is not a regular file (a FIFO, socket or device: never opened).
NOT_SERIAL, NOT_REGULAR = "not_serial", "not_regular"


@dataclass(frozen=True)
class Rejected:
    """A member-shaped name that is skipped: not a chip serial under strict naming, or not a regular file."""

    path: str
    reason: str
    kind: str = NOT_SERIAL


@dataclass(frozen=True)
class ScanResult:
    """One walk of a root (or of a folder under it)."""

    root: str
    start: str
    members: dict[str, Found]
    rejected: tuple[Rejected, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()
    unreadable: frozenset[str] = frozenset()
    files: int = 0
    dirs: int = 0
    complete: bool = True  #: False when the walk was stopped before the end

    def stats(self) -> dict[str, MemberStat]:
        return {p: f.stat for p, f in self.members.items()}


@dataclass(frozen=True)
class SnapshotDiff:
    """Members created, deleted and modified between two snapshots (sorted paths)."""

    created: tuple[str, ...]
    deleted: tuple[str, ...]
    modified: tuple[str, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        return self.created + self.deleted + self.modified

    def __bool__(self) -> bool:
        return bool(self.created or self.deleted or self.modified)


def diff_snapshots(
    old: Mapping[str, MemberStat], new: Mapping[str, MemberStat], *, unreadable: Iterable[str] = ()
) -> SnapshotDiff:
    """Compare two snapshots. Members under an ``unreadable`` folder are never reported deleted."""
    blind = tuple(unreadable)
    created = sorted(p for p in new if p not in old)
    deleted = sorted(p for p in old if p not in new and not any(is_under(p, u) for u in blind))
    modified = sorted(p for p in new if p in old and old[p] != new[p])
    return SnapshotDiff(tuple(created), tuple(deleted), tuple(modified))


def _file_stat(st: os.stat_result) -> MemberStat:
    return MemberStat(st.st_size, st.st_mtime_ns, 1, f"{st.st_size}:{st.st_mtime_ns}")


def tile_folder_files(policy: WalkPolicy, folder: str) -> list[tuple[str, os.stat_result]]:
    """Every regular file in a tile folder (and its sub-folders), with its stat; no links followed.

    Hidden and temporary files count too: something being written in the
    folder means it is not finished, and the QC job checks the same totals
    (``daemon.jobs.member_changes``) before it runs.
    """
    return list(regular_files(folder).files)


def stat_tile_folder(policy: WalkPolicy, folder: str) -> MemberStat:
    """Aggregate stat of a tile folder; ``sig`` covers every file's relative name, size and mtime."""
    files = tile_folder_files(policy, folder)
    h = hashlib.blake2b(digest_size=16)
    cut = len(folder.rstrip(os.sep)) + 1
    for path, st in sorted(files):
        h.update(f"{path[cut:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return MemberStat(*file_totals(files), len(files), h.hexdigest())


def _is_junction(entry: os.DirEntry[str]) -> bool:
    check = getattr(entry, "is_junction", None)
    return bool(check and check())


def folder_role(policy: WalkPolicy, path: str, info: NameInfo) -> str:
    """``"tiles"`` when a member-shaped folder holds tiles, else ``"container"`` (look inside it).

    A folder that holds members of its own (``SS..D1/SS..D1.tif``) is a
    container. A folder named after a chip serial is a tile folder once it
    holds an image file; one whose name is not a serial needs tile-like names
    or a tile metadata file, so that plain folders are never mistaken for one.
    """
    has_image = has_tiles = has_meta = False
    with os.scandir(path) as it:
        entries = list(it)
    for e in entries:
        name = e.name
        if policy.skips(name) or e.is_symlink():
            continue
        low = name.lower()
        is_dir = e.is_dir(follow_symlinks=False)
        if low in TILE_METADATA or low.startswith("tileconfiguration") or (is_dir and low == "metadata"):
            has_meta = True
            continue
        tile_named = not is_dir and policy.is_tile_name(name)
        if not tile_named and parse_name(name, is_dir=is_dir).accepted(policy.naming):
            return "container"
        if not is_dir and os.path.splitext(low)[1] in TILE_SUFFIXES:
            has_image = True
            has_tiles = has_tiles or tile_named
    if info.status is NameStatus.MEMBER:
        return "tiles" if has_image or has_meta else "container"
    return "tiles" if has_tiles or has_meta else "container"


RoleCache = dict[str, tuple[int, str]]


def cached_folder_role(policy: WalkPolicy, path: str, info: NameInfo, cache: RoleCache | None) -> str:
    """:func:`folder_role`, remembered per folder mtime (it changes when entries come or go); the
    rescan and the polling observer share it. Raises OSError when the folder cannot be stat'ed."""
    if cache is None:
        return folder_role(policy, path, info)
    mtime = os.stat(path, follow_symlinks=False).st_mtime_ns
    hit = cache.get(path)
    if hit is None or hit[0] != mtime:
        hit = cache[path] = (mtime, folder_role(policy, path, info))
    return hit[1]


def _examine(
    policy: WalkPolicy,
    path: str,
    name: str,
    is_dir: bool,
    roles: RoleCache | None = None,
    st: os.stat_result | None = None,
) -> Found | Rejected | str | None:
    """One directory entry: a member, a rejected name, ``"descend"`` (a folder to walk) or None.
    ``st``: the entry's own stat when the caller has it (not following links), so it is not taken twice."""
    info = parse_name(name, is_dir=is_dir)
    if is_dir:
        if policy.excluded(path):
            return None
        if info.member is None or cached_folder_role(policy, path, info, roles) == "container":
            return "descend"
        if not info.accepted(policy.naming):
            return Rejected(path, f"tile folder {name!r}: {info.reason} (naming = strict)")
        return Found(path, info.member, stat_tile_folder(policy, path), info.status is NameStatus.MEMBER)
    if info.member is None:
        return None
    if st is None:
        st = os.stat(path, follow_symlinks=False)
    if not stat_mod.S_ISREG(st.st_mode):  # a FIFO would block the first read of it: never opened
        return Rejected(path, f"{name!r} is a {file_kind(st.st_mode)}, not a regular file", NOT_REGULAR)
    if not info.accepted(policy.naming):
        return Rejected(path, f"{name!r}: {info.reason} (naming = strict)")
    return Found(path, info.member, _file_stat(st), info.status is NameStatus.MEMBER)


def _entry_at(policy: WalkPolicy, path: str) -> Found | Rejected | str | None:
    """:func:`_examine` for a path below the root, checking every part of it against the policy."""
    if not is_under(path, policy.root) or os.path.normcase(path) == os.path.normcase(policy.root):
        return None
    parts = os.path.relpath(path, policy.root).split(os.sep)
    if any(policy.skips(p) for p in parts) or (not policy.recursive and len(parts) > 1):
        return None
    if any(is_under(path, x) for x in policy.exclude):
        return None
    try:
        st = os.stat(path, follow_symlinks=False)
        if stat_mod.S_ISLNK(st.st_mode):
            return None
        return _examine(policy, path, parts[-1], stat_mod.S_ISDIR(st.st_mode), st=st)
    except (FileNotFoundError, NotADirectoryError):
        return None


def probe(policy: WalkPolicy, path: str) -> Found | Rejected | None:
    """Look at one path now: the member it is, a rejected name, or None (gone, or not a member).

    Raises ``OSError`` when the answer is unknown (permission denied, share
    unreachable); a missing path is an answer (None).
    """
    got = _entry_at(policy, path)
    return got if isinstance(got, (Found, Rejected)) else None


def scan_tree(
    policy: WalkPolicy,
    start: str | None = None,
    *,
    recursive: bool | None = None,
    stop: threading.Event | None = None,
    roles: RoleCache | None = None,
) -> ScanResult:
    """Walk ``start`` (default: the root) and return every member under it.

    ``start`` below the root is first examined as an entry of its parent (it
    may itself be a tile folder or a member file). ``recursive=False`` looks
    at the entries of ``start`` only. A set ``stop`` event ends the walk early
    (``complete`` is False). Raises nothing for file-system trouble: folders
    that cannot be listed are in ``unreadable``. ``roles`` (a dict kept
    between walks) remembers which folders are tile folders.
    """
    root = policy.root
    start = root if start is None else start
    deep = policy.recursive if recursive is None else (recursive and policy.recursive)
    if os.path.normcase(start) != os.path.normcase(root):
        try:
            got = _entry_at(policy, start)
        except OSError:
            return ScanResult(root, start, {}, unreadable=frozenset({start}), complete=False)
        if isinstance(got, Found):
            return ScanResult(root, start, {got.path: got}, files=got.stat.files)
        if isinstance(got, Rejected):
            return ScanResult(root, start, {}, rejected=(got,))
        if got != "descend":
            return ScanResult(root, start, {})
    members: dict[str, Found] = {}
    rejected: list[Rejected] = []
    ignored: list[tuple[str, str]] = []
    unreadable: set[str] = set()
    files = dirs = 0
    stack = [start]
    complete = True
    while stack:
        if stop is not None and stop.is_set():
            complete = False
            break
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            unreadable.add(folder)
            continue
        dirs += 1
        for e in entries:
            if policy.skips(e.name):
                continue
            try:
                if e.is_symlink() or _is_junction(e):
                    continue
                is_dir = e.is_dir(follow_symlinks=False)
                got = _examine(policy, e.path, e.name, is_dir, roles)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                unreadable.add(e.path)
                continue
            if isinstance(got, Found):
                members[got.path] = got
                files += got.stat.files
            elif isinstance(got, Rejected):
                rejected.append(got)
                files += 0 if is_dir else 1
            elif got == "descend":
                if deep:
                    stack.append(e.path)
            elif not is_dir:
                files += 1
                if len(ignored) < _MAX_IGNORED:
                    ignored.append((e.path, parse_name(e.name).reason))
    return ScanResult(
        root, start, members, tuple(rejected), tuple(ignored), frozenset(unreadable), files, dirs, complete
    )
