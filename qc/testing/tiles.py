"""Generated tile sets with known geometry, for tests and benchmarks.

:func:`make_tile_set` cuts a grid of overlapping fields of view out of any
large 2-D or RGB array (a texture) at known positions: the nominal grid
position plus seeded per-tile stage jitter, optionally one tile misplaced by
a large amount, optionally featureless cells (flat background plus noise).
It returns :class:`qc.io.model.Tile` objects with in-memory loaders and the
ground truth. :func:`write_tile_folder` writes such a set as a tile folder
(``<prefix>_RRRR_CCCC_<stamp>.tif`` plus ``info.json``), and
:func:`tiles_from_folder` reads one back (a small stand-in for the real
reader, enough for tests and benchmarks). :func:`make_layout_set` cuts tiles
at any nominal positions (a serpentine, an L shape, a sparse or brick-like
layout), and :func:`write_tile_configuration_folder` writes any tile set as
tiles with arbitrary names plus a Fiji ``TileConfiguration.txt``.

Textures: :func:`mosaic_texture` blends random, randomly flipped/rotated
pieces of real crops into a large non-periodic texture (feathered, so there
are no seams on a grid that a registration could lock onto);
:func:`blob_texture` makes a fast procedural nuclei-like texture of any size,
optionally straight into a memory map, for benchmarks; :func:`grid_paper_texture`
a periodic one (thin grid lines over faint smooth blotches, like grid paper or a
chip's track grid), on which the strongest correlation peak is often an alias.

Positions are pixels, x right, y down; a tile's position is its top-left
corner in the mosaic frame, in which the nominal position of tile (r, c) is
``(c * step_x, r * step_y)``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from qc.io.model import Tile, array_digest

__all__ = [
    "TILE_NAME_RE",
    "GeneratedTileSet",
    "blob_texture",
    "grid_paper_texture",
    "make_layout_set",
    "make_tile_set",
    "mosaic_texture",
    "tiles_from_folder",
    "write_tile_configuration_folder",
    "write_tile_folder",
]

#: File names written by :func:`write_tile_folder`: ``<prefix>_RRRR_CCCC_<stamp>.tif``.
TILE_NAME_RE = re.compile(r"^(?P<prefix>.+)_(?P<row>\d{4})_(?P<col>\d{4})_(?P<stamp>[^_]+)\.tiff?$")


@dataclass(frozen=True)
class GeneratedTileSet:
    """A generated tile set and its ground truth.

    Attributes
    ----------
    tiles : tuple of Tile
        Row-major; nominal positions ``(c * step_x, r * step_y)``.
    rows, cols : int
        Grid size.
    tile_height, tile_width : int
        Tile size in pixels.
    overlap : float
        Nominal overlap as a fraction of the tile size.
    step_x, step_y : int
        Nominal grid pitch in pixels.
    true_positions : dict
        Tile name -> true top-left ``(x, y)`` in the mosaic frame, pixels.
    offsets : dict
        Tile name -> ``(dx, dy)`` true minus nominal position (jitter, plus
        the misplacement for the misplaced tile), whole pixels.
    misplaced : str or None
        Name of the deliberately misplaced tile.
    featureless : tuple of str
        Names of the cells whose area (and overlaps) was made featureless.
    """

    tiles: tuple[Tile, ...]
    rows: int
    cols: int
    tile_height: int
    tile_width: int
    overlap: float
    step_x: int
    step_y: int
    true_positions: dict[str, tuple[float, float]] = field(repr=False)
    offsets: dict[str, tuple[int, int]] = field(repr=False)
    misplaced: str | None = None
    featureless: tuple[str, ...] = ()

    def tile(self, row: int, col: int) -> Tile:
        """The tile at grid index ``(row, col)``."""
        return self.tiles[row * self.cols + col]


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    a = np.rot90(a, k % 4)
    return np.fliplr(a) if k >= 4 else a


def mosaic_texture(
    patches: Sequence[np.ndarray],
    shape: tuple[int, int],
    *,
    seed: int = 0,
    piece_px: int = 128,
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """Blend random pieces of real crops into a large non-periodic texture.

    Pieces of ``piece_px`` squared are cut at random places from the patches,
    flipped/rotated at random (8 orientations) and scaled in intensity by
    0.75-1.25, then splatted with a Hann feather at random positions (one
    per half-piece cell) and averaged. No seams, no grid the registration could lock
    onto, and the local statistics of the real stain.

    Parameters
    ----------
    patches : sequence of ndarray, each (h, w) or (h, w, 3)
        Source crops, all grey or all colour, each at least ``piece_px`` square.
    shape : (int, int)
        ``(height, width)`` of the texture, pixels.
    seed : int
        Seed of the random generator (same seed, same texture).
    piece_px : int
        Side of the pieces, pixels.
    dtype : dtype, optional
        Output dtype; default the patches' dtype.

    Returns
    -------
    ndarray, shape (height, width) or (height, width, 3)
    """
    srcs = [np.asarray(p) for p in patches]
    if not srcs:
        msg = "mosaic_texture needs at least one source patch"
        raise ValueError(msg)
    for p in srcs:
        if min(p.shape[:2]) < piece_px:
            msg = f"source patch {p.shape} is smaller than piece_px={piece_px}; lower piece_px"
            raise ValueError(msg)
    out_dtype = np.dtype(dtype or srcs[0].dtype)
    rng = np.random.default_rng(seed)
    h, w = int(shape[0]), int(shape[1])
    extra = srcs[0].shape[2:]
    acc = np.zeros((h + piece_px, w + piece_px, *extra), np.float32)
    wsum = np.zeros((h + piece_px, w + piece_px), np.float32)
    feather = np.outer(np.hanning(piece_px + 2)[1:-1], np.hanning(piece_px + 2)[1:-1]).astype(np.float32)
    feather_c = feather[..., None] if extra else feather
    step = piece_px // 2
    for y0 in range(-step, h + 1, step):
        for x0 in range(-step, w + 1, step):
            # stratified: anywhere in its cell, so no grid survives in the blend
            y = int(np.clip(y0 + rng.integers(0, step) + step // 2, 0, h))
            x = int(np.clip(x0 + rng.integers(0, step) + step // 2, 0, w))
            src = srcs[int(rng.integers(len(srcs)))]
            sy = int(rng.integers(src.shape[0] - piece_px + 1))
            sx = int(rng.integers(src.shape[1] - piece_px + 1))
            piece = _dihedral(src[sy : sy + piece_px, sx : sx + piece_px], int(rng.integers(8)))
            gain = float(rng.uniform(0.75, 1.25))
            acc[y : y + piece_px, x : x + piece_px] += piece.astype(np.float32) * (gain * feather_c)
            wsum[y : y + piece_px, x : x + piece_px] += feather
    half = piece_px // 2
    acc = acc[half : half + h, half : half + w]
    wsum = wsum[half : half + h, half : half + w]
    fill = float(np.mean([np.median(p) for p in srcs]))
    wexp = wsum[..., None] if extra else wsum
    tex = np.where(wexp > 1e-3, acc / np.maximum(wexp, 1e-3), fill)
    return _to_dtype(tex, out_dtype)


def _to_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        result: np.ndarray = np.clip(np.rint(arr), info.min, info.max).astype(dtype)
        return result
    return arr.astype(dtype)


def blob_texture(
    shape: tuple[int, int],
    *,
    seed: int = 0,
    sigma_px: float = 2.5,
    dtype: np.dtype | type = np.uint8,
    out: np.ndarray | None = None,
    band_rows: int = 2048,
) -> np.ndarray:
    """A fast procedural nuclei-like texture of any size (blurred sparse noise).

    Generated in bands of ``band_rows`` with a halo, so it can be written
    straight into a memory map (``out``) without holding it twice.

    Parameters
    ----------
    shape : (int, int)
        ``(height, width)`` in pixels.
    seed : int
        Random seed.
    sigma_px : float
        Blob size (Gaussian sigma), pixels.
    dtype : dtype
        ``uint8`` or ``uint16``.
    out : ndarray, optional
        Array of ``shape`` and ``dtype`` to fill (e.g. ``np.memmap``).
    band_rows : int
        Rows generated at a time.

    Returns
    -------
    ndarray, shape (height, width)
    """
    h, w = int(shape[0]), int(shape[1])
    dt = np.dtype(dtype)
    if out is None:
        out = np.empty((h, w), dt)
    halo = int(4 * sigma_px) + 1
    top = np.iinfo(dt).max if np.issubdtype(dt, np.integer) else 1.0
    starts = list(range(0, h, band_rows))
    children = np.random.SeedSequence(seed).spawn(len(starts))
    for y0, child in zip(starts, children, strict=False):
        rng = np.random.default_rng(child)
        y1 = min(h, y0 + band_rows)
        rows = (y1 - y0) + 2 * halo
        seeds = rng.random((rows, w), dtype=np.float32)
        seeds = np.where(seeds < 0.006, seeds * (1.0 / 0.006), 0).astype(np.float32)
        blobs: np.ndarray = cv2.GaussianBlur(seeds, (0, 0), sigma_px)
        blobs *= np.float32(2.0 * np.pi * sigma_px**2 * 0.5)
        blobs += np.float32(0.06)
        out[y0:y1] = _to_dtype(np.clip(blobs[halo : halo + (y1 - y0)], 0, 1) * top, dt)
    return out


def grid_paper_texture(
    shape: tuple[int, int],
    *,
    period_px: int = 22,
    line_px: int = 2,
    blotch: float = 25.0,
    blotch_px: float = 20.0,
    seed: int = 0,
) -> np.ndarray:
    """A periodic uint8 texture: dark grid lines every ``period_px`` over faint smooth blotches.

    The lines (70 on 200) carry most of the contrast and repeat exactly; the
    only non-periodic content is a Gaussian-smoothed noise field of standard
    deviation ``blotch`` grey levels and scale ``blotch_px``, the way stains
    and paper texture show under a grid.
    """
    h, w = int(shape[0]), int(shape[1])
    y, x = np.mgrid[0:h, 0:w]
    lines = ((x % period_px) < line_px) | ((y % period_px) < line_px)
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), blotch_px)
    tex = np.where(lines, 70.0, 200.0) + blotch * field / max(float(field.std()), 1e-6)
    result: np.ndarray = np.clip(np.rint(tex), 0, 255).astype(np.uint8)
    return result


def make_tile_set(
    texture: np.ndarray,
    *,
    rows: int,
    cols: int,
    tile_size: int | tuple[int, int],
    overlap: float = 0.1,
    jitter_px: int = 0,
    seed: int = 0,
    misplaced: tuple[int, int] | None = None,
    misplace_px: tuple[int, int] = (40, -30),
    featureless: Sequence[tuple[int, int]] = (),
    noise_sigma: float = 0.0,
    name_format: str = "tile_{row:04d}_{col:04d}",
) -> GeneratedTileSet:
    """Cut a grid of overlapping tiles out of a texture at known positions.

    Parameters
    ----------
    texture : ndarray, shape (H, W) or (H, W, 3)
        Any large array (memory maps welcome); it must cover the mosaic plus
        a margin of ``jitter_px + max(|misplace_px|)`` on every side.
    rows, cols : int
        Grid size.
    tile_size : int or (int, int)
        Tile side, or ``(height, width)``, pixels.
    overlap : float
        Nominal overlap as a fraction of the tile size (0 <= overlap < 0.5).
    jitter_px : int
        Each tile's true position is its nominal one plus a seeded uniform
        whole-pixel offset in ``[-jitter_px, jitter_px]`` per axis.
    seed : int
        Seed for the jitter and the noise.
    misplaced : (int, int), optional
        Grid index of one tile moved by ``misplace_px`` on top of its jitter.
    misplace_px : (int, int)
        ``(dx, dy)`` of the misplacement, pixels.
    featureless : sequence of (int, int)
        Cells whose footprint, grown by the overlap, is replaced by flat
        background (the texture's median) plus ``noise_sigma`` noise (at least
        1 grey level), so their overlaps carry no information.
    noise_sigma : float
        Gaussian camera noise added to every tile (seeded per tile).
    name_format : str
        Tile names, formatted with ``row`` and ``col``.

    Returns
    -------
    GeneratedTileSet
    """
    th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    th, tw = int(th), int(tw)
    if not 0 <= overlap < 0.5:
        msg = f"overlap must be in [0, 0.5), got {overlap}"
        raise ValueError(msg)
    step_x, step_y = round(tw * (1 - overlap)), round(th * (1 - overlap))
    rng = np.random.default_rng(seed)
    jit = rng.integers(-jitter_px, jitter_px + 1, size=(rows, cols, 2)) if jitter_px else np.zeros((rows, cols, 2), int)
    if misplaced is not None:
        jit[misplaced[0], misplaced[1]] += np.asarray(misplace_px, int)
    margin = int(np.abs(jit).max()) + 1
    need_h = margin * 2 + (rows - 1) * step_y + th
    need_w = margin * 2 + (cols - 1) * step_x + tw
    if texture.shape[0] < need_h or texture.shape[1] < need_w:
        msg = (
            f"texture {texture.shape[:2]} is too small for {rows}x{cols} tiles of {th}x{tw} px "
            f"at {overlap:.0%} overlap with {margin - 1} px offsets: need at least ({need_h}, {need_w})"
        )
        raise ValueError(msg)
    flat_level = float(np.median(np.asarray(texture[:: max(1, need_h // 256), :: max(1, need_w // 256)])))
    grow = max(tw - step_x, th - step_y) + margin
    flat_rects = [
        (
            c * step_x + int(jit[r, c, 0]) - grow,
            r * step_y + int(jit[r, c, 1]) - grow,
            c * step_x + int(jit[r, c, 0]) + tw + grow,
            r * step_y + int(jit[r, c, 1]) + th + grow,
        )
        for r, c in featureless
    ]
    names = {(r, c): name_format.format(row=r, col=c) for r in range(rows) for c in range(cols)}

    tiles: list[Tile] = []
    true_positions: dict[str, tuple[float, float]] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for r in range(rows):
        for c in range(cols):
            ox, oy = int(jit[r, c, 0]), int(jit[r, c, 1])
            tx, ty = c * step_x + ox, r * step_y + oy
            name = names[(r, c)]
            true_positions[name] = (float(tx), float(ty))
            offsets[name] = (ox, oy)
            loader = _TileLoader(texture, tx, ty, tw, th, margin, flat_rects, flat_level, noise_sigma, (seed, r, c))
            tiles.append(
                Tile(
                    name=name,
                    row=r,
                    col=c,
                    x=float(c * step_x),
                    y=float(r * step_y),
                    width=tw,
                    height=th,
                    loader=loader,
                    digest_fn=loader.digest,
                )
            )
    return GeneratedTileSet(
        tiles=tuple(tiles),
        rows=rows,
        cols=cols,
        tile_height=th,
        tile_width=tw,
        overlap=overlap,
        step_x=step_x,
        step_y=step_y,
        true_positions=true_positions,
        offsets=offsets,
        misplaced=names[misplaced] if misplaced is not None else None,
        featureless=tuple(names[rc] for rc in featureless),
    )


class _TileLoader:
    """Cuts one tile out of the texture on demand (deterministic), memoises its digest."""

    def __init__(
        self,
        texture: np.ndarray,
        tx: int,
        ty: int,
        tw: int,
        th: int,
        margin: int,
        flat_rects: Sequence[tuple[int, int, int, int]],
        flat_level: float,
        noise_sigma: float,
        key: tuple[int, int, int],
    ) -> None:
        self.texture, self.tx, self.ty, self.tw, self.th = texture, tx, ty, tw, th
        self.margin, self.flat_rects, self.flat_level = margin, flat_rects, flat_level
        self.noise_sigma, self.key = noise_sigma, key
        self._digest: str | None = None

    def __call__(self) -> np.ndarray:
        y0, x0 = self.ty + self.margin, self.tx + self.margin
        tile = np.array(self.texture[y0 : y0 + self.th, x0 : x0 + self.tw])
        rng = np.random.default_rng(self.key)
        dtype = tile.dtype
        work = tile.astype(np.float32)
        for fx0, fy0, fx1, fy1 in self.flat_rects:
            ax0, ay0 = max(fx0 - self.tx, 0), max(fy0 - self.ty, 0)
            ax1, ay1 = min(fx1 - self.tx, self.tw), min(fy1 - self.ty, self.th)
            if ax0 < ax1 and ay0 < ay1:
                patch = work[ay0:ay1, ax0:ax1]
                patch[...] = self.flat_level + rng.normal(0, max(1.0, self.noise_sigma), patch.shape)
        if self.noise_sigma > 0:
            work += rng.normal(0, self.noise_sigma, work.shape).astype(np.float32)
        return _to_dtype(work, dtype)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = array_digest(self())
        return self._digest


def write_tile_folder(
    tile_set: GeneratedTileSet,
    folder: str | Path,
    *,
    prefix: str = "FOV",
    stamp: str = "20240101120000",
) -> Path:
    """Write a tile set as a tile folder of TIFFs plus ``info.json``.

    Files are ``<prefix>_RRRR_CCCC_<stamp>.tif`` (uncompressed, one page);
    ``info.json`` holds ``rows``, ``cols``, ``overlap``, ``tile_width``,
    ``tile_height``, ``step_x``, ``step_y`` and ``dtype``.

    Returns
    -------
    Path
        The folder.
    """
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = None
    for t in tile_set.tiles:
        arr = t.read()
        dtype = str(arr.dtype)
        tifffile.imwrite(
            folder / f"{prefix}_{t.row:04d}_{t.col:04d}_{stamp}.tif",
            arr,
            photometric="rgb" if arr.ndim == 3 else "minisblack",
        )
    info = {
        "rows": tile_set.rows,
        "cols": tile_set.cols,
        "overlap": tile_set.overlap,
        "tile_width": tile_set.tile_width,
        "tile_height": tile_set.tile_height,
        "step_x": tile_set.step_x,
        "step_y": tile_set.step_y,
        "dtype": dtype,
    }
    (folder / "info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def tiles_from_folder(folder: str | Path) -> list[Tile]:
    """Read a folder written by :func:`write_tile_folder` back as tiles.

    Nominal positions come from ``info.json`` (``step_x``, ``step_y``, or the
    tile size and ``overlap``). Each tile's identity is its path, size and
    modification time, so a pair cache can memoise its digest; the digest
    itself hashes the decoded pixels.
    """
    import tifffile

    folder = Path(folder)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    tw, th = int(info["tile_width"]), int(info["tile_height"])
    step_x = int(info.get("step_x") or round(tw * (1 - float(info["overlap"]))))
    step_y = int(info.get("step_y") or round(th * (1 - float(info["overlap"]))))
    tiles = []
    for path in sorted(folder.iterdir()):
        m = TILE_NAME_RE.match(path.name)
        if not m:
            continue
        r, c = int(m["row"]), int(m["col"])
        st = path.stat()
        tiles.append(
            Tile(
                name=path.name,
                row=r,
                col=c,
                x=float(c * step_x),
                y=float(r * step_y),
                width=tw,
                height=th,
                loader=functools.partial(tifffile.imread, path),
                identity=f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}",
            )
        )
    return tiles


def make_layout_set(
    texture: np.ndarray,
    nominal: Sequence[tuple[float, float]],
    *,
    tile_size: int | tuple[int, int],
    jitter_px: int = 0,
    seed: int = 0,
    noise_sigma: float = 0.0,
    names: Sequence[str] | None = None,
    offsets: Sequence[tuple[int, int]] | None = None,
) -> tuple[tuple[Tile, ...], dict[str, tuple[float, float]]]:
    """Tiles cut at arbitrary nominal positions plus seeded stage jitter.

    Parameters
    ----------
    texture : ndarray
        Must cover every tile at its true position, with the positions taken
        relative to a margin of the largest stage error + 1 px inside the
        texture's top-left.
    nominal : sequence of (x, y)
        Each tile's nominal top-left, px (non-negative).
    tile_size, jitter_px, seed, noise_sigma
        As for :func:`make_tile_set`.
    names : sequence of str, optional
        Tile names; default ``tile_<i>``.
    offsets : sequence of (int, int), optional
        Each tile's stage error ``(dx, dy)``, px, instead of random jitter
        (the texture margin is then the largest of them).

    Returns
    -------
    (tiles, true_positions)
        Tiles with row 0, column ``i`` (the layout decides neighbours), and
        name -> true top-left ``(x, y)``.
    """
    th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    names = list(names) if names is not None else [f"tile_{i}" for i in range(len(nominal))]
    rng = np.random.default_rng(seed)
    jit = (
        rng.integers(-jitter_px, jitter_px + 1, size=(len(nominal), 2))
        if jitter_px
        else np.zeros((len(nominal), 2), int)
    )
    if offsets is not None:
        jit = np.asarray(offsets, int).reshape(len(nominal), 2)
    margin = int(np.abs(jit).max(initial=0)) + 1
    tiles, truth = [], {}
    for i, ((x, y), name) in enumerate(zip(nominal, names, strict=False)):
        tx, ty = round(x) + int(jit[i, 0]), round(y) + int(jit[i, 1])
        if ty + margin + th > texture.shape[0] or tx + margin + tw > texture.shape[1]:
            msg = f"texture {texture.shape[:2]} is too small for a {th}x{tw} tile at ({tx}, {ty})"
            raise ValueError(msg)
        loader = _TileLoader(texture, tx, ty, tw, th, margin, [], 0.0, noise_sigma, (seed, i, 0))
        tiles.append(
            Tile(
                name=name,
                row=0,
                col=i,
                x=float(x),
                y=float(y),
                width=tw,
                height=th,
                loader=loader,
                digest_fn=loader.digest,
            )
        )
        truth[name] = (float(tx), float(ty))
    return tuple(tiles), truth


def write_tile_configuration_folder(
    tiles: Sequence[Tile],
    folder: str | Path,
    *,
    names: Sequence[str] | None = None,
    config_name: str = "TileConfiguration.txt",
) -> Path:
    """Write tiles as TIFFs with any names and a Fiji ``TileConfiguration.txt`` of their nominal positions.

    The configuration has Fiji's comments and ``dim = 2`` line; ``names``
    (default the tiles' own) are the file names, written in the given order.

    Returns
    -------
    Path
        The folder.
    """
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else [t.name for t in tiles]
    lines = ["# Define the number of dimensions we are working on", "dim = 2", "", "# Define the image coordinates"]
    for t, name in zip(tiles, names, strict=False):
        arr = t.read()
        tifffile.imwrite(folder / name, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
        lines.append(f"{name}; ; ({t.x:.1f}, {t.y:.1f})")
    (folder / config_name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
