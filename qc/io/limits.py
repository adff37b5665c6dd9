"""Limits a reader checks against a file's *declared* dimensions.

A header is only a promise: a damaged or hostile file can declare a plane of
10^6 x 10^6 pixels. Every reader compares the declared sizes with
:class:`ReadLimits` before it allocates anything and raises
:class:`~qc.errors.ImageTooLargeError` when a limit is exceeded.

The defaults are generous for Stereo-seq work. The largest chips are several
centimetres across; at 20x (about 0.25 um per pixel) one centimetre is about
40,000 pixels, so a 10 cm chip is 400,000 pixels across.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qc.errors import ImageTooLargeError

__all__ = ["ReadLimits", "check_dimensions", "check_plane_bytes"]

GIB = 1024**3


@dataclass(frozen=True)
class ReadLimits:
    """Upper bounds on what a header may declare.

    Parameters
    ----------
    max_dimension : int
        Largest width or height, in pixels, of a plane, a tile or a pyramid
        level. Default 500,000 px (12.5 cm at 0.25 um/px).
    max_pixels : int
        Largest number of pixels (width x height) of one stored plane or
        tile. Default 10^11 px (a 7.9 cm square at 0.25 um/px). A sparse CZI
        mosaic's bounding box is not held to this: only its subblocks are.
    max_tiles : int
        Largest number of tiles or CZI subblocks. Default 200,000.
    max_channels : int
        Largest number of channels (or TIFF pages). Default 256.
    max_plane_bytes : int
        Largest full-resolution array :meth:`Image.plane` will allocate in
        memory (memory-mapped planes are not counted). Default 16 GiB; use
        :meth:`Image.downsampled` or :meth:`Image.read_region` for larger
        images.
    max_archive_bytes : int
        Largest total of the member sizes a QC archive's tar headers may
        declare (what it expands to). Default 64 GiB. Checked header by
        header, so a small ``.tar.gz`` that expands to far more is refused
        before its data is decompressed.
    """

    max_dimension: int = 500_000
    max_pixels: int = 100_000_000_000
    max_tiles: int = 200_000
    max_channels: int = 256
    max_plane_bytes: int = 16 * GIB
    max_archive_bytes: int = 64 * GIB

    def __post_init__(self) -> None:
        for name in (
            "max_dimension",
            "max_pixels",
            "max_tiles",
            "max_channels",
            "max_plane_bytes",
            "max_archive_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                msg = f"ReadLimits.{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)


def check_dimensions(
    path: str | Path,
    width: int,
    height: int,
    limits: ReadLimits,
    *,
    what: str = "image",
    channels: int = 1,
    tiles: int = 0,
) -> None:
    """Raise :class:`ImageTooLargeError` if declared sizes exceed ``limits``.

    Parameters
    ----------
    path : str or Path
        The file the sizes come from (named in the message).
    width, height : int
        Declared size in pixels.
    limits : ReadLimits
        The bounds to enforce.
    what : str
        What the sizes belong to, for the message ("image", "tile M=3", ...).
    channels, tiles : int
        Declared channel (or page) count and tile count, checked when > 0.
    """
    if width < 0 or height < 0:
        raise ImageTooLargeError(
            path,
            f"the header gives the {what} a negative size {width} x {height} px",
            hint="The header is damaged; re-export the image",
        )
    if max(width, height) > limits.max_dimension:
        problem = (
            f"the header gives the {what} a size of {width} x {height} px, beyond the limit of "
            f"{limits.max_dimension} px per side"
        )
        raise ImageTooLargeError(path, problem, hint="If the image is genuine, raise qc.max_dimension in the config")
    if width * height > limits.max_pixels:
        problem = (
            f"the header gives the {what} a size of {width} x {height} = {width * height} px, beyond the "
            f"limit of {limits.max_pixels} px"
        )
        raise ImageTooLargeError(path, problem)
    if channels > limits.max_channels:
        problem = f"the header declares {channels} channels or pages, beyond the limit of {limits.max_channels}"
        raise ImageTooLargeError(
            path, problem, hint="If the file is genuine, read it with a larger ReadLimits.max_channels"
        )
    if tiles > limits.max_tiles:
        problem = f"the file declares {tiles} tiles, beyond the limit of {limits.max_tiles}"
        raise ImageTooLargeError(
            path, problem, hint="If the file is genuine, read it with a larger ReadLimits.max_tiles"
        )


def check_plane_bytes(path: str | Path, shape: tuple[int, ...], dtype: np.dtype, limits: ReadLimits) -> None:
    """Refuse to allocate a full-resolution array larger than ``limits.max_plane_bytes``."""
    nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if nbytes > limits.max_plane_bytes:
        problem = (
            f"the full-resolution plane {tuple(shape)} {np.dtype(dtype)} needs {nbytes / GIB:.1f} GiB, beyond "
            f"the limit of {limits.max_plane_bytes / GIB:.1f} GiB"
        )
        raise ImageTooLargeError(
            path,
            problem,
            hint="Use downsampled() or read_region() for images this large, or raise max_plane_bytes",
        )
