"""Writers for test inputs: CZIs through pylibCZIrw, and byte-level patches of them."""

from __future__ import annotations

import struct
from pathlib import Path

import imagecodecs
import numpy as np
from pylibCZIrw import czi as pyczi

from qc.io.czidir import CziDirectory


def write_czi(
    path: Path,
    tiles: list[tuple[np.ndarray, int, int, int, int]],
    *,
    compression: str | None = None,
    channel_names: dict[int, str] | None = None,
    scale_um: float | None = None,
) -> Path:
    """Write ``(array, x, y, channel, scene)`` tiles with pylibCZIrw (arrays are HxW or HxWx3 RGB)."""
    with pyczi.create_czi(str(path), exist_ok=True, compression_options=compression) as w:
        for arr, x, y, c, s in tiles:
            data = arr[..., ::-1] if arr.ndim == 3 else arr  # pylibCZIrw takes BGR
            w.write(np.ascontiguousarray(data), location=(x, y), plane={"C": c}, scene=s)
        kwargs = {}
        if scale_um is not None:  # the XML stores metres (pylibCZIrw writes the value as given)
            kwargs = {"scale_x": scale_um * 1e-6, "scale_y": scale_um * 1e-6}
        w.write_metadata(document_name="test", channel_names=channel_names, **kwargs)
    return path


def _entry_offsets(path: Path) -> tuple[CziDirectory, list[int]]:
    """The directory and the file offset of each directory entry."""
    fh = path.open("rb")
    d = CziDirectory(fh, path)
    offsets, pos = [], d.directory_position + 32 + 128
    for _ in d.entries:
        fh.seek(pos + 28)
        (ndims,) = struct.unpack("<i", fh.read(4))
        offsets.append(pos)
        pos += 32 + 20 * ndims
    return d, offsets


def recompress_subblock_jpegxr(path: Path, index: int) -> None:
    """Re-encode one uncompressed subblock as lossless JPEG-XR, in place (the data shrinks)."""
    d, offsets = _entry_offsets(path)
    entry = d.entries[index]
    start, size = d._locate(entry)
    pixels = d.decode(entry)
    d.fh.close()
    encoded = imagecodecs.jpegxr_encode(pixels, level=1.0)
    assert len(encoded) <= size, "JPEG-XR did not shrink the subblock"
    with path.open("r+b") as fh:
        fh.seek(start)
        fh.write(encoded)
        fh.seek(entry.file_position + 32 + 8)
        fh.write(struct.pack("<q", len(encoded)))
        fh.seek(entry.file_position + 32 + 16 + 18)  # embedded DV entry: compression
        fh.write(struct.pack("<i", 4))
        fh.seek(offsets[index] + 18)  # directory entry: compression
        fh.write(struct.pack("<i", 4))


def declare_subblock_size(path: Path, index: int, width: int, height: int) -> None:
    """Overwrite a directory entry's X/Y size and stored size (a lying header)."""
    d, offsets = _entry_offsets(path)
    fh = d.fh
    fh.seek(offsets[index] + 28)
    (ndims,) = struct.unpack("<i", fh.read(4))
    fh.seek(offsets[index] + 32)
    dims = [struct.unpack("<4siifi", fh.read(20)) for _ in range(ndims)]
    fh.close()
    with path.open("r+b") as out:
        for k, (name, _start, _size, _coord, _stored) in enumerate(dims):
            value = {b"X": width, b"Y": height}.get(name.rstrip(b"\x00 "))
            if value is not None:
                out.seek(offsets[index] + 32 + 20 * k + 8)
                out.write(struct.pack("<i", value))
                out.seek(offsets[index] + 32 + 20 * k + 16)
                out.write(struct.pack("<i", value))
