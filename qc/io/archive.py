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
:class:`~qc.errors.UnsafeArchiveError`. A damaged IPR raises
:class:`~qc.ipr.IPRError` naming the group or attribute. Nothing is unpacked
to disk where it can be avoided: TIFFs up to :data:`IN_MEMORY_BYTES` are read
from memory; larger TIFFs, CZIs (libCZI needs a path), tile folders and the
IPR (HDF5 needs a file) are spilled to a temporary directory that is removed
when the image is closed (at once for the IPR).
"""

from __future__ import annotations

import io
import json
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from qc.errors import CorruptImageError, UnsafeArchiveError
from qc.io.detect import default_name, sniff_format
from qc.io.limits import ReadLimits
from qc.io.model import Image, Tile

__all__ = ["IN_MEMORY_BYTES", "ArchiveContents", "read_archive", "check_member_names"]

#: TIFF members up to this size are read from memory, larger ones spilled to a temporary file.
IN_MEMORY_BYTES = 256 * 1024**2


def _unsafe(path: Path, problem: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(path, problem)


def _normal(name: str) -> str | None:
    """A member name as a clean relative POSIX path, or ``None`` if it could escape."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("//"):
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
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("role") in ("nuclear", "IF", "HE"):
            roles[entry["name"]] = entry["role"]
    return roles


def read_archive(path: str | Path, *, limits: ReadLimits = ReadLimits()) -> ArchiveContents:  # noqa: B008
    """Open every image under ``<stem>/images/`` of a QC archive.

    Roles come from ``report.json`` when it lists the image, else from the
    name and pixel type. The caller closes the images (temp files go with them).
    """
    from qc.io import _open_path  # late import: qc.io imports this module

    path = Path(path)
    try:
        tar = tarfile.open(path, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorruptImageError(path, f"not a readable .tar.gz archive ({exc})") from exc
    images: list[Image] = []
    try:
        try:
            members = check_member_names(path, tar.getmembers())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CorruptImageError(path, f"the archive is truncated or damaged ({exc})") from exc
        if len(members) > limits.max_tiles + 1000:
            raise CorruptImageError(path, f"the archive has {len(members)} members; too many for a QC output")
        report = None
        reports = [n for n in members if PurePosixPath(n).name == "report.json" and len(PurePosixPath(n).parts) <= 2]
        if reports:
            try:
                fobj = tar.extractfile(members[reports[0]])
                report = json.loads(fobj.read().decode("utf-8")) if fobj else None
            except (ValueError, tarfile.TarError, OSError, EOFError) as exc:
                raise CorruptImageError(path, f"{reports[0]} cannot be read ({exc})") from exc
        roles = _report_roles(report)
        iprs = [n for n in members if len(PurePosixPath(n).parts) == 1 and n.lower().endswith(".ipr") and members[n].isfile()]
        if iprs:
            chip, entries_ = _saw_entries(tar, path, iprs[0], members)
            for top, names, is_file, image_name, role in entries_:
                images.append(_open_member(tar, path, top, names, members, is_file, image_name, role, limits, _open_path))
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
            role = roles.get(image_name)
            images.append(_open_member(tar, path, top, names if not is_file else [top], members, is_file, image_name, role, limits, _open_path))
    except Exception:
        for img in images:
            img.close()
        raise
    finally:
        tar.close()
    return ArchiveContents(report, images)


_IMAGE_SUFFIXES = (".tif", ".tiff", ".czi")


def _saw_entries(
    tar: tarfile.TarFile, path: Path, ipr_member: str, members: dict[str, tarfile.TarInfo]
) -> tuple[str | None, list[tuple[str, list[str], bool, str, str]]]:
    """The chip and the images of a SAW archive from its IPR: ``(top, names, is_file, image name, role)`` each."""
    from qc.ipr import IPRError, read_ipr
    from qc.saw_archive import image_folder

    tmpdir = Path(tempfile.mkdtemp(prefix="imageqc-ipr-"))
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
    out = []
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
        subdirs = {"/".join(PurePosixPath(n).parts[: depth + 1]) for n in inside if len(PurePosixPath(n).parts) > depth + 1}
        if len(singles) == 1 and not subdirs:
            out.append((singles[0], [singles[0]], True, image_name, role))  # a stitched image
        elif len(subdirs) == 1 and not singles:
            top = subdirs.pop()  # a tile folder
            out.append((top, [n for n in inside if n.startswith(top + "/")], False, image_name, role))
        else:
            out.append((folder, inside, False, image_name, role))  # tiles laid directly in the stain folder
    return chip, out


def _open_member(tar, path, top, names, members, is_file, image_name, role, limits, opener) -> Image:  # noqa: ANN001, PLR0913
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
            tmpdir = Path(tempfile.mkdtemp(prefix="imageqc-"))
            target = tmpdir / PurePosixPath(top).name
            with target.open("wb") as out:
                out.write(head)
                shutil.copyfileobj(fobj, out, 1 << 20)
            inner = opener(target, name=image_name, role=role, limits=limits, display_path=display)
            return _ArchivedImage(inner, path, top, tmpdir)
        tmpdir = Path(tempfile.mkdtemp(prefix="imageqc-"))
        folder = tmpdir / PurePosixPath(top).name
        folder.mkdir()
        for name in names:
            m = members[name]
            rel = PurePosixPath(name).relative_to(top)
            dest = folder.joinpath(*rel.parts)
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
        if isinstance(exc, (tarfile.TarError, EOFError, OSError)):
            raise CorruptImageError(display, f"the archive member cannot be read ({exc})") from exc
        raise
