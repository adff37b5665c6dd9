"""TileFolderImage on generated folders of every convention and the real stitch2d folder."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile

from qc.errors import CorruptImageError, UnsupportedFormatError
from qc.io import open_image
from qc.io._reduce import block_mean
from qc.io.tiles import TileFolderImage

RNG = np.random.default_rng(3)
TH, TW = 40, 50


def mosaic_tiles(rows, cols, *, rgb=False, dtype=np.uint8, overlap=0.1):
    """Cut a random mosaic into tiles at the positions overlap implies; return tiles and the mosaic."""
    sx, sy = round(TW * (1 - overlap)), round(TH * (1 - overlap))
    h, w = sy * (rows - 1) + TH, sx * (cols - 1) + TW
    shape = (h, w, 3) if rgb else (h, w)
    full = RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    return {
        (r, c): full[r * sy : r * sy + TH, c * sx : c * sx + TW].copy() for r in range(rows) for c in range(cols)
    }, full


def save(path, arr):
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
    else:
        assert cv2.imwrite(str(path), arr[..., ::-1] if arr.ndim == 3 else arr)


def test_go_optical_folder_positions_from_metadata_overlap(tmp_path):
    tiles, full = mosaic_tiles(3, 4, dtype=np.uint16, overlap=0.2)
    folder = tmp_path / "SS200000135TL_D1_CD31_IF"
    folder.mkdir()
    for (r, c), arr in tiles.items():
        save(folder / f"SS2_{r:04d}_{c:04d}_CD31.tif", arr)
    (folder / "info.json").write_text(json.dumps({"rows": 3, "cols": 4, "overlap": 0.2}))
    with open_image(folder) as img:
        assert isinstance(img, TileFolderImage)
        assert img.format == "tiles" and img.role == "IF" and img.name == "SS200000135TL_D1_CD31_IF"
        assert img.fov_grid == (3, 4) and img.position_source == "metadata overlap"
        assert (img.width, img.height) == full.shape[::-1]
        t = {(t.row, t.col): t for t in img.tiles}
        assert (t[(2, 3)].x, t[(2, 3)].y) == (120.0, 64.0)
        np.testing.assert_array_equal(t[(1, 2)].read(), tiles[(1, 2)])
        np.testing.assert_array_equal(img.plane(), full)  # tiles agree in overlaps, so the assembly is exact
        np.testing.assert_array_equal(img.read_region(33, 17, 60, 50), full[17:67, 33:93])
        np.testing.assert_array_equal(img.downsampled(4), block_mean(full, 4))
    # a site-wide overlap never overrides the microscope's own metadata
    with open_image(folder, tile_overlap=(0.3, 0.3)) as img:
        assert img.position_source == "metadata overlap" and img.overlap == (0.2, 0.2)


def test_motic_rgb_jpeg_folder_default_overlap(tmp_path):
    tiles, _ = mosaic_tiles(2, 3, rgb=True)
    folder = tmp_path / "SS200000135TL_D1"
    folder.mkdir()
    for (r, c), arr in tiles.items():
        save(folder / f"Motic_{r:04d}_{c:04d}_.png", arr)
    (folder / "info.ini").write_text("[Scan]\nRowCount=2\nColCount=3\n")
    with open_image(folder) as img:
        assert img.is_rgb and img.role == "HE" and img.position_source == "default overlap"
        assert img.overlap == (0.1, 0.1)
        t = {(t.row, t.col): t for t in img.tiles}
        assert (t[(1, 2)].x, t[(1, 2)].y) == pytest.approx((2 * TW * 0.9, TH * 0.9))
        np.testing.assert_array_equal(t[(0, 1)].read(), tiles[(0, 1)])  # PNG is lossless, RGB order kept
        assert img.downsampled(5).shape[2] == 3
    with open_image(folder, tile_overlap=(0.25, 0.05)) as img:  # no overlap in info.ini: the given one is used
        assert img.position_source == "given overlap" and img.overlap == (0.25, 0.05)
        t = {(t.row, t.col): t for t in img.tiles}
        assert (t[(1, 2)].x, t[(1, 2)].y) == pytest.approx((2 * TW * 0.75, TH * 0.95))


def test_leica_snake_folder(tmp_path):
    tiles, _full = mosaic_tiles(2, 3)
    folder = tmp_path / "leica"
    folder.mkdir()
    order = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    for i, rc in enumerate(order):
        save(folder / f"TileScan_001_s{i:02d}_ch00.tif", tiles[rc])
    with open_image(folder, name="SS200000135TL_D1") as img:
        assert img.info.convention == "leica_snake" and img.fov_grid == (2, 3)
        assert img.name == "SS200000135TL_D1"
        t = {(t.row, t.col): t for t in img.tiles}
        np.testing.assert_array_equal(t[(1, 2)].read(), tiles[(1, 2)])
        assert t[(1, 2)].name == "TileScan_001_s03_ch00.tif"


def test_leica_stage_folder_with_custom_regex_and_tile_configuration(tmp_path):
    tiles, _ = mosaic_tiles(2, 2)
    stage = tmp_path / "stage"
    stage.mkdir()
    for i, rc in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        save(stage / f"TileScan 1--Stage{i:02d}--Z00--C00.tif", tiles[rc])
    with open_image(stage) as img:
        assert img.info.convention == "leica_stage" and img.fov_grid == (2, 2)
        np.testing.assert_array_equal({(t.row, t.col): t for t in img.tiles}[(1, 0)].read(), tiles[(1, 0)])

    custom = tmp_path / "custom"
    custom.mkdir()
    lines = ["dim = 2"]
    for (r, c), arr in tiles.items():
        save(custom / f"fov-r{r}-c{c}.tif", arr)
        lines.append(f"fov-r{r}-c{c}.tif; ; ({100 + c * 47.5}, {-20 + r * 36.0})")
    (custom / "TileConfiguration.txt").write_text("\n".join(lines))
    img = TileFolderImage(custom, pattern=r"-r(?P<row>\d+)-c(?P<col>\d+)")
    assert img.position_source == "TileConfiguration"
    assert sorted((t.x, t.y) for t in img.tiles) == [(0.0, 0.0), (0.0, 36.0), (47.5, 0.0), (47.5, 36.0)]
    assert (img.width, img.height) == (98, 76)


def test_stitch2d_real_folder(shared_data):
    folder = shared_data / "tiles" / "stitch2d"
    expected = json.loads((folder / "expected_params_from_test_stitch2d.json").read_text())
    with open_image(folder) as img:
        assert img.fov_grid == (3, 2) and img.channels == ("gray",) and img.dtype == np.uint8
        by_name = {t.name: t for t in img.tiles}
        for key, fname in expected["filenames"].items():
            t = by_name[fname]
            ey, ex = expected["coords"][key]
            assert (t.height, t.width) == tuple(expected["metadata"]["tile_shape"])
            # default 10 % overlap: rows match the true layout, columns overlap ~25 % in truth
            assert abs(t.y - ey) <= 10
            assert abs(t.x - ex) <= 0.16 * t.width
        assert by_name["stitch2d_ex[Grid@1 2].jpg"].read().shape == (442, 512)
    with TileFolderImage(folder, overlap=(0.245, 0.10)) as img:
        for key, fname in expected["filenames"].items():
            t = next(t for t in img.tiles if t.name == fname)
            ey, ex = expected["coords"][key]
            assert abs(t.y - ey) <= 10 and abs(t.x - ex) <= 10


def save_folder(folder, tiles, suffix=".tif"):
    """``tiles`` ({(row, col): pixels}) written into a new ``folder`` as ``t_RRRR_CCCC_<suffix>`` files."""
    folder.mkdir()
    for (r, c), arr in tiles.items():
        save(folder / f"t_{r:04d}_{c:04d}_{suffix}", arr)
    return folder


def test_tile_digest_identity_and_errors(tmp_path):
    tiles, _ = mosaic_tiles(1, 2)
    folder = save_folder(tmp_path / "f", tiles)
    with open_image(folder) as img:
        a, b = img.tiles
        assert a.digest() != b.digest() and len(a.digest()) == 64
        assert str(folder / "t_0000_0000_.tif") in a.identity
    save(folder / "t_0000_0001_.tif", np.zeros((TH + 1, TW), np.uint8))
    with open_image(folder) as img, pytest.raises(CorruptImageError, match="first tile"):
        img.tiles[1].read()
    data = (folder / "t_0000_0001_.tif").read_bytes()
    (folder / "t_0000_0001_.tif").write_bytes(data[: len(data) // 2])
    with open_image(folder) as img, pytest.raises(CorruptImageError, match="t_0000_0001_"):
        img.tiles[1].read()
    (folder / "t_0000_0000_.tif").write_bytes(b"")
    with pytest.raises(CorruptImageError):
        open_image(folder)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_a_tile_decodes_into_memory_it_is_given_when_it_can_and_into_new_memory_when_not(tmp_path, suffix):
    tiles, _ = mosaic_tiles(1, 2)
    folder = save_folder(tmp_path / "f", tiles, suffix)
    with open_image(folder) as img:
        tile = img.tiles[1]
        tile.will_read()  # a hint to the OS; nothing to see but that it does not fail
        buf = np.full((TH, TW), 7, np.uint8)
        got = tile.read(out=buf)
        np.testing.assert_array_equal(got, tiles[(0, 1)])
        assert (got is buf) == (suffix == ".tif")  # a TIFF's pixels go straight into buf; OpenCV's elsewhere
        wrong = np.zeros((TH, TW), np.uint16)  # not the tile's dtype: left alone, a new array returned
        got = tile.read(out=wrong)
        assert got is not wrong and not wrong.any()
        np.testing.assert_array_equal(got, tiles[(0, 1)])
        (folder / f"t_0000_0001_{suffix}").unlink()
        tile.will_read()  # a file gone: still only a hint, the read says what is wrong
        with pytest.raises(CorruptImageError):
            tile.read(out=buf)


def test_truncated_jpeg_tile(tmp_path):
    tiles, _ = mosaic_tiles(1, 2)
    folder = save_folder(tmp_path / "j", tiles, ".jpg")
    (folder / "t_0000_0001_.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with open_image(folder) as img, pytest.raises(CorruptImageError, match="cannot be decoded"):
        img.tiles[1].read()


def test_folder_without_known_names(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    save(folder / "overview.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(UnsupportedFormatError, match=r"overview.tif"):
        open_image(folder)


def test_an_empty_folder_is_called_empty_not_a_naming_problem(tmp_path):
    """#15: an empty tile folder was reported as "no tile names follow a known convention"."""
    folder = tmp_path / "A02677B5"
    folder.mkdir()
    with pytest.raises(UnsupportedFormatError, match="the folder is empty") as err:
        open_image(folder)
    assert "convention" not in str(err.value) and "wait for the export to finish" in str(err.value)
    (folder / "notes.txt").write_text("scan started")
    with pytest.raises(UnsupportedFormatError, match=r"holds no image files .*notes.txt"):
        open_image(folder)


