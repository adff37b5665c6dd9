"""Row, window and band access to one TIFF page that decodes only what it needs.

tifffile parses the IFDs and decodes segments (strips or tiles); this module
decides which segments a request touches, reads just their bytes and pastes
the decoded pieces together. Uncompressed strips are read row by row
straight from the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from qc.errors import CorruptImageError

__all__ = ["PageReader"]

#: Uncompressed bands are read in pieces of about this many bytes.
_RAW_BAND_BYTES = 8 * 1024**2


class PageReader:
    """Decode parts of one TIFF page (an IFD: a channel or a pyramid level).

    Parameters
    ----------
    tif : tifffile.TiffFile
        The open file.
    page : tifffile.TiffPage or tifffile.TiffFrame
        The page whose segments are read.
    keyframe : tifffile.TiffPage
        The page that describes the geometry and decoding (``page`` itself
        unless ``page`` is a frame).
    path : Path
        Named in error messages.
    """

    def __init__(
        self,
        tif: tifffile.TiffFile,
        page: tifffile.TiffPage | tifffile.TiffFrame,
        keyframe: tifffile.TiffPage,
        path: Path,
    ) -> None:
        self.path = path
        self.page = page
        self.key = keyframe
        self.fh = tif.filehandle
        self.lock = self.fh.lock
        self.height, self.width = int(keyframe.imagelength), int(keyframe.imagewidth)
        self.samples = int(keyframe.samplesperpixel)
        self.separate = keyframe.planarconfig == 2 and self.samples > 1
        self.dtype = np.dtype(keyframe.dtype).newbyteorder("=")
        self.file_dtype = np.dtype(tif.byteorder + self.dtype.char)
        self.tiled = bool(keyframe.is_tiled)
        if self.tiled:
            self.seg_h, self.seg_w = int(keyframe.tilelength), int(keyframe.tilewidth)
        else:
            self.seg_h, self.seg_w = max(1, min(int(keyframe.rowsperstrip or self.height), self.height)), self.width
        self.nrows = math.ceil(self.height / self.seg_h)
        self.ncols = math.ceil(self.width / self.seg_w)
        self.per_plane = self.nrows * self.ncols
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.raw = (
            keyframe.compression == 1
            and keyframe.predictor == 1
            and keyframe.fillorder == 1
            and keyframe.bitspersample == 8 * self.dtype.itemsize
            and not self.tiled
        )
        self.memmappable = bool(page.is_memmappable) and self.file_dtype.isnative and not self.separate
        self._decode = keyframe.decode
        self._decode_args: dict[str, Any] = {"_fullsize": self.tiled}
        if keyframe.compression in (6, 7, 33007, 34892):
            self._decode_args["jpegtables"] = getattr(page, "jpegtables", None)
            self._decode_args["jpegheader"] = getattr(keyframe, "jpegheader", None)

    # ---- shapes -------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        if self.samples == 1:
            return (self.height, self.width)
        return (self.height, self.width, self.samples)

    def _empty(self, h: int, w: int) -> np.ndarray:
        return np.zeros((h, w) if self.samples == 1 else (h, w, self.samples), dtype=self.dtype)

    # ---- segment I/O --------------------------------------------------------------------

    def _read_bytes(self, index: int) -> bytes | None:
        offset, count = int(self.offsets[index]), int(self.counts[index])
        if count == 0:
            return None
        with self.lock:
            self.fh.seek(offset)
            data = self.fh.read(count)
        if len(data) != count:
            problem = f"segment {index} is truncated ({len(data)} of {count} bytes at byte {offset})"
            raise CorruptImageError(self.path, problem)
        return data

    def _decode_one(self, item: tuple[int, bytes | None]) -> np.ndarray | None:
        index, data = item
        if data is None:
            return None
        try:
            seg, _, _ = self._decode(data, index, **self._decode_args)
        except Exception as exc:  # tifffile and imagecodecs raise many types for bad data
            kind = "tile" if self.tiled else "strip"
            raise CorruptImageError(self.path, f"{kind} {index} cannot be decoded ({exc})") from exc
        if seg is None:
            return None
        decoded: np.ndarray = seg[0]  # (length, width, contig samples)
        return decoded

    def _segments(self, indices: list[int]) -> list[np.ndarray | None]:
        items = [(i, self._read_bytes(i)) for i in indices]
        if len(items) < 4:
            return [self._decode_one(it) for it in items]
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(self._decode_one, items))

    # ---- public reads -------------------------------------------------------------------

    def window(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels ``[y:y+h, x:x+w]`` (2-D, or HxWxS) decoded from the segments they touch."""
        if self.raw:
            return np.array(self.rows(y, y + h)[:, x : x + w])
        out = self._empty(h, w)
        r0, r1 = y // self.seg_h, (y + h - 1) // self.seg_h
        c0, c1 = x // self.seg_w, (x + w - 1) // self.seg_w
        planes = range(self.samples) if self.separate else [None]
        for s in planes:
            base = (s or 0) * self.per_plane
            indices = [base + r * self.ncols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
            for index, seg in zip(indices, self._segments(indices), strict=True):
                if seg is None:
                    continue
                r, c = divmod(index - base, self.ncols)
                sy, sx = r * self.seg_h, c * self.seg_w
                ya, yb = max(y, sy), min(y + h, sy + seg.shape[0], self.height)
                xa, xb = max(x, sx), min(x + w, sx + seg.shape[1], self.width)
                if ya >= yb or xa >= xb:
                    continue
                piece = seg[ya - sy : yb - sy, xa - sx : xb - sx]
                if s is not None:
                    out[ya - y : yb - y, xa - x : xb - x, s] = piece[..., 0]
                elif self.samples == 1:
                    out[ya - y : yb - y, xa - x : xb - x] = piece[..., 0]
                else:
                    out[ya - y : yb - y, xa - x : xb - x] = piece
        return out

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Full-width rows ``y0`` to ``y1`` (exclusive)."""
        if not self.raw:
            return self.window(0, y0, self.width, y1 - y0)
        out = self._empty(y1 - y0, self.width)
        row_bytes = self.width * self.file_dtype.itemsize * (1 if self.separate else self.samples)
        planes = range(self.samples) if self.separate else [None]
        for s in planes:
            base = (s or 0) * self.per_plane
            y = y0
            while y < y1:
                strip = y // self.seg_h
                last = min(y1, (strip + 1) * self.seg_h)
                index = base + strip
                start = int(self.offsets[index]) + (y - strip * self.seg_h) * row_bytes
                n = (last - y) * row_bytes
                if int(self.counts[index]) < (last - strip * self.seg_h) * row_bytes:
                    problem = f"strip {index} holds {int(self.counts[index])} bytes, too few for its rows"
                    raise CorruptImageError(self.path, problem)
                with self.lock:
                    self.fh.seek(start)
                    data = self.fh.read(n)
                if len(data) != n:
                    raise CorruptImageError(self.path, f"strip {index} is truncated at byte {start + len(data)}")
                arr = np.frombuffer(data, dtype=self.file_dtype).astype(self.dtype, copy=False)
                if s is not None:
                    out[y - y0 : last - y0, :, s] = arr.reshape(last - y, self.width)
                else:
                    out[y - y0 : last - y0] = arr.reshape(out[y - y0 : last - y0].shape)
                y = last
        return out

    def bands(self) -> Iterator[np.ndarray]:
        """Consecutive full-width row bands covering the page top to bottom."""
        if self.raw:
            row_bytes = max(1, self.width * self.dtype.itemsize * self.samples)
            step = max(1, _RAW_BAND_BYTES // row_bytes)
        else:
            step = self.seg_h
        for y in range(0, self.height, step):
            yield self.rows(y, min(self.height, y + step))

    def decode_all(self, threads: int = 1) -> np.ndarray:
        """The whole page, decoded once: by tifffile's own decoder with ``threads`` threads when it can.

        Its segments (tiles or strips) are decoded in parallel straight into the
        result, as ``tifffile.imread`` does. Whatever tifffile refuses (or a
        planar-separate page) is decoded band by band here, which names the
        strip or tile at fault when the data is bad.
        """
        if not self.separate:
            try:
                arr = self.page.asarray(maxworkers=max(1, int(threads)))
            except Exception:  # tifffile and imagecodecs raise many types for bad data: let bands() say which
                arr = None
            if arr is not None and arr.shape == self.shape:
                native: np.ndarray = arr.astype(self.dtype, copy=False)
                return native
        out = self._empty(self.height, self.width)
        y = 0
        for band in self.bands():
            out[y : y + band.shape[0]] = band
            y += band.shape[0]
        return out

    def memmap(self) -> np.ndarray:
        """The page as a read-only memory map (only when :attr:`memmappable` and read from a path)."""
        return np.memmap(self.fh.path, dtype=self.dtype, mode="r", offset=int(self.offsets[0]), shape=self.shape)
