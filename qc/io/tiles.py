"""Folders of tiles (fields of view) written by microscope software.

The grid comes from :mod:`qc.io.tilenames` (names and metadata files). Each
tile's nominal top-left position, in pixels relative to the mosaic's
top-left, is taken from Fiji's ``TileConfiguration.txt`` when present, else
from the grid index times the tile size minus the overlap (from the metadata,
else ``overlap=``, default 0.1). A folder positioned only by its
``TileConfiguration.txt`` (any names, any layout) gets its rows and columns
from the positions: tiles closer than half a tile share a row (column).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import tifffile

from qc.errors import CorruptImageError, UnsupportedFormatError
from qc.io._mosaic import assemble, grid_indices, reduce_tiles, tile_view
from qc.io._reduce import check_factor, reduce_array, reduced_shape
from qc.io.detect import default_name, default_role
from qc.io.limits import ReadLimits, check_dimensions, check_plane_bytes
from qc.io.model import Image, Tile, file_identity
from qc.io.tiffcheck import walk_tiff
from qc.io.tilenames import TILE_SUFFIXES, TileFolderInfo, inspect_tile_folder, read_tile_configuration

__all__ = ["DEFAULT_OVERLAP", "TileFolderImage", "read_tile_file"]

#: Fractional overlap between neighbouring tiles when no metadata says.
DEFAULT_OVERLAP = 0.1


def read_tile_file(
    path: Path,
    limits: ReadLimits = ReadLimits(),  # noqa: B008
    *,
    data: bytes | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one tile file: 2-D grey or HxWx3 RGB (TIFF via tifffile, JPEG/PNG/BMP via OpenCV).

    ``data``: the file's bytes when the caller has read them already (then the file is not opened).
    ``out``: an array to decode into when the file's first page has exactly its shape and dtype (a TIFF:
    an uncompressed one is then read straight into it, no new memory); the result is ``out`` then, else
    a new array as without it.
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
        walk_tiff(source, limits=limits, name=path)
        try:
            with tifffile.TiffFile(path if data is None else io.BytesIO(data)) as tif:
                page = tif.pages.first
                fits = out is not None and out.shape == page.shape and out.dtype == page.dtype
                arr = page.asarray(out=out if fits else None)
        except Exception as exc:
            raise CorruptImageError(path, f"the tile cannot be decoded ({exc})") from exc
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        return arr
    try:
        raw = (
            np.fromfile(path, dtype=np.uint8) if data is None else np.frombuffer(data, np.uint8)
        )  # fromfile handles non-ASCII Windows paths, unlike cv2.imread
    except OSError as exc:
        raise CorruptImageError(path, f"the tile cannot be read ({exc.strerror or exc})") from exc
    decoded: np.ndarray | None = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if decoded is None:
        raise CorruptImageError(path, "the tile cannot be decoded (truncated or not an image)")
    if decoded.ndim == 3:
        if decoded.shape[2] == 4:
            decoded = decoded[..., :3]
        decoded = np.ascontiguousarray(decoded[..., ::-1])  # OpenCV gives BGR
    return decoded


def will_read_file(path: Path) -> None:
    """Ask the OS to start reading ``path`` into its cache and return at once (POSIX ``posix_fadvise``
    WILLNEED; nothing on systems without it, or when the file cannot be opened: the read itself reports that)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TileFolderImage(Image):
    """A folder of tiles; see the module docstring.

    Parameters
    ----------
    path : str or Path
        The folder.
    name, role : str, optional
        Override the defaults (folder name; ``IF``/``HE``/``nuclear``).
    pattern : str, optional
        Custom row/col regex (see :func:`~qc.io.tilenames.inspect_tile_folder`).
    cols : int, optional
        Column count for linear tile indices when no metadata gives it.
    overlap : float or (float, float), optional
        Fractional overlap (x, y) used when neither ``TileConfiguration.txt``
        nor the metadata gives positions or overlap; default 0.1. The
        positions are only the starting guess the stitching refines.
    limits : ReadLimits
        Checked against the tile count and size, and the mosaic size.
    display_path : str or Path, optional
        Shown in messages and as :attr:`path` when ``path`` is a temporary copy.
    """

    format = "tiles"

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        role: str | None = None,
        pattern: str | re.Pattern[str] | None = None,
        cols: int | None = None,
        overlap: float | tuple[float, float] | None = None,
        limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen
        display_path: str | Path | None = None,
    ) -> None:
        folder = Path(path)
        self.path = Path(display_path) if display_path is not None else folder
        self.limits = limits
        info = inspect_tile_folder(folder, pattern=pattern, cols=cols)
        self.info: TileFolderInfo = info
        if not info.tiles and not info.ignored:
            others = (
                sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:3] if folder.is_dir() else []
            )
            problem = (
                "the folder is empty" if not others else f"the folder holds no image files (found e.g. {others[0]!r})"
            )
            hint = f"A tile folder holds the FOV images ({', '.join(TILE_SUFFIXES)}); wait for the export to finish or check the path"
            raise UnsupportedFormatError(self.path, problem, hint=hint)
        if not info.tiles:
            problem = "no tile names follow a known convention (_RRRR_CCCC_, [Grid@C R], _sNN_, --StageNN)"
            problem += " and no TileConfiguration.txt lists them"
            if info.ignored:
                problem += f"; found e.g. {info.ignored[0]!r}"
            hint = (
                "Give a row/col (or index) regex for this naming scheme (the watch root's tile_pattern, or "
                "imageqc qc --tile-pattern), or put Fiji's TileConfiguration.txt with the tile positions beside them"
            )
            raise UnsupportedFormatError(self.path, problem, hint=hint)
        check_dimensions(self.path, 0, 0, limits, tiles=len(info.tiles))
        first = read_tile_file(folder / info.tiles[0].file, limits)
        th, tw = first.shape[:2]
        check_dimensions(self.path, tw, th, limits, what=f"tile {info.tiles[0].file}")
        self._tile_shape = first.shape
        self.dtype = first.dtype
        rgb = first.ndim == 3
        self.channels = ("R", "G", "B") if rgb else ("gray",)
        self._samples = 3 if rgb else None
        self.pixel_size_um = info.metadata.pixel_size_um
        positions = self._positions(info, tw, th, overlap)
        cells = {t.file: (t.row, t.col) for t in info.tiles}
        if info.convention == "tile_configuration":  # any layout: rows and columns from the positions
            files = [t.file for t in info.tiles]
            grid_rows, grid_cols = grid_indices(
                [positions[f][0] for f in files], [positions[f][1] for f in files], tw, th
            )
            cells = dict(zip(files, zip(grid_rows, grid_cols, strict=False), strict=False))
        order = sorted(info.tiles, key=lambda t: (*cells[t.file], t.file))
        self._tiles = [
            Tile(
                name=t.file,
                row=cells[t.file][0],
                col=cells[t.file][1],
                x=positions[t.file][0],
                y=positions[t.file][1],
                width=tw,
                height=th,
                loader=(load := self._loader(folder / t.file)),
                loader_into=load,
                hint_fn=functools.partial(will_read_file, folder / t.file),
                digest_fn=functools.partial(_file_digest, folder / t.file),
                identity=file_identity(folder / t.file),
            )
            for t in order
        ]
        self.width = math.ceil(max(t.x for t in self._tiles) + tw)
        self.height = math.ceil(max(t.y for t in self._tiles) + th)
        check_dimensions(self.path, self.width, self.height, limits, what="mosaic")
        self.name = name or default_name(self.path)
        self.role = role or default_role(self.name, rgb=rgb)
        self.overlap = self._overlap_used
        self._held: weakref.ref[np.ndarray] | None = None
        self._views: dict[str, np.ndarray] = {}

    def _positions(
        self, info: TileFolderInfo, tw: int, th: int, overlap: float | tuple[float, float] | None
    ) -> dict[str, tuple[float, float]]:
        self._overlap_used: tuple[float, float] | None = None
        if info.tile_configuration is not None:
            config = read_tile_configuration(info.tile_configuration)
            if all(t.file in config for t in info.tiles):
                xs = [config[t.file][0] for t in info.tiles]
                ys = [config[t.file][1] for t in info.tiles]
                mx, my = min(xs), min(ys)
                self.position_source = "TileConfiguration"
                return {t.file: (config[t.file][0] - mx, config[t.file][1] - my) for t in info.tiles}
        if info.overlap is not None:  # the microscope's own word beats a site-wide setting
            overlap = info.overlap
            self.position_source = "metadata overlap"
        elif overlap is None:
            overlap = DEFAULT_OVERLAP
            self.position_source = "default overlap"
        else:
            self.position_source = "given overlap"
        ox, oy = (overlap, overlap) if isinstance(overlap, (int, float)) else overlap
        if not (0 <= ox < 1 and 0 <= oy < 1):
            msg = f"overlap must be a fraction in [0, 1), got {overlap!r}"
            raise ValueError(msg)
        self._overlap_used = (float(ox), float(oy))
        return {t.file: (t.col * tw * (1 - ox), t.row * th * (1 - oy)) for t in info.tiles}

    def _loader(self, path: Path) -> Callable[..., np.ndarray]:
        """The tile's loader: ``load()`` decodes into new memory, ``load(out)`` into ``out`` where it can."""
        shape, dtype, limits = self._tile_shape, self.dtype, self.limits

        def load(out: np.ndarray | None = None) -> np.ndarray:
            arr = read_tile_file(path, limits, out=out)
            if arr.shape != shape or arr.dtype != dtype:
                problem = f"tile is {arr.shape} {arr.dtype} but the folder's first tile is {shape} {dtype}"
                raise CorruptImageError(path, problem, hint="Re-export the tile folder; all tiles must match")
            return arr

        return load

    @property
    def tiles(self) -> Sequence[Tile]:
        return self._tiles

    def plane(self, channel: int | str = 0) -> np.ndarray:
        self.channel_index(channel)
        shape = (self.height, self.width) + ((3,) if self._samples else ())
        check_plane_bytes(self.path, shape, self.dtype, self.limits)
        out = assemble(
            self._tiles, 0, 0, self.width, self.height, self.dtype, self._samples, self.threads, self._view_hook()
        )
        self._held = weakref.ref(out)  # downsampled() reduces it while the caller holds it
        return out

    def read_region(self, x: int, y: int, width: int, height: int, channel: int | str = 0) -> np.ndarray:
        self.channel_index(channel)
        self._check_region(x, y, width, height)
        return assemble(self._tiles, x, y, width, height, self.dtype, self._samples, self.threads)

    def downsampled(self, factor: int, channel: int | str = 0) -> np.ndarray:
        factor = check_factor(factor)
        self.channel_index(channel)
        oh, ow = reduced_shape(self.height, self.width, factor)
        check_plane_bytes(self.path, (oh, ow) + ((3,) if self._samples else ()), self.dtype, self.limits)
        held = self._held() if self._held is not None else None
        if held is not None:  # assembled already: never read the tiles twice
            return reduce_array(held, factor, threads=self.threads)
        return reduce_tiles(self._tiles, self.width, self.height, factor, self.dtype, self._samples, self._view_hook())

    def _view_hook(self) -> Callable[[Tile, np.ndarray], None] | None:
        f = self.tile_view_factor
        if not f:
            return None
        views = self._views

        def keep(tile: Tile, pixels: np.ndarray) -> None:
            views[tile.name] = tile_view(pixels, f)

        return keep

    def tile_views(self) -> Mapping[str, np.ndarray]:
        return dict(self._views)
