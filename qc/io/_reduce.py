"""Area-mean reduction by an integer factor, in bounded memory.

Readers feed full-width row bands in order (:class:`BandReducer`), never the
full-resolution plane. Edge blocks average only the pixels they have.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["BandReducer", "block_mean", "check_factor", "reduce_array", "reduced_shape"]

#: Work in chunks whose float64 temporary stays under this many bytes.
_CHUNK_BYTES = 64 * 1024**2


def check_factor(factor: int) -> int:
    """Validate a reduction factor (a positive integer) and return it as int."""
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        msg = f"downsampling factor must be a positive integer, got {factor!r}"
        raise ValueError(msg)
    return int(factor)


def reduced_shape(height: int, width: int, factor: int) -> tuple[int, int]:
    """``(ceil(height / factor), ceil(width / factor))``."""
    return math.ceil(height / factor), math.ceil(width / factor)


def _cast(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        result: np.ndarray = np.clip(np.rint(mean), info.min, info.max).astype(dtype)
        return result
    return mean.astype(dtype)


def _row_accumulator(dtype: np.dtype, factor: int) -> type[np.generic]:
    """The narrowest type that sums ``factor`` rows of ``dtype`` exactly (several times faster than float64).

    Integer sums are exact in every choice, so the block means are the same as with float64.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        top = int(np.iinfo(dtype).max) - min(0, int(np.iinfo(dtype).min))
        if dtype.kind == "u" and factor * top <= np.iinfo(np.uint16).max and dtype.itemsize == 1:
            return np.uint16
        if dtype.kind == "u" and factor * top < 2**24:
            return np.float32  # integers below 2**24 are exact in float32
    return np.float64


def _block_sum(arr: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of ``factor`` x ``factor`` blocks (float64) and the rows/cols each block has.

    Whole blocks are summed through reshaped views and the partial last row
    and column of blocks separately, so the input is never copied or padded
    (numpy casts to float64 in small buffered chunks).
    """
    h, w = arr.shape[:2]
    rest = arr.shape[2:]
    oh, ow = reduced_shape(h, w, factor)
    hf, wf = h // factor * factor, w // factor * factor
    rows = np.empty((oh, w, *rest), dtype=np.float64)
    if hf:
        acc = _row_accumulator(arr.dtype, factor)
        rows[: hf // factor] = arr[:hf].reshape(hf // factor, factor, w, *rest).sum(axis=1, dtype=acc)
    if hf < h:
        rows[-1] = arr[hf:].sum(axis=0, dtype=np.float64)
    sums = np.empty((oh, ow, *rest), dtype=np.float64)
    if wf:
        sums[:, : wf // factor] = rows[:, :wf].reshape(oh, wf // factor, factor, *rest).sum(axis=2)
    if wf < w:
        sums[:, -1] = rows[:, wf:].sum(axis=1)
    rcount = np.minimum(factor, h - np.arange(oh) * factor).astype(np.float64)
    ccount = np.minimum(factor, w - np.arange(ow) * factor).astype(np.float64)
    return sums, rcount, ccount


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Area mean of ``factor`` x ``factor`` blocks of a 2-D or HxWxC array, in its dtype."""
    sums, rcount, ccount = _block_sum(arr, factor)
    count = np.outer(rcount, ccount)
    if sums.ndim == 3:
        count = count[:, :, None]
    return _cast(sums / count, arr.dtype)


class BandReducer:
    """Reduce an image fed as consecutive full-width row bands.

    Parameters
    ----------
    height, width : int
        Full-resolution size in pixels.
    factor : int
        Reduction factor.
    dtype : numpy.dtype
        Pixel type of the bands and of the result.
    samples : int or None
        Samples per pixel for HxWxS bands (RGB), ``None`` for 2-D.
    """

    def __init__(self, height: int, width: int, factor: int, dtype: np.dtype, samples: int | None = None) -> None:
        self.factor = factor
        self.width = width
        self.height = height
        oh, ow = reduced_shape(height, width, factor)
        shape = (oh, ow) if samples is None else (oh, ow, samples)
        self.out = np.zeros(shape, dtype=dtype)
        self._row = 0  # next output row
        self._fed = 0  # full-resolution rows fed so far
        self._pending: np.ndarray | None = None
        per_row = width * 8 * (samples or 1)
        self._chunk_rows = max(factor, (_CHUNK_BYTES // max(per_row, 1)) // factor * factor)

    def _emit(self, rows: np.ndarray) -> None:
        reduced = block_mean(rows, self.factor)
        self.out[self._row : self._row + reduced.shape[0]] = reduced
        self._row += reduced.shape[0]

    def feed(self, band: np.ndarray) -> None:
        """Add the next rows (``band.shape[0]`` rows of the full width)."""
        f = self.factor
        self._fed += band.shape[0]
        start = 0
        if self._pending is not None:
            need = f - self._pending.shape[0]
            block = np.concatenate([self._pending, band[:need]])
            start = min(need, band.shape[0])
            if block.shape[0] < f:
                self._pending = block
                return
            self._pending = None
            self._emit(block)
        end = start + (band.shape[0] - start) // f * f
        for s in range(start, end, self._chunk_rows):
            self._emit(band[s : min(s + self._chunk_rows, end)])
        if end < band.shape[0]:
            self._pending = np.array(band[end:])

    def finish(self) -> np.ndarray:
        """Flush the last partial block row and return the reduced image."""
        if self._pending is not None:
            self._emit(self._pending)
            self._pending = None
        return self.out


def reduce_array(arr: np.ndarray, factor: int, *, threads: int = 1) -> np.ndarray:
    """:func:`block_mean` of an array already in memory (or mapped), in row chunks on ``threads`` threads.

    Equal to ``block_mean(arr, factor)``; each chunk's float64 temporary stays
    under about 64 MB.
    """
    h, w = arr.shape[:2]
    samples = arr.shape[2] if arr.ndim == 3 else None
    oh, ow = reduced_shape(h, w, factor)
    out = np.empty((oh, ow) if samples is None else (oh, ow, samples), dtype=arr.dtype)
    per_row = w * 8 * (samples or 1)
    rows = max(factor, (_CHUNK_BYTES // max(per_row, 1)) // factor * factor)

    def work(y: int) -> None:
        out[y // factor : (min(y + rows, h) + factor - 1) // factor] = block_mean(arr[y : y + rows], factor)

    starts = range(0, h, rows)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(work, starts))
    else:
        for y in starts:
            work(y)
    return out
