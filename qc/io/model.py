"""The in-memory model every reader returns and every metric consumes.

A :class:`ScanSet` holds the images of one chip: its nuclear-stain (DAPI,
ssDNA) or H&E image and up to six immunofluorescence images. An
:class:`Image` is either one stitched plane (a TIFF, a single-tile CZI) or a
set of :class:`Tile` objects (a tile folder, a CZI mosaic) with nominal
positions. Pixels are read lazily: building the model reads headers only.

Coordinates are pixels, x to the right, y down; tile positions are the
nominal top-left corners in the mosaic frame (the microscope's stage
positions, or the grid index times the tile size minus the overlap).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMATS", "ROLES", "Image", "ScanSet", "Tile", "array_digest", "file_identity"]

#: Roles an image plays in a scan set.
ROLES = ("nuclear", "IF", "HE")
#: Input formats, as named in the QC report.
FORMATS = ("tiff", "czi", "tiles", "tar.gz")


def array_digest(arr: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (hex); stable across runs."""
    h = hashlib.sha256()
    h.update(repr((arr.shape, str(arr.dtype))).encode())
    h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def file_identity(path: Path) -> str:
    """A tile file's cheap identity (path, size, modification time in ns): what its digest is memoised under.

    The tile folder reader gives each tile this :attr:`Tile.identity`, so a
    digest the pair cache memoised (by live QC or the stitching) can be found
    again from the file's path alone.
    """
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


@dataclass(frozen=True, eq=False)
class Tile:
    """One field of view of a tiled image.

    Parameters
    ----------
    name : str
        The tile's own name: its file name in a folder, ``"M=3"`` in a CZI.
    row, col : int
        Grid index, 0-based, row-major from the top-left tile.
    x, y : float
        Nominal top-left position in the mosaic, in pixels.
    width, height : int
        Tile size in pixels.
    loader : callable
        Returns the tile's pixels as a 2-D (grey) or HxWx3 (RGB) array.
    digest_fn : callable, optional
        Returns a content digest without decoding when the reader can (for
        example the hash of the file's bytes); otherwise the pixels are hashed.
    identity : str, optional
        A cheap stat-based identity (path, size, mtime in ns, subblock
        offset...) that changes whenever the content may have changed. Callers
        may memoise :meth:`digest` under it to avoid re-hashing unchanged tiles.
    loader_into : callable, optional
        ``loader_into(out)`` decodes into ``out`` (an array of the tile's shape
        and dtype) where the reader can and returns it, else a new array; see
        :meth:`read`.
    hint_fn : callable, optional
        Asks the operating system to start reading the tile's bytes into its
        cache; see :meth:`will_read`.
    """

    name: str
    row: int
    col: int
    x: float
    y: float
    width: int
    height: int
    loader: Callable[[], np.ndarray] = field(repr=False)
    digest_fn: Callable[[], str] | None = field(default=None, repr=False)
    identity: str | None = None
    loader_into: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    hint_fn: Callable[[], None] | None = field(default=None, repr=False)

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        """Decode and return the tile's pixels.

        ``out``: memory to reuse, of the tile's shape and dtype. Readers that can
        decode into it return ``out`` itself (a tile read in turn into one buffer
        costs no new memory); others return a new array: check ``result is out``.
        """
        if out is not None and self.loader_into is not None:
            return self.loader_into(out)
        return self.loader()

    def will_read(self) -> None:
        """Tell the operating system this tile is read soon, so a cold file is fetched while other work runs.

        Only a hint: nothing happens where the reader or the system cannot act on it.
        """
        if self.hint_fn is not None:
            self.hint_fn()

    def digest(self) -> str:
        """A content digest: equal digests mean equal pixels."""
        if self.digest_fn is not None:
            return self.digest_fn()
        return array_digest(self.read())


