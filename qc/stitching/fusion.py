"""Fusion: the stitched image of a tile set, streamed into a tiled, pyramidal OME-TIFF.

:func:`fuse_tiles` places each tile at its position (the registered ones of
:func:`qc.stitching.evaluate_stitching`, else the nominal ones), rounded to
whole pixels, and writes the mosaic band by band: a band is one row of TIFF
tiles (``tile_px`` rows of the mosaic); only the tiles that cross the band
are decoded, each once, and dropped as soon as the bands have passed it, so
memory is bounded by a few rows of tiles and one band, never the mosaic.

Overlaps are blended:

``linear``
    Each tile's pixels are weighted by their distance to the tile's nearest
    edge (a product of two ramps that falls to 1 at the border), and
    overlapping pixels are the weighted mean: seams fade over the overlap.
``nearest``
    Each pixel comes from the tile it lies deepest inside (the largest of the
    same weights): a hard seam down the middle of every overlap, no pixel
    value that no tile recorded.

Pixels no tile covers are 0. The dtype (8 or 16 bit, float) and RGB are
kept. The pyramid's reduced levels (each half the size of the one above,
area mean, down to one TIFF tile) are built from the bands as they pass,
into temporary memory-mapped files beside the output, and written as
SubIFDs of the full-resolution page, which is what OME-TIFF readers (QuPath,
Fiji/Bio-Formats, napari, tifffile) read as a pyramid.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from qc.errors import QCError
from qc.io.model import Tile

__all__ = ["BLENDS", "FusionResult", "fuse_tiles"]

BLENDS = ("linear", "nearest")


@dataclass(frozen=True)
class FusionResult:
    """What :func:`fuse_tiles` wrote.

    ``width``/``height`` are the mosaic's, ``origin`` the position (in the
    tiles' frame) of its top-left pixel, ``levels`` the pyramid's sizes
    ``(height, width)`` from full resolution down, ``seconds`` the wall time.
    """

    path: Path
    width: int
    height: int
    origin: tuple[float, float]
    dtype: str
    samples: int
    levels: tuple[tuple[int, int], ...]
    tiles: int
    blend: str
    seconds: float


def _ramp(n: int) -> np.ndarray:
    """1 at both ends, rising linearly to the middle: each pixel's distance to the nearer edge, plus 1."""
    i = np.arange(n, dtype=np.float32)
    return np.minimum(i + 1, n - i)


def _to_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        result: np.ndarray = np.clip(np.rint(arr), info.min, info.max).astype(dtype)
        return result
    return arr.astype(dtype)


