"""Assemble and reduce images that come as tiles at nominal positions."""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from qc.io._reduce import block_mean, reduced_shape
from qc.io.model import Tile

__all__ = ["ahead", "assemble", "grid_indices", "owned_rects", "reduce_tiles", "tile_view"]

T = TypeVar("T")
R = TypeVar("R")

#: Called with each tile and its pixels as a mosaic is read (to keep a reduced view of every tile); thread-safe.
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


#: ``(x0, y0, x1, y1)``, end-exclusive, in mosaic pixels.
Rect = tuple[int, int, int, int]


def _minus(r: Rect, b: Rect) -> list[Rect]:
    """``r`` without ``b``: at most four rectangles (the bands above and below ``b``, left and right of it)."""
    x0, y0, x1, y1 = r
    bx0, by0, bx1, by1 = b
    if bx0 >= x1 or bx1 <= x0 or by0 >= y1 or by1 <= y0:
        return [r]
    out = []
    if by0 > y0:
        out.append((x0, y0, x1, by0))
    if by1 < y1:
        out.append((x0, by1, x1, y1))
    my0, my1 = max(y0, by0), min(y1, by1)
    if bx0 > x0:
        out.append((x0, my0, bx0, my1))
    if bx1 < x1:
        out.append((bx1, my0, x1, my1))
    return out


def owned_rects(boxes: Sequence[Rect], window: Rect) -> list[list[Rect]]:
    """For each box, the parts of ``window`` it covers that no later box covers.

    They are disjoint, so the boxes' pixels can be written in any order, or at
    once, and the result is that of writing them in order with later ones
    overwriting earlier ones.
    """
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    wx0, wy0, wx1, wy1 = window
    out: list[list[Rect]] = []
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
        rects = [(max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1))]
        if rects[0][0] >= rects[0][2] or rects[0][1] >= rects[0][3]:
            out.append([])
            continue
        rest = b[i + 1 :]
        later = np.nonzero((rest[:, 0] < x1) & (rest[:, 2] > x0) & (rest[:, 1] < y1) & (rest[:, 3] > y0))[0]
        for j in later.tolist():
            rects = [piece for r in rects for piece in _minus(r, tuple(rest[j].tolist()))]
            if not rects:
                break
        out.append(rects)
    return out


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

    Only the tiles that touch the window are read, on up to ``threads``
    threads; each thread also places the tile it decoded, writing only the
    pixels no later tile covers (:func:`owned_rects`), so the result is that of
    placing them in order. Each tile is handed to ``on_tile`` once, on the
    thread that decoded it (so in no set order: the hook must be thread-safe).
    Tiles must decode to their declared size. Uncovered pixels are 0.
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
    boxes = [(round(t.x), round(t.y), round(t.x) + t.width, round(t.y) + t.height) for t in touching]
    owned = owned_rects(boxes, (x, y, x + width, y + height))

    def place(k: int) -> None:
        t = touching[k]
        pixels = t.read()
        tx, ty = boxes[k][:2]
        for x0, y0, x1, y1 in owned[k]:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
        if on_tile is not None:
            on_tile(t, pixels)

    for _ in ahead(place, range(len(touching)), threads):
        pass
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
