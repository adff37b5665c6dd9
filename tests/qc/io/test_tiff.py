"""TiffImage and check_tiff_whole on files written here with tifffile."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from qc.errors import CorruptImageError, UnsupportedFormatError
from qc.io import _tiffpage, check_tiff_whole, open_image
from qc.io._reduce import block_mean
from qc.io.tiff import TiffImage

RNG = np.random.default_rng(20240501)

DTYPES = {
    "uint8": (np.uint8, False),
    "uint16": (np.uint16, False),
    "rgb8": (np.uint8, True),
    "rgb16": (np.uint16, True),
}
LAYOUTS = {
    "striped": {"rowsperstrip": 16},
    "tiled": {"tile": (32, 48)},
}
COMPRESSIONS = {"none": None, "deflate": "zlib", "lzw": "lzw", "zstd": "zstd"}


def make(dtype: type, rgb: bool, shape: tuple[int, int] = (133, 171)) -> np.ndarray:
    full = shape + ((3,) if rgb else ())
    return RNG.integers(0, np.iinfo(dtype).max, full, dtype=dtype, endpoint=True)


def write(path: Path, arr: np.ndarray, **kwargs) -> Path:
    rgb = arr.ndim == 3
    tifffile.imwrite(path, arr, photometric="rgb" if rgb else "minisblack", **kwargs)
    return path


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", DTYPES)
def test_every_form_reads_back_exactly(tmp_path, kind, layout, compression):
    dtype, rgb = DTYPES[kind]
    arr = make(dtype, rgb)
    path = write(tmp_path / "SS200000135TL_D1.tif", arr, compression=COMPRESSIONS[compression], **LAYOUTS[layout])
    check_tiff_whole(path)
    with open_image(path) as img:
        assert isinstance(img, TiffImage)
        assert (img.width, img.height, img.dtype) == (171, 133, np.dtype(dtype))
        assert img.channels == (("R", "G", "B") if rgb else ("gray",))
        assert img.role == ("HE" if rgb else "nuclear")
        assert img.name == "SS200000135TL_D1"
        np.testing.assert_array_equal(img.plane(), arr)
        np.testing.assert_array_equal(img.read_region(37, 21, 60, 50), arr[21:71, 37:97])
        np.testing.assert_array_equal(img.read_region(170, 132, 1, 1), arr[132:133, 170:171])
        for factor in (1, 5, 8):
            np.testing.assert_array_equal(img.downsampled(factor), block_mean(arr, factor))


@pytest.mark.parametrize("kwargs", [{"bigtiff": True}, {"bigtiff": True, "tile": (64, 64), "compression": "zlib"}])
def test_bigtiff(tmp_path, kwargs):
    arr = make(np.uint16, False, (150, 130))
    path = write(tmp_path / "big.tif", arr, **kwargs)
    assert tifffile.TiffFile(path).is_bigtiff
    check_tiff_whole(path)
    with open_image(path) as img:
        np.testing.assert_array_equal(img.plane(), arr)
        np.testing.assert_array_equal(img.read_region(5, 6, 70, 80), arr[6:86, 5:75])


def test_uncompressed_plane_is_memory_mapped_read_only(tmp_path):
    arr = make(np.uint8, False)
    path = write(tmp_path / "m.tif", arr)
    with open_image(path) as img:
        plane = img.plane()
        assert isinstance(plane, np.memmap)
        assert not plane.flags.writeable
        region = img.read_region(0, 0, 10, 10)
        assert not isinstance(region, np.memmap)
        del plane


def test_big_endian_file(tmp_path):
    arr = make(np.uint16, False)
    path = write(tmp_path / "be.tif", arr, byteorder=">")
    with open_image(path) as img:
        assert img.dtype == np.dtype("uint16") and img.dtype.isnative
        np.testing.assert_array_equal(img.plane(), arr)
        np.testing.assert_array_equal(img.downsampled(4), block_mean(arr, 4))


def test_planar_separate_rgb(tmp_path):
    arr = make(np.uint8, True)
    path = tmp_path / "sep.tif"
    tifffile.imwrite(path, np.moveaxis(arr, -1, 0), photometric="rgb", planarconfig="separate", rowsperstrip=10)
    with open_image(path) as img:
        assert img.is_rgb
        np.testing.assert_array_equal(img.plane(), arr)
        np.testing.assert_array_equal(img.read_region(3, 4, 50, 40), arr[4:44, 3:53])
        np.testing.assert_array_equal(img.downsampled(3), block_mean(arr, 3))


def test_ome_tiff_channels_names_and_pixel_size(tmp_path):
    arr = make(np.uint16, False, (2, 90, 110)[1:])
    stack = np.stack([arr, arr // 2])
    path = tmp_path / "SS200000135TL_D1_CD31_IF.ome.tif"
    tifffile.imwrite(
        path,
        stack,
        metadata={
            "axes": "CYX",
            "Channel": {"Name": ["DAPI", "CD31"]},
            "PhysicalSizeX": 0.5,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 0.5,
        },
        tile=(32, 32),
        compression="zlib",
    )
    with open_image(path) as img:
        assert img.name == "SS200000135TL_D1_CD31_IF"
        assert img.role == "IF"
        assert img.channels == ("DAPI", "CD31")
        assert img.pixel_size_um == pytest.approx(0.5)
        np.testing.assert_array_equal(img.plane("CD31"), arr // 2)
        np.testing.assert_array_equal(img.plane(0), arr)
        np.testing.assert_array_equal(img.read_region(10, 20, 30, 40, channel="CD31"), (arr // 2)[20:60, 10:40])
        np.testing.assert_array_equal(img.downsampled(4, channel=1), block_mean(arr // 2, 4))
        with pytest.raises(ValueError, match="no channel 'GFP'"):
            img.plane("GFP")
        with pytest.raises(ValueError, match="no channel 2"):
            img.plane(2)


def test_pyramid_level_is_used_for_coarse_views(tmp_path):
    """Level 1 holds different content than a reduction of level 0, so the result shows which was read."""
    base = make(np.uint8, False, (256, 320))
    level1 = np.full((128, 160), 7, np.uint8)
    level2 = np.full((64, 80), 9, np.uint8)
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(base, subifds=2, tile=(64, 64), compression="zlib", metadata={"axes": "YX"})
        tw.write(level1, subfiletype=1, tile=(64, 64), compression="zlib")
        tw.write(level2, subfiletype=1, tile=(64, 64), compression="zlib")
    check_tiff_whole(path)
    with open_image(path) as img:
        assert img.levels == [(320, 256), (160, 128), (80, 64)]
        np.testing.assert_array_equal(img.downsampled(1), base)
        np.testing.assert_array_equal(img.downsampled(2), level1)
        np.testing.assert_array_equal(img.downsampled(4), level2)
        np.testing.assert_array_equal(img.downsampled(8), block_mean(level2, 2))
        # 3 is not a multiple of 2 or 4: full resolution is reduced
        np.testing.assert_array_equal(img.downsampled(3), block_mean(base, 3))


def test_imagej_resolution_gives_pixel_size(tmp_path):
    arr = make(np.uint8, False)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, arr, imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "um"})
    with open_image(path) as img:
        assert img.pixel_size_um == pytest.approx(0.65)


def test_centimetre_resolution_and_implausible_dpi(tmp_path):
    arr = make(np.uint8, False)
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, arr, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, arr, resolution=(72, 72), resolutionunit="INCH")
    with open_image(cm) as a, open_image(dpi) as b:
        assert a.pixel_size_um == pytest.approx(0.5)
        assert b.pixel_size_um is None  # 352 um/px is a software default, not a microscope


@pytest.mark.parametrize("kwargs", [{"rowsperstrip": 8}, {"tile": (32, 32), "compression": "zlib"}])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.98])
def test_truncated_files_raise_corrupt_image_error(tmp_path, kwargs, keep):
    arr = make(np.uint16, False, (200, 200))
    path = write(tmp_path / "cut.tif", arr, **kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptImageError) as info:
        check_tiff_whole(path)
    assert "cut.tif" in str(info.value) and "cut short" in str(info.value)
    with pytest.raises(CorruptImageError):
        open_image(path)


def test_truncated_header_only(tmp_path):
    path = tmp_path / "head.tif"
    path.write_bytes(b"II*\x00\x08\x00\x00\x00\x05")
    with pytest.raises(CorruptImageError, match="beyond the end"):
        check_tiff_whole(path)


def test_corrupt_compressed_tile_raises_on_read(tmp_path):
    arr = make(np.uint8, False, (128, 128))
    path = write(tmp_path / "bad.tif", arr, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    check_tiff_whole(path)  # structure is fine: only the pixels are damaged
    with open_image(path) as img:
        np.testing.assert_array_equal(img.read_region(0, 0, 64, 64), arr[:64, :64])
        with pytest.raises(CorruptImageError, match="tile 3 cannot be decoded"):
            img.read_region(64, 64, 10, 10)
        with pytest.raises(CorruptImageError):
            img.downsampled(4)


def test_ifd_loop_is_corrupt(tmp_path):
    arr = make(np.uint8, False, (16, 16))
    path = write(tmp_path / "loop.tif", arr)
    data = bytearray(path.read_bytes())
    first = int.from_bytes(data[4:8], "little")
    count = int.from_bytes(data[first : first + 2], "little")
    next_at = first + 2 + 12 * count
    data[next_at : next_at + 4] = first.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="loops"):
        check_tiff_whole(path)


def test_unsupported_pixel_layouts(tmp_path):
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, np.zeros((10, 10, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(UnsupportedFormatError):
        open_image(two)
    bits = tmp_path / "bits.tif"
    tifffile.imwrite(bits, np.zeros((10, 10), bool))
    with pytest.raises(UnsupportedFormatError):
        open_image(bits)


def test_region_outside_the_image_is_refused(tmp_path):
    path = write(tmp_path / "r.tif", make(np.uint8, False))
    with open_image(path) as img:
        for args in [(-1, 0, 5, 5), (0, 0, 0, 5), (170, 0, 5, 5), (0, 130, 5, 5)]:
            with pytest.raises(ValueError, match="not inside"):
                img.read_region(*args)
        with pytest.raises(ValueError, match="positive integer"):
            img.downsampled(0)


@pytest.mark.parametrize(
    "kwargs", [{}, {"rowsperstrip": 4, "compression": "zlib"}, {"tile": (64, 64), "compression": "zstd"}]
)
def test_downsampled_streams_in_bounded_memory(tmp_path, monkeypatch, kwargs):
    """numpy allocations are traced: the peak stays far below the full plane."""
    monkeypatch.setattr(_tiffpage, "_RAW_BAND_BYTES", 256 * 1024)
    arr = make(np.uint16, False, (2048, 2048))
    path = write(tmp_path / "s.tif", arr, **kwargs)
    expected = block_mean(arr, 8)
    raw = arr.nbytes
    del arr
    with open_image(path) as img:
        tracemalloc.start()
        try:
            out = img.downsampled(8)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(out, expected)
    assert peak < raw / 4, f"peak {peak} bytes for a {raw}-byte plane"


def test_jpeg_ycbcr_rgb_reads_as_rgb(tmp_path):
    """JPEG-compressed RGB is written as YCbCr (tifffile's and most scanners' default): it is RGB to QC."""
    y, x = np.mgrid[0:256, 0:320]
    arr = np.stack([(x * 0.7) % 256, (y * 0.9) % 256, ((x + y) * 0.4) % 256], axis=-1).astype(np.uint8)
    path = write(tmp_path / "he.tif", arr, tile=(64, 64), compression="jpeg", compressionargs={"level": 95})
    assert tifffile.TiffFile(path).pages[0].photometric == 6  # YCbCr
    with open_image(path) as img:
        assert img.is_rgb and img.role == "HE"
        plane = img.plane()
        assert plane.shape == arr.shape
        assert np.abs(plane.astype(int) - arr).mean() < 4  # lossy, and chroma subsampled
        np.testing.assert_array_equal(img.read_region(37, 21, 100, 90), plane[21:111, 37:137])
        np.testing.assert_array_equal(img.downsampled(8), block_mean(plane, 8))


@pytest.mark.parametrize(
    "kwargs", [{"tile": (32, 48), "compression": "zlib"}, {"rowsperstrip": 8, "compression": "lzw"}]
)
def test_held_plane_is_reduced_not_decoded_again(tmp_path, monkeypatch, kwargs):
    """While the caller holds the decoded plane, downsampled() reduces it (issue #16: one decode per image)."""
    arr = make(np.uint8, False, (300, 257))
    path = write(tmp_path / "d.tif", arr, **kwargs)
    with open_image(path) as img:
        img.threads = 2
        plane = img.plane()
        np.testing.assert_array_equal(plane, arr)

        def no_decode(self):
            raise AssertionError("decoded a second time")

        monkeypatch.setattr(_tiffpage.PageReader, "bands", no_decode)
        for factor in (1, 7, 20):
            np.testing.assert_array_equal(img.downsampled(factor), block_mean(arr, factor))
        del plane
        monkeypatch.undo()
        np.testing.assert_array_equal(img.downsampled(7), block_mean(arr, 7))  # streamed again once released