def _halve(band: np.ndarray) -> np.ndarray:
    """Area mean over 2 x 2 blocks, in the band's dtype; an odd last row or column is averaged on its own.

    The even part goes through OpenCV's exact-halving path (several times
    faster than a resize to an odd size).
    """
    h, w = band.shape[:2]
    he, we = h - h % 2, w - w % 2
    out = np.empty(((h + 1) // 2, (w + 1) // 2, *band.shape[2:]), band.dtype)
    if he and we:
        out[: he // 2, : we // 2] = cv2.resize(band[:he, :we], (we // 2, he // 2), interpolation=cv2.INTER_AREA)
    if w % 2 and he:
        col = band[:he, w - 1].astype(np.float32)
        out[: he // 2, -1] = _to_dtype(col.reshape(he // 2, 2, *band.shape[2:]).mean(axis=1), band.dtype)
    if h % 2:
        row = band[h - 1].astype(np.float32)
        if we:
            out[-1, : we // 2] = _to_dtype(row[:we].reshape(we // 2, 2, *band.shape[2:]).mean(axis=1), band.dtype)
        if w % 2:
            out[-1, -1] = band[h - 1, w - 1]
    return out


def _tiles_of(band: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """The TIFF tiles of one band, left to right, the last ones padded to full size."""
    for x0 in range(0, band.shape[1], tile_px):
        t = band[:, x0 : x0 + tile_px]
        if t.shape[0] != tile_px or t.shape[1] != tile_px:
            pad = np.zeros((tile_px, tile_px, *band.shape[2:]), band.dtype)
            pad[: t.shape[0], : t.shape[1]] = t
            t = pad
        yield np.ascontiguousarray(t)


def _level_tiles(level: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """The TIFF tiles of a whole (memory-mapped) level, band by band."""
    for y0 in range(0, level.shape[0], tile_px):
        yield from _tiles_of(np.asarray(level[y0 : y0 + tile_px]), tile_px)


def fuse_tiles(
    tiles: Sequence[Tile],
    out: str | Path,
    *,
    positions: Mapping[str, tuple[float, float]] | None = None,
    blend: str = "linear",
    tile_px: int = 512,
    compression: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FusionResult:
    """Write the stitched image of ``tiles`` to ``out`` as a tiled, pyramidal OME-TIFF.

    Parameters
    ----------
    tiles : sequence of Tile
        The fields of view (at least one), all of one dtype and sample count.
    out : str or Path
        The ``.ome.tif`` to write (replaced when it exists).
    positions : mapping, optional
        Tile name -> top-left ``(x, y)`` px, e.g.
        :attr:`qc.stitching.StitchingResult.registered_positions`; default the
        tiles' nominal positions. Rounded to whole pixels.
    blend : {"linear", "nearest"}
        How overlaps are combined (see the module docstring).
    tile_px : int
        TIFF tile side and band height, px (a power of two, 16 to 4096).
    compression : str, optional
        TIFF compression for tifffile (e.g. ``"zlib"``); default none (fastest).
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` after each band.

    Returns
    -------
    FusionResult
    """
    import tifffile

    if blend not in BLENDS:
        msg = f"unknown blend {blend!r}; use one of {', '.join(BLENDS)}"
        raise ValueError(msg)
    if not 16 <= tile_px <= 4096 or tile_px & (tile_px - 1):
        msg = f"tile_px must be a power of two from 16 to 4096, got {tile_px}"
        raise ValueError(msg)
    tiles = list(tiles)
    if not tiles:
        msg = "there are no tiles to fuse"
        raise QCError(msg, hint="Give a tile folder or a CZI mosaic")
    start = time.perf_counter()
    pos = {t.name: (positions or {}).get(t.name, (t.x, t.y)) for t in tiles}
    x_min = min(p[0] for p in pos.values())
    y_min = min(p[1] for p in pos.values())
    place = [(round(pos[t.name][0] - x_min), round(pos[t.name][1] - y_min)) for t in tiles]
    width = max(x + t.width for (x, _), t in zip(place, tiles, strict=False))
    height = max(y + t.height for (_, y), t in zip(place, tiles, strict=False))

    cache: dict[int, np.ndarray] = {}

    def tile_pixels(i: int) -> np.ndarray:
        if i not in cache:
            arr = np.asarray(tiles[i].read())
            if arr.shape[:2] != (tiles[i].height, tiles[i].width):
                msg = f"tile {tiles[i].name!r} decoded to {arr.shape[:2]} px but declares {tiles[i].height}x{tiles[i].width}"
                raise QCError(msg, hint="The tile file and the mosaic metadata disagree; re-export the scan")
            cache[i] = arr
        return cache[i]

    by_top = sorted(range(len(tiles)), key=lambda i: place[i][1])
    first = tile_pixels(by_top[0])
    dtype, extra = first.dtype, first.shape[2:]
    samples = extra[0] if extra else 1
    del first  # the cache holds it until the bands pass it

    levels = [(height, width)]
    while max(levels[-1]) > tile_px and 2 ** len(levels) <= tile_px:  # a band halves to whole rows
        h, w = levels[-1]
        levels.append((max(1, math.ceil(h / 2)), max(1, math.ceil(w / 2))))
    ramps = {}

    def weights(i: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Tile i's blending weights over its own rows r0:r1, columns c0:c1."""
        key = (tiles[i].width, tiles[i].height)
        if key not in ramps:
            ramps[key] = (_ramp(key[0]), _ramp(key[1]))
        rx, ry = ramps[key]
        result: np.ndarray = ry[r0:r1, None] * rx[None, c0:c1]
        return result

    def fused_band(y0: int, y1: int) -> np.ndarray:
        """Mosaic rows y0:y1: every tile copied in, then each overlap blended from all the tiles that cover it."""
        band = np.zeros((y1 - y0, width, *extra), dtype)
        active = []
        for i in by_top:
            x, y = place[i]
            t = tiles[i]
            if y >= y1:
                break
            if y + t.height <= y0:
                continue
            arr = tile_pixels(i)
            if arr.shape[2:] != extra:
                msg = f"tile {t.name!r} is {arr.shape} but the first tile has {extra or 'one'} sample(s)"
                raise QCError(msg, hint="All tiles of a set must match; re-export the scan")
            a0, a1 = max(y0, y) - y, min(y1, y + t.height) - y
            band[y + a0 - y0 : y + a1 - y0, x : x + t.width] = arr[a0:a1]
            active.append((i, x, max(y0, y), x + t.width, min(y1, y + t.height)))
        done: set[tuple[int, int, int, int]] = set()
        for k, (_, ax0, ay0, ax1, ay1) in enumerate(active):
            for _, bx0, by0, bx1, by1 in active[k + 1 :]:
                rect = (max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1))
                if rect[0] >= rect[2] or rect[1] >= rect[3] or rect in done:
                    continue
                done.add(rect)
                rx0, ry0, rx1, ry1 = rect
                shape = (ry1 - ry0, rx1 - rx0)
                acc = (
                    np.zeros((*shape, *extra), np.float32)
                    if blend == "linear"
                    else band[ry0 - y0 : ry1 - y0, rx0:rx1].copy()
                )
                best = np.zeros(shape, np.float32)
                for i, cx0, cy0, cx1, cy1 in active:  # every tile that covers part of the overlap
                    px0, py0, px1, py1 = max(rx0, cx0), max(ry0, cy0), min(rx1, cx1), min(ry1, cy1)
                    if px0 >= px1 or py0 >= py1:
                        continue
                    x, y = place[i]
                    w = weights(i, py0 - y, py1 - y, px0 - x, px1 - x)
                    sub = tile_pixels(i)[py0 - y : py1 - y, px0 - x : px1 - x]
                    o = (slice(py0 - ry0, py1 - ry0), slice(px0 - rx0, px1 - rx0))
                    if blend == "linear":
                        acc[o] += sub.astype(np.float32) * (w[..., None] if extra else w)
                        best[o] += w
                    else:
                        take = w > best[o]
                        acc[o][take] = sub[take]
                        best[o][take] = w[take]
                if blend == "linear":
                    acc /= best[..., None] if extra else best
                    acc = _to_dtype(acc, dtype)
                band[ry0 - y0 : ry1 - y0, rx0:rx1] = acc
        return band

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    photometric = "rgb" if samples == 3 else "minisblack"
    with tempfile.TemporaryDirectory(prefix=".fuse-", dir=out.parent, ignore_cleanup_errors=True) as tmp:
        reduced = [
            np.lib.format.open_memmap(Path(tmp) / f"level{k}.npy", mode="w+", dtype=dtype, shape=(h, w, *extra))
            for k, (h, w) in enumerate(levels)
            if k
        ]

        def base_tiles() -> Iterator[np.ndarray]:
            for y0 in range(0, height, tile_px):
                y1 = min(height, y0 + tile_px)
                band = fused_band(y0, y1)
                for i in [i for i in cache if place[i][1] + tiles[i].height <= y1]:
                    del cache[i]  # the bands have passed it
                # this band's share of every reduced level, each the area mean of the one above
                down, top = band, y0
                for lvl in reduced:
                    top //= 2  # exact: bands start at multiples of tile_px, a power of two
                    down = _halve(down)
                    lvl[top : top + down.shape[0]] = down
                yield from _tiles_of(band, tile_px)
                if progress is not None:
                    progress(y1, height)

        with tifffile.TiffWriter(out, bigtiff=True, ome=True) as tif:
            meta = {"axes": "YXS" if extra else "YX"}
            tif.write(
                base_tiles(),
                shape=(height, width, *extra),
                dtype=dtype,
                tile=(tile_px, tile_px),
                photometric=photometric,
                compression=compression,
                subifds=len(reduced),
                metadata=meta,
            )
            for k in range(len(reduced)):
                tif.write(
                    _level_tiles(reduced[k], tile_px),
                    shape=reduced[k].shape,
                    dtype=dtype,
                    tile=(tile_px, tile_px),
                    photometric=photometric,
                    compression=compression,
                    subfiletype=1,
                    metadata=None,
                )
        reduced.clear()  # unmapped before the folder goes (Windows cannot delete mapped files)
    return FusionResult(
        path=out,
        width=width,
        height=height,
        origin=(float(x_min), float(y_min)),
        dtype=str(dtype),
        samples=samples,
        levels=tuple(levels),
        tiles=len(tiles),
        blend=blend,
        seconds=time.perf_counter() - start,
    )
