"""QC archives (``.tar.gz``) read for re-QC: the SAW archives imageqc and StereoMap write, and imageqc's older ones.

SAW layout (imageqc now, StereoMap Image QC)::

    <QCResultFile>.ipr                          SAW's image record: which images, their stains
    DAPI/ | ssDNA/ | HE/                        the nuclear or H&E image: one TIFF, or a tile folder
    IF/<name>_IF/                               each immunofluorescence image
    imageqc/report.json, imageqc/pictures/...   imageqc's own outputs (not in StereoMap's)

Older imageqc layout::

    <stem>/report.json
    <stem>/pictures/*.png
    <stem>/images/<original file name>          a TIFF or CZI
    <stem>/images/<original folder name>/...    a tile folder

Every member is checked before anything is read: absolute names, ``..``,
links whose target leaves the archive, and device or FIFO members raise
:class:`~qc.errors.UnsafeArchiveError`. The member sizes the tar headers
declare are added up header by header and the archive is refused
(:class:`~qc.errors.ImageTooLargeError`) as soon as they pass
``ReadLimits.max_archive_bytes``, before that member's data is decompressed:
a small ``.tar.gz`` that expands to gigabytes costs a header read. A damaged
IPR raises :class:`~qc.ipr.IPRError` naming the group or attribute.

Nothing is unpacked to disk where it can be avoided: TIFFs up to
:data:`IN_MEMORY_BYTES` are read from memory; larger TIFFs, CZIs (libCZI
needs a path), tile folders and the IPR (HDF5 needs a file) are spilled to a
hidden folder ``.imageqc-archive.partial-<host>-<pid>.*`` in ``scratch_dir``
(the service passes its output folder, whose leftovers of killed writers it
removes), after checking that the member fits in its free space; the folder
is removed when the image is closed (at once for the IPR).

:func:`check_archive_whole` is the cheap completeness check discovery uses:
it reads the gzip header, the first tar header and the gzip trailer, and
never decompresses the archive.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from qc.errors import CorruptImageError, ImageTooLargeError, UnsafeArchiveError
from qc.filenames import fit_name, writer_tag
from qc.io.detect import default_name, sniff_format
from qc.io.limits import GIB, ReadLimits
from qc.io.model import Image, Tile

__all__ = [
    "IN_MEMORY_BYTES",
    "SPILL_PREFIX",
    "ArchiveContents",
    "check_archive_whole",
    "check_member_names",
    "read_archive",
]

#: TIFF members up to this size are read from memory, larger ones spilled to a temporary file.
IN_MEMORY_BYTES = 256 * 1024**2
#: Start of the hidden folders archive members are spilled to (then ``-<host>-<pid>.<random>``).
SPILL_PREFIX = ".imageqc-archive.partial"
#: Free space left over after a spilled member, so spilling never fills a disk to its last byte.
SPILL_MARGIN_BYTES = 64 * 1024**2
_CUT_SHORT = "the file was cut short (copied while still being written?)"


def _unsafe(path: Path, problem: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(path, problem)


def _normal(name: str) -> str | None:
    """A member name as a clean relative POSIX path, or ``None`` if it could escape."""
    name = name.replace("\\", "/")
    if name.startswith(("/", "//")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        return None
    return "/".join(parts)


def check_member_names(path: Path, members: Sequence[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    """Refuse unsafe members; return ``{normalised name: member}``.

    Raises
    ------
    UnsafeArchiveError
        Absolute names, ``..``, links leaving the archive, device/FIFO members.
    """
    out: dict[str, tarfile.TarInfo] = {}
    for m in members:
        name = _normal(m.name)
        if name is None:
            raise _unsafe(path, f"member {m.name!r} has an absolute path or '..'")
        if m.ischr() or m.isblk() or m.isfifo():
            raise _unsafe(path, f"member {m.name!r} is a device or FIFO")
        if m.issym() or m.islnk():
            target = m.linkname.replace("\\", "/")
            if m.issym():
                target = posixpath.join(posixpath.dirname(name), target) if not target.startswith("/") else target
            if _normal(target) is None or posixpath.normpath(target).startswith(".."):
                raise _unsafe(path, f"link {m.name!r} points outside the archive ({m.linkname!r})")
        elif not (m.isfile() or m.isdir()):
            raise _unsafe(path, f"member {m.name!r} has an unsupported type")
        out[name] = m
    return out


class _ArchivedImage(Image):
    """An image read from inside an archive; delegates to the real reader and owns its temp files."""

    format = "tar.gz"

    def __init__(self, inner: Image, archive: Path, member: str, tmpdir: Path | None) -> None:
        self._inner = inner
        self._tmpdir = tmpdir
        self.path = archive / member
        self.member = member
        self.member_format = inner.format
        for attr in ("name", "role", "width", "height", "dtype", "channels", "pixel_size_um"):
            setattr(self, attr, getattr(inner, attr))

    def __getattr__(self, item: str) -> Any:  # levels, info, scenes, ...
        if item.startswith("__") or item == "_inner":
            raise AttributeError(item)
        return getattr(self._inner, item)

    @property
    def tiles(self) -> Sequence[Tile] | None:
        return self._inner.tiles

    def tiles_for(self, channel: int | str = 0) -> Sequence[Tile] | None:
        return self._inner.tiles_for(channel)

    def plane(self, channel: int | str = 0) -> np.ndarray:
        return self._inner.plane(channel)

    def read_region(self, x: int, y: int, width: int, height: int, channel: int | str = 0) -> np.ndarray:
        return self._inner.read_region(x, y, width, height, channel)

    def downsampled(self, factor: int, channel: int | str = 0) -> np.ndarray:
        return self._inner.downsampled(factor, channel)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None


class ArchiveContents:
    """What :func:`read_archive` found: the report (if any) and the opened images."""

    def __init__(self, report: dict[str, Any] | None, images: list[Image], ipr_chip: str | None = None) -> None:
        self.report = report
        self.images = images
        self.ipr_chip = ipr_chip

    @property
    def chip(self) -> str | None:
        """The chip serial the report (or else the IPR) names."""
        chip = (self.report or {}).get("chip")
        return chip if isinstance(chip, str) and chip else self.ipr_chip


def _report_roles(report: dict[str, Any] | None) -> dict[str, str]:
    roles: dict[str, str] = {}
    for entry in (report or {}).get("images", []) or []:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and entry.get("role") in ("nuclear", "IF", "HE")
        ):
            roles[entry["name"]] = entry["role"]
    return roles


def _members_within_budget(tar: tarfile.TarFile, path: Path, limits: ReadLimits) -> list[tarfile.TarInfo]:
    """Every member header, refusing the archive as soon as the declared sizes pass the budget.

    Each header is checked before tarfile skips over its data (which, in a
    gzip stream, means decompressing it), so a bomb is refused at its first
    oversized header.
    """
    members: list[tarfile.TarInfo] = []
    total = 0
    most = limits.max_tiles + 1000
    while True:
        member = tar.next()
        if member is None:
            return members
        members.append(member)
        total += max(member.size, 0) if member.isfile() else 0
        if total > limits.max_archive_bytes:
            problem = (
                f"its members expand to more than {_gib(total)} (member {member.name!r} declares {_gib(member.size)}), "
                f"beyond the limit of {_gib(limits.max_archive_bytes)}; nothing was expanded"
            )
            raise ImageTooLargeError(
                path,
                problem,
                hint="If the archive is genuine, raise qc.max_archive_gb in the config; otherwise remove it",
            )
        if len(members) > most:
            raise CorruptImageError(path, f"the archive has more than {most} members; too many for a QC output")


def _fitted(name: str) -> str:
    """A member's name as a file name this file system takes (:func:`~qc.filenames.fit_name`, extension kept)."""
    stem, dot, ext = name.rpartition(".")
    return fit_name(stem, dot + ext) if stem and len(ext) <= 8 else fit_name(name)


