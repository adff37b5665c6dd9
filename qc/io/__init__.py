"""Image readers: TIFF/BigTIFF/OME-TIFF, Zeiss CZI, tile folders, QC archives.

Everything is read lazily into one model (:mod:`qc.io.model`): opening reads
headers only; pixels come through :meth:`Image.plane`,
:meth:`Image.read_region`, :meth:`Image.downsampled` and the tiles' loaders.

>>> from qc.io import open_scan_set
>>> with open_scan_set(["SS200000135TL_D1.tif", "SS200000135TL_D1_CD31_IF.czi"]) as scan:  # doctest: +SKIP
...     coarse = scan.nuclear.downsampled(8)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from qc.errors import ScanSetError
from qc.io.archive import check_archive_whole, read_archive
from qc.io.czidir import check_czi_whole
from qc.io.detect import default_name, detect_format
from qc.io.limits import ReadLimits
from qc.io.model import FORMATS, ROLES, Image, ScanSet, Tile, array_digest, file_identity
from qc.io.tiffcheck import check_tiff_whole
from qc.io.tilenames import TileFolderInfo, inspect_tile_folder

__all__ = [
    "FORMATS",
    "ROLES",
    "Image",
    "ReadLimits",
    "ScanSet",
    "Tile",
    "TileFolderInfo",
    "array_digest",
    "check_archive_whole",
    "check_czi_whole",
    "check_tiff_whole",
    "default_name",
    "detect_format",
    "file_identity",
    "inspect_tile_folder",
    "open_image",
    "open_scan_set",
]

_IF_SUFFIX = re.compile(r"^(?P<chip>.+?)_(?P<stain>[A-Za-z0-9-]+)_IF$")


def _open_path(
    path: Path,
    *,
    name: str | None = None,
    role: str | None = None,
    limits: ReadLimits = ReadLimits(),  # noqa: B008
    display_path: Path | None = None,
    tile_pattern: str | None = None,
    tile_overlap: float | tuple[float, float] | None = None,
) -> Image:
    """Open a TIFF, CZI or tile folder at ``path`` (no archives)."""
    kind = detect_format(path)
    shown = display_path or path
    if kind == "tiff":
        from qc.io.tiff import TiffImage

        return TiffImage(path, name=name, role=role, limits=limits, display_path=shown)
    if kind == "czi":
        from qc.io.czi import CziImage

        return CziImage(path, name=name, role=role, limits=limits, display_path=shown)
    if kind == "tiles":
        from qc.io.tiles import TileFolderImage

        return TileFolderImage(
            path, name=name, role=role, limits=limits, display_path=shown, pattern=tile_pattern, overlap=tile_overlap
        )
    from qc.errors import UnsupportedFormatError

    raise UnsupportedFormatError(shown, "a QC archive inside a QC archive is not supported")


def open_image(
    path: str | Path,
    *,
    name: str | None = None,
    role: str | None = None,
    limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen
    tile_pattern: str | None = None,
    tile_overlap: float | tuple[float, float] | None = None,
    scratch_dir: str | Path | None = None,
) -> Image:
    """Open one image: a TIFF, a CZI, a tile folder, or one image of a QC archive.

    Parameters
    ----------
    path : str or Path
        File or folder. The format is detected from the content (magic
        bytes); the extension only words the error when nothing matches.
    name : str, optional
        Scan-set member name; default the file stem (``.tif``, ``.tiff``,
        ``.ome.tif``, ``.czi`` stripped, any case) or the folder name. For an
        archive, selects which image to return when it holds several.
    role : str, optional
        ``"nuclear"``, ``"IF"`` or ``"HE"``; default ``IF`` for names ending
        ``_IF``, ``HE`` for RGB, else ``nuclear``.
    limits : ReadLimits
        Declared sizes beyond these are refused before any allocation.
    tile_pattern, tile_overlap : optional
        For tile folders: a row/col regex for names no built-in convention
        knows, and the fractional overlap (x, y) to assume when neither a
        ``TileConfiguration.txt`` nor the metadata gives positions (see
        :class:`~qc.io.tiles.TileFolderImage`).
    scratch_dir : path, optional
        For archives: where members that cannot be read from memory are
        spilled (see :func:`~qc.io.archive.read_archive`).

    Returns
    -------
    Image
        Close it (or use ``with``) to release file handles and temp files.

    Raises
    ------
    qc.errors.ReadError
        Or its subclasses: ``UnsupportedFormatError``, ``CorruptImageError``,
        ``ImageTooLargeError``, ``UnsafeArchiveError``.
    """
    path = Path(path)
    if detect_format(path) != "tar.gz":
        return _open_path(
            path, name=name, role=role, limits=limits, tile_pattern=tile_pattern, tile_overlap=tile_overlap
        )
    contents = read_archive(path, limits=limits, scratch_dir=scratch_dir)
    images = contents.images
    chosen = [im for im in images if name is None or im.name == name]
    if len(chosen) != 1:
        for im in images:
            im.close()
        names = ", ".join(im.name for im in images) or "none"
        msg = f"{path}: pass name= to choose one image of this archive (it holds: {names})"
        raise ScanSetError(msg)
    for im in images:
        if im is not chosen[0]:
            im.close()
    if role is not None:
        chosen[0].role = role
    return chosen[0]


def _chip_of(images: list[Image]) -> str:
    for im in images:
        if im.role in ("nuclear", "HE"):
            return im.name
    for im in images:
        m = _IF_SUFFIX.match(im.name)
        if m:
            return m.group("chip")
    return images[0].name


def open_scan_set(
    paths: str | Path | Iterable[str | Path],
    *,
    chip: str | None = None,
    limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen
    tile_pattern: str | None = None,
    tile_overlap: float | tuple[float, float] | None = None,
    scratch_dir: str | Path | None = None,
) -> ScanSet:
    """Open the images of one chip.

    Parameters
    ----------
    paths : path or iterable of paths
        Image files, tile folders and/or QC archives (``.tar.gz``; all images
        under ``<stem>/images/`` are opened).
    chip : str, optional
        The chip serial. Default: the archive's ``report.json`` ``"chip"``,
        else the nuclear/H&E image's name, else the ``<chip>`` of an
        ``<chip>_<IF>_IF`` name.
    limits : ReadLimits
        Passed to every reader.
    tile_pattern, tile_overlap : optional
        Passed to every tile folder (see :func:`open_image`).
    scratch_dir : path, optional
        Where archive members that cannot be read from memory are spilled
        (default: the system's temporary folder; the service passes its
        output folder).

    Raises
    ------
    qc.errors.ScanSetError
        No images, duplicate image names, or (when the chip is derived)
        images named for different chips.
    qc.errors.ReadError
        From the readers; images already opened are closed first.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    images: list[Image] = []
    report_chip = None
    try:
        for p in paths:
            p = Path(p)
            if detect_format(p) == "tar.gz":
                contents = read_archive(p, limits=limits, scratch_dir=scratch_dir)
                images.extend(contents.images)
                report_chip = report_chip or contents.chip
            else:
                images.append(_open_path(p, limits=limits, tile_pattern=tile_pattern, tile_overlap=tile_overlap))
        if not images:
            msg = "the scan set has no images"
            raise ScanSetError(msg)
        names = [im.name for im in images]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            msg = f"the scan set names {', '.join(dupes)} more than once; keep one export per image"
            raise ScanSetError(msg)
        chip_name = chip or report_chip or _chip_of(images)
        if chip is None:
            strangers = [n for n in names if n != chip_name and not n.startswith(chip_name + "_")]
            if strangers:
                msg = f"images {', '.join(strangers)} do not belong to chip {chip_name}; QC one chip at a time"
                raise ScanSetError(msg)
    except BaseException:
        for im in images:
            im.close()
        raise
    return ScanSet(chip=chip_name, images=images)
