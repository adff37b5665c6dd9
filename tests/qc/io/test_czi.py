"""CziImage and check_czi_whole: the real shared files and CZIs written here with pylibCZIrw."""

from __future__ import annotations

import numpy as np
import pytest
from pylibCZIrw import czi as pyczi

from qc.errors import CorruptImageError, ImageTooLargeError
from qc.io import ReadLimits, check_czi_whole, open_image
from qc.io._reduce import block_mean
from qc.io.czi import CziImage
from qc.io.czidir import CziDirectory
from tests.qc.io.helpers import declare_subblock_size, recompress_subblock_jpegxr, write_czi

RNG = np.random.default_rng(7)


def rand(shape, dtype=np.uint16):
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


# ---- real files -------------------------------------------------------------------------------


def test_mosaic_test_czi_facts(shared_data):
    path = shared_data / "czi" / "mosaic_test.czi"
    check_czi_whole(path)
    with open_image(path) as img:
        assert isinstance(img, CziImage)
        assert img.format == "czi" and img.name == "mosaic_test"
        assert img.pixel_size_um == pytest.approx(1.083, abs=5e-4)
        assert img.dtype == np.uint16 and img.channels == ("EGFP",)
        tiles = img.tiles
        assert len(tiles) == 2 and img.fov_grid == (1, 2)
        t0, t1 = tiles
        assert (t0.x, t0.y, t1.x, t1.y) == (0, 0, 832, 0)
        assert (t0.width, t0.height) == (924, 624)
        assert (img.width, img.height) == (832 + 924, 624)
        a0, a1 = t0.read(), t1.read()
        assert a0.shape == (624, 924) and a0.dtype == np.uint16
        # the composite shows tile 0 where tile 1 does not cover it, and tile 1 elsewhere
        plane = img.plane()
        np.testing.assert_array_equal(plane[:, :832], a0[:, :832])
        np.testing.assert_array_equal(plane[:, 832:], a1)
        np.testing.assert_array_equal(img.read_region(800, 100, 100, 50), plane[100:150, 800:900])
        # tiles are distinct images: the overlap is not a copy
        assert t0.digest() != t1.digest()
        assert t0.identity != t1.identity and str(path) in t0.identity


def test_tiles_czi_two_by_two_two_channels(shared_data):
    with open_image(shared_data / "czi" / "tiles.czi") as img:
        assert img.fov_grid == (2, 2)
        assert len(img.channels) == 2 and img.channels == ("Ch1", "T PMT")
        tiles = img.tiles
        assert sorted((t.row, t.col) for t in tiles) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert min(t.x for t in tiles) == 0 and min(t.y for t in tiles) == 0
        other = img.tiles_for("T PMT")
        assert [(t.row, t.col, t.x, t.y) for t in other] == [(t.row, t.col, t.x, t.y) for t in tiles]
        assert not np.array_equal(other[0].read(), tiles[0].read())
        assert img.tiles_for(1)[0].digest() == other[0].digest()
        assert img.pixel_size_um == pytest.approx(0.8303, abs=1e-3)


def test_dapi_gfp_channel_names(shared_data):
    with open_image(shared_data / "czi" / "DAPI_GFP.czi") as img:
        assert img.channels == ("DAPI", "GFP")
        assert img.tiles is None and img.fov_grid is None
        assert img.pixel_size_um is None
        dapi, gfp = img.plane("DAPI"), img.plane("GFP")
        assert dapi.shape == (640, 640) and dapi.dtype == np.uint8
        np.testing.assert_array_equal(img.plane(0), dapi)
        assert not np.array_equal(dapi, gfp)
        np.testing.assert_array_equal(img.downsampled(8, "GFP"), block_mean(gfp, 8))


def test_rgb_czi_is_rgb_and_he(shared_data):
    with open_image(shared_data / "czi" / "RGB-8bit.czi") as img:
        assert img.is_rgb and img.role == "HE"
        plane = img.plane()
        assert plane.shape == (624, 924, 3) and plane.dtype == np.uint8
        with pyczi.open_czi(str(shared_data / "czi" / "RGB-8bit.czi")) as ref:
            bgr = ref.read()
        np.testing.assert_array_equal(plane, bgr[..., ::-1])
        np.testing.assert_array_equal(img.downsampled(4), block_mean(plane, 4))


