"""Where a scan set's images go in the archive SAW takes (``saw count --image-tar``).

The archive is what StereoMap's Image QC writes, laid out as cellbin2 reads it::

    <QCResultFile>.ipr                               SAW's image record (qc.ipr)
    <stain>/<chip>_<stain>.tif                        the nuclear or H&E image (DAPI, ssDNA, HE)
    <stain>/<tile folder>/...                         ... or its tiles and their metadata files
    IF/<name>_IF/<chip>_<name>_IF.tif                 each immunofluorescence image
    imageqc/report.json, imageqc/pictures/*.png, ...  imageqc's own outputs

and named ``<QCResultFile>.tar.gz`` (SAW refuses an archive whose name is not
the IPR's ``QCResultFile``). TIFFs go in unchanged (only the extension is
normalised to ``.tif``); a CZI is re-encoded losslessly as a TIFF of its
plane, since cellbin2 and SAW read TIFFs only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qc.filenames import fit_name
from qc.io import Image, ScanSet
from qc.io.listing import regular_files

__all__ = ["IMAGEQC_FOLDER", "ArchiveMember", "as_tiff", "image_folder", "image_members", "needs_tiff", "walk"]

#: imageqc's own outputs (report, pictures, stitching files) sit in this folder of the archive.
IMAGEQC_FOLDER = "imageqc"


@dataclass(frozen=True)
class ArchiveMember:
    """One input image in the archive: ``source`` (a file or a tile folder) stored as ``arcname``."""

    source: Path
    arcname: str
    image: str
    group: str


def image_folder(group: str) -> str:
    """The archive folder of an image whose IPR group is ``group`` (``DAPI``, ``CD31_IF``, ...)."""
    return f"IF/{group}" if group.endswith("_IF") else group


def image_members(scan_set: ScanSet, stain: str, *, converted: dict[str, Path] | None = None) -> list[ArchiveMember]:
    """The archive members of every image of ``scan_set`` (see the module docstring).

    Parameters
    ----------
    scan_set : ScanSet
    stain : str
        The report's stain (``DAPI``, ``ssDNA``, ``HE``, ``DAPI+mIF``).
    converted : dict, optional
        Image name -> a TIFF written by :func:`as_tiff` for the images that
        :func:`needs_tiff`; such an image without one is left out.
    """
    from qc.ipr import ipr_group_name

    out: list[ArchiveMember] = []
    for img in scan_set.images:
        group = "HE" if img.role == "HE" else ipr_group_name(scan_set.chip, img.name, stain)
        folder = image_folder(group)
        single = f"{folder}/{fit_name(f'{scan_set.chip}_{group}', '.tif')}"  # a name any file system can unpack
        if needs_tiff(img):
            tif = (converted or {}).get(img.name)
            if tif is not None:
                out.append(ArchiveMember(tif, single, img.name, group))
        elif img.tiles:
            out.append(ArchiveMember(Path(img.path), f"{folder}/{Path(img.path).name}", img.name, group))
        else:
            out.append(ArchiveMember(Path(img.path), single, img.name, group))
    return out


def needs_tiff(img: Image) -> bool:
    """Whether the image must be written as a TIFF for SAW: a CZI, or one read from an archive."""
    path = Path(img.path)
    return img.format == "czi" or not path.exists() or (img.tiles is None and path.is_dir())


def as_tiff(img: Image, folder: Path) -> Path:
    """Write an image's plane as an uncompressed TIFF in ``folder`` (lossless); returns its path."""
    import tifffile

    plane = img.plane(0)
    path = folder / fit_name(img.name, ".tif")
    tifffile.imwrite(path, plane, bigtiff=plane.nbytes > 2**31, photometric="rgb" if plane.ndim == 3 else "minisblack")
    return path


def walk(member: ArchiveMember) -> Iterator[tuple[Path, str]]:
    """Every file of a member with its archive name (a tile folder's regular files, sorted; links and special files skipped)."""
    if not member.source.is_dir():
        yield member.source, member.arcname
        return
    cut = len(os.fspath(member.source).rstrip("/" + os.sep)) + 1
    for name, _ in regular_files(member.source).files:  # sorted; no link followed, no FIFO opened
        yield Path(name), "/".join([member.arcname, *name[cut:].replace(os.sep, "/").split("/")])
