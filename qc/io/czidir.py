"""The CZI (ZISRAW) container: file header, subblock directory, subblocks.

pylibCZIrw composites planes and parses metadata well but cannot hand back
one subblock's own pixels or its file offset, which the stitching metric
needs (overlapping tiles). This module reads the subblock directory and
decodes single subblocks (uncompressed, JPEG, LZW, JPEG-XR, zstd0, zstd1)
through imagecodecs. Layout, all little-endian:

- segments start with a 32-byte header: 16-byte id, allocated and used size;
- ``ZISRAWFILE`` at 0 holds the directory and metadata positions;
- ``ZISRAWDIRECTORY`` lists ``DV`` entries (32 bytes plus 20 per dimension:
  pixel type, file position, compression, pyramid type, X/Y/C/S/M... with
  start, size and stored size);
- ``ZISRAWSUBBLOCK`` repeats the entry, then (after a header of at least
  256 bytes) metadata, pixel data and attachments.

:func:`check_czi_whole` reads only these headers.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np

from qc.errors import CorruptImageError, UnsupportedFormatError
from qc.io.limits import ReadLimits, check_dimensions
from qc.io.regular import open_regular

__all__ = ["COMPRESSIONS", "PIXEL_TYPES", "CziDirectory", "SubBlockEntry", "check_czi_whole"]

#: CZI pixel type -> (numpy dtype, samples per pixel, name).
PIXEL_TYPES = {
    0: ("u1", 1, "Gray8"),
    1: ("<u2", 1, "Gray16"),
    2: ("<f4", 1, "Gray32Float"),
    3: ("u1", 3, "Bgr24"),
    4: ("<u2", 3, "Bgr48"),
    8: ("<f4", 3, "Bgr96Float"),
}
#: CZI compression codes this reader decodes.
COMPRESSIONS = {0: "uncompressed", 1: "JPEG", 2: "LZW", 4: "JPEG-XR", 5: "zstd0", 6: "zstd1"}
_CUT_SHORT = "the file was cut short (copied or exported while still being written?)"


@dataclass(frozen=True)
class SubBlockEntry:
    """One directory entry: where a subblock is and what it holds.

    ``x, y, width, height`` are the logical rectangle (CZI pixel frame, may
    be negative); ``stored_width/height`` are smaller for pyramid subblocks.
    ``dims`` maps every dimension letter to its start index.
    """

    index: int
    pixel_type: int
    file_position: int
    compression: int
    pyramid_type: int
    x: int
    y: int
    width: int
    height: int
    stored_width: int
    stored_height: int
    dims: dict[str, int]

    @property
    def c(self) -> int:
        return self.dims.get("C", 0)

    @property
    def scene(self) -> int:
        return self.dims.get("S", 0)

    @property
    def m(self) -> int | None:
        return self.dims.get("M")

    @property
    def is_layer0(self) -> bool:
        """Full resolution (not a pyramid subblock)."""
        return self.stored_width == self.width and self.stored_height == self.height

    @property
    def other_planes(self) -> tuple[tuple[str, int], ...]:
        """Indices of dimensions other than X, Y, C, S, M (Z, T, ...)."""
        return tuple(sorted((k, v) for k, v in self.dims.items() if k not in "XYCSM"))


def _entry(buf: bytes, pos: int, index: int, path: Path) -> tuple[SubBlockEntry, int]:
    if buf[pos : pos + 2] != b"DV":
        raise CorruptImageError(path, f"subblock directory entry {index} is not a DV entry")
    pixel_type, file_pos, _part, compression, pyramid = struct.unpack_from("<iqiiB", buf, pos + 2)
    (ndims,) = struct.unpack_from("<i", buf, pos + 28)
    if not 0 < ndims <= 32:
        raise CorruptImageError(path, f"subblock directory entry {index} declares {ndims} dimensions")
    dims: dict[str, int] = {}
    rect = {"X": (0, 0, 0), "Y": (0, 0, 0)}
    for k in range(ndims):
        raw, start, size, _coord, stored = struct.unpack_from("<4siifi", buf, pos + 32 + 20 * k)
        name = raw.rstrip(b"\x00 ").decode("ascii", "replace")[:1]
        dims[name] = start
        if name in rect:
            rect[name] = (start, size, stored)
    entry = SubBlockEntry(
        index,
        pixel_type,
        file_pos,
        compression,
        pyramid,
        rect["X"][0],
        rect["Y"][0],
        rect["X"][1],
        rect["Y"][1],
        rect["X"][2],
        rect["Y"][2],
        dims,
    )
    return entry, 32 + 20 * ndims


class CziDirectory:
    """The parsed header and subblock directory of a CZI file.

    Parameters
    ----------
    fh : binary file object
        Open, seekable; kept for later subblock reads.
    path : Path
        Named in messages.
    limits : ReadLimits, optional
        Subblock count and sizes are checked against it.
    """

    def __init__(self, fh: BinaryIO, path: Path, limits: ReadLimits | None = None) -> None:
        self.fh, self.path = fh, path
        self.lock = threading.Lock()
        fh.seek(0, os.SEEK_END)
        self.size = fh.tell()
        head = self._read(0, 112, "the file header")
        if head[:10] != b"ZISRAWFILE":
            raise CorruptImageError(path, "not a CZI file: the ZISRAWFILE header is missing")
        self.directory_position, self.metadata_position = struct.unpack_from("<qq", head, 84)
        if self.directory_position <= 0:
            raise CorruptImageError(path, f"the file header has no subblock directory: {_CUT_SHORT}")
        seg = self._read(self.directory_position, 64, "the subblock directory")
        if seg[:15] != b"ZISRAWDIRECTORY":
            raise CorruptImageError(path, f"no subblock directory at byte {self.directory_position}")
        (used,) = struct.unpack_from("<q", seg, 24)
        (count,) = struct.unpack_from("<i", seg, 32)
        if limits is not None:
            check_dimensions(path, 0, 0, limits, tiles=count)
        if count < 0 or used < 128 + 32 * count:
            raise CorruptImageError(path, f"the subblock directory declares {count} entries in {used} bytes")
        body = self._read(self.directory_position + 32 + 128, used - 128, "the subblock directory")
        entries, pos = [], 0
        for i in range(count):
            if pos + 32 > len(body):
                raise CorruptImageError(path, f"the subblock directory ends inside entry {i}")
            entry, n = _entry(body, pos, i, path)
            pos += n
            if limits is not None:
                check_dimensions(path, entry.width, entry.height, limits, what=f"subblock {i}")
            entries.append(entry)
        self.entries: list[SubBlockEntry] = entries

    def _read(self, offset: int, n: int, what: str) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise CorruptImageError(
                self.path, f"{what} at byte {offset} lies beyond the end of the {self.size}-byte file: {_CUT_SHORT}"
            )
        with self.lock:
            self.fh.seek(offset)
            data = self.fh.read(n)
        if len(data) != n:
            raise CorruptImageError(self.path, f"{what} at byte {offset} could not be read: {_CUT_SHORT}")
        return data

    def metadata_xml(self) -> str:
        """The XML metadata document ('' when the file has none)."""
        if self.metadata_position <= 0:
            return ""
        seg = self._read(self.metadata_position, 40, "the metadata segment")
        if seg[:14] != b"ZISRAWMETADATA":
            raise CorruptImageError(self.path, f"no metadata segment at byte {self.metadata_position}")
        (xml_size,) = struct.unpack_from("<i", seg, 32)
        xml = self._read(self.metadata_position + 32 + 256, xml_size, "the XML metadata")
        return xml.decode("utf-8", "replace")

    def _locate(self, entry: SubBlockEntry) -> tuple[int, int]:
        """(offset, size) of a subblock's pixel data, checked to lie inside the file."""
        seg = self._read(entry.file_position, 48, f"subblock {entry.index}")
        if seg[:14] != b"ZISRAWSUBBLOCK":
            raise CorruptImageError(
                self.path, f"subblock {entry.index}: no subblock segment at byte {entry.file_position}"
            )
        meta_size, _att, data_size = struct.unpack_from("<iiq", seg, 32)
        (ndims,) = struct.unpack_from("<i", self._read(entry.file_position + 48 + 28, 4, f"subblock {entry.index}"))
        header = max(256, 16 + 32 + 20 * ndims)
        start = entry.file_position + 32 + header + meta_size
        if meta_size < 0 or data_size < 0 or start + data_size > self.size:
            raise CorruptImageError(
                self.path,
                f"subblock {entry.index} data ends at byte {start + data_size} but the file has "
                f"{self.size} bytes: {_CUT_SHORT}",
            )
        return start, data_size

    def raw_data(self, entry: SubBlockEntry) -> bytes:
        """The stored (possibly compressed) bytes of a subblock."""
        start, size = self._locate(entry)
        return self._read(start, size, f"subblock {entry.index} data")

    def check(self) -> None:
        """Check that every subblock segment and its data lie inside the file."""
        for entry in self.entries:
            self._locate(entry)

    def decode(self, entry: SubBlockEntry) -> np.ndarray:
        """A subblock's pixels at stored size: 2-D grey or HxWx3 in RGB order."""
        if entry.pixel_type not in PIXEL_TYPES:
            raise UnsupportedFormatError(
                self.path, f"subblock {entry.index} has unsupported pixel type {entry.pixel_type}"
            )
        if entry.compression not in COMPRESSIONS:
            raise UnsupportedFormatError(
                self.path, f"subblock {entry.index} uses unsupported compression {entry.compression}"
            )
        dtype, samples, _ = PIXEL_TYPES[entry.pixel_type]
        h, w = entry.stored_height, entry.stored_width
        data = self.raw_data(entry)
        try:
            arr = _decode(data, entry.compression, np.dtype(dtype), samples, h, w)
        except CorruptImageError:
            raise
        except Exception as exc:  # imagecodecs raises codec-specific errors
            name = COMPRESSIONS[entry.compression]
            raise CorruptImageError(self.path, f"subblock {entry.index} ({name}) cannot be decoded ({exc})") from exc
        if arr.shape[:2] != (h, w):
            raise CorruptImageError(self.path, f"subblock {entry.index} decodes to {arr.shape[:2]}, expected {(h, w)}")
        if samples == 3 and entry.compression in (0, 2, 5, 6):
            arr = arr[..., ::-1]  # stored BGR
        return np.ascontiguousarray(arr.astype(np.dtype(dtype).newbyteorder("="), copy=False))


