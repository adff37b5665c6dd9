"""Assemble and reduce images that come as tiles at nominal positions."""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from qc.io._reduce import block_mean, reduced_shape
from qc.io.model import Tile

__all__ = ["ahead", "assemble", "grid_indices", "read_ahead", "reduce_tiles", "tile_view"]

T = TypeVar("T")
R = TypeVar("R")

#: Called with each tile and its pixels as a mosaic is read (to keep a reduced view of every tile).
TileHook = Callable[[Tile, np.ndarray], None]

#: Bands of the mosaic are assembled in pieces of about this many bytes (at least one block row).
_BAND_BYTES = 4 * 1024**2


def _shape(h: int, w: int, samples: int | None) -> tuple[int, ...]:
    return (h, w) if samples is None else (h, w, samples)


def ahead(fn: Callable[[T], R], items: Sequence[T], threads: int = 1) -> Generator[R, None, None]:
    """``fn`` of each item, in the order given, on up to ``threads`` threads.

    At most ``2 * threads`` items are worked on ahead of the result the caller
    holds, so memory stays at a few results (decoded tiles) whatever the count.
    Closing the iterator early cancels what has not started.
    """
    if threads <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qc-ahead") as ex:
        pending: collections.deque[Future[R]] = collections.deque()
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) > 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def read_ahead(tiles: Sequence[Tile], threads: int = 1) -> Iterator[tuple[Tile, np.ndarray]]:
    """Each tile with its pixels, in the order given, decoded on up to ``threads`` threads (:func:`ahead`)."""
    return ahead(lambda t: (t, t.read()), tiles, threads)


def assemble(
    tiles: Sequence[Tile],
    x: int,
    y: int,
    width: int,
    height: int,
    dtype: np.dtype,
    samples: int | None,
    threads: int = 1,
    on_tile: TileHook | None = None,
) -> np.ndarray:
    """The window ``[y:y+height, x:x+width]`` of the mosaic; later tiles overwrite earlier ones.

    Only the tiles that touch the window are read (on up to ``threads``
    threads, placed in order), and each is handed to ``on_tile`` as read.
    Uncovered pixels are 0.
    """
    out = np.zeros(_shape(height, width, samples), dtype=dtype)
    touching = [
        t
        for t in tiles
        if not (
            round(t.x) >= x + width
            or round(t.y) >= y + height
            or round(t.x) + t.width <= x
            or round(t.y) + t.height <= y
        )
    ]
    for t, pixels in read_ahead(touching, threads):
        if on_tile is not None:
            on_tile(t, pixels)
        tx, ty = round(t.x), round(t.y)
        x0, y0 = max(x, tx), max(y, ty)
        x1, y1 = min(x + width, tx + pixels.shape[1]), min(y + height, ty + pixels.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    return out


def tile_view(pixels: np.ndarray, factor: int) -> np.ndarray:
    """A tile reduced by ``factor`` for pictures: the area mean of an evenly spread subset of each block.

    Each output pixel averages at least 16 of its block's pixels (every
    ``step``-th row and column, ``step`` dividing ``factor``): a fraction of a
    full :func:`block_mean`'s cost, and as smooth at a picture's scale.
    """
    step = max(d for d in range(1, factor + 1) if factor % d == 0 and 4 * d <= max(factor, 4))
    return block_mean(pixels[::step, ::step], factor // step)


def reduce_tiles(
    tiles: Sequence[Tile],
    width: int,
    height: int,
    factor: int,
    dtype: np.dtype,
    samples: int | None,
    on_tile: TileHook | None = None,
) -> np.ndarray:
    """Area-mean reduction of the composited mosaic, equal to ``block_mean(assemble(...), factor)``.

    Works in bands of whole output rows, each spanning only the columns its
    tiles cover; a tile stays decoded while bands cross it and is read once
    (and handed to ``on_tile`` then). Empty rows of a sparse mosaic cost
    nothing.
    """
    oh, ow = reduced_shape(height, width, factor)
    out = np.zeros(_shape(oh, ow, samples), dtype=dtype)
    placed = [(round(t.x), round(t.y), t) for t in tiles]
    cache: dict[int, np.ndarray] = {}
    row_bytes_per_block = factor * np.dtype(dtype).itemsize * (samples or 1)
    by = 0
    while by < oh:
        y0 = by * factor
        live = [(i, x, y, t) for i, (x, y, t) in enumerate(placed) if y < height and y + t.height > y0 and x < width]
        if not live:
            nxt = [y for x, y, t in placed if y >= y0]
            by = max(by + 1, min(nxt) // factor) if nxt else oh
            continue
        xa = max(0, min(x for _, x, _, _ in live)) // factor * factor
        xb = min(width, max(x + t.width for _, x, _, t in live))
        k = max(1, _BAND_BYTES // max(1, (xb - xa) * row_bytes_per_block))
        y1 = min(height, (by + k) * factor)
        band_tiles = [(i, x, y, t) for i, x, y, t in live if y < y1]
        band = np.zeros(_shape(y1 - y0, xb - xa, samples), dtype=dtype)
        for i, x, y, t in band_tiles:
            if i not in cache:
                cache[i] = t.read()
                if on_tile is not None:
                    on_tile(t, cache[i])
            pixels = cache[i]
            px0, py0 = max(x, xa), max(y, y0)
            px1, py1 = min(x + pixels.shape[1], xb), min(y + pixels.shape[0], y1)
            if px1 > px0 and py1 > py0:
                band[py0 - y0 : py1 - y0, px0 - xa : px1 - xa] = pixels[py0 - y : py1 - y, px0 - x : px1 - x]
        reduced = block_mean(band, factor)
        out[by : by + reduced.shape[0], xa // factor : xa // factor + reduced.shape[1]] = reduced
        for i, _, y, t in band_tiles:
            if y + t.height <= y1:
                cache.pop(i, None)
        by += reduced.shape[0]
    return out


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
    """Row and column of each tile from its position: positions closer than half a tile share a row/column.

    A layout that is not a grid (rows offset by part of a tile, like bricks)
    would put two tiles in one cell; then each row's columns are its tiles'
    ranks by x instead, so every tile keeps a cell of its own.
    """
    rows, cols = _cluster(ys, tile_height / 2), _cluster(xs, tile_width / 2)
    if len(set(zip(rows, cols, strict=False))) < len(rows):
        order = sorted(range(len(rows)), key=lambda i: (rows[i], xs[i], ys[i]))
        seen: dict[int, int] = {}
        for i in order:
            cols[i] = seen.get(rows[i], 0)
            seen[rows[i]] = cols[i] + 1
    return rows, cols