def _gib(n: int) -> str:
    return f"{n / GIB:.3g} GiB"


def _spill_dir(scratch_dir: Path | None, need: int, display: Path) -> Path:
    """A new hidden folder in ``scratch_dir`` (default: the system's temporary folder) with room for ``need`` bytes."""
    base = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if need + SPILL_MARGIN_BYTES > free:
        msg = (
            f"reading {display} needs {_gib(need)} of scratch space in {base} but only {_gib(free)} is free; "
            "free space there, or QC the images without the archive"
        )
        raise OSError(errno.ENOSPC, msg, str(base))
    return Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}-{writer_tag()}.", dir=base))


def read_archive(
    path: str | Path,
    *,
    limits: ReadLimits = ReadLimits(),  # noqa: B008
    scratch_dir: str | Path | None = None,
) -> ArchiveContents:
    """Open every image of a QC archive (SAW layout, or ``<stem>/images/`` of older ones).

    Roles come from ``report.json`` when it lists the image, else from the
    name and pixel type. The caller closes the images (spilled files go with
    them).

    Parameters
    ----------
    path : path
        The ``.tar.gz``.
    limits : ReadLimits
        Passed to the image readers; ``max_archive_bytes`` bounds what the
        members may expand to, ``max_tiles`` their number.
    scratch_dir : path, optional
        Where members that cannot be read from memory are spilled (a hidden
        folder inside it, removed when the image is closed). Default: the
        system's temporary folder; the service passes its output folder.

    Raises
    ------
    qc.errors.ImageTooLargeError
        The members expand beyond ``limits.max_archive_bytes``.
    OSError
        ``ENOSPC`` when a member to spill does not fit in ``scratch_dir``'s free space.
    """
    from qc.io import _open_path  # late import: qc.io imports this module

    path = Path(path)
    try:
        tar = tarfile.open(path, mode="r:gz")  # noqa: SIM115 - closed in the finally below, after the members are read
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorruptImageError(path, f"not a readable .tar.gz archive ({exc})") from exc
    images: list[Image] = []
    try:
        try:
            members = check_member_names(path, _members_within_budget(tar, path, limits))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise CorruptImageError(path, f"the archive is truncated or damaged ({exc})") from exc
        scratch = Path(scratch_dir) if scratch_dir is not None else None
        report = None
        reports = [n for n in members if PurePosixPath(n).name == "report.json" and len(PurePosixPath(n).parts) <= 2]
        if reports:
            try:
                fobj = tar.extractfile(members[reports[0]])
                report = json.loads(fobj.read().decode("utf-8")) if fobj else None
            except (ValueError, tarfile.TarError, OSError, EOFError) as exc:
                raise CorruptImageError(path, f"{reports[0]} cannot be read ({exc})") from exc
        roles = _report_roles(report)
        iprs = [
            n
            for n in members
            if len(PurePosixPath(n).parts) == 1 and n.lower().endswith(".ipr") and members[n].isfile()
        ]
        if iprs:
            chip, entries_ = _saw_entries(tar, path, iprs[0], members, scratch)
            for top, names, is_file, image_name, role in entries_:
                images.append(
                    _open_member(tar, path, top, names, members, is_file, image_name, role, limits, _open_path, scratch)
                )
            if not images:
                msg = f"{iprs[0]} lists images but no stain folder (DAPI/, ssDNA/, HE/, IF/<name>_IF/) of the archive holds one"
                raise CorruptImageError(path, msg)
            return ArchiveContents(report, images, ipr_chip=chip)
        entries: dict[str, list[str]] = {}
        for name in members:
            parts = PurePosixPath(name).parts
            if "images" not in parts[:2]:
                continue
            i = parts.index("images")
            if len(parts) <= i + 1:
                continue
            top = "/".join(parts[: i + 2])
            entries.setdefault(top, []).append(name)
        for top, names in sorted(entries.items()):
            top_member = members.get(top)
            is_file = top_member is not None and (top_member.isfile() or top_member.issym() or top_member.islnk())
            image_name = default_name(PurePosixPath(top).name)
            found_role = roles.get(image_name)
            images.append(
                _open_member(
                    tar,
                    path,
                    top,
                    names if not is_file else [top],
                    members,
                    is_file,
                    image_name,
                    found_role,
                    limits,
                    _open_path,
                    scratch,
                )
            )
    except Exception:
        for img in images:
            img.close()
        raise
    finally:
        tar.close()
    return ArchiveContents(report, images)