class Image(ABC):
    """One image of a scan set, read lazily.

    Concrete readers (TIFF, CZI, tile folders, QC archives) subclass this.
    Subclasses set the attributes in ``__init__`` from headers only.
    """

    name: str
    """Scan-set member name: ``<chip>`` or ``<chip>_<IF>_IF``."""
    path: Path
    """The file or folder it was read from."""
    format: str
    """One of :data:`FORMATS`."""
    role: str
    """One of :data:`ROLES`."""
    width: int
    height: int
    dtype: np.dtype
    channels: tuple[str, ...]
    """Channel names: ``("gray",)``, ``("R", "G", "B")``, or names from metadata."""
    pixel_size_um: float | None
    """Physical pixel size in micrometres when the file says so."""
    threads: int = 1
    """Threads a reader may use to decode (QC sets it to its own thread setting)."""
    tile_view_factor: int | None = None
    """Set before reading a tiled image whole: each tile, as read, is kept reduced by this factor in
    :meth:`tile_views` (what a low-resolution picture at registered positions is made of)."""

    def tile_views(self) -> Mapping[str, np.ndarray]:
        """Each tile's reduced view (by :attr:`tile_view_factor`) kept while the image was read, by tile name.

        Empty for readers that do not keep them, and until the image was read
        whole (:meth:`plane` or :meth:`downsampled`).
        """
        return {}

    @property
    def tiles(self) -> Sequence[Tile] | None:
        """The fields of view when the image comes as tiles, else ``None``."""
        return None

    @property
    def fov_grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the tile grid, or ``None`` for a stitched image."""
        tiles = self.tiles
        if not tiles:
            return None
        return (max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1)

    @property
    def is_rgb(self) -> bool:
        return len(self.channels) == 3 and self.channels == ("R", "G", "B")

    def channel_index(self, channel: int | str = 0) -> int:
        """Resolve a channel given by index or by name to its index.

        RGB images have one colour plane: only channel ``0`` is valid and
        every read returns HxWx3.

        Raises
        ------
        ValueError
            The channel is not one of :attr:`channels`.
        """
        n = 1 if self.is_rgb else len(self.channels)
        if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
            if 0 <= int(channel) < n:
                return int(channel)
        elif isinstance(channel, str) and not self.is_rgb and channel in self.channels:
            return self.channels.index(channel)
        names = "0 (the colour plane)" if self.is_rgb else ", ".join(repr(c) for c in self.channels)
        msg = f"{self.path}: no channel {channel!r}; this image has {names}"
        raise ValueError(msg)

    def tiles_for(self, channel: int | str = 0) -> Sequence[Tile] | None:
        """The fields of view of one channel, or ``None`` for a stitched image.

        :attr:`tiles` is ``tiles_for(0)``: its loaders return channel 0.
        Multi-channel mosaics (a CZI with DAPI + IF) override this to return
        tiles with the same grid, names and positions whose loaders return
        the requested channel.
        """
        if self.channel_index(channel) == 0:
            return self.tiles
        return None

    def read_region(self, x: int, y: int, width: int, height: int, channel: int | str = 0) -> np.ndarray:
        """A full-resolution window of one channel.

        Parameters
        ----------
        x, y : int
            Top-left corner in pixels (x to the right, y down).
        width, height : int
            Window size in pixels; the window must lie inside the image.
        channel : int or str
            Channel index or name.

        Returns
        -------
        numpy.ndarray
            ``(height, width)`` or ``(height, width, 3)`` for RGB, in
            :attr:`dtype`; a new array (never a view into a memory map).

        Notes
        -----
        This default slices :meth:`plane`; readers of tiled or compressed
        files override it to decode only the strips, tiles or subblocks the
        window touches.
        """
        self._check_region(x, y, width, height)
        return np.array(self.plane(channel)[y : y + height, x : x + width])

    def _check_region(self, x: int, y: int, width: int, height: int) -> None:
        if width < 1 or height < 1 or x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            msg = (
                f"{self.path}: region x={x}, y={y}, {width} x {height} px is not inside the "
                f"{self.width} x {self.height} px image"
            )
            raise ValueError(msg)

    @abstractmethod
    def plane(self, channel: int | str = 0) -> np.ndarray:
        """The full-resolution stitched plane of one channel (RGB: HxWx3).

        Memory-mapped where the file allows it; tiled images are assembled at
        their nominal positions.
        """

    @abstractmethod
    def downsampled(self, factor: int, channel: int | str = 0) -> np.ndarray:
        """A view reduced by an integer ``factor`` in both axes (area mean).

        Never materialises the full-resolution plane twice; uses a pyramid
        level when the file has one.

        The result has ``ceil(height / factor)`` rows and ``ceil(width /
        factor)`` columns (edge blocks average the pixels they have), the
        image's dtype (means rounded), and ``(..., 3)`` for RGB. Tiled images
        are reduced from their tiles at their nominal positions; pixels no
        tile covers are 0.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ScanSet:
    """The images of one chip, QC'd together."""

    chip: str
    images: list[Image]

    @property
    def nuclear(self) -> Image | None:
        """The nuclear-stain or H&E image, if present."""
        for img in self.images:
            if img.role in ("nuclear", "HE"):
                return img
        return None

    @property
    def if_images(self) -> list[Image]:
        return [img for img in self.images if img.role == "IF"]

    def close(self) -> None:
        for img in self.images:
            img.close()

    def __enter__(self) -> ScanSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
