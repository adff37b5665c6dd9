"""ReadLimits: lying headers are refused before anything is allocated."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import tifffile

from qc.errors import ImageTooLargeError
from qc.io import ReadLimits, check_tiff_whole, open_image


def lying_tiff(path, width: int, height: int, *, big: bool = False) -> None:
    """A tiny TIFF whose header declares ``width`` x ``height`` 8-bit pixels in one strip."""
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 0),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 16),
    ]
    if big:
        head = b"II" + struct.pack("<HHHQ", 43, 8, 0, 16)
        ifd = struct.pack("<Q", len(tags))
        data_at = 16 + 8 + 20 * len(tags) + 8
        for tag, typ, count, value in tags:
            value = data_at if tag == 273 else value
            ifd += struct.pack("<HHQQ", tag, typ, count, value)
        ifd += struct.pack("<Q", 0)
    else:
        head = b"II" + struct.pack("<HI", 42, 8)
        ifd = struct.pack("<H", len(tags))
        data_at = 8 + 2 + 12 * len(tags) + 4
        for tag, typ, count, value in tags:
            value = data_at if tag == 273 else value
            ifd += struct.pack("<HHII", tag, typ, count, value)
        ifd += struct.pack("<I", 0)
    path.write_bytes(head + ifd + b"\x00" * 16)


@pytest.mark.parametrize("big", [False, True])
def test_huge_declared_tiff_is_refused_before_allocating(tmp_path, big):
    path = tmp_path / "liar.tif"
    lying_tiff(path, 1_000_000, 1_000_000, big=big)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            open_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "1000000 x 1000000" in str(info.value) and "liar.tif" in str(info.value)
    assert peak < 5 * 1024**2
    with pytest.raises(ImageTooLargeError):
        check_tiff_whole(path, limits=ReadLimits())


def test_small_limits_refuse_ordinary_files(tmp_path):
    path = tmp_path / "ok.tif"
    tifffile.imwrite(path, np.zeros((300, 200), np.uint8), compression="zlib")
    with pytest.raises(ImageTooLargeError, match=r"250 px per side.*raise qc.max_dimension in the config"):
        open_image(path, limits=ReadLimits(max_dimension=250))  # the hint names the limit that was exceeded
    with pytest.raises(ImageTooLargeError, match=r"50000 px.*raise qc.max_pixels in the config"):
        open_image(path, limits=ReadLimits(max_pixels=50_000))
    with open_image(path, limits=ReadLimits(max_plane_bytes=10_000)) as img:
        with pytest.raises(ImageTooLargeError, match="downsampled"):
            img.plane()
        assert img.downsampled(4).shape == (75, 50)
        assert img.read_region(0, 0, 10, 10).shape == (10, 10)


def test_defaults_and_validation():
    limits = ReadLimits()
    assert limits.max_dimension >= 400_000  # a 10 cm chip at 0.25 um/px
    assert limits.max_pixels >= 40_000**2 * 4
    with pytest.raises(ValueError, match="max_dimension"):
        ReadLimits(max_dimension=0)
    with pytest.raises(AttributeError):
        limits.max_dimension = 5  # frozen