_IMAGE_SUFFIXES = (".tif", ".tiff", ".czi")


def _saw_entries(
    tar: tarfile.TarFile, path: Path, ipr_member: str, members: dict[str, tarfile.TarInfo], scratch: Path | None
) -> tuple[str | None, list[tuple[str, list[str], bool, str, str]]]:
    """The chip and the images of a SAW archive from its IPR: ``(top, names, is_file, image name, role)`` each."""
    from qc.ipr import IPRError, read_ipr
    from qc.saw_archive import image_folder

    tmpdir = _spill_dir(scratch, members[ipr_member].size, path / ipr_member)
    try:
        spilled = tmpdir / "record.ipr"
        fobj = tar.extractfile(members[ipr_member])
        if fobj is None:
            raise CorruptImageError(path / ipr_member, "the archive member cannot be read")
        with spilled.open("wb") as out:
            shutil.copyfileobj(fobj, out, 1 << 20)
        try:
            record = read_ipr(spilled)
        except IPRError as e:
            raise IPRError(path / ipr_member, e.where, e.problem, hint=e.hint) from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    entries: list[tuple[str, list[str], bool, str, str]] = []
    chip = None
    for group, image in record.images.items():
        chip = str(image.image_info.get("STOmicsChipSN") or "") or path.name.split("_")[0]
        is_if = group.endswith("_IF")
        role = "IF" if is_if else "HE" if group == "HE" else "nuclear"
        image_name = f"{chip}_{group}" if is_if else chip
        folder = image_folder(group)
        inside = [n for n in members if n.startswith(folder + "/")]
        if not inside:
            continue
        depth = len(PurePosixPath(folder).parts)
        singles = [
            n for n in inside
            if len(PurePosixPath(n).parts) == depth + 1 and members[n].isfile() and n.lower().endswith(_IMAGE_SUFFIXES)
        ]  # fmt: skip
        subdirs = {
            "/".join(PurePosixPath(n).parts[: depth + 1]) for n in inside if len(PurePosixPath(n).parts) > depth + 1
        }
        if len(singles) == 1 and not subdirs:
            entries.append((singles[0], [singles[0]], True, image_name, role))  # a stitched image
        elif len(subdirs) == 1 and not singles:
            top = subdirs.pop()  # a tile folder
            entries.append((top, [n for n in inside if n.startswith(top + "/")], False, image_name, role))
        else:
            entries.append((folder, inside, False, image_name, role))  # tiles laid directly in the stain folder
    return chip, entries


