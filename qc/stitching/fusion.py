"""Fusion: the stitched image of a tile set, streamed into a tiled, pyramidal OME-TIFF.

:func:`fuse_tiles` places each tile at its position (the registered ones of
:func:`qc.stitching.evaluate_stitching`, else the nominal ones), rounded to
whole pixels, and writes the mosaic band by band: a band is one row of TIFF
tiles (``tile_px`` rows of the mosaic); only the tiles that cross the band
are decoded, each once, and dropped as soon as the bands have passed it, so
memory is bounded by a few rows of tiles and a few bands, never the mosaic.

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
area mean, down to one TIFF tile) are halved from each band as it passes and
written as soon as a row of their tiles is complete
(:class:`~qc.stitching.pyramid_tiff.PyramidTiffWriter`): no temporary file,
every byte written once. Bands are fused straight into TIFF tile order (no
regrouping before the write), into buffers reused for the whole mosaic, as
are the tiles' pixels (fresh memory costs a page fault per page; readers that
can decode into a given array, such as an uncompressed TIFF's, read straight
into them). With ``threads`` above 1 one thread does the file work, reading
the tiles about one tile height ahead of the bands and writing the rows
already fused, while the others fuse each band in column strips.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qc.errors import QCError
from qc.filenames import writer_tag
from qc.io.model import Tile
from qc.stitching.pyramid_tiff import COMPRESSIONS, PyramidTiffWriter, ome_description

__all__ = ["BLENDS", "FusionResult", "fuse_tiles"]

BLENDS = ("linear", "nearest")

#: A mosaic rectangle ``(x0, y0, x1, y1)``, px, ends excluded.
Rect = tuple[int, int, int, int]

#: Rows of tiles (full-resolution bands or reduced-level rows) waiting for the writer thread at most.
_PENDING_WRITES = 4
#: Column strips each band is cut into per thread (shared out as the threads come free).
_STRIPS_PER_THREAD = 3
#: Tile sizes whose blending weights are kept (a 2048^2 tile's take 16 MiB); other sizes are computed each time.
_WEIGHT_MAPS = 4


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


def _halve(band: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Area mean over 2 x 2 blocks, in the band's dtype; an odd last row or column is averaged on its own.

    Written into ``out`` (``((h + 1) // 2, (w + 1) // 2)``, may be a view with
    a row stride) when given. The even part goes through OpenCV's
    exact-halving path (several times faster than a resize to an odd size).
    """
    h, w = band.shape[:2]
    he, we = h - h % 2, w - w % 2
    if out is None:
        out = np.empty(((h + 1) // 2, (w + 1) // 2, *band.shape[2:]), band.dtype)
    if he and we:
        dst = out[: he // 2, : we // 2]
        half = cv2.resize(band[:he, :we], (we // 2, he // 2), dst=dst, interpolation=cv2.INTER_AREA)
        if half is not dst:  # OpenCV wrote elsewhere (it could not use the view)
            dst[...] = half
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


def _levels(height: int, width: int, tile_px: int) -> list[tuple[int, int]]:
    """Full resolution, then halves down to one TIFF tile; a band halves to whole rows at every level."""
    levels = [(height, width)]
    while max(levels[-1]) > tile_px and 2 ** len(levels) <= tile_px:
        h, w = levels[-1]
        levels.append((max(1, math.ceil(h / 2)), max(1, math.ceil(w / 2))))
    return levels


class _Buffers:
    """Arrays reused once their user is done with them: rows of tiles after the writer, tiles after the bands.

    Fresh memory costs a page fault per page (and, in a virtual machine, often
    a trip to the host); a few dozen arrays reused for the whole mosaic do not.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: np.dtype, *, zero: bool = True) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, dtype.str))
            buf = free.pop() if free else None
        if buf is None:
            return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        if zero:
            buf.fill(0)
        return buf

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault((buf.shape, buf.dtype.str), []).append(buf)


class _Rows:
    """Hands rows of tiles to the writer, on a thread of its own or not."""

    def __init__(self, writer: PyramidTiffWriter, buffers: _Buffers, pool: ThreadPoolExecutor | None) -> None:
        self.writer, self.buffers, self.pool = writer, buffers, pool
        self.pending: deque[Future[None]] = deque()

    def __call__(self, level: int, row: int, tiles: np.ndarray) -> None:
        if self.pool is None:
            self._write(level, row, tiles)
            return
        self.pending.append(self.pool.submit(self._write, level, row, tiles))
        while len(self.pending) > _PENDING_WRITES:
            self.pending.popleft().result()

    def _write(self, level: int, row: int, tiles: np.ndarray) -> None:
        self.writer.write_row(level, row, tiles)
        self.buffers.put(tiles)

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()


class _Pyramid:
    """Each full-resolution band written as a row of tiles and halved into every reduced level's current row.

    Every row is kept as TIFF tiles, ``(across, tile_px, tile_px[, samples])``,
    so it goes to the file as it is. Each tile halves on its own (it starts at
    an even column) into one half of a tile of the next level.
    """

    def __init__(self, levels: Sequence[tuple[int, int]], tile_px: int, dtype: np.dtype, extra: tuple[int, ...], rows: _Rows, buffers: _Buffers) -> None:  # fmt: skip
        self.levels, self.tile_px, self.dtype, self.extra = levels, tile_px, dtype, extra
        self.rows, self.buffers = rows, buffers
        self.current = [self._buffer(k) for k in range(len(levels))]
        self.filled = [0] * len(levels)
        self.row = [0] * len(levels)

    def _buffer(self, level: int) -> np.ndarray:
        """A row of ``level``'s tiles: zeroed for the reduced levels, as it was for the full resolution (whose
        band :meth:`_Blender.fill` writes whole)."""
        across = self.rows.writer.across[level]
        return self.buffers.get((across, self.tile_px, self.tile_px, *self.extra), self.dtype, zero=level > 0)

    def band(self) -> np.ndarray:
        """The tiles the next full-resolution band is fused into (not zeroed: the band is filled whole)."""
        return self.current[0]

    def _halve_columns(self, k: int, first: int, n: int, columns: range) -> None:
        """Rows first:first+n of level k-1's current row, TIFF tile columns ``columns``, halved into level k's."""
        t, half, width = self.tile_px, self.tile_px // 2, self.levels[k - 1][1]
        src, dst, g = self.current[k - 1], self.current[k], self.filled[k]
        m = (n + 1) // 2
        for tc in columns:
            cols = min(t, width - tc * t)
            j, side = divmod(tc, 2)
            _halve(src[tc, first : first + n, :cols], dst[j, g : g + m, side * half : side * half + (cols + 1) // 2])

    def halve_band(self, rows: int, x0: int, x1: int) -> None:
        """Mosaic columns x0:x1 (whole TIFF tiles) of the band just fused, halved into the first reduced level.

        Column strips of a band halve independently (each TIFF tile into its own half of a tile below), so the
        threads that fused them do it; :meth:`add` then does the rest.
        """
        if len(self.levels) > 1:
            t = self.tile_px
            self._halve_columns(1, 0, rows, range(x0 // t, -(-x1 // t)))

    def add(self, rows: int, last: bool) -> None:
        """The band (``rows`` rows of :meth:`band`, halved into the first reduced level by :meth:`halve_band`) is
        fused: halve it down the other levels and write what is complete."""
        t = self.tile_px
        first, n = 0, rows  # the rows just added to the level above
        done = [0]
        for k in range(1, len(self.levels)):
            g, m = self.filled[k], (n + 1) // 2
            if k > 1:
                self._halve_columns(k, first, n, range(-(-self.levels[k - 1][1] // t)))
            self.filled[k] += m
            first, n = g, m
            if self.filled[k] == t or last:
                done.append(k)
        for k in done:  # after the halving: a level's rows are read by the next level first
            self.rows(k, self.row[k], self.current[k])
            self.row[k] += 1
            self.filled[k] = 0
            self.current[k] = self._buffer(k)


def _pieces(x0: int, x1: int, t: int) -> Iterator[tuple[int, int, int]]:
    """Mosaic columns x0:x1 cut at TIFF tile edges: ``(tile column, first, end)`` each."""
    tc = x0 // t
    while x0 < x1:
        end = min(x1, (tc + 1) * t)
        yield tc, x0, end
        x0, tc = end, tc + 1


class _Tiles:
    """The tiles' pixels, decoded once when a band first needs them (or ahead of it) and dropped when the bands have
    passed them.

    Each tile is decoded into a buffer reused for the whole mosaic (a reader that can decode into it, such as an
    uncompressed TIFF's, writes straight into it; others are copied in), so decoding costs no fresh memory.
    """

    def __init__(self, tiles: Sequence[Tile], place: Sequence[tuple[int, int]]) -> None:
        self.tiles, self.place = tiles, place
        self.by_top = sorted(range(len(tiles)), key=lambda i: place[i][1])
        self.pixels: dict[int, np.ndarray] = {}
        self.pending: dict[int, Future[np.ndarray]] = {}  # decoding ahead of the bands
        self.held = _Buffers()
        self.like: tuple[tuple[int, ...], np.dtype] | None = None  # the first tile's samples and dtype
        self.hinted = 0  # tiles (in by_top order) whose reading the OS was asked to start

    def crossing(self, y0: int, y1: int) -> list[int]:
        """The tiles whose rows cross mosaic rows y0:y1, top first."""
        out = []
        for i in self.by_top:
            y = self.place[i][1]
            if y >= y1:
                break
            if y + self.tiles[i].height > y0:
                out.append(i)
        return out

    def hint(self, y0: int, y1: int) -> None:
        """Ask the OS to start fetching the tiles whose first rows lie in mosaic rows y0:y1 (each asked once)."""
        for i in self.by_top[self.hinted :]:
            if self.place[i][1] >= y1:
                break
            self.hinted += 1
            if self.place[i][1] >= y0:
                self.tiles[i].will_read()

    def prefetch(self, indices: Iterable[int], pool: ThreadPoolExecutor) -> None:
        """Start decoding these tiles on ``pool``; :meth:`load` waits for them."""
        for i in indices:
            if i not in self.pixels and i not in self.pending:
                self.pending[i] = pool.submit(self._decode, i)

    def load(self, indices: Sequence[int], pool: ThreadPoolExecutor | None) -> None:
        """Have these tiles' pixels in :attr:`pixels` (decoded on ``pool`` when given, else here)."""
        if pool is not None:
            self.prefetch(indices, pool)
        for i in indices:
            fut = self.pending.pop(i, None)
            if fut is not None:
                self.pixels[i] = fut.result()
            elif i not in self.pixels:
                self.pixels[i] = self._decode(i)

    def _decode(self, i: int) -> np.ndarray:
        t = self.tiles[i]
        buf = None
        if self.like is not None:
            extra, dtype = self.like
            buf = self.held.get((t.height, t.width, *extra), dtype, zero=False)
        arr = np.asarray(t.read(out=buf))
        if arr is buf:
            return arr
        if buf is not None:
            self.held.put(buf)
        if arr.shape[:2] != (t.height, t.width):
            msg = f"tile {t.name!r} decoded to {arr.shape[:2]} px but declares {t.height}x{t.width}"
            raise QCError(msg, hint="The tile file and the mosaic metadata disagree; re-export the scan")
        held = self.held.get(arr.shape, arr.dtype, zero=False)
        np.copyto(held, arr)
        return held

    def check(self, i: int, dtype: np.dtype, extra: tuple[int, ...]) -> None:
        arr = self.pixels[i]
        if arr.shape[2:] != extra or arr.dtype != dtype:
            msg = (
                f"tile {self.tiles[i].name!r} is {arr.shape} {arr.dtype} but the first tile is "
                f"{extra or 'one'} sample(s) of {dtype}"
            )
            raise QCError(msg, hint="All tiles of a set must match; re-export the scan")

    def drop_above(self, y: int) -> None:
        """Forget the tiles that end at or above mosaic row ``y``."""
        for i in [i for i in self.pixels if self.place[i][1] + self.tiles[i].height <= y]:
            self.held.put(self.pixels.pop(i))


def _uncovered(area: Rect, rects: Sequence[Rect]) -> list[Rect]:
    """The parts of ``area`` that none of ``rects`` (each inside it) covers: cells of the grid their edges cut."""
    if not rects:
        return [area]
    r = np.array(rects)
    xs = np.unique(np.concatenate(([area[0], area[2]], r[:, 0], r[:, 2])))
    ys = np.unique(np.concatenate(([area[1], area[3]], r[:, 1], r[:, 3])))
    x0, x1, y0, y1 = xs[:-1], xs[1:], ys[:-1], ys[1:]
    inside_x = (r[:, 0, None] <= x0) & (x1 <= r[:, 2, None])  # (rects, columns of cells)
    inside_y = (r[:, 1, None] <= y0) & (y1 <= r[:, 3, None])  # (rects, rows of cells)
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(axis=0)
    return [(int(x0[c]), int(y0[k]), int(x1[c]), int(y1[k])) for k, c in zip(*np.nonzero(~covered), strict=True)]


class _Blender:
    """Fuses one column strip of one band: every tile copied in, then each overlap blended from the tiles covering it."""

    def __init__(self, tiles: _Tiles, blend: str) -> None:
        self.tiles, self.blend = tiles, blend
        self.maps: dict[tuple[int, int], np.ndarray] = {}  # a tile size's weights, computed once (read-only)
        self.lock = threading.Lock()

    def weights(self, i: int, rect: Rect) -> np.ndarray:
        """Tile i's blending weights over the mosaic rectangle ``(x0, y0, x1, y1)`` (a read-only view)."""
        t = self.tiles.tiles[i]
        x, y = self.tiles.place[i]
        size = (t.width, t.height)
        full = self.maps.get(size)
        if full is None:
            full = np.multiply.outer(_ramp(t.height), _ramp(t.width))
            full.setflags(write=False)
            with self.lock:
                if len(self.maps) < _WEIGHT_MAPS:
                    self.maps.setdefault(size, full)
        return full[rect[1] - y : rect[3] - y, rect[0] - x : rect[2] - x]

    def pixels(self, i: int, rect: Rect) -> np.ndarray:
        x, y = self.tiles.place[i]
        return self.tiles.pixels[i][rect[1] - y : rect[3] - y, rect[0] - x : rect[2] - x]

    def fill(self, band: np.ndarray, y0: int, rows: int, active: Sequence[int], x0: int, x1: int) -> None:
        """Mosaic columns x0:x1 of the band of ``rows`` rows from mosaic row y0, kept as TIFF tiles in ``band``.

        ``band`` holds whatever its buffer held before: what no tile covers (the TIFF tiles' padding past the
        mosaic's last row and column included) is zeroed, the rest is written over.
        """
        y1, t = y0 + rows, band.shape[1]
        cover: list[tuple[int, Rect]] = []
        for i in active:
            x, y = self.tiles.place[i]
            tile = self.tiles.tiles[i]
            rect = (max(x, x0), max(y, y0), min(x + tile.width, x1), min(y + tile.height, y1))
            if rect[0] < rect[2] and rect[1] < rect[3]:
                cover.append((i, rect))
        for gap in _uncovered((x0, y0, -(-x1 // t) * t, y0 + t), [c for _, c in cover]):
            for tc, a, b in _pieces(gap[0], gap[2], t):
                band[tc, gap[1] - y0 : gap[3] - y0, a - tc * t : b - tc * t] = 0
        for i, rect in cover:
            x, y = self.tiles.place[i]
            pixels = self.tiles.pixels[i][rect[1] - y : rect[3] - y]
            for tc, a, b in _pieces(rect[0], rect[2], t):
                band[tc, rect[1] - y0 : rect[3] - y0, a - tc * t : b - tc * t] = pixels[:, a - x : b - x]
        if len(cover) < 2:
            return
        edges = np.array([c for _, c in cover])  # (n, 4): every pair's intersection at once
        lo = np.maximum(edges[:, None, :2], edges[None, :, :2])
        hi = np.minimum(edges[:, None, 2:], edges[None, :, 2:])
        for k, m in zip(*np.nonzero(np.triu((lo < hi).all(axis=2), 1)), strict=True):
            rect = (int(lo[k, m, 0]), int(lo[k, m, 1]), int(hi[k, m, 0]), int(hi[k, m, 1]))
            self._overlap(band, y0, rect, int(k), int(m), cover, edges)

    def _overlap(self, band: np.ndarray, y0: int, rect: Rect, k: int, m: int, cover: Sequence[tuple[int, Rect]], edges: np.ndarray) -> None:  # fmt: skip
        """Where tiles ``cover[k]`` and ``cover[m]`` overlap: cut at the edges of the other tiles over it into cells
        that one set of tiles covers, and blend each cell whose first two tiles (in ``cover``'s order) are these
        two, so every pixel is blended once, from every tile over it."""
        lo = np.maximum(edges[:, :2], rect[:2])
        hi = np.minimum(edges[:, 2:], rect[2:])
        over_rect = np.nonzero((lo < hi).all(axis=1))[0]
        if len(over_rect) == 2:  # only these two: most of every overlap
            self._cell(band, y0, rect, [cover[k][0], cover[m][0]])
            return
        parts = [(int(n), (int(lo[n, 0]), int(lo[n, 1]), int(hi[n, 0]), int(hi[n, 1]))) for n in over_rect]
        xs = sorted({e for _, p in parts for e in (p[0], p[2])})
        ys = sorted({e for _, p in parts for e in (p[1], p[3])})
        for ya, yb in pairwise(ys):
            for xa, xb in pairwise(xs):
                over = [n for n, p in parts if p[0] <= xa and xb <= p[2] and p[1] <= ya and yb <= p[3]]
                if over[:2] == [k, m]:
                    self._cell(band, y0, (xa, ya, xb, yb), [cover[n][0] for n in over])

    def _cell(self, band: np.ndarray, y0: int, cell: Rect, over: Sequence[int]) -> None:
        """A cell blended into the band's tiles, a TIFF tile column at a time."""
        t = band.shape[1]
        for tc, a, b in _pieces(cell[0], cell[2], t):
            out = band[tc, cell[1] - y0 : cell[3] - y0, a - tc * t : b - tc * t]
            self._blend(out, (a, cell[1], b, cell[3]), over)

    def _blend(self, out: np.ndarray, cell: Rect, over: Sequence[int]) -> None:
        """One cell from every tile in ``over`` (each covers all of it; the first wins a tie)."""
        weights = [self.weights(i, cell) for i in over]
        values = [self.pixels(i, cell) for i in over]
        rgb = out.ndim == 3
        if self.blend == "nearest":
            out[...] = values[0]
            best = weights[0]
            for w, v in zip(weights[1:], values[1:], strict=True):
                take = w > best
                np.copyto(out, v, where=take[..., None] if rgb else take)
                best = np.maximum(best, w)
            return
        if len(over) == 2:  # most of every overlap
            (wa, wb), (va, vb) = weights, values
            if out.dtype == np.uint8:  # OpenCV's one pass: (a * wa + b * wb) / (wa + wb + 1e-5), rounded
                mixed = cv2.blendLinear(va, vb, wa, wb, dst=out)
                if mixed is not out:  # OpenCV wrote elsewhere (it could not use the view)
                    out[...] = mixed
                return
            total = wa + wb
            alpha = np.divide(wa, total, out=total)  # a's share; b + (a - b) * share is exact where a == b
            mix = va.astype(np.float32)
            mix -= vb
            mix *= alpha[..., None] if rgb else alpha
            mix += vb
            out[...] = np.rint(mix, out=mix) if np.issubdtype(out.dtype, np.integer) else mix
            return
        acc = np.zeros(out.shape, np.float32)
        total = np.zeros(out.shape[:2], np.float32)
        for w, v in zip(weights, values, strict=True):
            acc += v.astype(np.float32) * (w[..., None] if rgb else w)
            total += w
        acc /= total[..., None] if rgb else total
        out[...] = _to_dtype(acc, out.dtype)


class _Shared:
    """Column strips of one band, taken in turn by every thread that joins (:meth:`work`) until none is left.

    The fusing thread works through them and the file thread joins when its reads and writes leave it time,
    so the two share the fusion however busy the file work keeps one of them.
    """

    def __init__(self, strips: Sequence[tuple[int, int]], do: Callable[[int, int], None]) -> None:
        self.left, self.do = deque(strips), do
        self.lock = threading.Lock()

    def work(self) -> None:
        while True:
            with self.lock:
                if not self.left:
                    return
                a, b = self.left.popleft()
            self.do(a, b)


def _strips(width: int, tile_px: int, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` column ranges covering 0:width, split at whole TIFF tiles."""
    across = -(-width // tile_px)
    n = max(1, min(n, across))
    cuts = [round(k * across / n) * tile_px for k in range(n + 1)]
    return [(a, min(b, width)) for a, b in pairwise(cuts) if a < min(b, width)]


def _fuse_strip(blender: _Blender, pyramid: _Pyramid, y0: int, rows: int, active: Sequence[int], x0: int, x1: int) -> None:  # fmt: skip
    """Columns x0:x1 of the band of ``rows`` rows from mosaic row y0: fused, then halved into the level below."""
    blender.fill(pyramid.band(), y0, rows, active, x0, x1)
    pyramid.halve_band(rows, x0, x1)


def fuse_tiles(
    tiles: Sequence[Tile],
    out: str | Path,
    *,
    positions: Mapping[str, tuple[float, float]] | None = None,
    blend: str = "linear",
    tile_px: int = 512,
    compression: str | None = None,
    threads: int = 2,
    pixel_size_um: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FusionResult:
    """Write the stitched image of ``tiles`` to ``out`` as a tiled, pyramidal OME-TIFF.

    Parameters
    ----------
    tiles : sequence of Tile
        The fields of view (at least one), all of one dtype and sample count.
    out : str or Path
        The file to write (replaced when it exists; written under a hidden
        temporary name beside it and renamed when whole).
    positions : mapping, optional
        Tile name -> top-left ``(x, y)`` px, e.g.
        :attr:`qc.stitching.StitchingResult.registered_positions`; default the
        tiles' nominal positions. Rounded to whole pixels.
    blend : {"linear", "nearest"}
        How overlaps are combined (see the module docstring).
    tile_px : int
        TIFF tile side and band height, px (a power of two, 16 to 4096).
    compression : {None, "zlib", "zstd"}
        TIFF compression of the tiles; default none (fastest).
    threads : int
        At most this many threads: with 1 the tiles are decoded and the bands
        fused and written in turn; with more, one reads the tiles ahead of the
        bands and writes the file while the others fuse each band (in column
        strips).
    pixel_size_um : float, optional
        Recorded in the OME-XML (PhysicalSizeX/Y).
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` after each band.

    Returns
    -------
    FusionResult
    """
    if blend not in BLENDS:
        msg = f"unknown blend {blend!r}; use one of {', '.join(BLENDS)}"
        raise ValueError(msg)
    if not 16 <= tile_px <= 4096 or tile_px & (tile_px - 1):
        msg = f"tile_px must be a power of two from 16 to 4096, got {tile_px}"
        raise ValueError(msg)
    if compression is not None and compression not in COMPRESSIONS:
        msg = f"unknown compression {compression!r}; use None or one of {', '.join(COMPRESSIONS)}"
        raise ValueError(msg)
    tiles = list(tiles)
    if not tiles:
        msg = "there are no tiles to fuse"
        raise QCError(msg, hint="Give a tile folder or a CZI mosaic")
    start = time.perf_counter()
    threads = max(1, int(threads))
    pos = {t.name: (positions or {}).get(t.name, (t.x, t.y)) for t in tiles}
    x_min = min(p[0] for p in pos.values())
    y_min = min(p[1] for p in pos.values())
    place = [(round(pos[t.name][0] - x_min), round(pos[t.name][1] - y_min)) for t in tiles]
    width = max(x + t.width for (x, _), t in zip(place, tiles, strict=True))
    height = max(y + t.height for (_, y), t in zip(place, tiles, strict=True))
    levels = _levels(height, width, tile_px)

    source = _Tiles(tiles, place)
    first = source.by_top[0]
    source.load([first], None)
    dtype, extra = source.pixels[first].dtype, tuple(source.pixels[first].shape[2:])
    source.like = (extra, dtype)
    samples = extra[0] if extra else 1
    blender = _Blender(source, blend)
    # column strips of each band, shared by the threads: several per thread, so that the file thread can take some
    strips = _strips(width, tile_px, 1 if threads == 1 else _STRIPS_PER_THREAD * threads)
    ahead = max(t.height for t in tiles)  # tiles are decoded about one tile height before the bands need them

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.partial-{writer_tag()}")
    try:
        with ExitStack() as stack:
            fh = stack.enter_context(part.open("wb"))
            io = workers = None
            if threads > 1:  # shut down (queued work cancelled) before the file closes
                io = ThreadPoolExecutor(1, thread_name_prefix="fuse-io")
                stack.callback(io.shutdown, wait=True, cancel_futures=True)
            if threads > 2:
                workers = ThreadPoolExecutor(threads - 2, thread_name_prefix="fuse")
                stack.callback(workers.shutdown, wait=True, cancel_futures=True)
            shape = (height, width, *extra)
            description = ome_description(shape, dtype, pixel_size_um=pixel_size_um)
            writer = PyramidTiffWriter(
                fh, levels, dtype, samples, tile_px, compression=compression, description=description
            )
            buffers = _Buffers()
            rows = _Rows(writer, buffers, io)
            pyramid = _Pyramid(levels, tile_px, dtype, extra, rows, buffers)
            for y0 in range(0, height, tile_px):
                y1 = min(height, y0 + tile_px)
                active = source.crossing(y0, y1)
                source.load(active, io)
                if io is not None:
                    source.prefetch(source.crossing(y1, y1 + ahead), io)
                source.hint(y1 + ahead, y1 + 2 * ahead)
                for i in active:
                    source.check(i, dtype, extra)
                shared = _Shared(strips, partial(_fuse_strip, blender, pyramid, y0, y1 - y0, active))
                joined = [pool.submit(shared.work) for pool in (io, workers) if pool is not None]
                joined += [workers.submit(shared.work) for _ in range(threads - 3)] if workers is not None else []
                shared.work()
                for f in joined:
                    f.result()
                source.drop_above(y1)
                pyramid.add(y1 - y0, last=y1 == height)
                if progress is not None:
                    progress(y1, height)
            rows.drain()
            writer.finish()
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
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