# ---- generated files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compression", [None, "zstd0:ExplicitLevel=2", "zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack"]
)
def test_generated_overlapping_mosaic_tiles_are_exact(tmp_path, compression):
    tiles = [rand((60, 80)) for _ in range(6)]
    step_x, step_y = 70, 52  # 10 px and 8 px overlaps
    placed = [(t, 100 + (i % 3) * step_x, -40 + (i // 3) * step_y, 0, 0) for i, t in enumerate(tiles)]
    path = write_czi(tmp_path / "chip.czi", placed, compression=compression, scale_um=0.5)
    check_czi_whole(path)
    with open_image(path) as img:
        assert img.fov_grid == (2, 3)
        assert img.pixel_size_um == pytest.approx(0.5)
        assert (img.width, img.height) == (2 * step_x + 80, step_y + 60)
        for t, arr in zip(img.tiles, tiles, strict=True):
            np.testing.assert_array_equal(t.read(), arr)
        assert [(t.x, t.y) for t in img.tiles] == [((i % 3) * step_x, (i // 3) * step_y) for i in range(6)]
        assert [(t.row, t.col) for t in img.tiles] == [(i // 3, i % 3) for i in range(6)]
        # the last tile is fully visible in the composite
        np.testing.assert_array_equal(img.read_region(2 * step_x, step_y, 80, 60), tiles[5])
        assert img.downsampled(4).shape == (28, 55)


def test_jpegxr_subblock_decodes_like_libczi(tmp_path):
    yy, xx = np.mgrid[0:64, 0:96]
    a = ((xx * 2 + yy) % 256).astype(np.uint8)  # smooth: compresses well
    b = rand((64, 96), np.uint8)
    path = write_czi(tmp_path / "jxr.czi", [(a, 0, 0, 0, 0), (b, 96, 0, 0, 0)])
    recompress_subblock_jpegxr(path, 0)
    with path.open("rb") as fh:
        assert CziDirectory(fh, path).entries[0].compression == 4
    check_czi_whole(path)
    with open_image(path) as img, pyczi.open_czi(str(path)) as ref:
        libczi = ref.read(roi=(0, 0, 96, 64))[..., 0]
        np.testing.assert_array_equal(img.tiles[0].read(), libczi)
        np.testing.assert_array_equal(img.tiles[0].read(), a)  # lossless
        np.testing.assert_array_equal(img.tiles[1].read(), b)


def test_generated_multichannel_names_and_tiles_for(tmp_path):
    dapi, gfp = rand((50, 70)), rand((50, 70))
    dapi2, gfp2 = rand((50, 70)), rand((50, 70))
    placed = [(dapi, 0, 0, 0, 0), (gfp, 0, 0, 1, 0), (dapi2, 65, 0, 0, 0), (gfp2, 65, 0, 1, 0)]
    path = write_czi(tmp_path / "SS200000135TL_D1_GFP_IF.czi", placed, channel_names={0: "DAPI", 1: "GFP"})
    with open_image(path) as img:
        assert img.channels == ("DAPI", "GFP")
        assert img.role == "IF" and img.name == "SS200000135TL_D1_GFP_IF"
        np.testing.assert_array_equal(img.tiles[1].read(), dapi2)
        np.testing.assert_array_equal(img.tiles_for("GFP")[1].read(), gfp2)
        np.testing.assert_array_equal(img.tiles_for(1)[0].read(), gfp)
        np.testing.assert_array_equal(img.plane("GFP")[:, 65:], gfp2)


def test_several_scenes_are_one_image(tmp_path):
    a, b = rand((40, 50), np.uint8), rand((40, 50), np.uint8)
    path = write_czi(tmp_path / "scenes.czi", [(a, 0, 0, 0, 0), (b, 300, 10, 0, 1)])
    with open_image(path) as img:
        assert img.scenes == (0, 1)
        assert [t.name for t in img.tiles] == ["S=0 M=0", "S=1 M=0"]
        assert (img.width, img.height) == (350, 50)
        np.testing.assert_array_equal(img.tiles[1].read(), b)
        np.testing.assert_array_equal(img.read_region(300, 10, 50, 40), b)


def test_sparse_mosaic_with_huge_bounding_box_is_never_allocated(tmp_path):
    a, b = rand((64, 64), np.uint8), rand((64, 64), np.uint8)
    path = write_czi(tmp_path / "sparse.czi", [(a, 0, 0, 0, 0), (b, 180_000, 150_000, 0, 0)])
    with open_image(path, limits=ReadLimits(max_plane_bytes=1 << 30)) as img:
        assert (img.width, img.height) == (180_064, 150_064)
        np.testing.assert_array_equal(img.tiles[1].read(), b)
        np.testing.assert_array_equal(img.read_region(180_000, 150_000, 64, 64), b)
        with pytest.raises(ImageTooLargeError, match="downsampled"):
            img.plane()
        coarse = img.downsampled(512)  # 352 x 294: built from the two tiles only
        assert coarse.shape == (294, 352)
        assert coarse[0, 0] == np.rint(a.sum(dtype=np.float64) / 512**2)  # area mean: empty pixels are 0
        # the last block spans x 179712..180064 and y 150016..150064 (an edge block of 352 x 48 px)
        assert coarse[-1, -1] == np.rint(b[16:].sum(dtype=np.float64) / (352 * 48))
        assert np.count_nonzero(coarse) == 3


def test_truncated_czi_is_corrupt(tmp_path):
    path = write_czi(tmp_path / "cut.czi", [(rand((100, 100)), 0, 0, 0, 0), (rand((100, 100)), 90, 0, 0, 0)])
    data = path.read_bytes()
    for keep in (0.5, 0.9, 0.99):
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CorruptImageError, match=r"cut.czi"):
            check_czi_whole(path)
        with pytest.raises(CorruptImageError):
            open_image(path)


def test_czi_header_declaring_huge_subblock_is_refused(tmp_path):
    path = write_czi(tmp_path / "liar.czi", [(rand((32, 32)), 0, 0, 0, 0)])
    declare_subblock_size(path, 0, 1_000_000, 1_000_000)
    with pytest.raises(ImageTooLargeError, match="1000000 x 1000000"):
        open_image(path)
    with pytest.raises(ImageTooLargeError):
        check_czi_whole(path, limits=ReadLimits())


def test_corrupt_zstd_subblock_raises_on_read(tmp_path):
    path = write_czi(
        tmp_path / "bad.czi",
        [(rand((64, 64)), 0, 0, 0, 0), (rand((64, 64)), 60, 0, 0, 0)],
        compression="zstd0:ExplicitLevel=1",
    )
    with path.open("rb") as fh:
        d = CziDirectory(fh, path)
        start, _ = d._locate(d.entries[1])
    data = bytearray(path.read_bytes())
    data[start : start + 16] = b"\x00" * 16
    path.write_bytes(bytes(data))
    with open_image(path) as img:
        img.tiles[0].read()
        with pytest.raises(CorruptImageError, match=r"subblock 1 .zstd0. cannot be decoded"):
            img.tiles[1].read()


def test_held_plane_is_reduced_not_decoded_again(tmp_path, monkeypatch):
    """While the caller holds the composited plane, downsampled() reduces it (issue #16: one decode per image)
    and equals what reducing the subblocks gives."""
    tiles = [rand((60, 80)) for _ in range(6)]
    placed = [(t, (i % 3) * 70, (i // 3) * 52, 0, 0) for i, t in enumerate(tiles)]
    path = write_czi(tmp_path / "chip.czi", placed, compression="zstd0:ExplicitLevel=2")
    with open_image(path) as img:
        streamed = img.downsampled(4)
        plane = img.plane()

        def no_decode(self, entry):
            raise AssertionError("decoded a second time")

        monkeypatch.setattr(CziDirectory, "decode", no_decode)
        np.testing.assert_array_equal(img.downsampled(4), block_mean(plane, 4))
        np.testing.assert_array_equal(img.downsampled(4), streamed)