def _open_member(
    tar: tarfile.TarFile,
    path: Path,
    top: str,
    names: Sequence[str],
    members: Mapping[str, tarfile.TarInfo],
    is_file: bool,
    image_name: str,
    role: str | None,
    limits: ReadLimits,
    opener: Callable[..., Image],
    scratch: Path | None,
) -> Image:
    display = path / top
    tmpdir: Path | None = None
    try:
        if is_file:
            member = members[top]
            fobj = tar.extractfile(member)
            if fobj is None:
                raise CorruptImageError(display, "the archive member cannot be read")
            head = fobj.read(16)
            kind = sniff_format(head)
            if kind == "tiff" and member.size <= IN_MEMORY_BYTES:
                buf = io.BytesIO(head + fobj.read())
                from qc.io.tiff import TiffImage

                inner: Image = TiffImage(display, fileobj=buf, name=image_name, role=role, limits=limits)
                return _ArchivedImage(inner, path, top, None)
            tmpdir = _spill_dir(scratch, member.size, display)
            target = tmpdir / _fitted(PurePosixPath(top).name)
            with target.open("wb") as out:
                out.write(head)
                shutil.copyfileobj(fobj, out, 1 << 20)
            inner = opener(target, name=image_name, role=role, limits=limits, display_path=display)
            return _ArchivedImage(inner, path, top, tmpdir)
        tmpdir = _spill_dir(scratch, sum(members[n].size for n in names if members[n].isfile()), display)
        folder = tmpdir / _fitted(PurePosixPath(top).name)
        folder.mkdir()
        for name in names:
            m = members[name]
            rel = PurePosixPath(name).relative_to(top)
            dest = folder.joinpath(*(_fitted(part) for part in rel.parts))
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            fobj = tar.extractfile(m)
            if fobj is None:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("wb") as out:
                shutil.copyfileobj(fobj, out, 1 << 20)
        inner = opener(folder, name=image_name, role=role, limits=limits, display_path=display)
        return _ArchivedImage(inner, path, top, tmpdir)
    except BaseException as exc:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise  # a full disk is not a damaged archive: QC is retried once there is space
        if isinstance(exc, (tarfile.TarError, EOFError, OSError, zlib.error)):
            raise CorruptImageError(display, f"the archive member cannot be read ({exc})") from exc
        raise


def check_archive_whole(path: str | Path) -> None:
    """Raise :class:`CorruptImageError` unless ``path`` looks like a whole ``.tar.gz``; never decompresses it.

    Reads the gzip header, decompresses only the first tar header (512 bytes)
    and reads the gzip trailer, whose size field (the uncompressed length
    modulo 2^32) must be a whole number of 512-byte tar blocks: a file cut
    short while being copied ends in compressed data instead, which passes
    this with a chance of 1 in 512. The full read, with its size budget,
    happens in the QC run.
    """
    path = Path(path)
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(10)
        if len(head) < 10 or head[:2] != b"\x1f\x8b" or head[2] != 8:
            raise CorruptImageError(path, "not a gzip file: the .tar.gz header is missing")
        if size < 10 + 8 + 2:
            raise CorruptImageError(path, f"the {size}-byte file is too short for a .tar.gz: {_CUT_SHORT}")
        fh.seek(size - 8)
        (isize,) = struct.unpack("<4xI", fh.read(8))
        if isize % tarfile.BLOCKSIZE:
            problem = (
                f"the gzip trailer gives an uncompressed size of {isize} bytes (mod 2^32), not a whole number of "
                f"tar blocks: {_CUT_SHORT}"
            )
            raise CorruptImageError(path, problem)
        fh.seek(0)
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        first = b""
        try:
            while len(first) < tarfile.BLOCKSIZE:
                data = inflate.unconsumed_tail or fh.read(64 * 1024)
                if not data:
                    break
                first += inflate.decompress(data, tarfile.BLOCKSIZE - len(first))
                if inflate.eof:
                    break
        except zlib.error as exc:
            raise CorruptImageError(path, f"the gzip stream is damaged at its start ({exc})") from None
    if len(first) < tarfile.BLOCKSIZE:
        raise CorruptImageError(path, f"the archive ends before its first tar header: {_CUT_SHORT}")
    try:
        tarfile.TarInfo.frombuf(first, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exc:
        raise CorruptImageError(path, f"the first tar header is damaged ({exc}); not a tar archive") from None