def test_a_folder_read_whole_on_threads_is_the_serial_mosaic_and_its_thumbnail_reads_nothing_again(
    tmp_path, monkeypatch
):
    """Tiles decode on the QC threads yet later tiles still win in overlaps; the thumbnail comes from the
    plane held (each tile file read once, issue #18), and each tile's reduced view is kept when asked."""
    import qc.io.tiles as tiles_mod

    rng = np.random.default_rng(8)
    folder = tmp_path / "f"
    folder.mkdir()
    for r in range(3):
        for c in range(4):  # tiles that disagree in their overlaps: only the order decides those pixels
            save(folder / f"t_{r:04d}_{c:04d}_.tif", rng.integers(0, 255, (TH, TW), dtype=np.uint8))
    with open_image(folder) as img:
        serial = img.plane()
    reads: list[str] = []
    real = tiles_mod.read_tile_file
    monkeypatch.setattr(
        tiles_mod, "read_tile_file", lambda path, *a, **k: reads.append(path.name) or real(path, *a, **k)
    )
    with open_image(folder) as img:
        img.threads, img.tile_view_factor = 2, 4
        reads.clear()
        plane = img.plane()
        np.testing.assert_array_equal(plane, serial)
        np.testing.assert_array_equal(img.downsampled(4), block_mean(serial, 4))
        assert sorted(reads) == sorted(t.name for t in img.tiles)  # once each, for both
        views = img.tile_views()
        assert set(views) == {t.name for t in img.tiles}
        first = img.tiles[0]
        assert views[first.name].shape == (TH // 4, -(-TW // 4))
        assert abs(float(views[first.name].mean()) - float(first.read().mean())) < 3
    with open_image(folder) as img:  # without a factor nothing is kept
        img.downsampled(4)
        assert img.tile_views() == {}