def _raw(buf: bytes | bytearray, dtype: np.dtype, samples: int, h: int, w: int) -> np.ndarray:
    n = h * w * samples * dtype.itemsize
    if len(buf) < n:
        msg = f"{len(buf)} bytes of pixel data, {n} needed"
        raise ValueError(msg)
    arr = np.frombuffer(buf[:n], dtype=dtype)
    return arr.reshape((h, w) if samples == 1 else (h, w, samples))


def _decode(data: bytes, compression: int, dtype: np.dtype, samples: int, h: int, w: int) -> np.ndarray:
    if compression == 0:
        return _raw(data, dtype, samples, h, w)
    if compression == 2:
        return _raw(imagecodecs.lzw_decode(data), dtype, samples, h, w)
    if compression == 5:
        return _raw(imagecodecs.zstd_decode(data), dtype, samples, h, w)
    if compression == 6:
        size = data[0] if data else 0
        if size not in (1, 3):
            msg = f"zstd1 header of {size} bytes"
            raise ValueError(msg)
        hilo = size == 3 and data[1] == 1 and bool(data[2] & 1)
        buf = imagecodecs.zstd_decode(data[size:])
        if hilo and dtype.itemsize == 2:
            n = h * w * samples
            planes = np.frombuffer(buf[: 2 * n], dtype=np.uint8).reshape(2, n)
            buf = np.stack([planes[0], planes[1]], axis=1).tobytes()  # low bytes then high bytes
        return _raw(buf, dtype, samples, h, w)
    if compression == 1:
        return imagecodecs.jpeg8_decode(data)
    if compression == 4:
        return imagecodecs.jpegxr_decode(data)
    msg = f"compression {compression}"
    raise ValueError(msg)


def check_czi_whole(source: str | Path | BinaryIO, *, limits: ReadLimits | None = None) -> None:
    """Raise :class:`CorruptImageError` unless the CZI is structurally whole.

    Whole means: the file header, the subblock directory and the metadata
    segment can be read, and every directory entry points to a subblock
    segment whose pixel data lies inside the file. Headers only: a few
    hundred bytes per subblock.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with open_regular(path) as fh:
                directory = CziDirectory(fh, path, limits)
                directory.check()
                directory.metadata_xml()
        except OSError as exc:
            raise CorruptImageError(path, f"cannot be read ({exc.strerror or exc})") from exc
        return
    directory = CziDirectory(source, Path(getattr(source, "name", "<stream>")), limits)
    directory.check()
    directory.metadata_xml()
