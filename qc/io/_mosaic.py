"""Assemble and reduce images that come as tiles at nominal positions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qc.io._reduce import MosaicReducer
from qc.io.model import Tile

__all__ = ["assemble", "reduce_tiles", "grid_indices"]


def _shape(h: int, w: int, samples: int | None) -> tuple[int, ...]:
    return (h, w) if samples is None else (h, w, samples)


def assemble(
    tiles: Sequence[Tile], x: int, y: int, width: int, height: int, dtype: np.dtype, samples: int | None
) -> np.ndarray:
    """The window ``[y:y+height, x:x+width]`` of the mosaic; later tiles overwrite earlier ones.

    Only the tiles that touch the window are read. Uncovered pixels are 0.
    """
    out = np.zeros(_shape(height, width, samples), dtype=dtype)
    for t in tiles:
        tx, ty = int(round(t.x)), int(round(t.y))
        if tx >= x + width or ty >= y + height or tx + t.width <= x or ty + t.height <= y:
            continue
        pixels = t.read()
        x0, y0 = max(x, tx), max(y, ty)
        x1, y1 = min(x + width, tx + pixels.shape[1]), min(y + height, ty + pixels.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    return out


def reduce_tiles(
    tiles: Sequence[Tile], width: int, height: int, factor: int, dtype: np.dtype, samples: int | None
) -> np.ndarray:
    """Area-mean reduction of the mosaic, tile by tile (overlaps averaged)."""
    reducer = MosaicReducer(height, width, factor, dtype, samples)
    for t in tiles:
        reducer.add(t.read(), int(round(t.x)), int(round(t.y)))
    return reducer.finish()


def _cluster(values: Sequence[float], gap: float) -> list[int]:
    """Index of each value's cluster, clusters ordered by value; a new cluster starts after ``gap``."""
    order = sorted(set(values))
    labels: dict[float, int] = {}
    k, last = -1, None
    for v in order:
        if last is None or v - last > gap:
            k += 1
        labels[v] = k
        last = v
    return [labels[v] for v in values]


def grid_indices(
    xs: Sequence[float], ys: Sequence[float], tile_width: int, tile_height: int
) -> tuple[list[int], list[int]]:
    """Row and column of each tile from its position: positions closer than half a tile share a row/column."""
    return _cluster(ys, tile_height / 2), _cluster(xs, tile_width / 2)
